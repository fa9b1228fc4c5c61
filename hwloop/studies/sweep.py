"""Sweeps of device-profile knobs: the paper's constraint studies (Fig. 5 a-d) on any device.

A sweep is

* a **base profile** (``devices/emulator-ideal.yaml`` by default: every non-ideality off, so a
  knob studies one constraint alone, as the paper does);
* **fixed overrides** (``--set FIELD=VALUE``), e.g. several constraints at once;
* zero, one or two **knobs**, each with its values (two knobs make a grid, plotted as a heat
  map; no knob makes a single point per seed, e.g. the combined-constraints study);
* **seeds** and the number of **fine-tuning epochs**.

Every point is one :func:`hwloop.train.finetune.run_finetune` call, which measures the device
before fine-tuning and after E epochs of hardware-in-the-loop fine-tuning. A point's profile is
built in this order: base profile, the knob's implied settings (:attr:`Knob.implies`), the fixed
overrides, the knob values.

Outputs in ``--out``:

* ``results.jsonl``: one line per finished point, appended (one ``write``, flushed and fsynced)
  by the parent process only as each point finishes;
* ``results.csv`` and ``results.json`` (points, and a summary over seeds), rewritten at the end
  (and kept in step while the sweep runs);
* a PNG plot (:mod:`hwloop.studies.plots`);
* ``points/<point>/``: each point's ``report.json``, ``log.jsonl``, ``run.log`` and final
  weights.

**Resumable.** A point is identified by its key: knob values, seed, epochs and a hash of
everything else that changes its result (the base profile's *content*, the fixed overrides, data
set, subsets, architecture, learning rate, ...). A rerun of the same command skips the keys
already in ``results.jsonl`` and runs only the missing ones; a point interrupted mid-fine-tuning
resumes from its last epoch checkpoint; one whose report was written but not yet recorded is
recorded without running again.

**Seeds.** ``seed_mode="chip"`` (default): seed s is chip instance s (the frozen mismatch draw) and
the fine-tuning run's noise; the ReLU twin and the batch order are shared by all seeds (seed
``twin_seed``), so seeds cost no extra pre-training. ``seed_mode="all"``: seed s also trains its
own ReLU twin (the model cache keeps it) and orders the batches, the paper's ``mean +- sd``
over independently trained networks. On a deterministic profile (no mismatch, no jitter) chip
seeds give identical points.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm import tqdm

from hwloop.devices.open import override_profile, resolve_device_name
from hwloop.emulator.profile import find_profile, load_profile
from hwloop.errors import HwloopError
from hwloop.studies.executors import SerialExecutor
from hwloop.studies.knobs import knob_for, parse_values
from hwloop.studies.plots import plot_sweep
from hwloop.studies.results import (CSV_COLUMNS, SUMMARY_FIELDS, append_row, atomic_write,  # noqa: F401 - re-exported
                                    fmt_value, format_summary, load_rows, row_from_report, sort_rows, summarize,
                                    write_tables)
from hwloop.train import finetune, twin
from hwloop.train.hil import FinetuneConfig
from hwloop.train.options import FinetuneOptions

__all__ = ["SweepSpec", "SweepError", "plan", "point_key", "run_point", "run_sweep", "load_rows",
           "summarize", "CSV_COLUMNS", "format_summary", "row_from_report"]


class SweepError(HwloopError, RuntimeError):
    """A sweep finished with failed points (rerun the same command to retry only those)."""


# ------------------------------------------------------------------------------------ spec
class SweepSpec(BaseModel):
    """Everything a sweep needs. Every field has a default except the knobs' values."""

    model_config = ConfigDict(extra="forbid")

    knobs: list[str] = Field(default_factory=list, max_length=2)
    values: list[list[Any]] = Field(default_factory=list, description="values per knob")
    base: str = "devices/emulator-ideal.yaml"
    fixed: dict[str, Any] = Field(default_factory=dict, description="overrides of every point")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    seed_mode: str = Field(default="chip", pattern="^(chip|all)$")
    twin_seed: int = Field(default=0, ge=0, description="seed of the shared ReLU twin (seed_mode chip)")
    epochs: int = Field(default=1, ge=0, description="fine-tuning epochs per point")
    dataset: str = Field(default="fashion-mnist", pattern="^(fashion-mnist|mnist|synthetic)$")
    data_dir: Optional[str] = None
    arch: str = Field(default="fc2", pattern="^(fc2|fc16|lenet5|vgg16)$")
    pretrain_epochs: Optional[int] = Field(default=None, ge=0)
    train_subset: Optional[int] = Field(default=None, ge=1)
    test_subset: Optional[int] = Field(default=None, ge=1)
    lr: float = Field(default=1e-4, gt=0, le=1.0)
    batch_size: int = Field(default=64, ge=1)
    l1: float = Field(default=0.0, ge=0)
    max_steps_per_epoch: Optional[int] = Field(default=None, ge=1)
    calibration: Optional[str] = None
    cache_dir: Optional[str] = None
    keep_checkpoints: bool = False

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v) or any(s < 0 for s in v):
            raise ValueError(f"seeds must be distinct and >= 0, got {v}")
        return v

    def model_post_init(self, __context: Any) -> None:
        if len(self.values) != len(self.knobs):
            raise HwloopError(f"{len(self.knobs)} knob(s) but {len(self.values)} list(s) of values")
        for name, vals in zip(self.knobs, self.values):
            self.values[self.knobs.index(name)] = parse_values(name, vals)
        if len(set(self.knobs)) != len(self.knobs):
            raise HwloopError(f"knob given twice: {self.knobs}")
        fields = [f for k in self.knobs for f in knob_for(k).fields]
        clash = sorted(set(fields) & set(self.fixed))
        if clash:
            raise HwloopError(f"--set {', '.join(clash)} is also swept by --knob; drop one of them")


