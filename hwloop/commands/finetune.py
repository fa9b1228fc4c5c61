"""``hwloop finetune``: hardware-in-the-loop fine-tuning, the main job (see
:mod:`hwloop.train.finetune`)."""

from __future__ import annotations

import argparse
import json

from hwloop.commands import add_data_args, add_device_args


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
    add_device_args(p, "devices/emulator-analog.yaml")
    add_data_args(p)
    p.add_argument("--pretrain-epochs", type=int, default=None,
                   help="epochs of the ReLU twin (default: the recipe's, 30)")
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (default 3)")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (default 3e-4)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--l1", type=float, default=0.0, help="activity penalty (paper Table 2, +L1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-subset", type=int, default=None, help="use the first N training images")
    p.add_argument("--test-subset", type=int, default=None, help="use the first N test images")
    p.add_argument("--max-steps-per-epoch", type=int, default=None)
    p.add_argument("--window-percentile", type=float, default=None,
                   help="windows hold this percentile of activations (default: the profile's)")
    p.add_argument("--calibration", default=None, help="calibration record to compensate with")
    p.add_argument("--out", default=None,
                   help="output folder (default: a new runs/finetune-<UTC date-time>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as JSON too")
    p.set_defaults(func=run)


def default_out() -> str:
    import datetime as dt
    return "runs/finetune-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


def options_from_args(args: argparse.Namespace):
    from hwloop.errors import CheckpointError
    from hwloop.train.finetune import FinetuneOptions
    from hwloop.train.hil import FinetuneConfig
    if args.out is None:
        if args.resume:
            raise CheckpointError("--resume needs --out: the folder of the run to continue")
        args.out = default_out()
    ft = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, l1=args.l1,
                        seed=args.seed, max_steps_per_epoch=args.max_steps_per_epoch)
    return FinetuneOptions(device=args.device, chip_seed=args.chip_seed, dataset=args.dataset,
                           data_dir=args.data_dir, arch=args.arch, pretrain_epochs=args.pretrain_epochs,
                           train_subset=args.train_subset, test_subset=args.test_subset,
                           window_percentile=args.window_percentile, finetune=ft, out=args.out,
                           resume=args.resume, calibration=args.calibration,
                           progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from hwloop.errors import DataError
    from hwloop.train.finetune import format_table, run_finetune
    try:
        opts = options_from_args(args)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise DataError(f"invalid option {'.'.join(map(str, err['loc']))}={err.get('input')!r}: {err['msg']}") from None
    if opts.train_subset or opts.finetune.max_steps_per_epoch:
        print(f"note: using a subset (train_subset={opts.train_subset}, "
              f"max_steps_per_epoch={opts.finetune.max_steps_per_epoch})")
    report = run_finetune(opts)
    print(format_table(report))
    print(f"report: {opts.out}/report.json   step log: {opts.out}/log.jsonl")
    if args.json:
        print(json.dumps(report, indent=2, default=float))
    return 0
