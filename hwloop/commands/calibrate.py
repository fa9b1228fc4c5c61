"""``hwloop calibrate``: measure a chip's frozen mismatch and write its calibration record
(:mod:`hwloop.calibrate`, docs/calibration.md).

A record is measured for a topology (layer kinds and shapes, not windows): the network that
will run, given as ``--arch`` on ``--dataset``'s input shape (fc2 on fashion-mnist by default).
"""

from __future__ import annotations

import argparse
import os
import json

from hwloop.commands import add_device_args, dataset_name
from hwloop.errors import CalibrationError, DataError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="measure a chip's frozen mismatch (probes) and write calibration/<device-id>.json",
        description=(
            "Program probe networks through the device interface (threshold sweeps with zero "
            "weights at several window widths, one-hot and relayed synapse probes), fit per "
            "neuron its slope, delay and threshold offset and per synapse its gain, estimate the "
            "random jitter from repeats, and write a hash-protected JSON record. The record "
            "belongs to one chip (device id) and one topology: --arch on --dataset's input "
            "shape. Use it with `hwloop finetune --calibration FILE` or `hwloop evaluate "
            "--calibration FILE`."),
    )
    add_device_args(p, "devices/emulator-mismatch.yaml")
    p.add_argument("--arch", default="fc2", choices=("fc2", "fc16", "lenet5", "vgg16"),
                   help="topology to calibrate for (default fc2)")
    p.add_argument("--dataset", default="fashion-mnist", choices=("fashion-mnist", "mnist", "synthetic"),
                   type=dataset_name,
                   help="input shape and classes of the topology (default fashion-mnist)")
    p.add_argument("--out", default=None, help="record path (default calibration/<device-id>.json)")
    p.add_argument("--force", action="store_true", help="replace an existing record at --out")
    p.add_argument("--repeats", type=int, default=16, help="repeats per probe setting (default 16)")
    p.add_argument("--levels", type=int, default=12, help="threshold levels per width (default 12)")
    p.add_argument("--widths", default="2,8,32",
                   help="window widths of the threshold sweep, tau_c, comma separated (default 2,8,32)")
    p.add_argument("--no-synapse-gains", action="store_true",
                   help="skip the synapse probes (per-neuron slope/delay/offset only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the probe patterns")
    p.add_argument("--no-plots", action="store_true", help="write no plot of the fit")
    p.add_argument("--json", action="store_true", help="print the record summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: import-time cost (the library loads pydantic models, ~0.15 s; `hwloop --help` stays fast)
    from hwloop.calibrate.fit import (CalibrationOptions, calibrate_device, default_record_path,
                                      spec_for_arch)
    from hwloop.calibrate.record import save_record
    from hwloop.devices.open import open_named_device
    from hwloop.train.plots import plot_calibration_fit

    try:
        widths = tuple(float(w) for w in str(args.widths).split(",") if w.strip())
    except ValueError:
        raise DataError(f"--widths must be comma-separated numbers, got {args.widths!r}") from None
    spec = spec_for_arch(args.arch, args.dataset)
    opts = CalibrationOptions(repeats=args.repeats, levels=args.levels, widths=widths,
                              synapse_gains=not args.no_synapse_gains, seed=args.seed, log=print)
    with open_named_device(args.device, args.chip_seed) as dev:
        # where the record goes is settled before any probing: a record that exists is kept
        # unless --force, and an unwritable folder fails now, not after the measurement
        out = args.out or default_record_path(dev.info().device_id)
        folder = os.path.dirname(os.path.abspath(out))
        if os.path.exists(out) and not args.force:
            raise CalibrationError(f"{out} exists: pass --force to replace that chip's record, or "
                                   "choose another --out")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise CalibrationError(f"--out {out}: folder {folder} cannot be made: {exc}") from None
        if not os.access(folder, os.W_OK):
            raise CalibrationError(f"--out {out}: folder {folder} is not writable")
        rec = calibrate_device(dev, spec, opts, arch=args.arch, chip_seed=args.chip_seed)
    save_record(out, rec)
    if not args.no_plots:
        try:
            plot_calibration_fit(rec, plot_path(out))
        except Exception as exc:  # the record is written: a picture does not fail the run
            print(f"warning: fit plot not written ({type(exc).__name__}: {exc})")
    print(summary(rec, out))
    if args.json:
        print(json.dumps(rec.summary(), indent=2, default=float))
    return 0


def plot_path(record_path: str) -> str:
    """``calibration/<id>.json`` -> ``calibration/<id>.fit.png``."""
    base = record_path[:-5] if record_path.endswith(".json") else record_path
    return base + ".fit.png"


def summary(rec, out: str) -> str:
    """What `hwloop calibrate` prints (and `hwloop report RECORD` again). The hash shown is the
    record's content hash (``content_sha256``), the one `hwloop finetune` and `evaluate` show."""
    # lazy: import-time cost (the library loads pydantic models, ~0.15 s; `hwloop --help` stays fast)
    from hwloop.calibrate.record import content_hash
    s = rec.summary()
    lines = [f"device {rec.device_id}: {rec.device_runs} runs, {rec.samples} samples, "
             f"{rec.wall_time_s:.1f} s; random jitter SD {rec.jitter_sd:.4g} +- {rec.jitter_sd_se:.2g} tau_c"]
    for row in s["layers"]:
        fields = ", ".join(f"{k} {v}" for k, v in row.items()
                           if k not in ("index", "kind", "neurons", "residual_rms"))
        lines.append(f"  layer {row['index']} {row['kind']} ({row['neurons']}): {fields}; "
                     f"residual RMS {row['residual_rms']}")
    for lc in rec.layers:  # e.g. neurons whose fit failed and were set to the layer median
        for note in lc.notes:
            lines.append(f"  note, layer {lc.index}: {note}")
    for note in rec.notes:
        lines.append(f"  note: {note}")
    lines.append(f"record: {out} (sha256 {content_hash(rec)[:16]}...)")
    if os.path.exists(plot_path(out)):
        lines.append(f"plots: {plot_path(out)}")
    return "\n".join(lines)
