"""Progress that is quiet when piped: a live bar on a terminal, one line per epoch everywhere.

A tqdm bar redraws itself with carriage returns; in a log file each redraw stays (a demo's log
grew to 482 kB). :func:`bar` therefore returns a bar only when the stream is a terminal
(``HWLOOP_PROGRESS=always`` forces one, ``never`` turns it off); the summary lines
(:func:`epoch_line`, :func:`link_health`) are printed in both cases.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Optional

HEALTH_SHOWN = ("retries", "crc_errors", "resends", "nudges", "timeouts", "resyncs", "naks")


def interactive(stream=None) -> bool:
    """True when a live bar should be drawn on ``stream`` (default stderr)."""
    mode = os.environ.get("HWLOOP_PROGRESS", "auto").lower()
    if mode in ("always", "1", "yes"):
        return True
    if mode in ("never", "0", "no"):
        return False
    stream = stream or sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Bar:
    """A tqdm bar that drops quietly when tqdm is missing."""

    def __init__(self, total: int, desc: str, unit: str):
        from tqdm import tqdm
        self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                         file=sys.stderr)

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def set_postfix(self, **kw) -> None:
        self._bar.set_postfix(**kw)

    def close(self) -> None:
        self._bar.close()


def bar(on: bool, total: int, desc: str, unit: str = "it") -> Optional[_Bar]:
    """A live progress bar, or None when ``on`` is false or stderr is not a terminal."""
    if not on or not interactive():
        return None
    try:
        return _Bar(total, desc, unit)
    except ImportError:  # pragma: no cover
        return None


def health_delta(now: Optional[dict], before: Optional[dict]) -> dict[str, int]:
    """The link-health counters that grew between two snapshots of a device's ``health``."""
    if not now:
        return {}
    before = before or {}
    return {k: int(now[k]) - int(before.get(k, 0)) for k in HEALTH_SHOWN
            if k in now and isinstance(now[k], (int, float))}


def link_health(counts: Optional[dict]) -> str:
    """``link: 3 retries, 0 crc errors, ...`` or '' for a device without a link (emulator)."""
    if not counts:
        return ""
    return "link: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items())


def plural(n: int, word: str) -> str:
    """``1 epoch``, ``3 epochs``."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def epoch_line(epoch: int, epochs: int, row: dict[str, Any], health: Optional[dict] = None) -> str:
    """One line per fine-tuning epoch: loss, accuracy, spikes, energy and link health."""
    parts = [f"epoch {epoch}/{epochs}: loss {row['train_loss']:.4f}",
             f"train accuracy {100 * row['train_accuracy']:.2f} %",
             f"spikes/neuron {row['spikes_per_neuron']:.3f}"]
    e = row.get("energy_j_per_sample")
    if e is not None and not (isinstance(e, float) and math.isnan(e)):
        parts.append(f"energy {format_joules(e)}")
    if row.get("wall_time_s") is not None:
        parts.append(f"{row['wall_time_s']:.1f} s")
    h = link_health(health)
    if h:
        parts.append(h)
    return ", ".join(parts)


def format_joules(v: float) -> str:
    """An energy in joules with a readable unit (nJ, pJ, fJ), or '-' when unknown."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    for unit, f in (("nJ", 1e-9), ("pJ", 1e-12), ("fJ", 1e-15)):
        if abs(v) >= f:
            return f"{v / f:.3f} {unit}"
    return f"{v:.3e} J"
