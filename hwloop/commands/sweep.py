"""``hwloop sweep``: constraint studies, one or two device-profile knobs swept with and without
hardware-in-the-loop fine-tuning (see :mod:`hwloop.studies.sweep`)."""

from __future__ import annotations

import argparse

from hwloop.commands import add_data_args, clean_msg
from hwloop.errors import DataError, HwloopError
from hwloop.train.progress import interactive


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="sweep device-profile knobs (jitter, time steps, weight bits, latency, any field), "
             "before and after HIL fine-tuning",
        description=(
            "Each point fine-tunes the converted network on the base profile with the knob values "
            "applied and records accuracy, spikes per neuron and energy before and after fine-tuning. "
            "Knobs: jitter (jitter_sd, tau_c), time-steps (time_steps_per_layer; implies "
            "window_percentile=99 and fixed windows), weight-bits (weight_bits), latency "
            "(window_percentile; implies fixed windows), or any dotted profile field. Two knobs make "
            "a grid (heat map); no knob makes one point per seed (e.g. all constraints via --set). "
            "Rerunning the same command skips finished points."),
        epilog="example: hwloop sweep --knob weight-bits --values 2,3,4,6,8 --finetune-epochs 1 "
               "--workers 2 --out runs/sweep-bits",
    )
    p.add_argument("--knob", action="append", default=[], metavar="K",
                   help="knob to sweep (give twice for a grid)")
    p.add_argument("--values", nargs="+", default=None, metavar="V",
                   help="values of the first knob (space or comma separated; null = field off)")
    p.add_argument("--values2", nargs="+", default=None, metavar="V", help="values of the second knob")
    p.add_argument("--base", default="devices/emulator-ideal.yaml",
                   help="base emulator profile (default: every non-ideality off)")
    p.add_argument("--set", dest="fixed", action="append", default=[], metavar="FIELD=VALUE",
                   help="fixed profile override for every point (repeatable; dotted for nested fields)")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per setting (default 1)")
    p.add_argument("--seed-mode", default="chip", choices=("chip", "all"),
                   help="chip: seed = chip instance, shared ReLU twin (default); all: seed also "
                        "trains its own twin and orders the batches")
    p.add_argument("--twin-seed", type=int, default=0, help="seed of the shared ReLU twin (seed mode chip)")
    p.add_argument("--finetune-epochs", type=int, default=1, help="fine-tuning epochs per point (default 1)")
    add_data_args(p)
    p.add_argument("--pretrain-epochs", type=int, default=None)
    p.add_argument("--train-subset", type=int, default=None,
                   help="first N training images (note: a different N trains a different ReLU twin; "
                        "--max-steps-per-epoch shortens fine-tuning and keeps the twin)")
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--max-steps-per-epoch", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--l1", type=float, default=0.0)
    p.add_argument("--calibration", default=None, help="calibration record for every point")
    p.add_argument("--cache-dir", default=None, help="model cache (default ~/.cache/hwloop/models)")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel points (default: CPU count; 1 runs in this process)")
    p.add_argument("--executor", default="local", choices=("local", "ray"))
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster address (default: start a local Ray instance)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each point's checkpoint.pt (deleted when the point finishes)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="output folder (rerun with the same one to resume)")
    p.set_defaults(func=run)


def spec_from_args(args: argparse.Namespace):
    # lazy: import-time cost (the library loads pydantic models, ~0.15 s; `hwloop --help` stays fast)
    from pydantic import ValidationError

    from hwloop.studies.knobs import parse_set
    from hwloop.studies.sweep import SweepSpec

    knobs = list(args.knob)
    if len(knobs) > 2:
        raise HwloopError("at most two --knob (a grid)")
    values = []
    if knobs:
        if not args.values:
            raise HwloopError(f"--knob {knobs[0]} needs --values")
        values.append(list(args.values))
    elif args.values or args.values2:
        raise HwloopError("--values without --knob")
    if len(knobs) == 2:
        if not args.values2:
            raise HwloopError(f"second --knob {knobs[1]} needs --values2")
        values.append(list(args.values2))
    elif args.values2:
        raise HwloopError("--values2 needs a second --knob")
    if args.seeds < 1:
        raise HwloopError("--seeds must be >= 1")
    try:
        return SweepSpec(knobs=knobs, values=values, base=args.base, fixed=parse_set(args.fixed),
                         seeds=list(range(args.seeds)), seed_mode=args.seed_mode, twin_seed=args.twin_seed,
                         epochs=args.finetune_epochs, dataset=args.dataset, data_dir=args.data_dir,
                         arch=args.arch, pretrain_epochs=args.pretrain_epochs,
                         train_subset=args.train_subset, test_subset=args.test_subset, lr=args.lr,
                         batch_size=args.batch_size, l1=args.l1,
                         max_steps_per_epoch=args.max_steps_per_epoch, calibration=args.calibration,
                         cache_dir=args.cache_dir, keep_checkpoints=args.keep_checkpoints)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(map(str, err["loc"]))
        if not loc:  # a check across options: its message says what is wrong
            raise DataError(f"invalid options: {clean_msg(err['msg'])}") from None
        raise DataError(f"invalid option {loc}={err.get('input')!r}: {clean_msg(err['msg'])}") from None


def run(args: argparse.Namespace) -> int:
    # lazy: import-time cost (the library loads pydantic models, ~0.15 s; `hwloop --help` stays fast)
    from hwloop.studies.executors import make_executor, one_thread
    from hwloop.studies.sweep import SweepError, format_summary, run_sweep

    spec = spec_from_args(args)
    one_thread()  # the parent only plans, loads the twin and writes tables
    with make_executor(args.executor, args.workers, args.ray_address) as ex:
        res = run_sweep(spec, args.out, ex, progress=not args.no_progress and interactive(),
                        plot=not args.no_plot)
    if res["rows"]:
        print(format_summary(res["rows"], spec.knobs))
    print(f"{res['ran']} point(s) run, {res['skipped']} already done, {len(res['failed'])} failed; "
          + ("files: " + ", ".join(res["files"]) if res["files"] else "no results yet"))
    if res["failed"]:
        raise SweepError(f"{len(res['failed'])} point(s) failed (first: {res['failed'][0]['error']}); "
                         "rerun the same command to retry only those")
    return 0
