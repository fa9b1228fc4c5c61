"""A sweep's results: the rows of finished points, ``results.jsonl`` (appended one line at a
time), ``results.csv`` and ``results.json`` (rewritten), the summary over seeds and its text
table. Split out of :mod:`hwloop.studies.sweep`, which plans and runs the points."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from hwloop.studies.knobs import knob_for

__all__ = ["CSV_COLUMNS", "SUMMARY_FIELDS", "append_row", "atomic_write", "fmt_value", "format_summary", "load_rows", "row_from_report",
           "sort_rows", "summarize", "write_tables"]


def fmt_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, float):
        return repr(v)
    return str(v)


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



# ------------------------------------------------------------------------------------ tables
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


def atomic_write(path: Path, text: str) -> None:
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


def write_tables(out: Path, spec: Any, rows: list[dict], config: str) -> None:
    """results.csv (one row per point, knob columns first) and results.json (spec, points,
    summary over seeds). ``spec`` is the :class:`~hwloop.studies.sweep.SweepSpec`, ``config``
    its :func:`~hwloop.studies.sweep.config_hash`."""
    cols = list(spec.knobs) + CSV_COLUMNS
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    atomic_write(out / "results.csv", buf.getvalue())
    doc = {"spec": spec.model_dump(mode="json"), "config": config,
           "knob_fields": {k: list(knob_for(k).fields) for k in spec.knobs},
           "knob_implies": {k: knob_for(k).implies for k in spec.knobs},
           "points": rows, "summary": summarize(rows, spec.knobs)}
    atomic_write(out / "results.json", json.dumps(doc, indent=2, default=float))


def sort_rows(rows: list[dict], tasks: list[dict]) -> list[dict]:
    order = {t["key"]: i for i, t in enumerate(tasks)}
    return sorted(rows, key=lambda r: order.get(r["key"], len(order)))


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
        lines.append([*([fmt_value(e["knobs"].get(k)) for k in knobs] or ["-"]), str(e["n"]),
                      cell(e["accuracy_before"]), cell(e["accuracy_after"]), cell(e["ideal_snn_accuracy"]),
                      cell(e["spikes_per_neuron_after"], False, "{:.3f}"),
                      cell(e["energy_j_after"], False, "{:.3e}")])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in lines)
