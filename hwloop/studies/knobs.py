"""The knobs a sweep turns (:class:`Knob`, :data:`KNOBS`, any dotted device-profile field) and
how their values and ``--set`` overrides are read from the command line. Used by
:mod:`hwloop.studies.sweep` (planning) and :mod:`hwloop.studies.plots` (axes and labels)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import yaml
from pydantic import BaseModel

from hwloop.emulator.profile import DeviceProfile
from hwloop.errors import HwloopError, ProfileError

__all__ = ["KNOBS", "Knob", "knob_for", "parse_set", "parse_values"]


@dataclass(frozen=True)
class Knob:
    """A swept quantity: the profile field(s) it sets, how to parse and plot its values.

    ``implies``: profile fields the study needs whatever the value (applied before the fixed
    overrides, so ``--set`` can change them). ``axis``: ``linear``, ``log2``, ``reversed`` or
    ``categorical`` (evenly spaced, in the order given).
    """

    name: str
    fields: tuple[str, ...]
    label: str
    kind: Optional[type] = None  # int, float, or None: parse as YAML (int, float, bool, null)
    implies: dict = field(default_factory=dict)
    axis: str = "linear"
    note: str = ""


KNOBS: dict[str, Knob] = {
    "jitter": Knob(
        "jitter", ("jitter_sd",), "spike-time jitter SD (tau_c)", float, axis="categorical",
        note="random Gaussian jitter, fresh every run, added to every input and emitted spike time"),
    "time-steps": Knob(
        "time-steps", ("time_steps_per_layer",), "time steps per layer", int,
        implies={"window_percentile": 99.0, "adaptive_windows": False}, axis="log2",
        note="Methods (ii): windows hold 99 % of training activations, fixed while fine-tuning"),
    "weight-bits": Knob(
        "weight-bits", ("weight_bits",), "weight bits", int,
        note="Methods (iii): signed codes, outliers clipped at 1/99 (4/96 for <= 4 bits) percentiles"),
    "latency": Knob(
        "latency", ("window_percentile",), "window percentile of activations (%)", float,
        implies={"adaptive_windows": False}, axis="categorical",
        note="Methods (iv): windows shortened to the percentile, fixed while fine-tuning"),
}


def _profile_leaf_fields() -> dict[str, Any]:
    """Dotted name -> pydantic FieldInfo of every leaf field of :class:`DeviceProfile`."""
    out: dict[str, Any] = {}

    def walk(model: type, prefix: str) -> None:
        for name, info in model.model_fields.items():
            ann = info.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
            else:
                out[prefix + name] = info
    walk(DeviceProfile, "")
    return out


def knob_for(name: str) -> Knob:
    """The :class:`Knob` of a short name (``jitter``, ``time-steps``, ``weight-bits``,
    ``latency``) or of any dotted profile field (``mismatch.synapse_gain_sd``)."""
    if name in KNOBS:
        return KNOBS[name]
    leaves = _profile_leaf_fields()
    if name not in leaves:
        raise ProfileError(f"unknown knob {name!r}: use one of {', '.join(KNOBS)} or a profile field "
                           f"({', '.join(sorted(leaves))})")
    return Knob(name, (name,), name, None)


_NULLS = {"null", "none", "float", "off", "~"}


def _parse_scalar(token: str, kind: Optional[type], what: str) -> Any:
    t = token.strip()
    if t.lower() in _NULLS:
        return None
    try:
        if kind is int:
            v = float(t)
            if not v.is_integer():
                raise ValueError
            return int(v)
        if kind is float:
            return float(t)
        return yaml.safe_load(t)
    except (ValueError, yaml.YAMLError):
        raise HwloopError(f"{what}: cannot read {token!r} as {kind.__name__ if kind else 'a value'}") from None


def parse_values(knob: Knob | str, tokens: Sequence[Any]) -> list[Any]:
    """Values of a knob from command-line tokens: ``["0", "0.05"]``, ``["0,0.05,0.1"]`` or
    already-typed values. ``null``/``none``/``float``/``off`` mean a null field (e.g. float
    weights). Duplicates are refused."""
    k = knob_for(knob) if isinstance(knob, str) else knob
    out: list[Any] = []
    for tok in tokens:
        parts = [p for p in tok.split(",") if p.strip()] if isinstance(tok, str) else [tok]
        for p in parts:
            out.append(_parse_scalar(p, k.kind, f"--values of {k.name}") if isinstance(p, str)
                       else (None if p is None else (k.kind(p) if k.kind else p)))
    if not out:
        raise HwloopError(f"knob {k.name}: no values given")
    if len({json.dumps(v) for v in out}) != len(out):
        raise HwloopError(f"knob {k.name}: repeated values in {out}")
    return out


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """``["weight_bits=4", "mismatch.synapse_gain_sd=0.03"]`` -> a dict of typed overrides."""
    leaves = _profile_leaf_fields()
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise HwloopError(f"--set {item!r}: expected FIELD=VALUE")
        key, val = (s.strip() for s in item.split("=", 1))
        if key in KNOBS:
            key = KNOBS[key].fields[0]
        if key not in leaves:
            raise ProfileError(f"--set {item!r}: no profile field {key!r} (fields: {', '.join(sorted(leaves))})")
        out[key] = _parse_scalar(val, None, f"--set {key}")
    return out
