"""``hwloop evaluate``: accuracy, spikes per neuron and energy of a network on a device,
optionally compensated with a calibration record (docs/calibration.md).

The network is either the converted ReLU twin (trained, or loaded from the model cache, as by
``hwloop finetune``; its windows shrunk to the profile's percentile) or the weights a
fine-tuning run saved (``--weights runs/.../final_weights.pt``, windows as saved). Weights from a
run that used a calibration record (its ``report.json`` says so) are already in the chip's
device domain: they are programmed as they are, and ``--calibration`` is not applied again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Optional

from hwloop.commands import add_data_args, add_device_args


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
                   help="final_weights.pt of a fine-tuning run (default: the converted ReLU twin)")
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


def weights_are_device_domain(weights: str) -> Optional[str]:
    """The calibration path recorded by the run that saved ``weights`` (its report.json beside
    it), or None when that run used none (or no report is found)."""
    rep = Path(weights).with_name("report.json")
    try:
        data = json.loads(rep.read_text())
    except (OSError, ValueError):
        return None
    cal = (data.get("provenance") or {}).get("calibration")
    return cal.get("path") if isinstance(cal, dict) else (cal or None)


def _load_weights(path: str) -> dict:
    """The state dict of a ``final_weights.pt`` written by ``hwloop finetune``.

    Raises:
        CheckpointError: the file is missing or is not such a weights file.
    """
    import torch

    from hwloop.errors import CheckpointError
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"--weights {path}: no such file") from None
    except Exception as exc:  # torch raises many types for a file of another kind
        raise CheckpointError(f"--weights {path} is not a weights file written by hwloop finetune "
                              f"(final_weights.pt): {type(exc).__name__}") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"--weights {path} is not a weights file written by hwloop finetune")
    return sd


def evaluate_on_device(device: str, chip_seed: Optional[int] = None, calibration: Optional[str] = None,
                       weights: Optional[str] = None, dataset: str = "fashion-mnist",
                       data_dir: Optional[str] = None, arch: str = "fc2", seed: int = 0,
                       pretrain_epochs: Optional[int] = None, train_subset: Optional[int] = None,
                       test_subset: Optional[int] = None, window_percentile: Optional[float] = None,
                       batch_size: int = 1000, log: Callable[[str], None] = print, *,
                       repeats: int = 1, progress: bool = False, trace: bool = False,
                       cache_dir: Optional[str] = None) -> dict[str, Any]:
    """Evaluate on a device; returns a dict with ``device`` (see
    :func:`hwloop.train.hil.evaluate_device`; with ``spread`` over ``repeats`` evaluations with
    fresh jitter), ``ideal_snn`` accuracy, and what was programmed; ``trace``: also the spike
    times of a few test images (``trace`` key, for the plots).

    The device is opened, and a calibration record checked against it, before anything else
    (the twin may take minutes to train): a wrong device fails at once."""
    import torch

    from hwloop.calibrate.compensate import program_calibrated
    from hwloop.calibrate.record import load_record
    from hwloop.mapping import program_network
    from hwloop.train.finetune import (FinetuneOptions, data_digest, data_source, load_data,
                                       map_network, open_named_device, relu_twin)
    from hwloop.train.hil import FinetuneConfig, evaluate_device, evaluate_net
    from hwloop.errors import CheckpointError
    from hwloop.ttfs import convert

    opts = FinetuneOptions(device=device, chip_seed=chip_seed, dataset=dataset, data_dir=data_dir,
                           arch=arch, pretrain_epochs=pretrain_epochs, train_subset=train_subset,
                           test_subset=test_subset, window_percentile=window_percentile,
                           finetune=FinetuneConfig(seed=seed), progress=progress,
                           eval_repeats=repeats, eval_batch_size=batch_size, cache_dir=cache_dir)
    # everything the user named is checked before the (possibly long) twin training
    rec = load_record(calibration) if calibration else None
    sd = _load_weights(weights) if weights else None
    from hwloop.train.finetune import evaluate_repeated
    with open_named_device(device, chip_seed) as dev:
        info = dev.info()
        if rec is not None:
            from hwloop.calibrate.fit import spec_for_arch
            from hwloop.calibrate.record import check_record_matches
            check_record_matches(rec, info.device_id, spec_for_arch(arch, opts.dataset))
        source = data_source(opts)
        data = load_data(opts)
        xtr, ytr, xte, yte = data
        digest = data_digest(data)
        relu, _ = relu_twin(opts, data, log, digest)
        net = convert(relu, xtr[:2000].to(torch.float64), dtype=torch.float64)
        mode = "calibrated" if rec is not None else "uncalibrated"
        if weights:
            try:
                net.load_state_dict(sd.get("shadow", sd) if isinstance(sd, dict) else sd)
            except (RuntimeError, TypeError) as exc:
                raise CheckpointError(f"--weights {weights} does not fit --arch {arch} on {dataset}: "
                                      f"{' '.join(str(exc).split())[:300]}") from None
            ideal = net
            run_cal = weights_are_device_domain(weights)
            prof = getattr(dev, "profile", None)
            clip = getattr(prof, "weight_clip_percentile", None)
            if run_cal:
                if rec is not None:
                    log(f"note: {weights} was fine-tuned with calibration {run_cal}: its weights are "
                        "already compensated; --calibration is not applied again")
                mode = f"fine-tuned with calibration {run_cal} (device-domain weights)"
                program_network(dev, net, clip_percentile=clip)
                rec = None
            elif rec is not None:
                program_calibrated(dev, net, rec, clip_percentile=clip)
            else:
                program_network(dev, net, clip_percentile=clip)
            shadow = net
        else:
            import copy
            ideal = copy.deepcopy(net)
            shadow, _, _ = map_network(dev, net, xtr, window_percentile, rec)
        res = evaluate_repeated(dev, shadow, xte, yte, opts, 500_000, "evaluating")
        tr = None
        if trace:
            from hwloop.train.plots import spike_trace
            dev.seed_noise(seed * 1_000_003 + 900_000)
            tr = spike_trace(shadow, xte, yte, device=dev)
    ideal_res = evaluate_net(ideal, xte, yte) if not weights else None
    cal = None
    if rec is not None or calibration:
        from hwloop.calibrate.record import content_hash
        r = rec if rec is not None else load_record(calibration)
        cal = {"path": calibration, "content_sha256": content_hash(r)}
    out = {"kind": "evaluate", "device_id": info.device_id, "device_name": device, "mode": mode,
           "dataset": opts.dataset, "arch": arch, "n_test": int(xte.shape[0]),
           "data": {**source, "sha256": digest}, "device": res, "ideal_snn": ideal_res,
           "calibration": calibration, "calibration_record": cal, "weights": weights}
    if trace:
        out["trace"] = tr
    return out


def default_out() -> str:
    import datetime as dt
    return "runs/evaluate-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


def run(args: argparse.Namespace) -> int:
    import os

    from hwloop.train.finetune import remove_if_empty
    from hwloop.train.lock import FolderLock
    out_dir = Path(args.out or default_out())
    existed = out_dir.exists()
    try:
        with FolderLock(out_dir, "hwloop evaluate"):
            out = evaluate_on_device(args.device, args.chip_seed, args.calibration, args.weights,
                                     args.dataset, args.data_dir, args.arch, args.seed,
                                     args.pretrain_epochs, args.train_subset, args.test_subset,
                                     args.window_percentile, args.batch_size, repeats=args.repeats,
                                     progress=not args.no_progress, trace=not args.no_plots,
                                     cache_dir=args.cache_dir)
            trace = out.pop("trace", None)
            tmp = out_dir / "report.json.tmp"
            tmp.write_text(json.dumps(out, indent=2, default=float))
            os.replace(tmp, out_dir / "report.json")
            if trace is not None:
                write_plots(out, trace, out_dir)
    except BaseException:
        if not existed:
            remove_if_empty(out_dir)
        raise
    print(summary(out, out_dir))
    if args.json:
        print(json.dumps(out, indent=2, default=float))
    return 0


PLOTS = ("spike_raster.png", "spike_times.png", "spikes_per_layer.png")


def write_plots(out: dict, trace: dict, out_dir: Path) -> list[str]:
    """The spike raster and per-layer spike-time histograms of a few test images on the
    device, and the spikes per neuron of each layer over the test set."""
    from hwloop.train import plots
    (out_dir / "spike_trace.json").write_text(json.dumps(trace))
    paths = [plots.plot_spike_raster(trace, out_dir / PLOTS[0]),
             plots.plot_spike_histograms(trace, out_dir / PLOTS[1]),
             plots.plot_layer_activity(out["device"], out_dir / PLOTS[2],
                                       title=f"{out['arch']} on {out['device_id']} ({out['mode']})")]
    return [str(p) for p in paths]


def summary(out: dict, out_dir) -> str:
    """What `hwloop evaluate` prints (and `hwloop report` again)."""
    from hwloop.train.finetune import format_eval
    d = out["device"]
    lines = [f"device {out['device_id']} ({out['mode']}), {out['arch']} on {out['dataset']}, "
             f"{out['n_test']} test images"]
    if out.get("calibration_record"):
        c = out["calibration_record"]
        lines.append(f"  calibration {c['path']} (sha256 {c['content_sha256'][:16]}...)")
    if out["ideal_snn"] is not None:
        lines.append(f"  ideal SNN (software)  accuracy {100 * out['ideal_snn']['accuracy']:.2f} %")
    lines.append(f"  device                {format_eval(d)}")
    lines.append(f"report: {Path(out_dir) / 'report.json'}")
    plots = [str(Path(out_dir) / p) for p in PLOTS if (Path(out_dir) / p).exists()]
    if plots:
        lines.append("plots: " + "  ".join(plots))
    return "\n".join(lines)
