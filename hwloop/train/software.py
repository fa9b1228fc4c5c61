"""Plain software training of a ReLU twin or a TTFS network (no device in the loop).

The same optimiser runs on either model. A :class:`~hwloop.ttfs.TTFSNetwork` (B1) gets the
adaptive window rule, Eq. (8), after every optimiser step, applied to the spike times of that
step's batch; because the B1 mapping is the identity, its trajectory equals the ReLU twin's.

Default recipe (``RECIPES["default"]``), chosen by measurement for FC2 on Fashion-MNIST
(784-340-10, Glorot init): AdamW, lr 2e-3, decoupled weight decay 0.05, batch 128, cosine decay
to zero over 30 epochs (no warm-up), label smoothing 0.1, no augmentation. Seeds 0/1/2 gave
90.46 / 90.30 / 90.50 % test accuracy (ReLU, about 1-2 CPU minutes each on 1-2 cores; the
paper: 90.14 %). Random 1-px shifts made FC2 worse at 30-50 epochs; lr 1e-3 gave 90.20-90.65 %. The reference recipe
of the paper's public implementation is kept as ``RECIPES["reference"]`` (Adam 5e-4, x0.9 every
5000 steps, batch 8, 10 epochs: about 89.2 %). See docs/tutorial.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hwloop.data.datasets import iterate_batches
from hwloop.errors import CheckpointError, DataError
from hwloop.train.checkpoint import load_checkpoint, save_checkpoint
from hwloop.train.progress import interactive
from hwloop.train.recipe import RECIPES, Recipe, lr_factor, resolve_recipe

__all__ = [
    "RECIPES",
    "Recipe",
    "evaluate",
    "lr_factor",
    "prediction_agreement",
    "random_shift",
    "train",
]


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each image of ``x`` (B, C, H, W) by its own random offset in
    [-max_shift, max_shift] pixels in both directions, filling with zeros."""
    if max_shift <= 0:
        return x
    if x.ndim != 4:
        raise DataError(f"random_shift needs (B, C, H, W) images, got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    s = int(max_shift)
    padded = F.pad(x, (s, s, s, s))
    oy = torch.randint(0, 2 * s + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * s + 1, (b,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]  # (B,1,H,1)
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]  # (B,1,1,W)
    bi = torch.arange(b)[:, None, None, None]
    ci = torch.arange(x.shape[1])[None, :, None, None]
    return padded[bi, ci, rows, cols]


def _is_ttfs(model: nn.Module) -> bool:
    return hasattr(model, "adapt_windows") and hasattr(model, "spike_times")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.float32


def _weighted_merge(acc: Any, new: Any, weight: float) -> Any:
    """Accumulate ``weight * new`` into ``acc`` for numbers, lists and dicts of numbers."""
    if isinstance(new, dict):
        acc = {} if acc is None else acc
        return {k: _weighted_merge(acc.get(k), v, weight) for k, v in new.items()}
    if isinstance(new, (list, tuple)):
        acc = [None] * len(new) if acc is None else acc
        return [_weighted_merge(a, v, weight) for a, v in zip(acc, new)]
    value = float(new) * weight
    return value if acc is None else acc + value


def _scale(acc: Any, factor: float) -> Any:
    if isinstance(acc, dict):
        return {k: _scale(v, factor) for k, v in acc.items()}
    if isinstance(acc, list):
        return [_scale(v, factor) for v in acc]
    return acc * factor


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 1000,
    spikes: bool | None = None,
) -> dict[str, Any]:
    """Accuracy and mean cross-entropy of ``model`` on ``(x, y)``; for a TTFS network also the
    average spikes per neuron (``spikes_per_neuron``), averaged over samples."""
    was_training = model.training
    model.eval()
    spikes = _is_ttfs(model) if spikes is None else spikes
    dtype = _model_dtype(model)
    correct, loss_sum, spk = 0, 0.0, None
    n = int(x.shape[0])
    try:
        for xb, yb in iterate_batches(x, y, batch_size):
            xb = xb.to(dtype)
            if spikes:
                stages, logits = model.run(model.encode(xb)) if hasattr(model, "run") else (
                    model.spike_times(xb), model(xb))
                spk = _weighted_merge(spk, model.spikes_per_neuron(stages), xb.shape[0])
            else:
                logits = model(xb)
            loss_sum += float(F.cross_entropy(logits.float(), yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    out: dict[str, Any] = {
        "accuracy": correct / max(n, 1),
        "loss": loss_sum / max(n, 1),
        "n": n,
    }
    if spikes and spk is not None:
        out["spikes_per_neuron"] = _scale(spk, 1.0 / n)
    return out


@torch.no_grad()
def prediction_agreement(a: nn.Module, b: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> float:
    """Fraction of samples on which ``a`` and ``b`` predict the same class."""
    same, n = 0, int(x.shape[0])
    da, db = _model_dtype(a), _model_dtype(b)
    for start in range(0, n, batch_size):
        xb = x[start : start + batch_size]
        same += int((a(xb.to(da)).argmax(1) == b(xb.to(db)).argmax(1)).sum())
    return same / max(n, 1)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _interactive() -> bool:
    return interactive()


@dataclass
class _Run:
    """The state of one :func:`train` call, shared by its steps."""

    model: nn.Module
    rec: Recipe
    x_train: torch.Tensor
    y_train: torch.Tensor
    ttfs: bool
    adapt: bool
    dtype: torch.dtype
    out: Path | None
    ckpt_path: Path | None
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    steps_per_epoch: int
    total_steps: int
    progress: bool
    tqdm: Any = None
    step: int = 0
    start_epoch: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    elapsed_before: float = 0.0
    t0: float = 0.0

    def wall_time(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0


def _setup(model: nn.Module, train_set: tuple[torch.Tensor, torch.Tensor], rec: Recipe, seed: int,
           out_dir: str | os.PathLike | None, progress: bool, adapt_windows: bool | None,
           resume: bool) -> _Run:
    """Check the data, build the optimiser and the generator, resume from the checkpoint."""
    x_train, y_train = train_set
    if x_train.shape[0] != y_train.shape[0] or x_train.shape[0] == 0:
        raise DataError(
            f"training set needs as many labels as images and at least one sample "
            f"(got {x_train.shape[0]} images, {y_train.shape[0]} labels)"
        )
    ttfs = _is_ttfs(model)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    opt_cls = torch.optim.AdamW if rec.optimizer == "adamw" else torch.optim.Adam
    steps_per_epoch = math.ceil(x_train.shape[0] / rec.batch_size)
    run = _Run(
        model=model, rec=rec, x_train=x_train, y_train=y_train, ttfs=ttfs,
        adapt=ttfs if adapt_windows is None else bool(adapt_windows and ttfs),
        dtype=_model_dtype(model), out=out, ckpt_path=out / "checkpoint.pt" if out is not None else None,
        optimizer=opt_cls(model.parameters(), lr=rec.lr, weight_decay=rec.weight_decay),
        generator=torch.Generator().manual_seed(int(seed)), steps_per_epoch=steps_per_epoch,
        total_steps=steps_per_epoch * rec.epochs, progress=progress,
    )
    ckpt = run.ckpt_path
    if resume and ckpt is not None and (ckpt.exists() or Path(str(ckpt) + ".prev").exists()):
        _resume(run)
    try:
        from tqdm.auto import tqdm  # optional: tqdm.auto may pull in ipywidgets; absent = no bar
        run.tqdm = tqdm
    except ImportError:  # pragma: no cover
        run.progress = False
    return run


def _resume(run: _Run) -> None:
    """Restore model, optimiser, generator, step and history from ``run.ckpt_path``."""
    state = load_checkpoint(run.ckpt_path, fallback=True)
    if state.get("recipe") != run.rec.to_dict():
        raise CheckpointError(
            f"{run.ckpt_path} was written with recipe {state.get('recipe')}, not {run.rec.to_dict()}"
        )
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.generator.set_state(state["generator"])  # windows are buffers: restored with the model
    run.step, run.start_epoch = int(state["step"]), int(state["epoch"]) + 1
    run.history = list(state.get("history", []))
    run.elapsed_before = float(state.get("wall_time_s", 0.0))


def _train_step(run: _Run, xb: torch.Tensor, yb: torch.Tensor, epoch: int) -> tuple[float, torch.Tensor, bool]:
    """One optimiser step on a batch: (loss, logits, whether the windows grew)."""
    rec, model, optimizer = run.rec, run.model, run.optimizer
    if rec.shift:
        xb = random_shift(xb, rec.shift, run.generator)
    xb = xb.to(run.dtype)
    factor = lr_factor(rec, run.step, run.total_steps)
    for group in optimizer.param_groups:
        group["lr"] = rec.lr * factor
    if run.adapt:
        stages, logits = model.run(model.encode(xb))
    else:
        logits = model(xb)
    loss = F.cross_entropy(logits, yb, label_smoothing=rec.label_smoothing)
    loss_value = float(loss.detach())
    if not math.isfinite(loss_value):
        raise DataError(f"training diverged: loss {loss_value} at step {run.step} (epoch {epoch})")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    grew = bool(model.adapt_windows([s.detach() for s in stages])) if run.adapt else False
    run.step += 1
    return loss_value, logits, grew


def _run_epoch(run: _Run, epoch: int, max_steps: int | None) -> tuple[dict[str, Any], bool]:
    """One pass over the shuffled training set: (the epoch's record, whether max_steps stopped it)."""
    rec = run.rec
    run.model.train()
    loss_sum, correct, seen, windows_grew = 0.0, 0, 0, 0
    stopped_early = False
    batches = iterate_batches(run.x_train, run.y_train, rec.batch_size, shuffle=True, generator=run.generator)
    bar = None
    if run.progress and _interactive():  # a live bar on a terminal only; epoch lines always
        bar = run.tqdm(batches, total=run.steps_per_epoch, desc=f"epoch {epoch + 1}/{rec.epochs}",
                       leave=False, dynamic_ncols=True)
        batches = bar
    for xb, yb in batches:
        loss_value, logits, grew = _train_step(run, xb, yb, epoch)
        windows_grew += grew
        n = int(yb.shape[0])
        loss_sum += loss_value * n
        correct += int((logits.detach().argmax(1) == yb).sum())
        seen += n
        if bar is not None and run.step % 20 == 0:
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
        if max_steps is not None and run.step >= max_steps:
            stopped_early = True
            break
    if bar is not None:
        bar.close()
    record: dict[str, Any] = {
        "epoch": epoch,
        "step": run.step,
        "train_loss": loss_sum / max(seen, 1),
        "train_accuracy": correct / max(seen, 1),
        "lr": rec.lr * lr_factor(rec, max(run.step - 1, 0), run.total_steps),
    }
    if run.adapt:
        record["windows_grew_steps"] = windows_grew
    return record, stopped_early


def _evaluate_epoch(run: _Run, record: dict[str, Any], test_set: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Add the test accuracy, loss and (TTFS) spikes per neuron to an epoch's record."""
    if test_set is None:
        return
    ev = evaluate(run.model, *test_set, spikes=run.ttfs)
    record["test_accuracy"] = ev["accuracy"]
    record["test_loss"] = ev["loss"]
    if "spikes_per_neuron" in ev:
        record["spikes_per_neuron"] = ev["spikes_per_neuron"]


def _log_epoch(run: _Run, record: dict[str, Any]) -> None:
    """The epoch's line on stderr."""
    msg = (f"epoch {record['epoch'] + 1}/{run.rec.epochs}: train loss {record['train_loss']:.4f} "
           f"acc {record['train_accuracy']:.4f}")
    if "test_accuracy" in record:
        msg += f", test acc {record['test_accuracy']:.4f}"
    if "spikes_per_neuron" in record:
        spn = record["spikes_per_neuron"]  # a TTFS net's is per layer, with the "total"
        msg += f", spikes/neuron {float(spn['total'] if isinstance(spn, dict) else spn):.3f}"
    msg += f", {record['wall_time_s']:.1f} s"
    run.tqdm.write(msg, file=sys.stderr)


def _save_epoch_checkpoint(run: _Run, epoch: int, wall_time_s: float) -> None:
    """``checkpoint.pt`` after an epoch (atomically, the previous one kept as ``.prev``)."""
    if run.ckpt_path is None:
        return
    model = run.model
    state = {
        "model": model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "generator": run.generator.get_state(),
        "epoch": epoch,
        "step": run.step,
        "recipe": run.rec.to_dict(),
        "history": run.history,
        "wall_time_s": wall_time_s,
    }
    if hasattr(model, "windows"):
        state["windows"] = [list(w) for w in model.windows()]
    save_checkpoint(run.ckpt_path, state)


def _final_report(run: _Run, seed: int, test_set: tuple[torch.Tensor, torch.Tensor] | None,
                  last: dict[str, Any], stopped_early: bool,
                  extra_report: dict[str, Any] | None) -> dict[str, Any]:
    """The report :func:`train` returns (and writes as ``report.json``); ``last`` is the record
    of the last epoch this call ran (empty if none)."""
    model = run.model
    report: dict[str, Any] = {
        "model_class": type(model).__name__,
        "ttfs": run.ttfs,
        "recipe": run.rec.to_dict(),
        "seed": int(seed),
        "epochs_run": len(run.history),
        "steps": run.step,
        "n_train": int(run.x_train.shape[0]),
        "n_test": int(test_set[0].shape[0]) if test_set is not None else 0,
        "train_loss": last.get("train_loss"),
        "train_accuracy": last.get("train_accuracy"),
        "test_accuracy": last.get("test_accuracy"),
        "test_loss": last.get("test_loss"),
        "wall_time_s": run.wall_time(),
        "history": run.history,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "stopped_early": stopped_early,
    }
    if run.ttfs:
        report["spikes_per_neuron"] = last.get("spikes_per_neuron")
        if hasattr(model, "windows"):
            report["windows"] = [list(w) for w in model.windows()]
    if extra_report:
        report.update(extra_report)
    return report


def train(
    model: nn.Module,
    train_set: tuple[torch.Tensor, torch.Tensor],
    test_set: tuple[torch.Tensor, torch.Tensor] | None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    schedule: str | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    *,
    recipe: Recipe | str | None = None,
    weight_decay: float | None = None,
    label_smoothing: float | None = None,
    shift: int | None = None,
    adapt_windows: bool | None = None,
    resume: bool = False,
    max_steps: int | None = None,
    extra_report: dict[str, Any] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place and return a JSON-able report.

    Args:
        model: a ReLU ``nn.Module`` or a :class:`~hwloop.ttfs.TTFSNetwork`.
        train_set, test_set: ``(images, labels)`` tensors (images in [0, 1]); ``test_set`` may
            be None (no evaluation).
        epochs, batch_size, lr, schedule, weight_decay, label_smoothing, shift: override the
            fields of ``recipe`` (``"default"`` unless given; see :data:`RECIPES`).
        seed: seeds the shuffling and augmentation generator (initialise the model yourself).
        out_dir: if given, ``checkpoint.pt`` is saved there after every epoch (atomically, the
            previous one kept as ``checkpoint.pt.prev``) and ``report.json`` at the end.
        progress: one line per epoch on stderr, and a tqdm bar when stderr is a terminal.
        adapt_windows: apply Eq. (8) after every step (default: when the model has windows).
        resume: continue from ``out_dir/checkpoint.pt`` if it exists.
        max_steps: stop after this many optimiser steps (for smoke tests).
        on_epoch: called with each epoch's record.

    Report keys: ``test_accuracy``, ``test_loss``, ``train_loss``, ``train_accuracy``,
    ``spikes_per_neuron`` (TTFS networks), ``wall_time_s``, ``recipe``, ``history``, ...
    """
    rec = resolve_recipe(
        recipe,
        dict(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            schedule=schedule,
            weight_decay=weight_decay,
            label_smoothing=label_smoothing,
            shift=shift,
        ),
    )
    run = _setup(model, train_set, rec, seed, out_dir, progress, adapt_windows, resume)
    run.t0 = time.perf_counter()
    last: dict[str, Any] = {}
    stopped_early = False
    for epoch in range(run.start_epoch, rec.epochs):
        record, stopped_early = _run_epoch(run, epoch, max_steps)
        _evaluate_epoch(run, record, test_set)
        record["wall_time_s"] = run.wall_time()
        run.history.append(record)
        last = record
        if run.progress:
            _log_epoch(run, record)
        _save_epoch_checkpoint(run, epoch, record["wall_time_s"])
        if on_epoch is not None:
            on_epoch(record)
        if stopped_early:
            break
    report = _final_report(run, seed, test_set, last, stopped_early, extra_report)
    if run.out is not None:
        _write_json(run.out / "report.json", report)
    return report
