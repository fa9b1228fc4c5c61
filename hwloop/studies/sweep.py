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

import csv
import functools
import hashlib
import io
import json
import math
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm import tqdm

from hwloop.devices.open import override_profile, resolve_device_name
from hwloop.emulator.profile import find_profile, load_profile
from hwloop.errors import HwloopError
from hwloop.studies.executors import SerialExecutor
from hwloop.studies.knobs import knob_for, parse_values
from hwloop.studies.plots import plot_sweep
from hwloop.train import finetune, twin
from hwloop.train.hil import FinetuneConfig
from hwloop.train.options import FinetuneOptions

__all__ = ["SweepSpec", "SweepError", "plan", "point_key", "run_point", "run_sweep", "load_rows",
           "summarize", "CSV_COLUMNS"]


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


def _fmt(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def point_key(knob_values: dict[str, Any], seed: int, epochs: int, cfg: str) -> str:
    """``jitter=0.1|seed=0|epochs=1|cfg=ab12...``: identifies a finished point in results.jsonl."""
    kv = ",".join(f"{k}={_fmt(v)}" for k, v in knob_values.items()) or "point"
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
def _latency(weights_path: Path) -> Optional[float]:
    """Input window start to read-out time (tau_c) of the fine-tuned network's windows."""
    try:
        sd = torch.load(weights_path, map_location="cpu", weights_only=True)["shadow"]
        t_min = [float(v) for k, v in sd.items() if k.endswith(".t_min")]
        t_max = [float(v) for k, v in sd.items() if k.endswith(".t_max")]
        return max(t_max) - min(t_min) + 1.0 if t_max and t_min else None
    except Exception:  # noqa: BLE001 - a missing number, not a failed point
        return None


def row_from_report(task: dict, report: dict, wall_s: float) -> dict:
    """A results row (flat, JSON-serialisable) from a point's finetune report."""
    b, a = report["before"], report["after"]
    nan = float("nan")
    row = {"key": task["key"], "config": task["config"], "knobs": task["knobs"]}
    row.update({k: v for k, v in task["knobs"].items()})
    row.update({
        "seed": task["seed"], "epochs": report["finetune"]["epochs"],
        "steps_per_epoch": report["steps_per_epoch"], "n_train": report["n_train"],
        "n_test": report["n_test"],
        "relu_accuracy": b["relu"], "ideal_snn_accuracy": b["ideal_snn"]["accuracy"],
        "ideal_snn_spikes_per_neuron": b["ideal_snn"].get("spikes_per_neuron", nan),
        "accuracy_before": b["device"]["accuracy"], "accuracy_after": a["device"]["accuracy"],
        "spikes_per_neuron_before": b["device"]["spikes_per_neuron"],
        "spikes_per_neuron_after": a["device"]["spikes_per_neuron"],
        "energy_j_before": b["device"]["energy_j_per_sample"],
        "energy_j_after": a["device"]["energy_j_per_sample"],
        "weight_bits": report.get("weight_bits"), "window_percentile": report.get("window_percentile"),
        "latency_tau_c": _latency(Path(task["options"]["out"]) / "final_weights.pt"),
        "finetune_wall_time_s": report.get("finetune_wall_time_s"), "wall_time_s": round(wall_s, 2),
        "device_id": (report.get("provenance") or {}).get("device_id"),
        "overrides": task["overrides"], "point_dir": task["options"]["out"],
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })
    return row


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


# ------------------------------------------------------------------------------------ results
CSV_COLUMNS = ["key", "seed", "epochs", "accuracy_before", "accuracy_after", "ideal_snn_accuracy",
               "relu_accuracy", "spikes_per_neuron_before", "spikes_per_neuron_after",
               "energy_j_before", "energy_j_after", "ideal_snn_spikes_per_neuron", "weight_bits",
               "window_percentile", "latency_tau_c", "steps_per_epoch", "n_train", "n_test",
               "finetune_wall_time_s", "wall_time_s", "device_id", "config"]


def load_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a results.jsonl; a torn last line (a killed writer) is ignored."""
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def append_row(path: Path, row: dict) -> None:
    """Append one JSON line with a single write, flushed and fsynced (a torn line, if the
    process dies mid-write, is dropped by :func:`load_rows`; a fresh line starts after it)."""
    data = json.dumps(row, default=float, allow_nan=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    data = "\n" + data
        os.write(fd, data.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _stats(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return {"mean": None, "min": None, "max": None, "std": None}
    return {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs),
            "std": statistics.pstdev(xs) if len(xs) > 1 else 0.0}


SUMMARY_FIELDS = ("accuracy_before", "accuracy_after", "ideal_snn_accuracy", "relu_accuracy",
                  "spikes_per_neuron_before", "spikes_per_neuron_after", "energy_j_before",
                  "energy_j_after", "latency_tau_c", "wall_time_s")


def summarize(rows: list[dict], knobs: Sequence[str]) -> list[dict]:
    """One entry per knob setting: the statistics over seeds of every :data:`SUMMARY_FIELDS`."""
    groups: dict[str, list[dict]] = {}
    order: list[str] = []
    for r in rows:
        g = json.dumps([r["knobs"].get(k) for k in knobs])
        if g not in groups:
            groups[g] = []
            order.append(g)
        groups[g].append(r)
    out = []
    for g in order:
        rs = groups[g]
        entry = {"knobs": rs[0]["knobs"], "seeds": sorted(r["seed"] for r in rs), "n": len(rs)}
        for f in SUMMARY_FIELDS:
            entry[f] = _stats([r.get(f) for r in rs])
        out.append(entry)
    return out


def write_tables(out: Path, spec: SweepSpec, rows: list[dict]) -> None:
    """results.csv (one row per point, knob columns first) and results.json (spec, points,
    summary over seeds)."""
    cols = list(spec.knobs) + CSV_COLUMNS
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    _atomic_write(out / "results.csv", buf.getvalue())
    doc = {"spec": spec.model_dump(mode="json"), "config": config_hash(spec),
           "knob_fields": {k: list(knob_for(k).fields) for k in spec.knobs},
           "knob_implies": {k: knob_for(k).implies for k in spec.knobs},
           "points": rows, "summary": summarize(rows, spec.knobs)}
    _atomic_write(out / "results.json", json.dumps(doc, indent=2, default=float))


def _sort_rows(rows: list[dict], tasks: list[dict]) -> list[dict]:
    order = {t["key"]: i for i, t in enumerate(tasks)}
    return sorted(rows, key=lambda r: order.get(r["key"], len(order)))


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
    _atomic_write(out / "sweep.json", json.dumps({"spec": spec.model_dump(mode="json"),
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
                rows = _sort_rows([r for k, r in done.items() if k in keys], tasks)
                write_tables(out, spec, rows)
                msg = (f"{key.split('|cfg=')[0]}: accuracy {100 * row['accuracy_before']:.2f} -> "
                       f"{100 * row['accuracy_after']:.2f} % (ideal SNN {100 * row['ideal_snn_accuracy']:.2f}), "
                       f"{row['wall_time_s']:.0f} s")
                (bar.write if bar is not None else log)(msg)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    rows = _sort_rows([r for k, r in done.items() if k in keys], tasks)
    files = []
    if rows:
        write_tables(out, spec, rows)
        files += [str(out / "results.jsonl"), str(out / "results.csv"), str(out / "results.json")]
        if plot:
            png = plot_sweep(rows, spec, out)
            if png:
                files.append(str(png))
    return {"planned": len(tasks), "skipped": skipped, "ran": ran, "failed": failed, "rows": rows,
            "files": files}


def format_summary(rows: list[dict], knobs: Sequence[str]) -> str:
    """A text table of the summary over seeds (mean [min, max] when there are several)."""
    def cell(st: dict, pct: bool = True, fmt: str = "{:.2f}") -> str:
        if st["mean"] is None:
            return "-"
        f = 100.0 if pct else 1.0
        s = fmt.format(f * st["mean"])
        if st["max"] != st["min"]:
            s += f" [{fmt.format(f * st['min'])}, {fmt.format(f * st['max'])}]"
        return s

    head = [*(knobs or ["point"]), "seeds", "acc before %", "acc after %", "ideal SNN %",
            "spikes/neuron after", "energy after (J)"]
    lines = [head]
    for e in summarize(rows, knobs):
        lines.append([*([_fmt(e["knobs"].get(k)) for k in knobs] or ["-"]), str(e["n"]),
                      cell(e["accuracy_before"]), cell(e["accuracy_after"]), cell(e["ideal_snn_accuracy"]),
                      cell(e["spikes_per_neuron_after"], False, "{:.3f}"),
                      cell(e["energy_j_after"], False, "{:.3e}")])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in lines)
