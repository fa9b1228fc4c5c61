"""The wire protocol's dialect-independent half: versions, units, payload layouts and codecs,
and the chip's error codes with the exception each one raises on the host.

Both dialects (``docs/protocol.md`` is the normative description and is checked against the
modules of :mod:`hwloop.wire` by ``tests/test_wire_*.py``) carry the same operations and the
same payloads: the frame dialect (:mod:`hwloop.wire.frame`) in byte-stuffed binary frames, the
SCPI dialect (:mod:`hwloop.wire.scpi`) as IEEE 488.2 definite-length blocks.

Units on the wire: spike times are clock ticks (uint32, ``TICK_SILENT`` for no spike) by
default, or exact float64 tau_c when the request asks for them (``Flag.F64_TIMES``, ``HWL:TFOR
F64``; the host does when the chip offers it, which makes a run through a transport
bit-identical to an in-process run); windows and thresholds are float64 in tau_c / potential
units; weights are signed integer codes plus one float64 scale per layer.
"""

from __future__ import annotations

import enum
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from hwloop.errors import DeviceError, DeviceLimitError, ProtocolError

#: Version byte of every frame; a chip answers frames of another version with ``Err.VERSION``.
#: Version 2 added RESEND, NAK, the PENDING flag and the NO_REPLY error; version 3 replaced COBS
#: by the byte stuffing below and added WRITE_WEIGHTS_SPARSE and HELLO ``features``
#: (docs/protocol.md).
PROTOCOL_VERSION = 3
#: Largest message (a request or reply reassembled from chunks).
MAX_MESSAGE = 64 * 1024 * 1024


class Err(enum.IntEnum):
    """Error codes of an ERROR reply (payload: code u16 | UTF-8 message)."""

    UNKNOWN_COMMAND = 0x0001
    BAD_PAYLOAD = 0x0002
    VERSION = 0x0003
    CHUNK = 0x0004
    TOO_LARGE = 0x0005
    NO_REPLY = 0x0006
    NOT_PROGRAMMED = 0x0010
    LIMIT = 0x0011
    RANGE = 0x0012
    UNSUPPORTED = 0x0013
    #: Another link controls the chip (the message names its address); this link may only query.
    BUSY = 0x0014
    DEVICE = 0x0020
    INTERNAL = 0x00FF


#: Error codes a host maps to :class:`hwloop.errors.ProtocolError` (the others map to
#: ``DeviceError``, and ``LIMIT`` to ``DeviceLimitError``).
PROTOCOL_ERRORS = frozenset({Err.UNKNOWN_COMMAND, Err.BAD_PAYLOAD, Err.VERSION, Err.CHUNK,
                             Err.TOO_LARGE, Err.NO_REPLY})
DT_TICKS = np.dtype("<u4")
DT_F64 = np.dtype("<f8")
DT_CODE16 = np.dtype("<i2")
DT_CODE32 = np.dtype("<i4")
DT_COUNT = np.dtype("<u4")
#: Spike time of a silent neuron in ticks.
TICK_SILENT = 0xFFFFFFFF
#: Latest representable spike time in ticks.
TICK_MAX = 0xFFFFFFFE
#: HELLO request: host protocol version u8, largest reply payload the host wants per frame u32
#: (0: the chip's default, MAX_PAYLOAD).
HELLO_REQ = struct.Struct("<BI")
#: HELLO reply: protocol version u8, then a UTF-8 JSON object (see :func:`hello_json`).
HELLO_REPLY = struct.Struct("<B")
#: SEED_NOISE request: seed u64.
SEED = struct.Struct("<Q")
#: Layer index u16 (WEIGHTS_CRC request).
LAYER = struct.Struct("<H")
#: WRITE_WEIGHTS header: layer u16, offset u32, count u32, scale f64; then ``count`` codes.
WRITE_WEIGHTS_HDR = struct.Struct("<HIId")
#: WRITE_WEIGHTS_SPARSE header: layer u16, count u32, scale f64; then ``count`` indices u32
#: (strictly increasing, each < the layer's number of codes), then ``count`` codes.
WRITE_WEIGHTS_SPARSE_HDR = struct.Struct("<HId")
#: READ_WEIGHTS / READ_THRESHOLDS request: layer u16, offset u32, count u32.
READ_RANGE = struct.Struct("<HII")
#: READ_WEIGHTS reply header: scale f64, count u32; then ``count`` codes.
READ_WEIGHTS_REPLY = struct.Struct("<dI")
#: WEIGHTS_CRC reply: crc32 u32 (of the whole layer's codes as int32 LE followed by the scale as
#: float64 LE), scale f64, number of codes u32.
WEIGHTS_CRC_REPLY = struct.Struct("<IdI")
#: WRITE_THRESHOLDS header: layer u16, offset u32, count u32; then ``count`` float64.
WRITE_THRESHOLDS_HDR = struct.Struct("<HII")
#: READ_THRESHOLDS reply header: count u32; then ``count`` float64.
COUNT = struct.Struct("<I")
#: SET_WINDOWS: number of neuron layers u16; then (t_min f64, t_max f64) per layer, tau_c.
WINDOWS_HDR = struct.Struct("<H")
#: RUN_BATCH request header: batch size u32, values per sample u32; then B*n times.
RUN_REQ = struct.Struct("<II")
#: RUN_BATCH reply header: batch u32, stages u16, neuron layers u16, classes u32, has_energy u8.
RUN_REPLY = struct.Struct("<IHHIB")
#: Time formats a chip may offer in its HELLO JSON (``time_formats``).
TIME_TICKS = "ticks"
TIME_F64 = "f64"
#: Optional commands a chip may offer in its HELLO JSON (``features``).
FEATURE_SPARSE = "sparse_weights"
#: The chip has the LOCK command (one controlling link at a time).
FEATURE_LOCK = "lock"


