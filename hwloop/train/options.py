"""What a fine-tuning run is asked to do: :class:`FinetuneOptions`, and the comparison of a
checkpoint's options and inputs with a run's (``--resume``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hwloop.train.hil import FinetuneConfig

__all__ = ["DEFAULT_DEVICE", "FinetuneOptions", "REPO_ROOT", "RESULT_OPTIONS", "input_mismatches",
           "normalize_dataset", "option_mismatches"]

REPO_ROOT = Path(__file__).resolve().parents[2]


DEFAULT_DEVICE = "devices/emulator-analog.yaml"


def normalize_dataset(name: str) -> str:
    """``fashion_mnist``, ``Fashion-MNIST`` -> ``fashion-mnist`` (the one spelling recorded)."""
    return str(name).strip().lower().replace("_", "-") if isinstance(name, str) else name


class FinetuneOptions(BaseModel):
    """Everything `hwloop finetune` needs; every field has an embedded default."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("dataset", mode="before")
    @classmethod
    def _dataset_spelling(cls, v):
        return normalize_dataset(v)

    device: str = Field(default=DEFAULT_DEVICE, description="profile path, serial URL/port or VISA resource")
    chip_seed: Optional[int] = Field(default=None, description="emulator chip instance (frozen mismatch)")
    profile_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="emulator only: profile fields to change, dotted for nested ones "
                    "(e.g. {'weight_bits': 4, 'mismatch.synapse_gain_sd': 0.05})")
    dataset: str = Field(default="fashion-mnist", pattern="^(fashion-mnist|mnist|synthetic)$")
    data_dir: Optional[str] = None
    arch: str = Field(default="fc2", pattern="^(fc2|fc16|lenet5|vgg16)$")
    pretrain_recipe: str = "default"
    pretrain_epochs: Optional[int] = Field(default=None, ge=0)
    train_subset: Optional[int] = Field(default=None, ge=1)
    test_subset: Optional[int] = Field(default=None, ge=1)
    window_percentile: Optional[float] = Field(default=None, gt=0, le=100)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    out: str = "runs/finetune"
    resume: bool = False
    calibration: Optional[str] = None
    cache_dir: Optional[str] = None
    eval_batch_size: int = Field(default=1000, ge=1)
    eval_repeats: int = Field(default=1, ge=1, le=100,
                              description="evaluate the device this many times (fresh jitter each), "
                                          "before and after fine-tuning: mean, SD, min, max")
    progress: bool = True
    plots: bool = Field(default=True, description="write the PNG plots beside the report")


#: the options that change a run's result, compared on ``--resume`` (``out``, ``resume``,
#: ``cache_dir`` and ``progress`` do not change it). The device is compared by what it is, not
#: by the string that reached it (a virtual chip restarted on another port is the same chip): its
#: device id and, for an emulator, its profile's content. The data, the twin and the calibration
#: record are compared by content as well (see ``inputs`` in :func:`run_finetune`).
RESULT_OPTIONS = ("chip_seed", "profile_overrides", "dataset", "data_dir", "arch",
                  "pretrain_recipe", "pretrain_epochs", "train_subset", "test_subset",
                  "window_percentile", "finetune", "calibration", "eval_batch_size",
                  "eval_repeats")


def option_mismatches(saved: dict, opts: FinetuneOptions) -> list[str]:
    """Every result-changing option (:data:`RESULT_OPTIONS`) whose value in a checkpoint's
    ``options`` differs from ``opts``, as ``"name: checkpoint X, now Y"`` (nested fine-tuning
    options dotted, e.g. ``finetune.lr``)."""
    now = opts.model_dump(mode="json")
    defaults = FinetuneOptions().model_dump(mode="json") if saved else {}
    out = []
    for k in RESULT_OPTIONS:
        a, b = saved.get(k, defaults.get(k)), now.get(k)  # an option newer than the checkpoint: its default
        if isinstance(b, dict) and isinstance(a, dict):
            out += [f"{k}.{kk}: checkpoint {a.get(kk)!r}, now {vv!r}" for kk, vv in b.items()
                    if a.get(kk) != vv]
            out += [f"{k}.{kk}: checkpoint {a[kk]!r}, now absent" for kk in a if kk not in b]
        elif a != b:
            out.append(f"{k}: checkpoint {a!r}, now {b!r}")
    return out


def input_mismatches(saved: dict, now: dict) -> list[str]:
    """Every content record of :func:`run_inputs` that differs (keys present in ``now``)."""
    return [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in now.items() if saved.get(k) != v]
