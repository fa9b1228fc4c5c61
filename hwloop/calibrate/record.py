"""The calibration record: what the probes of one chip measured, as one JSON file.

A record belongs to one chip (``device_id``) and one topology (the layer kinds and shapes of the
network it was measured for; windows are not part of it: the model of :mod:`hwloop.calibrate.fit`
is valid at any window width). It holds, per neuron layer and neuron, the identified parameters
of the circuit model (docs/calibration.md):

    t_i - t_min = d_i + s_i (theta_i + o_i w) - sum_j k_ij W_ij x_j        (dense / conv2d)
    readout_k   = sum_j rho_kj W_kj x_j + q_k offset_k                     (readout)

``s`` (slope: tau_c per potential unit in the window, 1 / B_i), ``d`` (delay, tau_c), ``o``
(threshold offset, relative to the window width w), ``k`` (input gain per synapse, and its row
mean per neuron), ``q`` (readout offset gain), ``rho`` (readout synapse gain); plus the residuals
of every fit, the random-jitter estimate, the number of device runs used, and a sha256 over the
content (``content_hash``) that :func:`load_record` verifies.

Per-synapse arrays are stored compactly as base64 little-endian float32 (``Array``); per-neuron
arrays as JSON lists.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hwloop.errors import CalibrationError

__all__ = ["Array", "CalibrationRecord", "LayerCalibration", "FORMAT", "check_record_matches",
           "content_hash", "load_record", "save_record"]

FORMAT = "hwloop-calibration/1"


class Array(BaseModel):
    """A float array stored as base64 of little-endian float32 (per-synapse data)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shape: tuple[int, ...]
    b64: str

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "Array":
        a = np.ascontiguousarray(t.detach().cpu().to(torch.float32).numpy(), dtype="<f4")
        return cls(shape=tuple(int(s) for s in a.shape), b64=base64.b64encode(a.tobytes()).decode())

    def tensor(self) -> torch.Tensor:
        raw = base64.b64decode(self.b64.encode())
        a = np.frombuffer(raw, dtype="<f4")
        if a.size != int(np.prod(self.shape, dtype=np.int64)):
            raise CalibrationError(f"calibration array of shape {self.shape} holds {a.size} values")
        return torch.from_numpy(a.copy()).reshape(self.shape).to(torch.float64)


class LayerCalibration(BaseModel):
    """Identified parameters of one neuron or readout layer (index into NetworkSpec.layers)."""

    model_config = ConfigDict(extra="forbid")

    index: int
    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    #: neuron layers: s_i, tau_c per potential unit in the window (1 / B_i); flat, one per neuron
    slope: Optional[list[float]] = None
    #: neuron layers: d_i, the comparator delay deviation, tau_c
    delay: Optional[list[float]] = None
    #: neuron layers: o_i, threshold offset relative to the window width (potential units / w)
    threshold_offset: Optional[list[float]] = None
    #: readout: q_k, gain of the written offset (readout = q_k offset_k with no input)
    offset_gain: Optional[list[float]] = None
    #: per-neuron input gain: row mean of the synapse gains (None: not identified)
    gain: Optional[list[float]] = None
    #: per-synapse gain k_ij (neuron layers, tau_c per potential unit) or rho_kj (readout),
    #: shape = weight_shape; None where not identified (conv, layers behind conv)
    synapse_gain: Optional[Array] = None
    #: standard error of one per-synapse estimate (pooled), same units
    synapse_gain_se: Optional[float] = None
    #: RMS residuals of the fits: "sweep" (tau_c), "synapse" (tau_c, readout: potential units)
    residual_rms: dict[str, float] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)

    def vec(self, name: str) -> Optional[torch.Tensor]:
        """A per-neuron field as a float64 tensor of ``out_shape`` (None if absent)."""
        v = getattr(self, name)
        if v is None:
            return None
        return torch.tensor(v, dtype=torch.float64).reshape(self.out_shape)


