"""``hwloop finetune``: hardware-in-the-loop fine-tuning, the main job (see
:mod:`hwloop.train.finetune`)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
from pathlib import Path

from hwloop.commands import add_data_args, add_device_args, clean_msg
from hwloop.errors import CheckpointError, DataError
from hwloop.train.checkpoint import load_checkpoint
from hwloop.train.tables import format_table


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a converted network on a device with exact B1 gradients (the main job)",
        description=(
            "Train (or load from the cache) the ReLU twin, convert it to a B1 TTFS network, map it "
            "onto the device, evaluate, fine-tune with gradients computed off-chip from the "
            "measured spike times, evaluate again. Every default is embedded: with no flags it "
            "runs FC2 on Fashion-MNIST on devices/emulator-analog.yaml."),
    )
    # every option defaults to None here: an option given on the command line is known as such,
    # so `--resume DIR` takes the others from the checkpoint and compares only those given
    add_device_args(p, "devices/emulator-analog.yaml", sentinel=True)
    add_data_args(p, sentinel=True)
    p.add_argument("--pretrain-epochs", type=int, default=None,
                   help="epochs of the ReLU twin (default: the recipe's, 30)")
    p.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default 3)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 3e-4)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64")
    p.add_argument("--l1", type=float, default=None, help="activity penalty (paper Table 2, +L1; default 0)")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--train-subset", type=int, default=None,
                   help="use the first N training images (note: trains a new ReLU twin for that "
                        "subset; --max-steps-per-epoch shortens fine-tuning and keeps the twin)")
    p.add_argument("--test-subset", type=int, default=None, help="use the first N test images")
    p.add_argument("--max-steps-per-epoch", type=int, default=None)
    p.add_argument("--window-percentile", type=float, default=None,
                   help="windows hold this percentile of activations (default: the profile's)")
    p.add_argument("--calibration", default=None, help="calibration record to compensate with")
    p.add_argument("--eval-repeats", type=int, default=None,
                   help="evaluate the device N times with fresh jitter, before and after "
                        "(mean +- SD; default 1)")
    p.add_argument("--out", default=None,
                   help="output folder (default: a new runs/finetune-<UTC date-time>)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR",
                   help="continue the run in DIR (or --out) from its checkpoint, with the options "
                        "it was started with; options given as well must match them")
    p.add_argument("--cache-dir", default=None, help="model cache (default ~/.cache/hwloop/models)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    p.add_argument("--json", action="store_true", help="print the report as JSON too")
    p.set_defaults(func=run)


def default_out() -> str:
    return "runs/finetune-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


#: command-line flag -> (FinetuneOptions field, nested in FinetuneConfig?)
FLAGS = {"device": ("device", False), "chip_seed": ("chip_seed", False), "dataset": ("dataset", False),
         "data_dir": ("data_dir", False), "arch": ("arch", False),
         "pretrain_epochs": ("pretrain_epochs", False), "train_subset": ("train_subset", False),
         "test_subset": ("test_subset", False), "window_percentile": ("window_percentile", False),
         "calibration": ("calibration", False), "eval_repeats": ("eval_repeats", False),
         "epochs": ("epochs", True), "lr": ("lr", True), "batch_size": ("batch_size", True),
         "l1": ("l1", True), "seed": ("seed", True), "max_steps_per_epoch": ("max_steps_per_epoch", True)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def given_options(args: argparse.Namespace) -> dict:
    """The options given on the command line, as FinetuneOptions fields (nested ``finetune``)."""
    top, ft = {}, {}
    for flag, (field, nested) in FLAGS.items():
        v = getattr(args, flag, None)
        if v is not None:
            (ft if nested else top)[field] = v
    if ft:
        top["finetune"] = ft
    return top


def stored_options(out: str) -> dict:
    """The options a run was started with, from ``out/checkpoint.pt`` (or its ``.prev``)."""
    ckpt = Path(out) / "checkpoint.pt"
    if not ckpt.exists() and not Path(str(ckpt) + ".prev").exists():
        raise CheckpointError(f"--resume {out}: no checkpoint at {ckpt} (no epoch of that run "
                              "finished: start it again without --resume)")
    ck = load_checkpoint(ckpt, fallback=True)
    opts = ck.get("options")
    if not isinstance(opts, dict):
        raise CheckpointError(f"{ckpt} stores no options (written by an older hwloop): resume "
                              "with --resume --out DIR and every option of that run")
    return opts


def options_from_args(args: argparse.Namespace):
    """FinetuneOptions from the command line. ``--resume [DIR]``: the checkpoint's stored
    options, with the given ones compared first (every mismatch refused at once)."""
    # lazy: import-time cost (the library loads pydantic models, ~0.15 s; `hwloop --help` stays fast)
    from hwloop.train.options import FinetuneOptions, option_mismatches
    resume_dir = args.resume if isinstance(args.resume, str) else None
    if resume_dir and args.out and resume_dir != args.out:
        raise CheckpointError(f"--resume {resume_dir} and --out {args.out} name two folders: give one")
    out = resume_dir or args.out
    given = given_options(args)
    local = {"progress": not args.no_progress, "plots": not args.no_plots}
    if args.cache_dir is not None:
        local["cache_dir"] = args.cache_dir
    if args.resume:
        if out is None:
            raise CheckpointError("--resume needs the folder of the run to continue: --resume DIR")
        stored = stored_options(out)
        base = {k: v for k, v in stored.items() if k not in ("out", "resume", "progress", "plots")}
        ft = {**base.get("finetune", {}), **given.get("finetune", {})}
        merged = {**base, **given, "finetune": ft, **local, "out": out, "resume": True}
        if "cache_dir" not in local and stored.get("cache_dir"):
            merged["cache_dir"] = stored["cache_dir"]
        opts = FinetuneOptions.model_validate(merged)
        bad = option_mismatches(stored, opts)
        if bad:
            raise CheckpointError(f"--resume {out}: options given differ from the run's ("
                                  + "; ".join(bad) + "): drop them to continue that run, or "
                                  "start a new run with another --out")
        return opts
    return FinetuneOptions.model_validate({**given, **local, "out": out or default_out()})


def resume_command(out: str) -> str:
    return f"hwloop finetune --resume {shlex.quote(str(out))}"


def run(args: argparse.Namespace) -> int:
    # lazy: import-time cost (the library loads pydantic models, ~0.15 s; `hwloop --help` stays fast)
    from pydantic import ValidationError

    from hwloop.train.finetune import run_finetune
    try:
        opts = options_from_args(args)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise DataError(f"invalid option {'.'.join(map(str, err['loc']))}={err.get('input')!r}: "
                        f"{clean_msg(err['msg'])}") from None
    subset = [f"{k}={v}" for k, v in (("train_subset", opts.train_subset),
                                       ("max_steps_per_epoch", opts.finetune.max_steps_per_epoch)) if v]
    if subset:
        print(f"note: using a subset ({', '.join(subset)})")
    try:
        report = run_finetune(opts)
    except KeyboardInterrupt as exc:
        if (Path(opts.out) / "checkpoint.pt").exists():
            exc.hint = f"continue with: {resume_command(opts.out)}"
        elif Path(opts.out).exists():
            exc.hint = (f"no epoch had finished ({opts.out} holds no checkpoint): run the same "
                        "command again")
        raise
    print(summary(report, opts.out))
    if args.json:
        print(json.dumps(report, indent=2, default=float))
    return 0


def summary(report: dict, out: str) -> str:
    """What `hwloop finetune` prints at the end (and `hwloop report` again)."""
    lines = [format_table(report), f"report: {out}/report.json   step log: {out}/log.jsonl"]
    plots = [str(Path(out) / p) for p in ("learning_curve.png", "spike_raster.png", "spike_times.png")
             if (Path(out) / p).exists()]
    if plots:
        lines.append("plots: " + "  ".join(plots))
    return "\n".join(lines)
