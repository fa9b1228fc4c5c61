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

**Validation.** The pydantic models check every value and shape when a record is built or
loaded, and :func:`load_record`, :func:`save_record`, :func:`check_record_matches` and
:meth:`~hwloop.calibrate.compensate.Compensation.from_record` raise :class:`CalibrationError`
naming the file (or the device, for a record in memory), the field as a dotted path
(``layers.0.slope``: ``layers[0]``, network layer 1) and the neuron (flat index) or synapse.
Allowed values (closed ranges; docs/calibration.md, "What a record must satisfy"):

* every float finite (no NaN / Infinity); counts, shapes and residuals >= 0;
* per neuron, one value per neuron (``prod(out_shape)``; ``gain``: ``weight_shape[0]``):
  ``slope`` s_i, ``gain`` k_i and ``offset_gain`` q_k in ``FACTOR_RANGE`` = [0.2, 5] (ideal 1;
  a factor of 5 either way is far beyond fabrication mismatch and is a failed fit or a broken
  circuit, which the linear model cannot compensate); ``threshold_offset`` o_i in
  ``OFFSET_RANGE`` = [-1, 1] (beyond, the comparator crosses at t_min or never for thresholds
  inside the window); ``delay`` d_i in [-W, W], W the widest probe window (a larger delay puts
  every probe spike outside the window, so it cannot have been measured);
* ``synapse_gain``: shape ``weight_shape``, base64 of exactly ``4 prod(shape)`` bytes, every
  k_ij (rho_kj) in [0 - 4 SE, 5 + 4 SE] (SE = ``synapse_gain_se``: a dead synapse, 0, measured
  with noise); compensation clamps per-synapse gains to [0.2, 5];
* dense / conv2d layers carry slope, delay and threshold_offset; ``probe_widths`` has >= 2
  widths > 0; ``t_max0`` > 0; layer indices are distinct.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from hwloop.calibrate.array import Array
from hwloop.calibrate.validate import (FACTOR_RANGE, LAYER_KINDS, OFFSET_RANGE, SYNAPSE_RANGE, _fail,
                                       check_delays, check_distinct_indices, check_per_neuron,
                                       check_synapse_gain, describe_validation_error, short)
from hwloop.errors import CalibrationError

#: re-exported: Array (:mod:`hwloop.calibrate.array`), FACTOR_RANGE, OFFSET_RANGE, SYNAPSE_RANGE
#: and describe_validation_error (:mod:`hwloop.calibrate.validate`)
__all__ = ["Array", "CalibrationRecord", "LayerCalibration", "FORMAT", "FACTOR_RANGE",
           "OFFSET_RANGE", "SYNAPSE_RANGE", "check_record_matches", "content_hash", "describe_validation_error",
           "load_record", "mismatch_digest", "save_record", "validate_record"]

FORMAT = "hwloop-calibration/1"

#: record fields added after format 1 was first written: left out of the content hash while
#: they are None, so that records written before them still verify
OPTIONAL_FIELDS = ("mismatch_sha256",)


