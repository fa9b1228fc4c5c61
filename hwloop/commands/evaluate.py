"""``hwloop evaluate``: accuracy, spikes per neuron and energy of a network on a device,
optionally compensated with a calibration record (docs/calibration.md). Argument parsing and
the printed summary only; the work is :func:`hwloop.train.evaluation.evaluate_on_device` (whose
docstring says how ``--weights``, ``--requantize`` and ``--calibration`` combine).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from hwloop.commands import add_data_args, add_device_args
from hwloop.train.tables import format_eval


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a network on a device (accuracy, spikes per neuron, energy), optionally calibrated",
        description=(
            "Map the converted ReLU twin (or saved fine-tuned weights) onto the device, with "
            "--calibration compensated for the chip's frozen mismatch, run the test set and "
            "print accuracy, spikes per neuron and energy per inference."),
    )
    add_device_args(p, "devices/emulator-mismatch.yaml")
    p.add_argument("--calibration", default=None, help="calibration record to compensate with")
    p.add_argument("--weights", default=None,
                   help="final_weights.pt of a fine-tuning run (default: the converted ReLU twin); "
                        "the state fine-tuning programmed (codes, scales, thresholds, windows) is "
                        "put back on the chip as saved")
    p.add_argument("--requantize", action="store_true",
                   help="with --weights: quantise the fine-tuned weights afresh for this device "
                        "instead of programming the saved state (needed on another chip than "
                        "the one they were fine-tuned on)")
    add_data_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the ReLU twin (model cache key)")
    p.add_argument("--pretrain-epochs", type=int, default=None)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None, help="use the first N test images")
    p.add_argument("--window-percentile", type=float, default=None,
                   help="windows hold this percentile of activations (default: the profile's)")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=1,
                   help="evaluate N times with fresh jitter: accuracy mean +- SD (default 1)")
    p.add_argument("--cache-dir", default=None, help="model cache (default ~/.cache/hwloop/models)")
    p.add_argument("--out", default=None,
                   help="folder for report.json and the plots (default: a new runs/evaluate-<UTC date-time>)")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the result as JSON too")
    p.set_defaults(func=run)


def default_out() -> str:
    return "runs/evaluate-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


def run(args: argparse.Namespace) -> int:
    # lazy: import-time cost (the library loads pydantic models, ~0.15 s; `hwloop --help` stays fast)
    from hwloop.train.evaluation import evaluate_to_folder
    out_dir = Path(args.out or default_out())
    out = evaluate_to_folder(out_dir, plots_too=not args.no_plots, device=args.device,
                             chip_seed=args.chip_seed, calibration=args.calibration,
                             weights=args.weights, dataset=args.dataset, data_dir=args.data_dir,
                             arch=args.arch, seed=args.seed, pretrain_epochs=args.pretrain_epochs,
                             train_subset=args.train_subset, test_subset=args.test_subset,
                             window_percentile=args.window_percentile, batch_size=args.batch_size,
                             repeats=args.repeats, progress=not args.no_progress,
                             cache_dir=args.cache_dir, requantize=args.requantize)
    print(summary(out, out_dir))
    if args.json:
        print(json.dumps(out, indent=2, default=float))
    return 0


def summary(out: dict, out_dir) -> str:
    """What `hwloop evaluate` prints (and `hwloop report` again)."""
    # lazy: import-time cost (the library loads pydantic models, ~0.15 s; `hwloop --help` stays fast)
    from hwloop.train.evaluation import PLOTS
    d = out["device"]
    lines = [f"device {out['device_id']} ({out['mode']}), {out['arch']} on {out['dataset']}, "
             f"{out['n_test']} test images"]
    if out.get("calibration_record"):
        c = out["calibration_record"]
        lines.append(f"  calibration {c['path']} (sha256 {c['content_sha256'][:16]}...)")
    prog = out.get("programmed") or {}
    if out.get("weights"):
        lines.append(f"  weights {out['weights']} ({prog.get('from', 'quantised afresh')})")
    if out["ideal_snn"] is not None:
        lines.append(f"  ideal SNN (software)  accuracy {100 * out['ideal_snn']['accuracy']:.2f} %")
    lines.append(f"  device                {format_eval(d)}")
    lines.append(f"report: {Path(out_dir) / 'report.json'}")
    plots = [str(Path(out_dir) / p) for p in PLOTS if (Path(out_dir) / p).exists()]
    if plots:
        lines.append("plots: " + "  ".join(plots))
    return "\n".join(lines)
