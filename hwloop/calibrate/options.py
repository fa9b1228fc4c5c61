"""What every step of :func:`~hwloop.calibrate.fit.calibrate_device` shares: its options, its
log, and the guards that turn a fit a record would refuse into a median fill or a
:class:`CalibrationError` naming the device, the layer and the field."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from pydantic import ValidationError

from hwloop.calibrate.validate import describe_validation_error
from hwloop.errors import CalibrationError

__all__ = ["CalibrationOptions"]


@dataclass
class CalibrationOptions:
    """Knobs of :func:`calibrate_device` (defaults: docs/calibration.md)."""

    repeats: int = 16
    levels: int = 12
    #: window widths (tau_c) of the threshold sweep; >= 2 to separate delay and offset
    widths: Sequence[float] = (2.0, 8.0, 32.0)
    #: window width (tau_c) of every layer during synapse probes
    synapse_width: float = 8.0
    synapse_gains: bool = True
    #: samples per input feature for the deeper-layer synapse fits
    samples_per_input: float = 12.0
    #: active neurons per pattern wanted in the stage feeding a deeper probed layer
    active_inputs: float = 3.0
    seed: int = 0
    verify: bool = True
    log: Optional[object] = None  # callable(str)


def _say(opts: CalibrationOptions, msg: str) -> None:
    if opts.log is not None:
        opts.log(msg)


@contextlib.contextmanager
def _fitted(device_id: str, what: str, prefix: tuple = ()) -> Iterator[None]:
    """Turn a value the record's models refuse (out of range, not finite) into a
    :class:`CalibrationError` naming the device, the layer and the field."""
    try:
        yield
    except ValidationError as exc:
        raise CalibrationError(f"calibration of {device_id}, {what}: the fit gave a value a record "
                               f"does not allow: {describe_validation_error(exc, prefix=prefix)} "
                               "(a failed fit or a circuit the model cannot compensate; see "
                               "docs/calibration.md)") from None


def _ids(mask: torch.Tensor, most: int = 8) -> str:
    idx = torch.nonzero(mask.flatten()).flatten().tolist()
    return ", ".join(map(str, idx[:most])) + (f", ... ({len(idx)} in all)" if len(idx) > most else "")


def _to_median(values: dict[str, torch.Tensor], bad: torch.Tensor, what: str, layer: str) -> str:
    """Set the ``bad`` neurons of every tensor in ``values`` (flat, in place) to the median of the
    others: a fit the record would refuse (docs/calibration.md, "What a record must satisfy") is
    a failed fit, and the neuron is then treated as a typical one. Returns the note."""
    good = ~bad
    if not bool(good.any()):
        raise CalibrationError(f"{layer}: every neuron's {what} fit is outside the allowed range; "
                               "the chip does not follow the model (docs/calibration.md)")
    for v in values.values():
        v[bad] = v[good].median()
    n = int(bad.sum())
    return (f"{n} neuron{'s' if n > 1 else ''} ({_ids(bad)}): {what} fit outside the allowed range, "
            f"set to the layer median ({', '.join(values)}): not compensated individually")


def _grid_dt(K: Optional[int], width: float) -> Optional[float]:
    return None if not K else float(width) / float(K)
