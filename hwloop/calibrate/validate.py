"""Range and shape validation of calibration records (:mod:`hwloop.calibrate.record`).

The allowed values (docs/calibration.md, "What a record must satisfy"; listed in the record
module's docstring), the checks the record's pydantic validators run, and
:func:`describe_validation_error`, which turns a pydantic error into one line naming the dotted
field, the network layer and the neuron or synapse.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

__all__ = ["FACTOR_RANGE", "LAYER_KINDS", "OFFSET_RANGE", "PER_NEURON", "SE_MARGIN", "SYNAPSE_RANGE",
           "check_delays", "check_distinct_indices", "check_per_neuron", "check_synapse_gain",
           "describe_validation_error"]

#: allowed range of the per-neuron factors slope s_i, gain k_i, offset gain q_k (ideal 1)
FACTOR_RANGE = (0.2, 5.0)
#: allowed range of the threshold offset o_i (fraction of the base threshold = window width)
OFFSET_RANGE = (-1.0, 1.0)
#: allowed range of one per-synapse gain, widened by SE_MARGIN standard errors of the estimate
SYNAPSE_RANGE = (0.0, 5.0)
SE_MARGIN = 4.0
LAYER_KINDS = ("dense", "conv2d", "readout")
#: the per-neuron fields, what they are (for messages) and their allowed range (delay: the
#: record-level bound, the widest probe window)
PER_NEURON: dict[str, tuple[str, tuple[float, float]]] = {
    "slope": ("slope s_i = 1/B_i, tau_c per potential unit, ideal 1", FACTOR_RANGE),
    "delay": ("delay d_i, tau_c", (-math.inf, math.inf)),
    "threshold_offset": ("threshold offset o_i, fraction of the window width, ideal 0",
                         OFFSET_RANGE),
    "offset_gain": ("readout offset gain q_k, ideal 1", FACTOR_RANGE),
    "gain": ("input gain k_i (row mean of the synapse gains), ideal 1", FACTOR_RANGE),
}


def short(v: Any, n: int = 40) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def _fail(field: str, detail: str) -> PydanticCustomError:
    """A validation error whose ``ctx["field"]`` (dotted, relative to the validated model)
    completes pydantic's location in :func:`describe_validation_error`."""
    return PydanticCustomError("calibration_value", "{detail}", {"detail": detail, "field": field})


def _rng(lo: float, hi: float) -> str:
    return f"[{lo:.6g}, {hi:.6g}]"


def _first_outside(a: np.ndarray, lo: float, hi: float) -> Optional[tuple[int, int]]:
    """(flat index of the first value outside [lo, hi] or not finite, how many), or None."""
    bad = np.flatnonzero(~(np.isfinite(a) & (a >= lo) & (a <= hi)))
    return None if bad.size == 0 else (int(bad[0]), int(bad.size))


def _more(n: int) -> str:
    return f" (and {n - 1} more)" if n > 1 else ""



# ---------------------------------------------------------------------- checks of the models
def check_per_neuron(name: str, v: list[float], weight_shape: Optional[Sequence[int]],
                     out_shape: Optional[Sequence[int]]) -> None:
    """One value per neuron (``gain``: per weight row), each inside ``PER_NEURON[name]``'s range.
    A shape that is None (or an empty ``weight_shape``) is itself reported: nothing checked."""
    if name == "gain":
        shape = weight_shape
        if not shape:
            return  # weight_shape itself is reported
        n, what = int(shape[0]), f"one per weight row, weight_shape {tuple(shape)}"
    else:
        shape = out_shape
        if shape is None:
            return
        n, what = int(np.prod(shape, dtype=np.int64)), f"one per neuron, out_shape {tuple(shape)}"
    if len(v) != n:
        raise ValueError(f"expected {n} values ({what}), got {len(v)}")
    descr, (lo, hi) = PER_NEURON[name]
    bad = _first_outside(np.asarray(v, dtype=np.float64), lo, hi)
    if bad is not None:
        j, cnt = bad
        raise ValueError(f"neuron {j}{_more(cnt)}: {v[j]!r} is outside the allowed range "
                         f"{_rng(lo, hi)} ({descr})")