class LayerCalibration(BaseModel):
    """Identified parameters of one neuron or readout layer (index into NetworkSpec.layers).

    Validated (module docstring): lengths against ``out_shape`` / ``weight_shape``, values
    finite and inside their allowed ranges, the fields a kind needs present."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, revalidate_instances="always")

    index: int = Field(ge=0)
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

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v not in LAYER_KINDS:
            raise ValueError(f"{v!r} is not a calibrated layer kind {LAYER_KINDS}")
        return v

    @field_validator("in_shape", "out_shape", "weight_shape")
    @classmethod
    def _shape(cls, v: tuple[int, ...], info: ValidationInfo) -> tuple[int, ...]:
        if any(s < 0 for s in v) or (info.field_name == "out_shape" and (not v or 0 in v)):
            raise ValueError(f"{tuple(v)} is not a valid shape")
        return v

    @field_validator("slope", "delay", "threshold_offset", "offset_gain", "gain")
    @classmethod
    def _per_neuron(cls, v: Optional[list[float]], info: ValidationInfo) -> Optional[list[float]]:
        if v is not None:
            check_per_neuron(info.field_name, v, info.data.get("weight_shape"),
                             info.data.get("out_shape"))
        return v


    @field_validator("synapse_gain_se")
    @classmethod
    def _se(cls, v: Optional[float]) -> Optional[float]:
        if v is not None and v < 0:
            raise ValueError(f"{v!r} is negative (a standard error)")
        return v

    @field_validator("residual_rms")
    @classmethod
    def _rms(cls, v: dict[str, float]) -> dict[str, float]:
        for k, x in v.items():
            if x < 0:
                raise _fail(k, f"{x!r} is negative (an RMS residual)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "LayerCalibration":
        if self.kind in ("dense", "conv2d"):
            missing = [n for n in ("slope", "delay", "threshold_offset") if getattr(self, n) is None]
            if missing:
                raise _fail(missing[0], f"required for a {self.kind} layer (slope, delay and "
                                        f"threshold_offset), missing: {', '.join(missing)}")
        if self.synapse_gain is not None:
            check_synapse_gain(self.synapse_gain, self.weight_shape, self.synapse_gain_se)
        return self

    def vec(self, name: str) -> Optional[torch.Tensor]:
        """A per-neuron field as a float64 tensor of ``out_shape`` (None if absent)."""
        v = getattr(self, name)
        if v is None:
            return None
        return torch.tensor(v, dtype=torch.float64).reshape(self.out_shape)


class CalibrationRecord(BaseModel):
    """One chip's calibration (see the module docstring; validated as described there)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

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
    #: emulator chips only: :func:`mismatch_digest` of the chip measured (its profile's frozen
    #: mismatch and its chip seed). None: a real chip, or a record older than the field (such a
    #: record is accepted as before; its content hash does not cover the absent field)
    mismatch_sha256: Optional[str] = None
    notes: list[str] = Field(default_factory=list)
    content_hash: str = ""
    #: the file it was loaded from (not part of the content), for messages
    _source: Optional[str] = PrivateAttr(default=None)

    @field_validator("input_shape")
    @classmethod
    def _input_shape(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(s <= 0 for s in v):
            raise ValueError(f"{tuple(v)} is not a valid input shape")
        return v

    @field_validator("mismatch_sha256")
    @classmethod
    def _digest(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and (len(v) != 64 or any(c not in "0123456789abcdef" for c in v)):
            raise ValueError(f"{short(v)} is not a sha256 hex digest (64 lowercase hex digits)")
        return v

    @field_validator("t_max0")
    @classmethod
    def _t_max0(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"{v!r} must be > 0 (tau_c)")
        return v

    @field_validator("probe_widths")
    @classmethod
    def _widths(cls, v: list[float]) -> list[float]:
        if len(v) < 2:
            raise ValueError(f"{v!r}: the threshold sweep needs at least two window widths")
        for j, w in enumerate(v):
            if w <= 0:
                raise _fail(str(j), f"{w!r} must be > 0 (tau_c)")
        return v

    @field_validator("time_steps_per_layer")
    @classmethod
    def _steps(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v < 1:
            raise ValueError(f"{v!r} must be >= 1 (or null: continuous time)")
        return v

    @field_validator("repeats", "levels", "device_runs", "samples", "programs", "writes",
                     "weight_bits", "jitter_sd", "jitter_sd_se", "wall_time_s")
    @classmethod
    def _non_negative(cls, v):
        if v is not None and v < 0:
            raise ValueError(f"{v!r} must be >= 0")
        return v

    @model_validator(mode="after")
    def _record(self) -> "CalibrationRecord":
        check_distinct_indices(self.layers)
        check_delays(self.layers, self.probe_widths)
        return self

    @property
    def source(self) -> Optional[str]:
        """The file the record was loaded from (None: built in memory)."""
        return self._source

    def layer(self, index: int) -> LayerCalibration:
        for lc in self.layers:
            if lc.index == index:
                return lc
        raise CalibrationError(f"{_name(self)} has no layer {index}")

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


def _name(rec: CalibrationRecord) -> str:
    """How messages name a record: its file, else its device."""
    if rec.source:
        return f"calibration record {rec.source} (device {rec.device_id})"
    return f"calibration record of {rec.device_id} (in memory)"


def validate_record(rec: CalibrationRecord) -> CalibrationRecord:
    """Validate ``rec`` again as it is now (an in-memory record may have been edited after it
    was built). Returns the validated copy.

    Raises:
        CalibrationError: naming the record's file (or device), the field and the allowed range.
    """
    if not isinstance(rec, CalibrationRecord):
        raise CalibrationError(f"expected a CalibrationRecord, got {type(rec).__name__}")
    data = rec.model_dump()
    try:
        out = CalibrationRecord.model_validate(data)
    except ValidationError as exc:
        raise CalibrationError(f"{_name(rec)} is invalid: {describe_validation_error(exc, data)}; recalibrate "
                               "(hwloop calibrate) or restore the file") from None
    out._source = rec.source
    return out


def content_hash(rec: CalibrationRecord) -> str:
    """sha256 of the canonical JSON of every field but ``content_hash``."""
    exclude = {"content_hash"}
    for k in OPTIONAL_FIELDS:  # added later: absent from older records, so absent from their hash
        if getattr(rec, k) is None:
            exclude.add(k)
    data = rec.model_dump(mode="json", exclude=exclude)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_record(path: Union[str, os.PathLike], rec: CalibrationRecord) -> str:
    """Write ``rec`` as JSON atomically (temp file in the same folder + ``os.replace``), with
    its content hash filled in. Returns the hash.

    Raises:
        CalibrationError: the record is invalid (nothing is written).
    """
    p = Path(path)
    try:
        validate_record(rec)
    except CalibrationError as exc:
        raise CalibrationError(f"not writing {p}: {exc}") from None
    rec.content_hash = content_hash(rec)
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
        CalibrationError: missing file, not JSON, unknown format, a value or shape that is not
            allowed (NaN, Infinity, out of range, wrong length, truncated base64; the message
            names the file, the field and the allowed range), or a content hash that does not
            match (the file was edited or truncated).
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
        raise CalibrationError(f"calibration record {p} is invalid: {describe_validation_error(exc, data)}; "
                               "recalibrate (hwloop calibrate) or restore the file") from None
    rec._source = str(p)
    want = content_hash(rec)
    if rec.content_hash != want:
        raise CalibrationError(f"calibration record {p}: content hash mismatch (stored "
                               f"{rec.content_hash[:16] or '<none>'}..., computed {want[:16]}...): the "
                               "file was modified after it was written; recalibrate")
    return rec


def mismatch_digest(device) -> Optional[str]:
    """sha256 of what an emulator chip's frozen mismatch is drawn from: its profile's
    ``mismatch`` standard deviations and its chip seed (the draws); None for a device without a
    ``profile`` (a real chip: its drift cannot be seen from the host, docs/calibration.md).

    Only what a calibration record measures and compensation corrects enters the digest: not
    the random jitter (fresh every run; a record is used on the same chip at another jitter),
    nor the weight precision or time grid (host-visible, in the record's own fields), nor the
    host-side settings (window percentile, clipping), names and energy constants. An edited
    YAML file, a profile override or a sweep point over ``mismatch.*`` under the same device id
    changes it."""
    prof = getattr(device, "profile", None)
    mismatch = getattr(prof, "mismatch", None)
    if mismatch is None:
        return None
    seed = getattr(device, "chip_seed", None)
    if seed is None:
        seed = getattr(prof, "chip_seed", None)
    doc = {"mismatch": mismatch.model_dump(mode="json"), "chip_seed": seed}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def check_record_matches(rec: CalibrationRecord, device_id: str, spec, *, device=None) -> None:
    """Raise :class:`CalibrationError` unless ``rec`` is valid (values and shapes, again: it may
    have been edited in memory) and was measured on ``device_id`` for the layer kinds and shapes
    of ``spec`` (a :class:`~hwloop.devices.base.NetworkSpec`). Messages name the record's file.

    ``device`` (the open device): an emulator chip is also compared by its
    :func:`mismatch_digest` with the record's ``mismatch_sha256``, so that a record is refused
    on a chip whose mismatch changed under the same device id (an edited profile, an override,
    a sweep point). A record without the digest (older, or of a real chip) and a device without
    a profile are compared by id only, as before."""
    validate_record(rec)
    name = _name(rec)
    if rec.device_id != device_id:
        raise CalibrationError(f"{name} is for device {rec.device_id!r}, but the device "
                               f"is {device_id!r}: calibrate this chip (hwloop calibrate --device ...)")
    now = mismatch_digest(device) if device is not None else None
    if rec.mismatch_sha256 is not None and now is not None and now != rec.mismatch_sha256:
        raise CalibrationError(
            f"{name} was measured on a chip with another frozen mismatch: record mismatch_sha256 "
            f"{rec.mismatch_sha256[:16]}..., device {device_id!r} now {now[:16]}... (same device id, "
            "but the profile's mismatch or the chip seed changed: an edited YAML file, a profile "
            "override or a sweep over mismatch.*); recalibrate this chip (hwloop calibrate "
            "--device ...)")
    if tuple(rec.input_shape) != tuple(spec.input_shape):
        raise CalibrationError(f"{name} has input shape "
                               f"{tuple(rec.input_shape)}, the network {tuple(spec.input_shape)}")
    want = {i: l for i, l in enumerate(spec.layers) if l.kind in ("dense", "conv2d", "readout")}
    have = {lc.index: lc for lc in rec.layers}
    if set(want) != set(have):
        raise CalibrationError(f"{name} covers layers {sorted(have)}, "
                               f"the network has neuron/readout layers {sorted(want)}: recalibrate for "
                               "this topology")
    for i, l in want.items():
        lc = have[i]
        if (lc.kind != l.kind or tuple(lc.out_shape) != tuple(l.out_shape)
                or tuple(lc.weight_shape) != tuple(l.weight_shape)):
            k = rec.layers.index(lc)
            raise CalibrationError(
                f"{name}, layer {i}: measured {lc.kind} "
                f"out {tuple(lc.out_shape)} weights {tuple(lc.weight_shape)}, the network has "
                f"{l.kind} out {tuple(l.out_shape)} weights {tuple(l.weight_shape)} "
                f"(layers.{k}.kind/out_shape/weight_shape): recalibrate for this topology")
