"""Training recipes: optimiser and learning-rate schedule of a software training run
(:class:`Recipe`, the named :data:`RECIPES`, :func:`lr_factor`). Used by
:func:`hwloop.train.software.train`, which re-exports them; the measurements behind the default
recipe are in that module's docstring."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from hwloop.errors import DataError

__all__ = ["OPTIMIZERS", "RECIPES", "SCHEDULES", "Recipe", "lr_factor", "resolve_recipe"]

SCHEDULES = ("cosine", "exponential", "constant", "onecycle")
OPTIMIZERS = ("adam", "adamw")


@dataclass(frozen=True)
class Recipe:
    """Optimiser and schedule of a training run (all JSON-serialisable)."""

    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.05
    batch_size: int = 128
    epochs: int = 30
    schedule: str = "cosine"
    warmup_fraction: float = 0.0  # cosine/onecycle: fraction of steps with a linear warm-up
    decay_rate: float = 0.9  # exponential: lr *= decay_rate every decay_steps steps
    decay_steps: int = 5000
    label_smoothing: float = 0.1
    shift: int = 0  # random translation by up to this many pixels (images only)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise DataError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise DataError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not (self.lr > 0 and self.batch_size >= 1 and self.epochs >= 0):
            raise DataError(
                f"need lr > 0, batch_size >= 1, epochs >= 0 (got {self.lr}, "
                f"{self.batch_size}, {self.epochs})"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise DataError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.shift < 0 or self.weight_decay < 0 or not 0.0 <= self.warmup_fraction < 1.0:
            raise DataError("shift and weight_decay must be >= 0, warmup_fraction in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RECIPES: dict[str, Recipe] = {
    "default": Recipe(),
    "reference": Recipe(
        optimizer="adam",
        lr=5e-4,
        weight_decay=0.0,
        batch_size=8,
        epochs=10,
        schedule="exponential",
        decay_rate=0.9,
        decay_steps=5000,
        label_smoothing=0.0,
    ),
}


def lr_factor(recipe: Recipe, step: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based)."""
    if recipe.schedule == "constant":
        return 1.0
    if recipe.schedule == "exponential":
        return recipe.decay_rate ** (step / recipe.decay_steps)
    total = max(1, total_steps)
    warm = int(recipe.warmup_fraction * total)
    if recipe.schedule == "onecycle" and warm == 0:
        warm = max(1, int(0.3 * total))
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_recipe(recipe: Recipe | str | None, overrides: dict[str, Any]) -> Recipe:
    """``recipe`` (a Recipe, a name in :data:`RECIPES`, None for the default) with the
    non-None ``overrides`` of its fields."""
    if recipe is None:
        recipe = "default"
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise DataError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
        recipe = RECIPES[recipe]
    changes = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(recipe, **changes) if changes else recipe