def check_synapse_gain(sg: Any, weight_shape: Sequence[int], se: Optional[float]) -> None:
    """``sg`` (an :class:`~hwloop.calibrate.record.Array`) has the layer's ``weight_shape`` and
    every gain inside ``SYNAPSE_RANGE`` widened by ``SE_MARGIN`` standard errors."""
    if tuple(sg.shape) != tuple(weight_shape):
        raise _fail("synapse_gain.shape", f"shape {tuple(sg.shape)} is not the layer's "
                                          f"weight_shape {tuple(weight_shape)}")
    m = SE_MARGIN * (se or 0.0)
    lo, hi = SYNAPSE_RANGE[0] - m, SYNAPSE_RANGE[1] + m
    bad = _first_outside(sg.numpy(), lo, hi)
    if bad is not None:
        j, cnt = bad
        raise _fail("synapse_gain", f"synapse {sg._where(j)}{_more(cnt)}: "
                                    f"{float(sg.numpy()[j]):.6g} is outside the allowed "
                                    f"range {_rng(lo, hi)} (per-synapse gain, ideal 1: "
                                    f"{_rng(*SYNAPSE_RANGE)} widened by {SE_MARGIN:g} x "
                                    f"synapse_gain_se = {m:.3g})")


def check_distinct_indices(layers: Sequence[Any]) -> None:
    """No network layer calibrated twice."""
    seen: dict[int, int] = {}
    for k, lc in enumerate(layers):
        if lc.index in seen:
            raise _fail(f"layers.{k}.index", f"network layer {lc.index} appears twice "
                                             f"(layers.{seen[lc.index]} and layers.{k})")
        seen[lc.index] = k


def check_delays(layers: Sequence[Any], probe_widths: Sequence[float]) -> None:
    """Every delay within the widest probe window (else it cannot have been measured)."""
    wmax = max(probe_widths)
    for k, lc in enumerate(layers):
        if lc.delay is None:
            continue
        bad = _first_outside(np.asarray(lc.delay, dtype=np.float64), -wmax, wmax)
        if bad is not None:
            j, cnt = bad
            raise _fail(f"layers.{k}.delay",
                        f"neuron {j}{_more(cnt)}: {lc.delay[j]!r} is outside the allowed range "
                        f"{_rng(-wmax, wmax)} ({PER_NEURON['delay'][0]}; at most the widest "
                        "probe window, probe_widths)")


# ---------------------------------------------------------------------- messages
def _layer_label(data: Any, k: int) -> str:
    try:
        lc = data["layers"][k] if isinstance(data, dict) else data.layers[k]
        index = lc["index"] if isinstance(lc, dict) else lc.index
        kind = lc["kind"] if isinstance(lc, dict) else lc.kind
        return f"network layer {int(index)}, {kind}"
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return f"layers[{k}]"


def describe_validation_error(exc: ValidationError, data: Any = None, prefix: tuple = ()) -> str:
    """A one-line description of a pydantic error: dotted field path (``layers.0.slope``), the
    network layer and neuron where the path has them, the message; and how many more."""
    errs = exc.errors(include_url=False)
    out = []
    for err in errs[:1]:
        loc = tuple(prefix) + tuple(err["loc"])
        extra = (err.get("ctx") or {}).get("field")
        if extra:
            loc = loc + tuple(int(p) if p.isdigit() else p for p in str(extra).split("."))
        path = ".".join(map(str, loc)) or "record"
        where = ""
        if len(loc) >= 2 and loc[0] == "layers" and isinstance(loc[1], int):
            label = _layer_label(data, loc[1])
            if len(loc) >= 4 and loc[2] in PER_NEURON and isinstance(loc[3], int):
                label += f", neuron {loc[3]}"
            where = f" ({label})"
        msg = err["msg"]
        if err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        elif err["type"] == "finite_number":
            msg = f"{err.get('input')!r} is not allowed: values must be finite numbers"
        elif "input" in err and not isinstance(err["input"], (dict, list, BaseModel)):
            msg = f"{msg} (got {err['input']!r})"
        out.append(f"{path}{where}: {msg}")
    more = f" (and {len(errs) - 1} more problems)" if len(errs) > 1 else ""
    return "; ".join(out) + more
