"""``hwloop devices``: list, show and scan devices.

* ``hwloop devices list``: the profiles in the top-level ``devices/`` folder (name, backend,
  weight bits, time steps, non-idealities, key limits, description).
* ``hwloop devices show PROFILE``: one validated profile (a name in ``devices/`` or a path),
  every field with its value and unit.
* ``hwloop devices scan``: look for connected chips (serial ports, VISA resources); delegated to
  :func:`hwloop.commands.devices_scan.scan`.
"""

from __future__ import annotations

import importlib
import json
import sys

from hwloop.emulator.profile import DeviceProfile, field_rows, list_profiles, load_profile, profiles_dir

__all__ = ["register", "run_list", "run_scan", "run_show"]


def _fmt(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _summary(p: DeviceProfile) -> dict:
    m = p.mismatch
    mism = max(m.synapse_gain_sd, m.capacitance_sd, m.ramp_current_sd, m.threshold_offset_sd)
    return {
        "name": p.name,
        "backend": p.backend,
        "bits": "float" if p.weight_bits is None else str(p.weight_bits),
        "steps": "cont." if p.time_steps_per_layer is None else str(p.time_steps_per_layer),
        "mismatch": f"{100 * mism:g}%",
        "jitter": f"{p.jitter_sd:g}",
        "layers": str(p.limits.max_layers),
        "neurons": str(p.limits.max_neurons_per_layer),
        "fan_in": str(p.limits.max_fan_in),
        "description": p.description,
    }


def run_list(args) -> int:
    """Print a table of the profiles in ``devices/`` (``--json``: a JSON list)."""
    entries = list_profiles()
    rows, bad = [], []
    for path, prof in entries:
        if isinstance(prof, DeviceProfile):
            row = _summary(prof)
            row["file"] = path.name
            rows.append(row)
        else:
            bad.append((path, prof))
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2))
    else:
        if not entries:
            print(f"no device profiles (*.yaml) in {profiles_dir()}")
            return 0
        cols = ["name", "backend", "bits", "steps", "mismatch", "jitter", "layers", "neurons",
                "fan_in", "description"]
        head = {"mismatch": "mism.sd", "jitter": "jitter/tau_c", "layers": "max_layers",
                "neurons": "max_neurons", "fan_in": "max_fan_in"}
        widths = {c: max([len(head.get(c, c))] + [len(r[c]) for r in rows]) for c in cols[:-1]}
        print("  ".join(head.get(c, c).ljust(widths[c]) for c in cols[:-1]) + "  description")
        for r in rows:
            print("  ".join(r[c].ljust(widths[c]) for c in cols[:-1]) + "  " + r["description"])
        print(f"({len(rows)} profiles in {profiles_dir()})")
    for path, err in bad:
        print(f"warning: {path.name}: {err}", file=sys.stderr)
    return 0


def run_show(args) -> int:
    """Print one validated profile, every field with value and unit (``--json``: the model)."""
    prof = load_profile(args.profile)
    if getattr(args, "json", False):
        print(json.dumps(prof.model_dump(mode="json"), indent=2))
        return 0
    rows = field_rows(prof)
    wf = max(len(r[0]) for r in rows)
    wv = max(len(_fmt(r[1])) for r in rows)
    wu = max(len(r[2]) for r in rows)
    print(f"profile {prof.name}  (device id {prof.device_id}; ideal: {_fmt(prof.is_ideal)})")
    print(f"{'field'.ljust(wf)}  {'value'.ljust(wv)}  {'unit'.ljust(wu)}  meaning")
    for name, value, unit, desc in rows:
        print(f"{name.ljust(wf)}  {_fmt(value).ljust(wv)}  {unit.ljust(wu)}  {desc}")
    print(f"{'(clip percentile in effect)'.ljust(wf)}  {_fmt(prof.clip_percentile).ljust(wv)}  "
          f"{'percent'.ljust(wu)}  weight outliers removed on each side")
    return 0


def run_scan(args) -> int:
    """Delegate to :func:`hwloop.commands.devices_scan.scan` (imported lazily)."""
    name = "hwloop.commands.devices_scan"
    try:
        mod = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        print("hwloop devices scan: device scanning is not available in this installation "
              f"({name} is missing); emulator profiles: `hwloop devices list`", file=sys.stderr)
        return 1
    found = mod.scan(visa_backend=args.visa_backend)
    if getattr(args, "json", False):
        print(json.dumps(found, indent=2, default=str))
        return 0
    if not found:
        print("no serial ports or VISA resources found")
        return 0
    for item in found:
        if not isinstance(item, dict):
            print(item)
            continue
        if item.get("error"):
            print(f"{item.get('kind', '?')}: error: {item['error']}")
            continue
        desc = item.get("description")
        print(f"{item.get('kind', '?'):7s} {item.get('open_with') or item.get('name')}"
              + (f"  ({desc})" if desc and desc != "n/a" else ""))
    return 0


def register(subparsers) -> None:
    """Add ``devices`` with its ``list``, ``show`` and ``scan`` subcommands."""
    p = subparsers.add_parser("devices", help="list, show and scan devices (profiles in devices/)",
                              description="List, show and scan devices (profiles in devices/).")
    sub = p.add_subparsers(dest="devices_command", metavar="SUBCOMMAND")
    pl = sub.add_parser("list", help="list the device profiles in devices/")
    pl.add_argument("--json", action="store_true", help="print JSON")
    pl.set_defaults(func=run_list)
    ps = sub.add_parser("show", help="show one validated profile with units")
    ps.add_argument("profile", metavar="PROFILE", help="profile name in devices/ or a YAML path")
    ps.add_argument("--json", action="store_true", help="print JSON")
    ps.set_defaults(func=run_show)
    pc = sub.add_parser("scan", help="look for connected chips (serial, VISA)")
    pc.add_argument("--visa-backend", default="@py", help="pyvisa backend (default: @py)")
    pc.add_argument("--json", action="store_true", help="print JSON")
    pc.set_defaults(func=run_scan)

    def _usage(args) -> int:
        p.print_help(sys.stderr)
        return 2

    p.set_defaults(func=_usage)