def ticks_per_tau_c(tau_c_s: float, clock_period_s: float) -> float:
    """Clock ticks per tau_c, ``tau_c_s / clock_period_s``."""
    return float(tau_c_s) / float(clock_period_s)


def times_to_ticks(times: np.ndarray, ratio: float) -> np.ndarray:
    """tau_c -> ticks: ``rint(t * ratio)`` (round half to even), ``+inf`` -> ``TICK_SILENT``.

    Resolution loss: a time moves by up to half a tick (0.5 / ratio tau_c). The conversion is
    exact both ways when ``ratio`` is a power of two and the times lie on the tick grid.

    Raises:
        ValueError: a time is NaN, -inf, negative or beyond ``TICK_MAX`` ticks.
    """
    t = np.asarray(times, dtype=np.float64)
    silent = np.isposinf(t)
    finite = t[~silent]
    if finite.size and (not np.all(np.isfinite(finite)) or finite.min() < 0):
        raise ValueError("spike times must be >= 0 (or +inf for no spike); got "
                         f"min={finite.min() if np.all(np.isfinite(finite)) else 'nan/-inf'}")
    ticks = np.rint(np.where(silent, 0.0, t) * ratio)
    if ticks.size and ticks.max() > TICK_MAX:
        raise ValueError(f"spike time {float(t[~silent].max())} tau_c is beyond the tick range "
                         f"({TICK_MAX} ticks at {ratio} ticks/tau_c)")
    out = ticks.astype(DT_TICKS)
    out[silent] = TICK_SILENT
    return out


def ticks_to_times(ticks: np.ndarray, ratio: float) -> np.ndarray:
    """ticks -> tau_c: ``ticks / ratio``, ``TICK_SILENT`` -> ``+inf``."""
    k = np.asarray(ticks, dtype=DT_TICKS)
    t = k.astype(np.float64) / ratio
    t[k == TICK_SILENT] = np.inf
    return t


def weights_crc(codes: np.ndarray, scale: float) -> int:
    """CRC of a layer as WEIGHTS_CRC reports it: crc32(codes as int32 LE || scale as f64 LE)."""
    data = np.ascontiguousarray(np.asarray(codes).reshape(-1), dtype=DT_CODE32).tobytes()
    return zlib.crc32(struct.pack("<d", float(scale)), zlib.crc32(data)) & 0xFFFFFFFF


def code_dtype(wide: bool) -> np.dtype:
    return DT_CODE32 if wide else DT_CODE16


def encode_sparse(layer: int, indices: np.ndarray, codes: np.ndarray, scale: float,
                  wide: bool) -> bytes:
    """WRITE_WEIGHTS_SPARSE payload: ``codes[k]`` goes to flat index ``indices[k]``."""
    idx = np.asarray(indices, dtype=np.int64)
    return (WRITE_WEIGHTS_SPARSE_HDR.pack(int(layer), idx.size, float(scale)) +
            idx.astype(DT_COUNT).tobytes() + np.asarray(codes).astype(code_dtype(wide)).tobytes())


