"""``hwloop check-device DEVICE``: the conformance suite (:func:`hwloop.testing.check_device`)
and, with ``--characterise``, the bring-up diagnostics (:func:`hwloop.testing.characterise`).

DEVICE is any string ``--device`` takes (profile, serial URL, VISA resource, or the URL scheme
of an installed third-party backend). Exit code 0 when every check passed or was skipped, 1 when
one failed. ``--out DIR`` receives ``conformance.json`` (and ``characterisation.json`` with the
plots).
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "check-device",
        help="run the conformance suite on a device (and bring-up diagnostics with --characterise)",
        description=(
            "Check that a device backend keeps the TTFSDevice contract: identity and limits, "
            "exact read-back, refusal of out-of-range writes, repeatable runs, windows, batch "
            "limits, counts and energy, units, timeouts and closed links (docs/drivers.md). "
            "With --characterise also measure transfer curves, timing resolution, linearity, "
            "jitter, dead and stuck neurons (JSON report and PNG plots)."))
    p.add_argument("device", metavar="DEVICE",
                   help="profile path (emulator), serial URL/port, VISA resource, or SCHEME://... "
                        "of an installed backend")
    p.add_argument("--chip-seed", type=int, default=None, help="emulator chip instance")
    p.add_argument("--characterise", "--characterize", action="store_true", dest="characterise",
                   help="also run the bring-up diagnostics (report and plots in --out)")
    p.add_argument("--out", default=None,
                   help="folder for the reports (default: runs/check-<UTC date-time>)")
    p.add_argument("--seed", type=int, default=0, help="seed of the test networks and inputs")
    p.add_argument("--repetitions", type=int, default=8,
                   help="runs per condition on a chip with random jitter (default 8)")
    p.add_argument("--timeout", type=float, default=None, help="link timeout, s (transports)")
    p.add_argument("--no-plots", action="store_true", help="characterise without plots")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def _open(args):
    # lazy: import-time cost (the library loads pydantic models, ~0.15 s; `hwloop --help` stays fast)
    from hwloop.devices import open as device_open
    if args.timeout is None:
        return device_open.open_named_device(args.device, args.chip_seed)
    kw = {"timeout": args.timeout}
    if args.chip_seed is not None:
        kw["chip_seed"] = args.chip_seed
    return device_open.open_device(device_open.resolve_device_name(args.device), **kw)


def run(args) -> int:
    # lazy: import-time cost (the library loads pydantic models, ~0.15 s; `hwloop --help` stays fast)
    from hwloop.testing import characterise, check_device
    out = Path(args.out or "runs/check-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    char = None
    if args.characterise:  # first: the conformance suite closes the device at its end
        dev = _open(args)
        try:
            char = characterise(dev, out, plots=not args.no_plots)
        finally:
            dev.close()
    report = check_device(_open(args), seed=args.seed, repetitions=args.repetitions)
    (out / "conformance.json").write_text(json.dumps(report.to_dict(), indent=2))
    print(report.format_table())
    if char is not None:
        j = char["jitter_tau_c"]
        print(f"characterisation: resolution {char['resolution_tau_c']} tau_c, jitter median "
              f"{j['median']:.3g} tau_c, dead {char['dead_neurons']}, stuck {char['stuck_neurons']}")
        for name in char["files"].values():
            print(f"  {out / name}")
    print(f"report: {out / 'conformance.json'}")
    if args.json:
        json.dump({"conformance": report.to_dict(), "characterisation": char}, sys.stdout, indent=2)
        print()
    return 0 if report.passed else 1
