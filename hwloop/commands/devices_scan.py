"""Find attached chips: serial ports (pyserial) and VISA resources (pyvisa-py).

``scan()`` never raises for a missing or broken backend: it reports the failure in the entry's
``error`` field and carries on.
"""

from __future__ import annotations

import warnings


def _serial_ports() -> list[dict]:
    try:
        from serial.tools import list_ports
        ports = list_ports.comports()
    except Exception as e:  # pyserial missing or the platform query failed
        return [{"kind": "serial", "name": None, "error": f"{type(e).__name__}: {e}"}]
    out = []
    for p in ports:
        out.append({"kind": "serial", "name": p.device, "open_with": p.device,
                    "description": p.description or "", "hwid": p.hwid or "",
                    "vid": p.vid, "pid": p.pid, "serial_number": p.serial_number})
    return out


def _visa_resources(backend: str) -> list[dict]:
    try:
        import pyvisa
        rm = pyvisa.ResourceManager(backend)
    except Exception as e:
        return [{"kind": "visa", "name": None, "error": f"{type(e).__name__}: {e}"}]
    try:
        with warnings.catch_warnings():  # pyvisa-py warns about optional discovery packages
            warnings.simplefilter("ignore")
            names = rm.list_resources()
    except Exception as e:
        return [{"kind": "visa", "name": None, "error": f"{type(e).__name__}: {e}"}]
    finally:
        try:
            rm.close()
        except Exception:
            pass
    return [{"kind": "visa", "name": n, "open_with": n, "backend": backend} for n in names]


def scan(visa_backend: str = "@py") -> list[dict]:
    """Serial ports and VISA resources visible from this machine, as dicts with ``kind``,
    ``name`` and ``open_with`` (the string for ``open_device``), or ``error`` on failure."""
    return _serial_ports() + _visa_resources(visa_backend)