def decode_sparse(payload: bytes, wide: bool, n_codes: Optional[int] = None
                  ) -> tuple[int, np.ndarray, np.ndarray, float]:
    """Inverse of :func:`encode_sparse`: (layer, indices int64, codes int64, scale).

    Raises:
        ValueError: the count disagrees with the payload size, or the indices are not strictly
            increasing, or (when ``n_codes`` is given) one is ``>= n_codes``.
    """
    if len(payload) < WRITE_WEIGHTS_SPARSE_HDR.size:
        raise ValueError("WRITE_WEIGHTS_SPARSE payload shorter than its header")
    layer, count, scale = WRITE_WEIGHTS_SPARSE_HDR.unpack_from(payload)
    dt = code_dtype(wide)
    if len(payload) != WRITE_WEIGHTS_SPARSE_HDR.size + count * (4 + dt.itemsize):
        raise ValueError(f"payload of {len(payload)} bytes does not hold {count} (index, code) "
                         "pairs")
    off = WRITE_WEIGHTS_SPARSE_HDR.size
    idx = np.frombuffer(payload, DT_COUNT, count, off).astype(np.int64)
    codes = np.frombuffer(payload, dt, count, off + 4 * count).astype(np.int64)
    if count > 1 and not bool(np.all(np.diff(idx) > 0)):
        raise ValueError("indices must be strictly increasing")
    if n_codes is not None and count and int(idx[-1]) >= n_codes:
        raise ValueError(f"index {int(idx[-1])} beyond the layer's {n_codes} codes")
    return layer, idx, codes, scale


def err_name(code: int) -> str:
    try:
        return Err(code).name
    except ValueError:
        return f"0x{code:04x}"


def hello_json(info_dict: dict, time_formats: list[str], features=()) -> dict:
    """The JSON object of a HELLO reply and of ``HWL:INFO?`` (``features`` only when some)."""
    doc = {"protocol_version": PROTOCOL_VERSION, "info": info_dict,
           "time_formats": list(time_formats)}
    if features:
        doc["features"] = list(features)
    return doc


@dataclass
class RunReply:
    """A decoded RUN_BATCH reply (numpy, flat per sample)."""

    batch: int
    stage_times: list[np.ndarray]  # (B, n_stage) float64 tau_c, +inf silent
    readout: np.ndarray  # (B, n_classes)
    v_tmax: list[np.ndarray]  # (B, n_layer)
    spike_counts: np.ndarray  # (B, n_layers) int64
    energy_j: Optional[np.ndarray]  # (B, n_layers) or None


def encode_run_request(times: np.ndarray, f64: bool, ratio: float) -> bytes:
    """``times``: (B, n) float64 tau_c."""
    t = np.asarray(times, dtype=np.float64)
    b, n = t.shape
    data = t.astype(DT_F64) if f64 else times_to_ticks(t, ratio)
    return RUN_REQ.pack(b, n) + data.tobytes()


def decode_run_request(payload: bytes, f64: bool, ratio: float,
                       max_values: int = MAX_MESSAGE) -> np.ndarray:
    """Inverse of :func:`encode_run_request`; raises ValueError on any inconsistency."""
    if len(payload) < RUN_REQ.size:
        raise ValueError("RUN_BATCH payload shorter than its header")
    b, n = RUN_REQ.unpack_from(payload)
    dt = DT_F64 if f64 else DT_TICKS
    if b * n > max_values or len(payload) != RUN_REQ.size + b * n * dt.itemsize:
        raise ValueError(f"RUN_BATCH payload of {len(payload)} bytes does not hold {b}x{n} "
                         f"{'float64' if f64 else 'uint32'} times")
    data = np.frombuffer(payload, dtype=dt, count=b * n, offset=RUN_REQ.size).reshape(b, n)
    if f64:
        return data.astype(np.float64)
    return ticks_to_times(data, ratio)


def encode_run_reply(stage_times: list[np.ndarray], readout: np.ndarray, v_tmax: list[np.ndarray],
                     spike_counts: np.ndarray, energy_j: Optional[np.ndarray], f64: bool,
                     ratio: float) -> bytes:
    """All arrays (B, n...) flattened per sample. Layout (every array C order, little endian)::

        RUN_REPLY header | n per stage u32[S] | n per neuron layer u32[L]
        | stage times (uint32 ticks or float64 tau_c) | readout f64[B, C]
        | v_tmax f64 per layer | spike counts u32[B, L] | energy f64[B, L] (if has_energy)
    """
    b = int(readout.shape[0])
    st = [np.asarray(s, dtype=np.float64).reshape(b, -1) for s in stage_times]
    vt = [np.asarray(v, dtype=np.float64).reshape(b, -1) for v in v_tmax]
    ro = np.asarray(readout, dtype=np.float64).reshape(b, -1)
    counts = np.asarray(spike_counts).reshape(b, len(vt))
    if counts.size and (counts.min() < 0 or counts.max() > 0xFFFFFFFF):
        raise ValueError("spike counts out of uint32 range")
    parts = [RUN_REPLY.pack(b, len(st), len(vt), ro.shape[1], 1 if energy_j is not None else 0),
             np.array([s.shape[1] for s in st], dtype=DT_COUNT).tobytes(),
             np.array([v.shape[1] for v in vt], dtype=DT_COUNT).tobytes()]
    for s in st:
        parts.append(s.astype(DT_F64).tobytes() if f64 else times_to_ticks(s, ratio).tobytes())
    parts.append(ro.astype(DT_F64).tobytes())
    parts.extend(v.astype(DT_F64).tobytes() for v in vt)
    parts.append(counts.astype(DT_COUNT).tobytes())
    if energy_j is not None:
        parts.append(np.asarray(energy_j, dtype=np.float64).reshape(b, len(vt))
                     .astype(DT_F64).tobytes())
    return b"".join(parts)