class CalibrationRecord(BaseModel):
    """One chip's calibration (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    device_id: str
    firmware_version: str = ""
    profile: Optional[str] = None
    created: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc)
                         .isoformat(timespec="seconds"))
    method: str = "threshold-sweep+synapse-probes"
    method_version: str = "1"
    hwloop_version: str = ""
    arch: Optional[str] = None
    input_shape: tuple[int, ...]
    t_max0: float = 1.0
    time_steps_per_layer: Optional[int] = None
    weight_bits: Optional[int] = None
    #: window widths (tau_c) the threshold sweep used
    probe_widths: list[float]
    repeats: int
    levels: int
    layers: list[LayerCalibration]
    #: random jitter SD estimated from the repeats (tau_c), its standard error, how
    jitter_sd: float
    jitter_sd_se: float = 0.0
    jitter_method: str = "repeat variance"
    device_runs: int
    samples: int
    programs: int = 0
    writes: int = 0
    wall_time_s: float = 0.0
    chip_seed: Optional[int] = None
    notes: list[str] = Field(default_factory=list)
    content_hash: str = ""

    def layer(self, index: int) -> LayerCalibration:
        for lc in self.layers:
            if lc.index == index:
                return lc
        raise CalibrationError(f"calibration record of {self.device_id} has no layer {index}")

    def summary(self) -> dict[str, Any]:
        """A short dict for printing (no arrays)."""
        out: dict[str, Any] = {"device_id": self.device_id, "profile": self.profile,
                               "created": self.created, "device_runs": self.device_runs,
                               "samples": self.samples, "jitter_sd": self.jitter_sd,
                               "content_hash": self.content_hash[:16], "layers": []}
        for lc in self.layers:
            row: dict[str, Any] = {"index": lc.index, "kind": lc.kind, "neurons": int(np.prod(lc.out_shape))}
            for name in ("slope", "delay", "threshold_offset", "gain", "offset_gain"):
                v = getattr(lc, name)
                if v is not None:
                    a = np.asarray(v)
                    row[name] = f"{a.mean():+.4f} +- {a.std():.4f}"
            row["residual_rms"] = {k: round(v, 5) for k, v in lc.residual_rms.items()}
            out["layers"].append(row)
        return out


def content_hash(rec: CalibrationRecord) -> str:
    """sha256 of the canonical JSON of every field but ``content_hash``."""
    data = rec.model_dump(mode="json", exclude={"content_hash"})
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_record(path: Union[str, os.PathLike], rec: CalibrationRecord) -> str:
    """Write ``rec`` as JSON atomically (temp file in the same folder + ``os.replace``), with
    its content hash filled in. Returns the hash."""
    rec.content_hash = content_hash(rec)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=str(p.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(rec.model_dump_json(indent=1))
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a record is an ordinary file
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return rec.content_hash


def load_record(path: Union[str, os.PathLike]) -> CalibrationRecord:
    """Read a record and verify its format and content hash.

    Raises:
        CalibrationError: missing file, not JSON, invalid fields, unknown format, or a content
            hash that does not match (the file was edited or truncated).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise CalibrationError(f"cannot read calibration record {p}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"calibration record {p} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        fmt = data.get("format") if isinstance(data, dict) else None
        raise CalibrationError(f"calibration record {p}: format {fmt!r} is not {FORMAT!r}")
    try:
        rec = CalibrationRecord.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise CalibrationError(f"calibration record {p} is invalid: "
                               f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    want = content_hash(rec)
    if rec.content_hash != want:
        raise CalibrationError(f"calibration record {p}: content hash mismatch (stored "
                               f"{rec.content_hash[:16] or '<none>'}..., computed {want[:16]}...): the "
                               "file was modified after it was written; recalibrate")
    return rec


def check_record_matches(rec: CalibrationRecord, device_id: str, spec) -> None:
    """Raise :class:`CalibrationError` unless ``rec`` was measured on ``device_id`` for the layer
    kinds and shapes of ``spec`` (a :class:`~hwloop.devices.base.NetworkSpec`)."""
    if rec.device_id != device_id:
        raise CalibrationError(f"calibration record is for device {rec.device_id!r}, but the device "
                               f"is {device_id!r}: calibrate this chip (hwloop calibrate --device ...)")
    if tuple(rec.input_shape) != tuple(spec.input_shape):
        raise CalibrationError(f"calibration record of {rec.device_id} has input shape "
                               f"{tuple(rec.input_shape)}, the network {tuple(spec.input_shape)}")
    want = {i: l for i, l in enumerate(spec.layers) if l.kind in ("dense", "conv2d", "readout")}
    have = {lc.index: lc for lc in rec.layers}
    if set(want) != set(have):
        raise CalibrationError(f"calibration record of {rec.device_id} covers layers {sorted(have)}, "
                               f"the network has neuron/readout layers {sorted(want)}: recalibrate for "
                               "this topology")
    for i, l in want.items():
        lc = have[i]
        if (lc.kind != l.kind or tuple(lc.out_shape) != tuple(l.out_shape)
                or tuple(lc.weight_shape) != tuple(l.weight_shape)):
            raise CalibrationError(
                f"calibration record of {rec.device_id}, layer {i}: measured {lc.kind} "
                f"out {tuple(lc.out_shape)} weights {tuple(lc.weight_shape)}, the network has "
                f"{l.kind} out {tuple(l.out_shape)} weights {tuple(l.weight_shape)}: recalibrate "
                "for this topology")