def _canon(v: Any) -> Any:
    """JSON-stable form of a value (1 and 1.0 stay distinct; floats by repr)."""
    if isinstance(v, float):
        return float(repr(v)) if math.isfinite(v) else str(v)
    if isinstance(v, dict):
        return {str(k): _canon(x) for k, x in sorted(v.items())}
    if isinstance(v, (list, tuple)):
        return [_canon(x) for x in v]
    return v


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(_canon(obj), sort_keys=True).encode()).hexdigest()


def base_profile(spec: SweepSpec):
    return find_profile(_resolve_base(spec.base)), load_profile(_resolve_base(spec.base))


def _resolve_base(name: str) -> str:
    return resolve_device_name(name)


def config_hash(spec: SweepSpec) -> str:
    """Hash of everything but the knob values and the seed that changes a point's result: the
    base profile's content (not its path), the fixed overrides, the data (where it was read
    from and its content), model and training.

    Raises:
        DatasetNotFound / DataError: the data cannot be read (as ``hwloop finetune`` would)."""
    _, prof = base_profile(spec)
    src = {"profile": prof.model_dump(mode="json"), "fixed": spec.fixed, "seed_mode": spec.seed_mode,
           "twin_seed": spec.twin_seed if spec.seed_mode == "chip" else None,
           **{k: getattr(spec, k) for k in ("dataset", "data_dir", "arch", "pretrain_epochs",
                                             "train_subset", "test_subset", "lr", "batch_size",
                                             "l1", "max_steps_per_epoch")},
           "data_sha256": _data_sha(spec.dataset, spec.data_dir, spec.train_subset,
                                    spec.test_subset, spec.twin_seed),
           "calibration": _file_sha(spec.calibration) if spec.calibration else None}
    return _sha(src)[:12]


@functools.lru_cache(maxsize=8)
def _data_sha(dataset: str, data_dir: Optional[str], train_subset: Optional[int],
              test_subset: Optional[int], seed: int) -> str:
    """Content hash of the data a sweep's points train and test on (a synthetic task is
    defined by its seed; points of other seeds differ by their seed in the point key)."""
    opts = FinetuneOptions(dataset=dataset, data_dir=data_dir, train_subset=train_subset,
                           test_subset=test_subset, finetune=FinetuneConfig(seed=seed))
    return twin.data_digest(twin.load_data(opts))


