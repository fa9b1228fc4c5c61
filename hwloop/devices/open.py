"""Open a device from one string: a profile path, a serial URL or a VISA resource."""

from __future__ import annotations

import os
import re
from pathlib import Path
from importlib.metadata import entry_points

from hwloop.devices.base import TTFSDevice
from hwloop.errors import DeviceError, ProfileError

ACCEPTED_FORMS = (
    "a device profile: a path ending in .yaml/.yml or an existing file -> in-process emulator",
    "a serial URL: socket://HOST:PORT, loop://, rfc2217://HOST:PORT, /dev/tty*, COM<n> "
    "-> SerialDevice (frame dialect)",
    "a VISA resource: TCPIP..., ASRL..., USB..., GPIB... -> VisaDevice (SCPI dialect)",
    "SCHEME://... of a backend installed under the entry-point group hwloop.devices",
)

_SERIAL = re.compile(r"^(socket://|loop://|rfc2217://|/dev/tty|/dev/pts/|/dev/cu\.|COM\d+$)",
                     re.IGNORECASE)
_VISA = re.compile(r"^(TCPIP|ASRL|USB|GPIB)", re.IGNORECASE)

_SERIAL_KW = ("timeout", "retries", "write_retries", "baudrate", "per_sample_timeout_s",
              "chunk_bytes", "time_format", "verify", "byte_rate", "ack_timeout",
              "reply_chunk_bytes", "sparse", "take_over", "adaptive", "max_ack_timeout",
              "min_chunk_bytes")
_VISA_KW = ("backend", "timeout", "per_sample_timeout_s", "byte_rate", "chunk_codes",
            "write_retries", "time_format", "resource_manager", "open_timeout", "verify",
            "sparse", "resync_timeout", "take_over")


#: Entry-point group of third-party backends: the entry point's name is a URL scheme, its
#: value a callable ``open(url, **kw) -> TTFSDevice`` (it must ignore keywords it does not take).
ENTRY_POINT_GROUP = "hwloop.devices"


def entry_point_for(name: str):
    """The ``hwloop.devices`` entry point registered for the URL scheme of ``name``
    (``scheme://...``), or None. Built-in forms are matched first, so a plugin cannot take
    them over."""
    scheme, sep, _ = str(name).strip().partition("://")
    if not sep or not scheme:
        return None
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name.lower() == scheme.lower():
            return ep
    return None


#: How an option given in a device string (``...?key=value&key=value``) is read.
_OPTION_TYPES = {
    "timeout": float, "per_sample_timeout_s": float, "byte_rate": float, "ack_timeout": float,
    "max_ack_timeout": float, "open_timeout": float, "resync_timeout": float,
    "retries": int, "write_retries": int, "baudrate": int, "chunk_bytes": int,
    "reply_chunk_bytes": int, "min_chunk_bytes": int, "chunk_codes": int,
    "verify": bool, "sparse": bool, "take_over": bool, "adaptive": bool,
    "time_format": str, "backend": str,
}


#: Query options of pyserial's own URL handlers, left in the URL for it.
_PYSERIAL_OPTIONS = ("logging", "ign_set_control", "poll_modem")


def _option_value(key: str, text: str, name: str):
    kind = _OPTION_TYPES[key]
    try:
        if kind is bool:
            low = text.strip().lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(text)
            return low in ("1", "true", "yes", "on")
        return kind(text)
    except ValueError as e:
        raise DeviceError(f"device string {name!r}: option {key}={text!r} is not a "
                          f"{kind.__name__}") from e


def split_options(name: str, kind: str) -> tuple[str, dict]:
    """``(device string without our options, options)`` of ``URL?key=value&...``.

    Serial URLs keep the query keys that are pyserial's own (``logging=debug``); VISA resource
    names have no query, so every key must be one of ours. Unknown keys raise DeviceError.
    """
    base, sep, query = name.partition("?")
    if not sep or kind == "emulator":
        return name, {}
    allowed = _SERIAL_KW if kind == "serial" else _VISA_KW
    opts, keep = {}, []
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if key in _OPTION_TYPES and key in allowed and eq:
            opts[key] = _option_value(key, value, name)
        elif kind == "serial" and key in _PYSERIAL_OPTIONS:
            keep.append(item)  # pyserial's own URL options
        else:
            raise DeviceError(f"device string {name!r}: unknown option {key!r} for the "
                              f"{kind} backend (options: {', '.join(sorted(allowed))})")
    return (base + ("?" + "&".join(keep) if keep else "")), opts


