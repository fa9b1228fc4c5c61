"""Open a device from one string: a profile path, a serial URL or a VISA resource."""

from __future__ import annotations

import os
import re

from hwloop.devices.base import TTFSDevice
from hwloop.errors import DeviceError

ACCEPTED_FORMS = (
    "a device profile: a path ending in .yaml/.yml or an existing file -> in-process emulator",
    "a serial URL: socket://HOST:PORT, loop://, rfc2217://HOST:PORT, /dev/tty*, COM<n> "
    "-> SerialDevice (frame dialect)",
    "a VISA resource: TCPIP..., ASRL..., USB..., GPIB... -> VisaDevice (SCPI dialect)",
)

_SERIAL = re.compile(r"^(socket://|loop://|rfc2217://|/dev/tty|/dev/pts/|/dev/cu\.|COM\d+$)",
                     re.IGNORECASE)
_VISA = re.compile(r"^(TCPIP|ASRL|USB|GPIB)", re.IGNORECASE)

_SERIAL_KW = ("timeout", "retries", "write_retries", "baudrate", "per_sample_timeout_s",
              "chunk_bytes", "time_format", "verify", "byte_rate", "ack_timeout",
              "reply_chunk_bytes", "sparse")
_VISA_KW = ("backend", "timeout", "per_sample_timeout_s", "byte_rate", "chunk_codes",
            "write_retries", "time_format", "resource_manager", "open_timeout", "verify",
            "sparse")


def backend_for(name: str) -> str:
    """"emulator", "serial" or "visa" for a device string; DeviceError if none fits."""
    s = str(name).strip()
    if s.lower().endswith((".yaml", ".yml")) or (os.path.isfile(s) and not _SERIAL.match(s)):
        return "emulator"
    if _SERIAL.match(s):
        return "serial"
    if _VISA.match(s):
        return "visa"
    raise DeviceError(f"cannot open device {name!r}: accepted forms are\n  - " +
                      "\n  - ".join(ACCEPTED_FORMS))


def open_device(name: str, **kw) -> TTFSDevice:
    """Open the device named by ``name`` (see :data:`ACCEPTED_FORMS`).

    Keyword arguments go to the backend: ``chip_seed`` to the emulator; ``timeout``,
    ``retries``, ``chunk_bytes``, ``time_format`` ... to the serial and VISA backends. Keywords a
    backend does not take are ignored, so one set of options serves every backend.
    """
    kind = backend_for(name)
    s = str(name).strip()
    if kind == "emulator":
        from hwloop.devices.emulator import EmulatorDevice  # lazy: heavy, and optional here
        return EmulatorDevice.from_profile(s, chip_seed=kw.get("chip_seed"))
    if kind == "serial":
        from hwloop.devices.serial_device import SerialDevice
        return SerialDevice(s, **{k: v for k, v in kw.items() if k in _SERIAL_KW})
    from hwloop.devices.visa_device import VisaDevice
    return VisaDevice(s, **{k: v for k, v in kw.items() if k in _VISA_KW})