def _file_sha(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return path


def point_key(knob_values: dict[str, Any], seed: int, epochs: int, cfg: str) -> str:
    """``jitter=0.1|seed=0|epochs=1|cfg=ab12...``: identifies a finished point in results.jsonl."""
    kv = ",".join(f"{k}={fmt_value(v)}" for k, v in knob_values.items()) or "point"
    return f"{kv}|seed={seed}|epochs={epochs}|cfg={cfg}"


def _slug(key: str) -> str:
    head = re.sub(r"[^A-Za-z0-9.=_-]+", "_", key.split("|cfg=")[0])[:80]
    return f"{head}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def plan(spec: SweepSpec, out: str | os.PathLike) -> list[dict]:
    """Every point of the sweep as a picklable task (knob grid x seeds), profiles validated.

    Raises :class:`ProfileError` for a value outside a field's range before anything runs.
    """
    base_path, prof = base_profile(spec)
    cfg = config_hash(spec)
    grids: list[dict[str, Any]] = [{}]
    for name, vals in zip(spec.knobs, spec.values):
        grids = [{**g, name: v} for g in grids for v in vals]
    tasks = []
    for kv in grids:
        overrides: dict[str, Any] = {}
        for name in spec.knobs:
            overrides.update(knob_for(name).implies)
        overrides.update(spec.fixed)
        for name, v in kv.items():
            for f in knob_for(name).fields:
                overrides[f] = v
        override_profile(prof, overrides)  # validate now, not in a worker
        for seed in spec.seeds:
            key = point_key(kv, seed, spec.epochs, cfg)
            ft_seed = seed if spec.seed_mode == "all" else spec.twin_seed
            ft = FinetuneConfig(epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size, l1=spec.l1,
                                seed=ft_seed, max_steps_per_epoch=spec.max_steps_per_epoch)
            point_dir = Path(out) / "points" / _slug(key)
            opts = FinetuneOptions(device=str(base_path.resolve()), chip_seed=seed,
                                   profile_overrides=overrides, dataset=spec.dataset, data_dir=spec.data_dir,
                                   arch=spec.arch, pretrain_epochs=spec.pretrain_epochs,
                                   train_subset=spec.train_subset, test_subset=spec.test_subset,
                                   finetune=ft, out=str(point_dir.resolve()), calibration=spec.calibration,
                                   cache_dir=spec.cache_dir, progress=False)
            tasks.append({"key": key, "config": cfg, "knobs": kv, "seed": seed, "overrides": overrides,
                          "options": opts.model_dump(mode="json"),
                          "keep_checkpoints": spec.keep_checkpoints})
    return tasks


# ------------------------------------------------------------------------------------ one point
def run_point(task: dict) -> dict:
    """Run one point (top-level, picklable: executors ship it to workers).

    Before and after fine-tuning come from one :func:`run_finetune` call. A point directory with
    a ``report.json`` is recorded without running; one with a ``checkpoint.pt`` resumes from it.
    """
    t0 = time.time()
    opts = FinetuneOptions.model_validate(task["options"])
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    report_path, ckpt = out / "report.json", out / "checkpoint.pt"
    (out / "point.json").write_text(json.dumps({k: task[k] for k in ("key", "knobs", "seed", "overrides")},
                                               indent=2, default=str))
    report = None
    if report_path.exists():  # finished earlier, not recorded (the parent died before it could)
        try:
            report = json.loads(report_path.read_text())
        except (OSError, ValueError):
            report = None
    if report is None:
        opts = opts.model_copy(update={"resume": ckpt.exists()})
        with open(out / "run.log", "a", encoding="utf-8") as logf:
            def log(msg: str) -> None:
                logf.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
                logf.flush()
            report = finetune.run_finetune(opts, log=log)
    if not task.get("keep_checkpoints") and ckpt.exists():
        ckpt.unlink()
        for extra in out.glob("checkpoint.pt.*"):
            extra.unlink()
    return row_from_report(task, report, time.time() - t0)


# ------------------------------------------------------------------------------------ the sweep
def prepare_twins(spec: SweepSpec, log: Callable[[str], None] = print, progress: bool = False) -> None:
    """Train (or load) every ReLU twin the points need, once, before workers start (otherwise
    every worker would train the same twin at the same time)."""
    seeds = sorted({s for s in spec.seeds}) if spec.seed_mode == "all" else [spec.twin_seed]
    for s in seeds:
        opts = FinetuneOptions(dataset=spec.dataset, data_dir=spec.data_dir, arch=spec.arch,
                               pretrain_epochs=spec.pretrain_epochs, train_subset=spec.train_subset,
                               test_subset=spec.test_subset, cache_dir=spec.cache_dir,
                               finetune=FinetuneConfig(seed=s), progress=progress)
        twin.relu_twin(opts, twin.load_data(opts), log)


def run_sweep(spec: SweepSpec, out: str | os.PathLike, executor=None, *,
              point_fn: Callable[[dict], dict] = run_point, progress: bool = True, plot: bool = True,
              prepare: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run the missing points of a sweep; write results and the plot. Returns a summary dict:
    ``planned``, ``skipped``, ``ran``, ``failed`` (list of ``{"key", "error"}``), ``rows``
    (this sweep's finished points), ``files``.

    ``executor``: an :class:`~hwloop.studies.executors.Executor` (default: a
    :class:`~hwloop.studies.executors.SerialExecutor`); it is not closed here. ``point_fn``:
    a top-level function ``task -> row`` (default :func:`run_point`). ``KeyboardInterrupt``
    leaves every finished point recorded; rerunning finishes the rest.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = plan(spec, out)
    jsonl = out / "results.jsonl"
    done = {r["key"]: r for r in load_rows(jsonl)}
    todo = [t for t in tasks if t["key"] not in done]
    skipped = len(tasks) - len(todo)
    executor = executor or SerialExecutor()
    atomic_write(out / "sweep.json", json.dumps({"spec": spec.model_dump(mode="json"),
                                                  "config": config_hash(spec),
                                                  "points": [t["key"] for t in tasks]}, indent=2))
    log(f"sweep: {len(tasks)} points ({skipped} already done, {len(todo)} to run) on {executor.describe()}; "
        f"results in {out}")
    if todo and prepare and point_fn is run_point:
        prepare_twins(spec, log, progress)

    bar = None
    if progress:
        bar = tqdm(total=len(tasks), initial=skipped, desc="sweep", unit="point", dynamic_ncols=True)
    failed: list[dict] = []
    ran = 0
    keys = {t["key"] for t in tasks}
    try:
        for i, row, err in executor.map_unordered(point_fn, todo):
            key = todo[i]["key"]
            if err is not None:
                failed.append({"key": key, "error": f"{type(err).__name__}: {err}"})
                msg = f"point {key} failed: {type(err).__name__}: {err}"
                (bar.write if bar is not None else log)(msg)
            else:
                append_row(jsonl, row)
                done[key] = row
                ran += 1
                rows = sort_rows([r for k, r in done.items() if k in keys], tasks)
                write_tables(out, spec, rows, config_hash(spec))
                msg = (f"{key.split('|cfg=')[0]}: accuracy {100 * row['accuracy_before']:.2f} -> "
                       f"{100 * row['accuracy_after']:.2f} % (ideal SNN {100 * row['ideal_snn_accuracy']:.2f}), "
                       f"{row['wall_time_s']:.0f} s")
                (bar.write if bar is not None else log)(msg)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    rows = sort_rows([r for k, r in done.items() if k in keys], tasks)
    files = []
    if rows:
        write_tables(out, spec, rows, config_hash(spec))
        files += [str(out / "results.jsonl"), str(out / "results.csv"), str(out / "results.json")]
        if plot:
            png = plot_sweep(rows, spec, out)
            if png:
                files.append(str(png))
    return {"planned": len(tasks), "skipped": skipped, "ran": ran, "failed": failed, "rows": rows,
            "files": files}