def run_reply_size(batch: int, stage_sizes: list[int], layer_sizes: list[int], n_classes: int,
                   f64: bool, has_energy: bool = True) -> int:
    """Bytes of a RUN_BATCH reply body (with energy unless ``has_energy`` is False)."""
    per_sample = (sum(stage_sizes) * (8 if f64 else 4) + 8 * n_classes + 8 * sum(layer_sizes)
                  + 4 * len(layer_sizes) + (8 * len(layer_sizes) if has_energy else 0))
    return RUN_REPLY.size + 4 * (len(stage_sizes) + len(layer_sizes)) + batch * per_sample


def max_batch_for_message(stage_sizes: list[int], layer_sizes: list[int], n_classes: int,
                          f64: bool, limit: int = MAX_MESSAGE) -> int:
    """Largest batch whose RUN_BATCH request and reply both fit in ``limit`` bytes."""
    per_reply = run_reply_size(1, stage_sizes, layer_sizes, n_classes, f64) - \
        run_reply_size(0, stage_sizes, layer_sizes, n_classes, f64)
    per_req = (stage_sizes[0] if stage_sizes else 0) * (8 if f64 else 4)
    return max(0, (limit - 64) // max(per_reply, per_req, 1))


def decode_run_reply(payload: bytes, f64: bool, ratio: float) -> RunReply:
    """Inverse of :func:`encode_run_reply`; every length is checked against the payload size."""
    mv = memoryview(payload)
    pos = 0

    def take(dtype: np.dtype, count: int) -> np.ndarray:
        nonlocal pos
        nbytes = count * dtype.itemsize
        if count < 0 or pos + nbytes > len(mv):
            raise ValueError(f"RUN_BATCH reply truncated: need {nbytes} bytes at offset {pos}, "
                             f"have {len(mv) - pos}")
        arr = np.frombuffer(mv, dtype=dtype, count=count, offset=pos)
        pos += nbytes
        return arr

    if len(mv) < RUN_REPLY.size:
        raise ValueError("RUN_BATCH reply shorter than its header")
    b, n_st, n_l, n_cls, has_energy = RUN_REPLY.unpack_from(mv)
    pos = RUN_REPLY.size
    st_n = take(DT_COUNT, n_st).astype(np.int64)
    l_n = take(DT_COUNT, n_l).astype(np.int64)
    tdt = DT_F64 if f64 else DT_TICKS
    stages = []
    for n in st_n:
        raw = take(tdt, b * int(n)).reshape(b, int(n))
        stages.append(raw.astype(np.float64) if f64 else ticks_to_times(raw, ratio))
    readout = take(DT_F64, b * n_cls).reshape(b, n_cls).astype(np.float64)
    v = [take(DT_F64, b * int(n)).reshape(b, int(n)).astype(np.float64) for n in l_n]
    counts = take(DT_COUNT, b * n_l).reshape(b, n_l).astype(np.int64)
    energy = take(DT_F64, b * n_l).reshape(b, n_l).astype(np.float64) if has_energy else None
    if pos != len(mv):
        raise ValueError(f"RUN_BATCH reply has {len(mv) - pos} trailing bytes")
    return RunReply(b, stages, readout, v, counts, energy)


def dumps(obj) -> bytes:
    """Compact UTF-8 JSON used by PROGRAM, HELLO and STATUS."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")


def chip_error(code: int, message: str, context: str) -> DeviceError:
    """The hwloop exception for an error the chip reports, in either dialect (an ERROR reply,
    a ``SYST:ERR?`` entry): ``LIMIT`` -> DeviceLimitError; framing and payload errors
    (:data:`PROTOCOL_ERRORS`) and SCPI's standard negative numbers (parse errors) ->
    ProtocolError; the rest -> DeviceError. The chip's code is kept as ``exc.code``."""
    code = int(code)
    label = f"{err_name(code)} (0x{code:04x})" if code >= 0 else str(code)
    text = f"{context}: chip error {label}: {message}"
    if code == Err.LIMIT:
        exc = DeviceLimitError(text)
    elif code < 0 or code in PROTOCOL_ERRORS:
        exc = ProtocolError(text)
    else:
        exc = DeviceError(text)
    exc.code = code  # the chip's error code, for callers that branch on it
    return exc
