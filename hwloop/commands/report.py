"""``hwloop report RUN_DIR``: print a finished run's summary and the paths of its plots again.

Understands the folders of ``hwloop finetune``, ``train``, ``evaluate`` and ``sweep`` (by what
their ``report.json`` / ``sweep.json`` hold) and a calibration record (``hwloop calibrate``'s
JSON file, or the folder holding it). The summary is printed by the same function the command
used, so it reads as it did at the end of the run (times included).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hwloop.commands import calibrate, evaluate, finetune, train
from hwloop.errors import CheckpointError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="print a run's summary and plot paths again (finetune, train, evaluate, sweep, calibrate)",
        description="Read RUN_DIR/report.json (or sweep.json, or a calibration record) and print "
                    "the summary its command printed, then the plots beside it.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="output folder of a run, or a calibration record")
    p.add_argument("--json", action="store_true", help="print the report itself as JSON too")
    p.set_defaults(func=run)


def kind_of(report: dict) -> str:
    if report.get("kind") == "evaluate":
        return "evaluate"
    if "before" in report and "after" in report:
        return "finetune"
    if "recipe" in report and "history" in report:
        return "train"
    if "layers" in report and "device_id" in report and "jitter_sd" in report:
        return "calibration"
    return "unknown"


def summarize(path: str | Path) -> tuple[str, dict]:
    """(the summary text, the report) of a run folder or a calibration record.

    Raises:
        CheckpointError: nothing hwloop wrote is there.
    """
    p = Path(path)
    if p.is_dir() and (p / "sweep.json").exists():
        return _sweep(p)
    rep_path = p / "report.json" if p.is_dir() else p
    if p.is_dir() and not rep_path.exists():
        records = sorted(p.glob("*.json"))
        if len(records) == 1:
            rep_path = records[0]
    try:
        report = json.loads(rep_path.read_text())
    except FileNotFoundError:
        if not p.exists():
            raise CheckpointError(f"{path}: no such file or folder") from None
        hint = ("a run of finetune, evaluate, train, calibrate or sweep still in progress or "
                "interrupted" if (p / "checkpoint.pt").exists() or (p / "log.jsonl").exists()
                else "hwloop report reads the folders of finetune, evaluate, train, calibrate "
                     "and sweep, and calibration records")
        raise CheckpointError(f"{path}: no report.json, sweep.json or calibration record there "
                              f"({hint})") from None
    except ValueError as exc:
        raise CheckpointError(f"{rep_path} is not JSON: {exc}") from None
    kind = kind_of(report)
    folder = rep_path.parent
    if kind == "finetune":
        return finetune.summary(report, str(folder)), report
    if kind == "evaluate":
        return evaluate.summary(report, folder), report
    if kind == "train":
        return train.summary(report, folder), report
    if kind == "calibration":
        # lazy: import-time cost (the library loads pydantic models, ~0.15 s; `hwloop --help` stays fast)
        from hwloop.calibrate.record import load_record
        return calibrate.summary(load_record(str(rep_path)), str(rep_path)), report
    raise CheckpointError(f"{rep_path} is not a report of an hwloop command")


def _sweep(folder: Path) -> tuple[str, dict]:
    # lazy: import-time cost (the library loads pydantic models, ~0.15 s; `hwloop --help` stays fast)
    from hwloop.studies.sweep import format_summary, load_rows
    meta = json.loads((folder / "sweep.json").read_text())
    keys = set(meta.get("points", []))
    rows = [r for r in load_rows(folder / "results.jsonl") if r["key"] in keys]
    knobs = meta.get("spec", {}).get("knobs", [])
    lines = [format_summary(rows, knobs)] if rows else []
    lines.append(f"{len(rows)} of {len(keys)} point(s) done; results: {folder / 'results.csv'}")
    plots = sorted(str(q) for q in folder.glob("*.png"))
    if plots:
        lines.append("plots: " + "  ".join(plots))
    return "\n".join(lines), {"sweep": meta, "rows": rows}


def run(args: argparse.Namespace) -> int:
    text, report = summarize(args.run_dir)
    print(text)
    if args.json:
        print(json.dumps(report, indent=2, default=float))
    return 0