def backend_for(name: str) -> str:
    """"emulator", "serial", "visa" or "entry-point" (a third-party backend, see
    :func:`entry_point_for`) for a device string; DeviceError if none fits."""
    s = str(name).strip()
    if s.lower().endswith((".yaml", ".yml")) or (os.path.isfile(s) and not _SERIAL.match(s)):
        return "emulator"
    if _SERIAL.match(s):
        return "serial"
    if _VISA.match(s):
        return "visa"
    if entry_point_for(s) is not None:
        return "entry-point"
    raise DeviceError(f"cannot open device {name!r}: accepted forms are\n  - " +
                      "\n  - ".join(ACCEPTED_FORMS))


def open_device(name: str, **kw) -> TTFSDevice:
    """Open the device named by ``name`` (see :data:`ACCEPTED_FORMS`).

    Options may also be given in the string itself, ``socket://127.0.0.1:5000?ack_timeout=0.2
    &chunk_bytes=512`` or ``TCPIP::host::5025::SOCKET?timeout=10`` (any keyword below; they
    win over keyword arguments), so that every command's ``--device`` reaches them.

    Keyword arguments go to the backend: ``chip_seed`` to the emulator; ``timeout``,
    ``retries``, ``chunk_bytes``, ``time_format`` ... to the serial and VISA backends. Keywords a
    backend does not take are ignored, so one set of options serves every backend.
    """
    kind = backend_for(name)
    s, opts = split_options(str(name).strip(), kind)
    kw = {**kw, **opts}  # options in the string win over keyword defaults
    if kind == "entry-point":  # a third-party backend, by its URL scheme
        return entry_point_for(s).load()(s, **kw)
    # lazy imports (measured import-time cost): a backend loads when a device of its form is
    # opened; pyvisa alone takes ~0.1 s, and a script that opens one chip needs no other
    if kind == "emulator":
        from hwloop.emulator.device import EmulatorDevice
        return EmulatorDevice.from_profile(s, chip_seed=kw.get("chip_seed"))
    if kind == "serial":
        from hwloop.wire.serial_device import SerialDevice
        return SerialDevice(s, **{k: v for k, v in kw.items() if k in _SERIAL_KW})
    from hwloop.wire.visa_device import VisaDevice
    return VisaDevice(s, **{k: v for k, v in kw.items() if k in _VISA_KW})


# ---------------------------------------------------------------------------- by name (hwloop commands)
#: the hwloop checkout, where a profile path such as ``devices/emulator-analog.yaml`` resolves
_REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_device_name(name: str) -> str:
    """A profile path relative to the current directory or to the hwloop checkout, or a bare
    profile name (``emulator-harsh`` -> ``devices/emulator-harsh.yaml``, as
    ``hwloop devices show`` takes it); serial URLs and VISA resources pass through."""
    if "://" in name or "::" in name or name.startswith(("/dev/", "COM", "ASRL", "TCPIP", "USB", "GPIB")):
        return name
    if Path(name).exists():
        return name
    if (_REPO_ROOT / name).exists():
        return str(_REPO_ROOT / name)
    if "/" not in name and "\\" not in name:
        from hwloop.emulator.profile import profiles_dir  # lazy: the emulator backend, as open_device
        for cand in (profiles_dir() / name, profiles_dir() / f"{name}.yaml",
                     profiles_dir() / f"{name}.yml"):
            if cand.is_file():
                return str(cand)
    return name


def override_profile(profile, overrides: dict):
    """A copy of a :class:`DeviceProfile` with dotted fields replaced, validated again
    (:class:`ProfileError` names a bad field, its value and the allowed range)."""
    from hwloop.emulator.profile import validate_profile  # lazy: the emulator backend, as open_device
    data = profile.model_dump()
    for key, value in overrides.items():
        node, parts = data, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ProfileError(f"profile override {key!r}: {part!r} is not a group of fields")
            node = node[part]
        node[parts[-1]] = value
    return validate_profile(data, source=f"{profile.name} with overrides {overrides}")


def open_named_device(name: str, chip_seed=None, profile_overrides=None) -> TTFSDevice:
    """Open a device by the one string a command takes (:func:`resolve_device_name`, then
    :func:`open_device`); emulator profiles may get field overrides (dotted names)."""
    name = resolve_device_name(name)
    if profile_overrides:
        if backend_for(name) != "emulator":
            raise DeviceError(f"profile overrides need an emulator profile, not {name!r}")
        # lazy: the emulator backend, as open_device
        from hwloop.emulator.device import EmulatorDevice
        from hwloop.emulator.profile import load_profile
        prof = override_profile(load_profile(name), profile_overrides)
        return EmulatorDevice.from_profile(prof, chip_seed=chip_seed)
    kw = {} if chip_seed is None else {"chip_seed": chip_seed}
    return open_device(name, **kw)
