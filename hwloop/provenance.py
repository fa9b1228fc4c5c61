"""Provenance written beside every result: what ran, on which device, from which code."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import subprocess
from typing import Any, Optional

import hwloop


def git_revision(path: Optional[str] = None) -> Optional[str]:
    """The git commit of the hwloop checkout (``+dirty`` if it has local changes), or None."""
    root = path or os.path.dirname(os.path.dirname(os.path.abspath(hwloop.__file__)))
    try:
        rev = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def provenance(device=None, device_name: Optional[str] = None, seeds: Optional[dict] = None,
               calibration: Optional[str] = None, extra: Optional[dict] = None) -> dict[str, Any]:
    """A JSON-able provenance record.

    Args:
        device: an open :class:`~hwloop.devices.base.TTFSDevice` (its ``info()``, ``profile``
            and ``health`` are recorded when present).
        device_name: the string the device was opened with.
        seeds: every seed of the run.
        calibration: path of the calibration record used, if any (its sha256 is recorded).
    """
    rec: dict[str, Any] = {
        "hwloop_version": hwloop.__version__,
        "git_revision": git_revision(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "seeds": dict(seeds or {}),
    }
    try:
        import torch
        rec["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    if device is not None:
        info = device.info()
        rec["device_id"] = info.device_id
        rec["firmware_version"] = info.firmware_version
        rec["protocol_version"] = info.protocol_version
        prof = getattr(device, "profile", None)
        if prof is not None:
            rec["profile"] = prof.model_dump(mode="json")
        for attr in ("chip_seed", "jitter_seed"):
            if getattr(device, attr, None) is not None:
                rec["seeds"].setdefault(attr, getattr(device, attr))
        health = getattr(device, "health", None)
        if health is not None:
            rec["health"] = dict(health)
    if calibration:
        rec["calibration"] = {"path": calibration, "sha256": file_sha256(calibration)}
    if extra:
        rec.update(extra)
    return rec
