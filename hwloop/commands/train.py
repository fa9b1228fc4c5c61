"""``hwloop train``: software training of a ReLU net or its TTFS twin (B1 / alpha1)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hwloop.commands import dataset_name

MODELS = ("b1", "relu", "alpha1")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a network in software (ReLU twin, B1 or alpha1 TTFS net)",
        description=(
            "Train an architecture of the paper in software. With --model b1/alpha1 the ReLU net "
            "is converted to a TTFS network (hwloop.convert) and the same optimiser trains it, "
            "with the adaptive windows of Eq. (8). Writes checkpoint.pt and report.json to --out."
        ),
    )
    p.add_argument("--arch", default="fc2", help="fc2, fc16, lenet5 or vgg16 (default fc2)")
    p.add_argument("--model", choices=MODELS, default="b1", help="default b1")
    p.add_argument("--dataset", default="fashion-mnist", type=dataset_name,
                   help="mnist or fashion-mnist (default)")
    p.add_argument("--data-dir", default=None, help="directory holding the IDX files")
    p.add_argument("--recipe", default="default", help="named recipe: default or reference")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--schedule", default=None, help="cosine, exponential, constant, onecycle")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="TTFS parameter dtype (default: the ReLU model's, float32)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training samples")
    p.add_argument("--out", default="runs/train", help="output directory (default runs/train)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is fastest on a busy machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    # lazy: import-time cost (torch and the library load only when the command runs; `hwloop --help` stays fast)
    import hwloop
    from hwloop.data import load_dataset
    from hwloop.errors import DataError
    from hwloop.ttfs.architectures import build_relu
    from hwloop.train.software import evaluate, prediction_agreement, train

    if args.threads is not None:
        if args.threads < 1:
            raise DataError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    x_train, y_train = load_dataset(args.dataset, "train", args.data_dir)
    x_test, y_test = load_dataset(args.dataset, "test", args.data_dir)
    if args.limit is not None:
        if args.limit < 1:
            raise DataError(f"--limit must be >= 1, got {args.limit}")
        x_train, y_train = x_train[: args.limit], y_train[: args.limit]
    n_classes = int(max(y_train.max(), y_test.max())) + 1

    torch.manual_seed(args.seed)
    try:
        relu = build_relu(args.arch, tuple(x_train.shape[1:]), n_classes)
    except ValueError as exc:
        raise DataError(str(exc)) from exc
    model = relu
    if args.model != "relu":
        dtype = getattr(torch, args.dtype) if args.dtype else None
        model = hwloop.convert(relu, x_train[:1000], model=args.model, dtype=dtype)

    report = train(
        model,
        (x_train, y_train),
        (x_test, y_test),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        schedule=args.schedule,
        out_dir=args.out,
        progress=not args.no_progress,
        recipe=args.recipe,
        weight_decay=args.weight_decay,
        resume=args.resume,
    )
    report.update(arch=args.arch, model=args.model, dataset=args.dataset)
    if args.model != "relu":
        twin = model.to_relu()
        report["relu_twin_agreement"] = prediction_agreement(model, twin, x_test)
        report["relu_twin_test_accuracy"] = evaluate(twin, x_test, y_test)["accuracy"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if not args.no_plots:
        write_plots(report, model, x_test, y_test, out)
    print(summary(report, out))
    return 0


PLOTS = ("learning_curve.png", "spike_raster.png", "spike_times.png")


def write_plots(report: dict, model, x_test, y_test, out: Path) -> list[str]:
    """The learning curve and, for a TTFS model, the spike raster and per-layer spike-time
    histograms of a few test images (computed in software)."""
    from hwloop.train import plots  # lazy: import-time cost (matplotlib)
    from hwloop.ttfs import TTFSNetwork
    paths = [plots.plot_train_curve(report.get("history", []), out / PLOTS[0],
                                    title=f"software training: {report.get('model')} {report.get('arch')} "
                                          f"on {report.get('dataset')}")]
    if isinstance(model, TTFSNetwork) and report.get("model") == "b1":
        trace = plots.spike_trace(model.eval(), x_test, y_test)
        (out / "spike_trace.json").write_text(json.dumps(trace))
        paths += [plots.plot_spike_raster(trace, out / PLOTS[1]),
                  plots.plot_spike_histograms(trace, out / PLOTS[2])]
    return [str(p) for p in paths]


def summary(report: dict, out) -> str:
    """What `hwloop train` prints at the end (and `hwloop report` again): the key figures as
    JSON, the report's path and the plots."""
    s = {k: report.get(k) for k in (
        "arch", "model", "dataset", "test_accuracy", "test_loss", "spikes_per_neuron",
        "relu_twin_agreement", "relu_twin_test_accuracy", "wall_time_s") if k in report}
    lines = [json.dumps(s, indent=2), f"report: {Path(out) / 'report.json'}"]
    plots = [str(Path(out) / p) for p in PLOTS if (Path(out) / p).exists()]
    if plots:
        lines.append("plots: " + "  ".join(plots))
    return "\n".join(lines)
