"""The virtual chip: serves any :class:`TTFSDevice` over a pty or TCP, in the frame or SCPI dialect.

    chip = serve(EmulatorDevice.from_profile("devices/emulator-analog.yaml"), transport="tcp")
    dev = open_device(chip.url)            # socket://127.0.0.1:PORT  (frame dialect)
    ...
    chip.stop()

Every length field is bounded before anything is allocated (``MAX_ENCODED`` per frame,
``MAX_MESSAGE`` per reassembled message, ``SCPI_MAX_LINE`` / ``SCPI_MAX_BLOCK`` for SCPI).
Faults (:class:`FaultConfig`) are injected here, on the chip side of the link, from a seeded
generator. The server binds loopback unless ``allow_remote=True``.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import ipaddress
import logging
import math
import os
import select
import socket
import struct
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from pydantic import ValidationError

from hwloop.devices import protocol as P
from hwloop.devices.base import NEURON_KINDS, WEIGHT_KINDS, NetworkSpec, TTFSDevice
from hwloop.devices.framing import (ChunkAssembler, Frame, FrameFault, FrameReader, encode_frame,
                                    split_chunks)
from hwloop.errors import DeviceError, DeviceLimitError, ProtocolError

THRESHOLD_KINDS = NEURON_KINDS + ("readout",)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Dialect-independent chip state
# ------------------------------------------------------------------------------------------------


class ChipError(Exception):
    """An operation the chip refuses: becomes an ERROR reply / a SYST:ERR? entry."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = int(code)
        self.message = message


class Peer:
    """Who is on the other end of a session: a name for messages (the client's address) and a
    way to tell whether that link is still there (``alive``)."""

    def __init__(self, name: str, alive: Optional[Callable[[], bool]] = None):
        self.name = name
        self._alive = alive

    def alive(self) -> bool:
        if self._alive is None:
            return True
        try:
            return bool(self._alive())
        except Exception:
            return False

    def __repr__(self) -> str:
        return f"Peer({self.name!r})"


class ChipCore:
    """Wraps a TTFSDevice with the chip's wire-level state: staged partial writes, tick ratio,
    and which link controls the chip (:meth:`claim`; docs/protocol.md, "Ownership")."""

    def __init__(self, device: TTFSDevice):
        self.device = device
        self.lock = threading.RLock()
        self.info = device.info()
        self.ratio = P.ticks_per_tau_c(self.info.tau_c_s, self.info.clock_period_s)
        self.spec: Optional[NetworkSpec] = None
        self._stage_w: dict[int, list] = {}
        self._stage_t: dict[int, np.ndarray] = {}
        self.runs = 0
        self.time_formats = [P.TIME_TICKS, P.TIME_F64]
        self.features = [P.FEATURE_SPARSE, P.FEATURE_LOCK]
        self.owner: Optional[Peer] = None
        self._owner_lock = threading.Lock()

    # -- ownership: one controlling link at a time -----------------------------------------------
    @staticmethod
    def busy_message(owner: Peer) -> str:
        return (f"chip busy: it is controlled by {owner.name}; this link may only query "
                "(identity, status, reads) until that link closes or releases it "
                "(take over with SerialDevice/VisaDevice take_over=True: LOCK take-over, "
                "SCPI HWL:LOCK:TAKE)")

    def _set_owner(self, peer: Optional[Peer], text: str, level: int = logging.INFO) -> None:
        self.owner = peer
        with self.lock:  # another link's staged partial writes must never be committed
            self._stage_w.clear()
            self._stage_t.clear()
        log.log(level, "virtual chip: %s", text)

    def claim(self, peer: Peer) -> None:
        """Give ``peer`` control when nobody (alive) has it; ChipError(BUSY) naming the owner
        otherwise."""
        with self._owner_lock:
            cur = self.owner
            if cur is peer:
                return
            if cur is not None and cur.alive():
                raise ChipError(P.Err.BUSY, self.busy_message(cur))
            self._set_owner(peer, f"{peer.name} took control of the chip" +
                            (f" ({cur.name} is gone)" if cur is not None else ""))

    def release(self, peer: Peer, why: str = "released the chip") -> bool:
        with self._owner_lock:
            if self.owner is not peer:
                return False
            self._set_owner(None, f"{peer.name} {why}")
            return True

    def take_over(self, peer: Peer) -> None:
        with self._owner_lock:
            cur = self.owner
            if cur is peer:
                return
            if cur is None:
                self._set_owner(peer, f"{peer.name} took control of the chip")
            else:
                self._set_owner(peer, f"{peer.name} took over the chip from {cur.name}",
                                logging.WARNING)

    def lock_state(self, peer: Peer) -> dict:
        with self._owner_lock:
            cur = self.owner
            return {"owner": None if cur is None else cur.name, "you": cur is peer}

    # -- helpers ---------------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable, *args):
        try:
            return fn(*args)
        except ChipError:
            raise
        except DeviceLimitError as e:
            raise ChipError(P.Err.LIMIT, str(e)) from e
        except DeviceError as e:
            raise ChipError(P.Err.DEVICE, f"{what}: {e}") from e
        except (ValueError, TypeError) as e:
            raise ChipError(P.Err.RANGE, f"{what}: {e}") from e
        except Exception as e:  # the wrapped device failed: report, keep serving
            raise ChipError(P.Err.INTERNAL, f"{what}: {type(e).__name__}: {e}") from e

    def _layer(self, layer: int, kinds: tuple[str, ...]):
        if self.spec is None:
            raise ChipError(P.Err.NOT_PROGRAMMED, "no network programmed")
        if not 0 <= layer < len(self.spec.layers):
            raise ChipError(P.Err.RANGE, f"layer {layer} out of range 0..{len(self.spec.layers)-1}")
        spec = self.spec.layers[layer]
        if spec.kind not in kinds:
            raise ChipError(P.Err.RANGE, f"layer {layer} is {spec.kind!r}; expected one of "
                                         f"{list(kinds)}")
        return spec

    @staticmethod
    def _range(offset: int, count: int, n: int, what: str) -> None:
        if offset + count > n:
            raise ChipError(P.Err.RANGE, f"{what}: offset {offset} + count {count} exceeds {n}")

    # -- operations ------------------------------------------------------------------------------
    def hello(self) -> dict:
        info = self.info.model_dump(mode="json")
        info["protocol_version"] = P.PROTOCOL_VERSION  # what this link speaks (provenance)
        doc = P.hello_json(info, self.time_formats, self.features)
        digest = getattr(self.device, "model_sha256", None)  # a virtual chip knows its model
        if digest:
            doc["model_sha256"] = digest
        return doc

    def seed_noise(self, seed: int) -> None:
        with self.lock:
            self._call("seed_noise", self.device.seed_noise, int(seed))

    def program(self, spec_json: bytes) -> None:
        try:
            spec = NetworkSpec.model_validate_json(spec_json)
        except (ValidationError, ValueError) as e:
            raise ChipError(P.Err.BAD_PAYLOAD, f"PROGRAM: invalid NetworkSpec JSON: {e}") from e
        with self.lock:
            self.spec = None
            self._stage_w.clear()
            self._stage_t.clear()
            self._call("program", self.device.program, spec)
            self.spec = spec

    def reset(self) -> None:
        with self.lock:
            self._call("reset", self.device.reset)
            self.spec = None
            self._stage_w.clear()
            self._stage_t.clear()

    def write_weights(self, layer: int, offset: int, codes: np.ndarray, scale: float,
                      commit: bool, indices: Optional[np.ndarray] = None) -> None:
        """Stage ``codes`` at ``offset`` (or, with ``indices``, at those flat indices: a sparse
        write, indices already checked increasing) and apply the layer on ``commit``."""
        with self.lock:
            spec = self._layer(layer, WEIGHT_KINDS)
            n = math.prod(spec.weight_shape)
            if indices is None:
                self._range(offset, codes.size, n, f"WRITE_WEIGHTS layer {layer}")
            elif indices.size and int(indices[-1]) >= n:
                raise ChipError(P.Err.RANGE, f"WRITE_WEIGHTS_SPARSE layer {layer}: index "
                                             f"{int(indices[-1])} exceeds {n - 1}")
            bits = self.info.weight_bits
            lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            if codes.size and (codes.min() < lo or codes.max() > hi):
                raise ChipError(P.Err.RANGE, f"layer {layer}: codes must lie in [{lo}, {hi}] for "
                                             f"weight_bits={bits}")
            if not math.isfinite(scale):
                raise ChipError(P.Err.RANGE, f"layer {layer}: scale {scale} is not finite")
            st = self._stage_w.get(layer)
            if st is None:
                cur, _ = self._call("read_weights", self.device.read_weights, layer)
                st = [cur.detach().cpu().numpy().astype(np.int64).reshape(-1).copy(), scale]
                self._stage_w[layer] = st
            if indices is None:
                st[0][offset:offset + codes.size] = codes
            else:
                st[0][indices] = codes
            st[1] = float(scale)
            if commit:
                del self._stage_w[layer]
                self._call("write_weights", self.device.write_weights, layer,
                           torch.from_numpy(st[0].reshape(spec.weight_shape)), st[1])

    def read_weights(self, layer: int, offset: int, count: int) -> tuple[np.ndarray, float]:
        with self.lock:
            spec = self._layer(layer, WEIGHT_KINDS)
            self._range(offset, count, math.prod(spec.weight_shape), f"READ_WEIGHTS layer {layer}")
            codes, scale = self._call("read_weights", self.device.read_weights, layer)
            flat = codes.detach().cpu().numpy().astype(np.int64).reshape(-1)
            return flat[offset:offset + count], float(scale)

    def weights_crc(self, layer: int) -> tuple[int, float, int]:
        with self.lock:
            self._layer(layer, WEIGHT_KINDS)
            codes, scale = self._call("read_weights", self.device.read_weights, layer)
            flat = codes.detach().cpu().numpy().astype(np.int64).reshape(-1)
            return P.weights_crc(flat, float(scale)), float(scale), int(flat.size)

    def write_thresholds(self, layer: int, offset: int, values: np.ndarray, commit: bool) -> None:
        with self.lock:
            spec = self._layer(layer, THRESHOLD_KINDS)
            n = math.prod(spec.out_shape)
            self._range(offset, values.size, n, f"WRITE_THRESHOLDS layer {layer}")
            st = self._stage_t.get(layer)
            if st is None:
                cur = self._call("read_thresholds", self.device.read_thresholds, layer)
                st = cur.detach().cpu().double().numpy().reshape(-1).copy()
                self._stage_t[layer] = st
            st[offset:offset + values.size] = values
            if commit:
                del self._stage_t[layer]
                self._call("write_thresholds", self.device.write_thresholds, layer,
                           torch.from_numpy(st.reshape(spec.out_shape)))

    def read_thresholds(self, layer: int, offset: int, count: int) -> np.ndarray:
        with self.lock:
            spec = self._layer(layer, THRESHOLD_KINDS)
            self._range(offset, count, math.prod(spec.out_shape), f"READ_THRESHOLDS layer {layer}")
            cur = self._call("read_thresholds", self.device.read_thresholds, layer)
            return cur.detach().cpu().double().numpy().reshape(-1)[offset:offset + count]

    def set_windows(self, pairs: np.ndarray) -> None:
        with self.lock:
            if self.spec is None:
                raise ChipError(P.Err.NOT_PROGRAMMED, "no network programmed")
            wins = [(float(a), float(b)) for a, b in pairs.reshape(-1, 2)]
            self._call("set_windows", self.device.set_windows, wins)
            self.spec = P.spec_with_windows(self.spec, wins)  # STATUS reports the new windows

    def run(self, times: np.ndarray, f64: bool) -> bytes:
        """``times``: (B, n) float64 tau_c. Returns the RUN_BATCH reply body."""
        with self.lock:
            if self.spec is None:
                raise ChipError(P.Err.NOT_PROGRAMMED, "no network programmed")
            b, n = times.shape
            if b < 1 or b > self.info.max_batch:
                raise ChipError(P.Err.LIMIT, f"batch of {b} outside 1..max_batch="
                                             f"{self.info.max_batch}")
            if n != math.prod(self.spec.input_shape):
                raise ChipError(P.Err.BAD_PAYLOAD, f"RUN_BATCH: {n} inputs per sample, network "
                                                   f"takes {self.spec.input_shape}")
            inp = torch.from_numpy(np.ascontiguousarray(times).reshape(b, *self.spec.input_shape))
            rec = self._call("run", self.device.run, inp)
            self.runs += 1
            try:
                return P.encode_run_reply(
                    [s.detach().cpu().double().numpy() for s in rec.spike_times],
                    rec.readout.detach().cpu().double().numpy(),
                    [v.detach().cpu().double().numpy() for v in rec.v_tmax],
                    rec.spike_counts.detach().cpu().numpy(),
                    None if rec.energy_j is None else rec.energy_j.detach().cpu().double().numpy(),
                    f64, self.ratio)
            except ValueError as e:
                raise ChipError(P.Err.RANGE, f"RUN_BATCH reply: {e}") from e

    def status(self) -> dict:
        with self.lock:
            return {"device_id": self.info.device_id, "programmed": self.spec is not None,
                    "spec": None if self.spec is None else self.spec.model_dump(mode="json"),
                    "runs": self.runs, "staged_weights": sorted(self._stage_w),
                    "staged_thresholds": sorted(self._stage_t)}


# ------------------------------------------------------------------------------------------------
# Frame dialect
# ------------------------------------------------------------------------------------------------


class FrameSession:
    """One connection of the frame dialect: reassembly, reply cache, dispatch."""

    #: Bytes of encoded reply frames the reply cache may hold (the newest reply is always kept,
    #: however large, so that it can be asked for again).
    CACHE_BYTES = 8 * 1024 * 1024

    def __init__(self, core: ChipCore, cache_size: int = 16, peer: Optional[Peer] = None,
                 cache_bytes: Optional[int] = None):
        self.core = core
        self.peer = peer or Peer("an in-process session")
        self.reader = FrameReader()
        self.cache: "collections.OrderedDict[tuple, list[bytes]]" = collections.OrderedDict()
        self.cache_size = cache_size
        self.cache_bytes = self.CACHE_BYTES if cache_bytes is None else int(cache_bytes)
        self._cache_nbytes = 0
        self.assembly: Optional[tuple[int, ChunkAssembler]] = None
        self.reply_payload = P.MAX_PAYLOAD
        self.by_seq: dict[int, tuple] = {}  # seq -> cache key of its latest request (RESEND)
        self.stats = {"frames": 0, "replayed": 0, "errors": 0, "resends": 0, "naks": 0}

    def handle(self, frame: Frame, busy: Optional[Callable] = None) -> list[bytes]:
        """Encoded reply frames for one received frame (a retried frame gets the cached reply).

        ``busy(seq, cmd)``, when given, is a context manager the session enters while it
        executes a command of ``PENDING_COMMANDS`` (the link layer sends PENDING meanwhile).
        """
        if frame.is_reply:
            return []
        self.stats["frames"] += 1
        if frame.cmd == P.Cmd.RESEND and frame.version == P.PROTOCOL_VERSION:
            return self._resend(frame)
        key = (frame.seq, frame.cmd, frame.flags, len(frame.payload),
               zlib.crc32(frame.payload))
        hit = self.cache.get(key)
        if hit is not None:
            self.cache.move_to_end(key)
            self.stats["replayed"] += 1
            return hit
        replies = self._process(frame, busy)
        self.cache[key] = replies
        self._cache_nbytes += sum(len(r) for r in replies)
        self.by_seq[frame.seq] = key
        while len(self.cache) > self.cache_size or \
                (self._cache_nbytes > self.cache_bytes and len(self.cache) > 1):
            old, frames = self.cache.popitem(last=False)
            self._cache_nbytes -= sum(len(r) for r in frames)
            if self.by_seq.get(old[0]) == old:
                del self.by_seq[old[0]]
        return replies

    def close(self) -> None:
        """Drop what the session holds (reply cache, half-received message)."""
        self.cache.clear()
        self.by_seq.clear()
        self._cache_nbytes = 0
        self.assembly = None
        self.reader = FrameReader()

    def _resend(self, frame: Frame) -> list[bytes]:
        """RESEND: the named chunks of the cached reply to ``frame.seq`` (the whole reply when it
        is a single frame). Read-only, so it is neither cached nor counted as a request."""
        self.stats["resends"] += 1
        try:
            indices = P.parse_resend_payload(frame.payload)
        except ValueError as e:
            return self._error(frame.seq, P.Err.BAD_PAYLOAD, f"RESEND: {e}")
        key = self.by_seq.get(frame.seq)
        if key is None:
            return self._error(frame.seq, P.Err.NO_REPLY, f"RESEND: no cached reply for seq "
                                                          f"{frame.seq}")
        frames = self.cache[key]
        if len(frames) == 1:
            return frames
        bad = [i for i in indices if i >= len(frames)]
        if bad:
            return self._error(frame.seq, P.Err.CHUNK, f"RESEND: chunk {bad[0]} of a "
                                                       f"{len(frames)}-chunk reply")
        return [frames[i] for i in dict.fromkeys(indices)]

    def nak(self, fault: FrameFault) -> bytes:
        """The NAK frame for a piece of the stream that was thrown away."""
        reason = {"crc": P.NakReason.CRC, "escape": P.NakReason.ESCAPE, "length": P.NakReason.LENGTH,
                  "overflow": P.NakReason.OVERFLOW}.get(fault.kind, P.NakReason.LENGTH)
        self.stats["naks"] += 1
        return encode_frame(Frame(0, P.Cmd.NAK, P.Flag.REPLY, P.NAK_PAYLOAD.pack(reason)))

    def _error(self, seq: int, code: int, message: str) -> list[bytes]:
        self.stats["errors"] += 1
        return [encode_frame(Frame(seq, P.Cmd.ERROR, P.Flag.REPLY, P.error_payload(code, message)))]

    def _process(self, frame: Frame, busy: Optional[Callable] = None) -> list[bytes]:
        seq, cmd = frame.seq, frame.cmd
        if frame.version != P.PROTOCOL_VERSION:
            return self._error(seq, P.Err.VERSION, f"protocol version {frame.version} not "
                                                   f"supported; chip speaks {P.PROTOCOL_VERSION}")
        payload = frame.payload
        try:
            if cmd in P.CONTROL_COMMANDS:
                self.core.claim(self.peer)  # BUSY while another link controls the chip
            if frame.flags & P.Flag.CHUNKED:
                if len(payload) < P.CHUNK_HEADER.size:
                    raise ProtocolError("chunk shorter than its header")
                idx, _ = P.CHUNK_HEADER.unpack_from(payload)
                if idx == 0 or self.assembly is None:
                    if idx != 0:
                        raise ProtocolError(f"chunk {idx} of {P.cmd_name(cmd)} without chunk 0")
                    self.assembly = (cmd, ChunkAssembler())
                if self.assembly[0] != cmd:
                    raise ProtocolError(f"chunk of {P.cmd_name(cmd)} inside a chunked "
                                        f"{P.cmd_name(self.assembly[0])}")
                if not self.assembly[1].add(payload):
                    return [encode_frame(Frame(seq, cmd, P.Flag.REPLY, b""))]
                payload = self.assembly[1].message()
                self.assembly = None
            if busy is not None and cmd in P.PENDING_COMMANDS:
                with busy(seq, cmd):
                    body = self._execute(cmd, frame.flags, payload)
            else:
                body = self._execute(cmd, frame.flags, payload)
        except ChipError as e:
            return self._error(seq, e.code, e.message)
        except ProtocolError as e:
            self.assembly = None
            return self._error(seq, P.Err.CHUNK, str(e))
        except (struct.error, ValueError) as e:
            return self._error(seq, P.Err.BAD_PAYLOAD, f"{P.cmd_name(cmd)}: {e}")
        return self._reply_frames(seq, cmd, body)

    def _reply_frames(self, seq: int, cmd: int, body: bytes) -> list[bytes]:
        if len(body) <= self.reply_payload:
            return [encode_frame(Frame(seq, cmd, P.Flag.REPLY, body))]
        chunks = split_chunks(body, self.reply_payload - P.CHUNK_HEADER.size)
        return [encode_frame(Frame(seq, cmd, P.Flag.REPLY | P.Flag.CHUNKED, c)) for c in chunks]

    def _execute(self, cmd: int, flags: int, payload: bytes) -> bytes:
        core = self.core
        if cmd == P.Cmd.HELLO:
            if len(payload) >= P.HELLO_REQ.size:
                _, want = P.HELLO_REQ.unpack_from(payload)
                self.reply_payload = (min(max(int(want), 64), P.MAX_PAYLOAD) if want
                                      else P.MAX_PAYLOAD)
            return P.HELLO_REPLY.pack(P.PROTOCOL_VERSION) + P.dumps(core.hello())
        if cmd == P.Cmd.LOCK:
            if P.FEATURE_LOCK not in core.features:
                raise ChipError(P.Err.UNKNOWN_COMMAND, f"unknown command 0x{cmd:02x}")
            (op,) = P.LOCK_PAYLOAD.unpack(payload)
            if op == P.LockOp.REQUEST:
                core.claim(self.peer)
            elif op == P.LockOp.RELEASE:
                core.release(self.peer)
            elif op == P.LockOp.TAKE_OVER:
                core.take_over(self.peer)
            elif op != P.LockOp.QUERY:
                raise ValueError(f"LOCK op {op} is not one of 0..3")
            return P.dumps(core.lock_state(self.peer))
        if cmd == P.Cmd.PROGRAM:
            core.program(payload)
            return b""
        if cmd == P.Cmd.STATUS:
            return P.dumps(core.status())
        if cmd == P.Cmd.RESET:
            self.assembly = None
            core.reset()
            return b""
        if cmd == P.Cmd.SEED_NOISE:
            (seed,) = P.SEED.unpack(payload)
            core.seed_noise(seed)
            return b""
        if cmd == P.Cmd.WRITE_WEIGHTS:
            layer, offset, count, scale = P.WRITE_WEIGHTS_HDR.unpack_from(payload)
            dt = P.code_dtype(bool(flags & P.Flag.WIDE))
            if len(payload) != P.WRITE_WEIGHTS_HDR.size + count * dt.itemsize:
                raise ValueError(f"payload of {len(payload)} bytes does not hold {count} codes")
            codes = np.frombuffer(payload, dt, count, P.WRITE_WEIGHTS_HDR.size).astype(np.int64)
            core.write_weights(layer, offset, codes, scale, bool(flags & P.Flag.COMMIT))
            return b""
        if cmd == P.Cmd.WRITE_WEIGHTS_SPARSE:
            if P.FEATURE_SPARSE not in core.features:
                raise ChipError(P.Err.UNKNOWN_COMMAND, f"unknown command 0x{cmd:02x}")
            layer, idx, codes, scale = P.decode_sparse(payload, bool(flags & P.Flag.WIDE))
            core.write_weights(layer, 0, codes, scale, bool(flags & P.Flag.COMMIT), idx)
            return b""
        if cmd == P.Cmd.READ_WEIGHTS:
            layer, offset, count = P.READ_RANGE.unpack_from(payload)
            codes, scale = core.read_weights(layer, offset, count)
            wide = bool(flags & P.Flag.WIDE)
            if not wide and codes.size and (codes.min() < -32768 or codes.max() > 32767):
                raise ChipError(P.Err.RANGE, "codes do not fit int16; set the WIDE flag")
            return P.READ_WEIGHTS_REPLY.pack(scale, codes.size) + \
                codes.astype(P.code_dtype(wide)).tobytes()
        if cmd == P.Cmd.WEIGHTS_CRC:
            (layer,) = P.LAYER.unpack_from(payload)
            return P.WEIGHTS_CRC_REPLY.pack(*core.weights_crc(layer))
        if cmd == P.Cmd.WRITE_THRESHOLDS:
            layer, offset, count = P.WRITE_THRESHOLDS_HDR.unpack_from(payload)
            if len(payload) != P.WRITE_THRESHOLDS_HDR.size + 8 * count:
                raise ValueError(f"payload of {len(payload)} bytes does not hold {count} values")
            vals = np.frombuffer(payload, P.DT_F64, count, P.WRITE_THRESHOLDS_HDR.size)
            core.write_thresholds(layer, offset, vals.astype(np.float64),
                                  bool(flags & P.Flag.COMMIT))
            return b""
        if cmd == P.Cmd.READ_THRESHOLDS:
            layer, offset, count = P.READ_RANGE.unpack_from(payload)
            vals = core.read_thresholds(layer, offset, count)
            return P.COUNT.pack(vals.size) + vals.astype(P.DT_F64).tobytes()
        if cmd == P.Cmd.SET_WINDOWS:
            (n,) = P.WINDOWS_HDR.unpack_from(payload)
            if len(payload) != P.WINDOWS_HDR.size + 16 * n:
                raise ValueError(f"payload of {len(payload)} bytes does not hold {n} windows")
            core.set_windows(np.frombuffer(payload, P.DT_F64, 2 * n, P.WINDOWS_HDR.size))
            return b""
        if cmd == P.Cmd.RUN_BATCH:
            f64 = bool(flags & P.Flag.F64_TIMES)
            times = P.decode_run_request(payload, f64, core.ratio)
            return core.run(times, f64)
        raise ChipError(P.Err.UNKNOWN_COMMAND, f"unknown command 0x{cmd:02x}")


# ------------------------------------------------------------------------------------------------
# SCPI dialect
# ------------------------------------------------------------------------------------------------


def _block(data: bytes) -> bytes:
    n = str(len(data))
    return b"#" + str(len(n)).encode() + n.encode() + data + b"\n"


class ScpiSession:
    """One connection of the SCPI dialect: a bounded parser, dispatch, the error queue and the
    IEEE 488.2 status registers.

    A line (``\\n``) is one program message; ``;`` separates its units. Headers are resolved
    by :func:`protocol.scpi_resolve` from :data:`protocol.SCPI_TABLE` (short and long forms,
    optional nodes, any case, a leading ``:``, paths relative to the previous unit). The
    responses of the queries of one message travel as one line, joined by ``;``.
    """

    BLOCK_QUERIES = ("HWL:WEIG?", "HWL:THR?", "HWL:RUN?")

    def __init__(self, core: ChipCore, peer: Optional[Peer] = None):
        self.core = core
        self.peer = peer or Peer("an in-process session")
        self.buf = bytearray()
        self.skip = 0
        self.discard_line = False
        self.errors: collections.deque = collections.deque()
        self.f64 = False
        self.esr = 0  # standard event status register
        self.ese = 0  # its enable mask
        self.sre = 0  # service request enable mask
        self.stats = {"commands": 0, "errors": 0}
        self._path: tuple = ()  # the current header path inside a program message
        self._parts: list[bytes] = []  # responses of this message's queries
        self._skip_rest = False  # a header error: the rest of the message is not executed

    def close(self) -> None:
        self.buf = bytearray()
        self.skip = 0
        self._parts = []

    def push_error(self, code: int, message: str) -> None:
        self.stats["errors"] += 1
        self.esr |= P.esr_bit_for(int(code))
        if len(self.errors) >= P.SCPI_ERROR_QUEUE_LEN:
            self.errors[-1] = (P.SCPI_QUEUE_OVERFLOW, "Queue overflow")
            return
        self.errors.append((int(code), message.replace('"', "'").replace("\n", " ")))

    def stb(self) -> int:
        """The status byte: EAV (error queue), MAV (a response of this message waits), ESB,
        MSS."""
        v = (P.STB_EAV if self.errors else 0) | (P.STB_MAV if any(self._parts) else 0) | \
            (P.STB_ESB if self.esr & self.ese else 0)
        return v | (P.STB_MSS if v & self.sre & ~P.STB_MSS else 0)

    def _end_message(self, out: list[bytes]) -> None:
        if self._parts:
            out.append(b";".join(self._parts) + P.SCPI_TERM.encode())
        self._parts = []
        self._path = ()
        self._skip_rest = False

    def _units(self, text: bytes, block: Optional[bytes]) -> int:
        """Execute the units of ``text`` (the last one gets ``block``); returns their count."""
        try:
            s = text.decode("ascii")
        except UnicodeDecodeError:
            self.push_error(P.SCPI_SYNTAX_ERROR, "Syntax error; non-ASCII header")
            self._skip_rest = True
            return 1
        units = P.scpi_split_units(s)
        n = 0
        for i, u in enumerate(units):
            last = i == len(units) - 1
            if not u.strip() and not (last and block is not None):
                continue
            n += 1
            self.dispatch(u.encode("ascii"), block if last else None)
        return n

    def feed(self, data: bytes) -> tuple[list[bytes], int]:
        """Returns (responses, number of complete message units seen)."""
        self.buf += data
        out: list[bytes] = []
        ncmd = 0
        while True:
            if self.skip:
                k = min(self.skip, len(self.buf))
                del self.buf[:k]
                self.skip -= k
                if self.skip:
                    break
            if self.discard_line:
                nl = self.buf.find(b"\n")
                if nl < 0:
                    self.buf.clear()
                    break
                del self.buf[:nl + 1]
                self.discard_line = False
                self._end_message(out)
            nl = self.buf.find(b"\n")
            hs = self.buf.find(b"#")
            if hs >= 0 and (nl < 0 or hs < nl):
                if hs > P.SCPI_MAX_LINE:
                    self.push_error(P.SCPI_SYNTAX_ERROR, "Header too long")
                    del self.buf[:hs]
                    self.discard_line = True
                    continue
                if len(self.buf) < hs + 2:
                    break
                nd = self.buf[hs + 1] - 0x30
                if not 1 <= nd <= 9:
                    self.push_error(P.SCPI_BLOCK_DATA_ERROR,
                                    "Block data error; only definite-length blocks #1-#9")
                    self._fail_block_unit(bytes(self.buf[:hs]))
                    del self.buf[:hs + 2]
                    self.discard_line = True
                    continue
                if len(self.buf) < hs + 2 + nd:
                    break
                digits = bytes(self.buf[hs + 2:hs + 2 + nd])
                if not digits.isdigit():
                    self.push_error(P.SCPI_BLOCK_DATA_ERROR, "Block data error; bad length digits")
                    self._fail_block_unit(bytes(self.buf[:hs]))
                    del self.buf[:hs + 2 + nd]
                    self.discard_line = True
                    continue
                length = int(digits)
                start = hs + 2 + nd
                if length > P.SCPI_MAX_BLOCK:
                    self.push_error(P.SCPI_TOO_MUCH_DATA,
                                    f"Too much data; block of {length} > {P.SCPI_MAX_BLOCK}")
                    ncmd += 1
                    self._fail_block_unit(bytes(self.buf[:hs]))
                    del self.buf[:start]
                    self.skip = length
                    continue
                end = start + length
                if len(self.buf) < end + 1:
                    break
                text = bytes(self.buf[:hs])
                block = bytes(self.buf[start:end])
                tail = self.buf[end]
                del self.buf[:end + (1 if tail in (0x0A, 0x3B) else 0)]
                ncmd += self._units(text, block)
                if tail == 0x3B:  # ';': the program message goes on
                    continue
                if tail != 0x0A:
                    self.discard_line = True
                    continue
                self._end_message(out)
            elif nl >= 0:
                text = bytes(self.buf[:nl])
                del self.buf[:nl + 1]
                ncmd += self._units(text, None)
                self._end_message(out)
            else:
                if len(self.buf) > P.SCPI_MAX_LINE:
                    self.push_error(P.SCPI_SYNTAX_ERROR, "Program message too long")
                    self.buf.clear()
                    self.discard_line = True
                break
        return out, ncmd

    def _fail_block_unit(self, text: bytes) -> None:
        """A unit whose block was refused: the units before it run, it answers empty."""
        try:
            units = P.scpi_split_units(text.decode("ascii"))
        except UnicodeDecodeError:
            units = [""]
        for u in units[:-1]:
            if u.strip():
                self.dispatch(u.encode("ascii"), None)
        head = units[-1].strip().split(None, 1)[0] if units[-1].strip() else ""
        if head.endswith("?"):
            try:
                key = P.scpi_resolve(head, self._path)[0].key
            except P.ScpiHeaderError:
                key = head.upper()
            self._parts.append(b"#10" if key in self.BLOCK_QUERIES else b"")
        self._skip_rest = True

    def dispatch(self, text: bytes, block: Optional[bytes]) -> None:
        """Execute one program message unit; a query adds its response (empty when it failed)
        to the message's responses."""
        s = text.decode("ascii", "replace").strip()
        parts = s.split(None, 1)
        head = parts[0] if parts else ""
        rest = parts[1] if len(parts) > 1 else ""
        is_query = head.endswith("?")
        if self._skip_rest:
            if is_query:
                self._parts.append(b"")
            return
        self.stats["commands"] += 1
        try:
            entry, self._path = P.scpi_resolve(head, self._path)
        except P.ScpiHeaderError as e:
            self.push_error(e.code, str(e))
            self._skip_rest = True  # IEEE 488.2: the rest of the message is not executed
            if is_query:
                self._parts.append(b"")
            return
        key = entry.key
        args = [a.strip() for a in rest.split(",")]
        while args and args[-1] == "":
            args.pop()
        r = None
        try:
            if key in P.SCPI_CONTROL:
                self.core.claim(self.peer)  # BUSY while another link controls the chip
            r = self._command(key, args, block)
        except ChipError as e:
            self.push_error(e.code, f"{key}: {e.message}")
        except (ValueError, IndexError, struct.error) as e:
            self.push_error(P.SCPI_DATA_TYPE_ERROR, f"{key}: bad arguments: {e}")
        if entry.query:
            if r is None:  # a failed query answers an empty response so the host does not wait
                r = b"#10" if key in self.BLOCK_QUERIES else b""
            elif r.endswith(b"\n"):
                r = r[:-1]
            self._parts.append(r)

    @staticmethod
    def _mask(args: list[str], what: str) -> int:
        if len(args) != 1:
            raise ValueError(f"{what} takes one number 0..255")
        v = float(args[0])
        if v != int(v) or not 0 <= v <= 255:
            raise ChipError(P.SCPI_DATA_OUT_OF_RANGE, f"Data out of range; {what} {args[0]} "
                                                      "outside 0..255")
        return int(v)

    def _need_block(self, head: str, block: Optional[bytes]) -> bytes:
        if block is None:
            raise ValueError(f"{head} needs a definite-length block")
        return block

    def _command(self, head: str, args: list[str], block: Optional[bytes]) -> Optional[bytes]:
        core = self.core

        def text(s: str) -> bytes:
            return (s + P.SCPI_TERM).encode("utf-8")

        if head == "*IDN?":
            i = core.info
            fields = [P.SCPI_VENDOR, type(core.device).__name__, i.device_id, i.firmware_version]
            return text(",".join(f.replace(",", "_") for f in fields))
        if head == "*RST":
            core.reset()
            self.f64 = False
            return None
        if head == "*CLS":
            self.errors.clear()
            self.esr = 0
            return None
        if head == "*OPC":  # commands execute in order: every one before this is done
            self.esr |= P.ESR_OPC
            return None
        if head == "*OPC?":
            return text("1")
        if head == "*WAI":
            return None
        if head == "*ESR?":
            v, self.esr = self.esr, 0
            return text(str(v))
        if head == "*ESE":
            self.ese = self._mask(args, "*ESE")
            return None
        if head == "*ESE?":
            return text(str(self.ese))
        if head == "*STB?":
            return text(str(self.stb()))
        if head == "*SRE":
            self.sre = self._mask(args, "*SRE") & ~P.STB_MSS
            return None
        if head == "*SRE?":
            return text(str(self.sre))
        if head == "*TST?":  # the self-test: the device answers for itself
            try:
                core.device.info()
                core.status()
                return text("0")
            except Exception:
                return text("1")
        if head == "SYST:ERR?":
            if not self.errors:
                return text('0,"No error"')
            code, msg = self.errors.popleft()
            return text(f'{code},"{msg}"')
        if head == "SYST:ERR:ALL?":
            if not self.errors:
                return text('0,"No error"')
            items = [f'{c},"{m}"' for c, m in self.errors]
            self.errors.clear()
            return text(",".join(items))
        if head == "SYST:ERR:COUN?":
            return text(str(len(self.errors)))
        if head == "SYST:VERS?":
            return text(P.SCPI_VERSION)
        if head == "SYST:LOCK:REQ?":
            try:
                core.claim(self.peer)
                return text("1")
            except ChipError:
                return text("0")
        if head == "SYST:LOCK:REL":
            core.release(self.peer)
            return None
        if head == "SYST:LOCK:OWN?":
            owner = core.lock_state(self.peer)["owner"]
            return text('"' + (owner or "NONE").replace('"', "'") + '"')
        if head == "HWL:LOCK:TAKE":
            core.take_over(self.peer)
            return None
        if head == "HWL:ECHO?":  # the host's resynchronisation marker (VisaDevice._resync)
            token = args[0] if len(args) == 1 else ""
            if not (0 < len(token) <= 64 and all(c.isascii() and (c.isalnum() or c in "-_.")
                                                  for c in token)):
                raise ValueError("HWL:ECHO? takes one token of 1-64 characters [A-Za-z0-9_.-]")
            return text(token)
        if head == "HWL:INFO?":
            return text(P.dumps(core.hello()).decode())
        if head == "HWL:STAT?":
            return text(P.dumps(core.status()).decode())
        if head == "HWL:SEED":
            seed = int(args[0])
            if not 0 <= seed < 2 ** 64:
                raise ValueError(f"seed {seed} outside 0..2^64-1")
            core.seed_noise(seed)
            return None
        if head == "HWL:PROG":
            core.program(self._need_block(head, block))
            return None
        if head == "HWL:WEIG":
            blk = self._need_block(head, block)
            layer, scale = int(args[0]), float(args[1])
            offset = int(args[2]) if len(args) > 2 else 0
            commit = bool(int(args[3])) if len(args) > 3 else True
            if len(blk) % 4:
                raise ValueError("int32 block length not a multiple of 4")
            codes = np.frombuffer(blk, P.DT_CODE32).astype(np.int64)
            core.write_weights(layer, offset, codes, scale, commit)
            return None
        if head == "HWL:WEIG:SPAR":
            blk = self._need_block(head, block)
            layer, scale = int(args[0]), float(args[1])
            commit = bool(int(args[2])) if len(args) > 2 else True
            if len(blk) % 8:
                raise ValueError("sparse block length not a multiple of 8")
            cnt = len(blk) // 8
            _, idx, codes, _ = P.decode_sparse(
                P.WRITE_WEIGHTS_SPARSE_HDR.pack(0, cnt, 0.0) + blk, True)
            core.write_weights(layer, 0, codes, scale, commit, idx)
            return None
        if head == "HWL:WEIG?":
            layer = int(args[0])
            spec = core._layer(layer, WEIGHT_KINDS)
            codes, _ = core.read_weights(layer, 0, math.prod(spec.weight_shape))
            return _block(codes.astype(P.DT_CODE32).tobytes())
        if head == "HWL:WEIG:SCAL?":
            layer = int(args[0])
            _, scale = core.read_weights(layer, 0, 0)
            return text(repr(scale))
        if head == "HWL:WEIG:CRC?":
            crc, scale, n = core.weights_crc(int(args[0]))
            return text(f"{crc},{scale!r},{n}")
        if head == "HWL:THR":
            blk = self._need_block(head, block)
            layer = int(args[0])
            offset = int(args[1]) if len(args) > 1 else 0
            commit = bool(int(args[2])) if len(args) > 2 else True
            if len(blk) % 8:
                raise ValueError("float64 block length not a multiple of 8")
            core.write_thresholds(layer, offset, np.frombuffer(blk, P.DT_F64).astype(np.float64),
                                  commit)
            return None
        if head == "HWL:THR?":
            layer = int(args[0])
            spec = core._layer(layer, THRESHOLD_KINDS)
            vals = core.read_thresholds(layer, 0, math.prod(spec.out_shape))
            return _block(vals.astype(P.DT_F64).tobytes())
        if head == "HWL:WIND":
            blk = self._need_block(head, block)
            if len(blk) % 16:
                raise ValueError("window block must hold float64 pairs")
            core.set_windows(np.frombuffer(blk, P.DT_F64))
            return None
        if head == "HWL:TFOR":
            fmt = args[0].upper()
            if fmt not in ("TICK", "F64"):
                raise ValueError(f"time format {fmt!r}; expected TICK or F64")
            self.f64 = fmt == "F64"
            return None
        if head == "HWL:TFOR?":
            return text("F64" if self.f64 else "TICK")
        if head == "HWL:RUN?":
            blk = self._need_block(head, block)
            b = int(args[0])
            dt = P.DT_F64 if self.f64 else P.DT_TICKS
            if b < 1 or len(blk) % (b * dt.itemsize):
                raise ValueError(f"block of {len(blk)} bytes does not hold {b} samples")
            n = len(blk) // (b * dt.itemsize)
            times = P.decode_run_request(P.RUN_REQ.pack(b, n) + blk, self.f64, core.ratio)
            return _block(core.run(times, self.f64))
        raise ChipError(P.SCPI_UNDEFINED_HEADER, f"Undefined header {head!r}")


# ------------------------------------------------------------------------------------------------
# Faults and transports
# ------------------------------------------------------------------------------------------------


@dataclass
class FaultConfig:
    """Link faults the virtual chip injects (both directions, seeded).

    ``bit_flip_rate``: probability per byte of flipping one random bit; ``drop_rate`` /
    ``dup_rate``: probability per frame of dropping / sending twice; ``delay_s``: added before
    every reply; ``disconnect_after``: close the link when the N-th frame (SCPI: command) arrives,
    without answering it. The SCPI dialect has no integrity layer, so it accepts only
    ``delay_s`` and ``disconnect_after``.
    """

    bit_flip_rate: float = 0.0
    drop_rate: float = 0.0
    dup_rate: float = 0.0
    delay_s: float = 0.0
    disconnect_after: Optional[int] = None
    seed: int = 0

    def __post_init__(self):
        for name in ("bit_flip_rate", "drop_rate", "dup_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}={v} must lie in [0, 1]")
        if self.delay_s < 0:
            raise ValueError(f"delay_s={self.delay_s} must be >= 0")
        if self.disconnect_after is not None and self.disconnect_after < 1:
            raise ValueError(f"disconnect_after={self.disconnect_after} must be >= 1")


class _Faults:
    def __init__(self, cfg: FaultConfig, conn_index: int):
        self.cfg = cfg
        self.rng = np.random.default_rng([cfg.seed, conn_index])
        self.stats = {"flipped_bits": 0, "dropped": 0, "duplicated": 0}

    def flip(self, data: bytes) -> bytes:
        rate = self.cfg.bit_flip_rate
        if rate <= 0 or not data:
            return data
        k = int(self.rng.binomial(len(data), rate))
        if not k:
            return data
        arr = np.frombuffer(data, np.uint8).copy()
        pos = self.rng.integers(0, len(data), k)
        bits = self.rng.integers(0, 8, k).astype(np.uint8)
        np.bitwise_xor.at(arr, pos, np.left_shift(np.uint8(1), bits))
        self.stats["flipped_bits"] += k
        return arr.tobytes()

    def drop(self) -> bool:
        if self.cfg.drop_rate > 0 and self.rng.random() < self.cfg.drop_rate:
            self.stats["dropped"] += 1
            return True
        return False

    def dup(self) -> bool:
        if self.cfg.dup_rate > 0 and self.rng.random() < self.cfg.dup_rate:
            self.stats["duplicated"] += 1
            return True
        return False


class _Conn:
    """A byte link on the chip side: a connected socket or a pty master fd (non-blocking).

    Full duplex: while a reply waits for room in the link, incoming bytes are still read (into
    an inbox that :meth:`recv` returns first), so a host that writes while the chip writes can
    never deadlock the pair.
    """

    def __init__(self, sock: Optional[socket.socket] = None, fd: Optional[int] = None):
        self.sock, self.fd = sock, fd
        if sock is not None:
            sock.setblocking(False)
        else:
            os.set_blocking(fd, False)
        self.closed = False
        self.eof = False
        self.discarded = 0  # bytes thrown away while a reply could not be sent
        self._inbox = bytearray()

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else self.fd

    def alive(self) -> bool:
        """False once the link is closed or the peer has hung up (a peek, consumes nothing;
        safe from another thread)."""
        if self.closed or self.eof:
            return False
        if self.sock is None:
            return True
        try:
            data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        return bool(data)

    def _read_now(self) -> Optional[bytes]:
        try:
            data = self.sock.recv(65536) if self.sock is not None else os.read(self.fd, 65536)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError:
            return None
        return data if data else None

    def recv(self, timeout: float) -> Optional[bytes]:
        """Bytes available within ``timeout`` (b"" if none); None when the peer hung up."""
        if self._inbox:
            data = bytes(self._inbox)
            self._inbox.clear()
            return data
        if self.closed or self.eof:
            return None
        try:
            r, _, _ = select.select([self.fileno()], [], [], timeout)
        except (OSError, ValueError):
            return None
        if not r:
            return b""
        return self._read_now()

    def send(self, data: bytes) -> bool:
        """Send all of ``data``; False when the link is gone. Incoming bytes are read only while
        the link has no room for ours (so that neither side can block the other), into an inbox
        of at most ``4 * MAX_ENCODED`` bytes; a peer that talks past that without reading loses
        the excess (counted in ``discarded``; its frames are retried like damaged ones)."""
        view = memoryview(data)
        while view:
            if self.closed:
                return False
            try:
                r, w, _ = select.select([] if self.eof else [self.fileno()], [self.fileno()], [],
                                        0.5)
            except (OSError, ValueError):
                return False
            if w:
                try:
                    n = self.sock.send(view) if self.sock is not None else os.write(self.fd, view)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    return False
                view = view[n:]
            elif r:
                got = self._read_now()
                if got is None:
                    self.eof = True
                elif len(self._inbox) + len(got) > 4 * P.MAX_ENCODED:
                    if not self.discarded:
                        log.warning("virtual chip: the peer keeps sending while it does not read; "
                                    "discarding its bytes until it does")
                    self.discarded += len(got)
                else:
                    self._inbox += got
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.sock is not None:
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self.sock.close()
            else:
                os.close(self.fd)
        except OSError:
            pass


def _serve_conn(conn: _Conn, core: ChipCore, dialect: str, faults: _Faults,
                stop: threading.Event, stats: dict, on_session: Callable,
                name: str = "link", peer: Optional[Peer] = None,
                idle_timeout: Optional[float] = None,
                on_close: Optional[Callable] = None) -> None:
    """Serve one link until the peer hangs up, the chip stops or a fault closes it.

    Whatever arrives, damaged or not, is answered (NAK, ERROR) or ignored; the link is only
    closed on purpose (``disconnect_after``), when it is gone, or when the chip stops, and every
    close is logged with its reason (``hwloop.devices.server``, WARNING for the unexpected ones).
    """
    cfg = faults.cfg
    nrx = 0
    peer = peer or Peer(name, conn.alive)
    if dialect == "frame":
        session = FrameSession(core, peer=peer)
    else:
        session = ScpiSession(core, peer=peer)
    on_session(session)
    send_lock = threading.Lock()

    def emit(frame: bytes) -> bool:
        """Send one frame through the fault injector; False when the link is gone."""
        with send_lock:
            if faults.drop():
                return True
            out = faults.flip(frame)
            for _ in range(2 if faults.dup() else 1):
                if not conn.send(out):
                    return False
                stats["bytes_tx"] += len(out)
        return True

    @contextlib.contextmanager
    def busy(seq: int, cmd: int):
        """While a long command executes: PENDING now and every PENDING_INTERVAL_S."""
        pending = encode_frame(Frame(seq, cmd, P.Flag.REPLY | P.Flag.PENDING, b""))
        done = threading.Event()

        def beat():
            while not done.wait(P.PENDING_INTERVAL_S):
                if not emit(pending):
                    return

        emit(pending)
        t = threading.Thread(target=beat, daemon=True, name="hwloop-chip-pending")
        t.start()
        try:
            yield
        finally:
            done.set()
            t.join()

    def handle(ev: Frame) -> list[bytes]:
        """The replies to one intact frame; an unexpected failure of the chip becomes an
        INTERNAL error reply (logged), never a closed link."""
        try:
            return session.handle(ev, busy)
        except Exception as e:  # a bug, not the host's fault: answer it and keep serving
            log.exception("virtual chip %s: %s (seq %d) failed", name, P.cmd_name(ev.cmd), ev.seq)
            stats["internal_errors"] = stats.get("internal_errors", 0) + 1
            return session._error(ev.seq, P.Err.INTERNAL, f"{P.cmd_name(ev.cmd)}: "
                                                          f"{type(e).__name__}: {e}")

    reason, level = "the chip stopped", logging.INFO
    gone = "the link failed while sending a reply (peer hung up?)"
    last_rx = time.monotonic()
    try:
        while not stop.is_set():
            data = conn.recv(0.25)
            if data is None:
                reason = "the peer hung up" if not conn.closed else "the link was closed"
                break
            if not data:
                if idle_timeout and time.monotonic() - last_rx > idle_timeout:
                    reason = f"idle for more than idle_timeout={idle_timeout:g} s"
                    break
                continue
            last_rx = time.monotonic()
            stats["bytes_rx"] += len(data)
            if dialect == "frame":
                for ev in session.reader.feed(faults.flip(data)):
                    if isinstance(ev, FrameFault):
                        stats["bad_frames"] += 1
                        if not emit(session.nak(ev)):  # the host resends at once
                            reason, level = gone, logging.WARNING
                            return
                        continue
                    nrx += 1
                    if cfg.disconnect_after is not None and nrx >= cfg.disconnect_after:
                        stats["disconnects"] += 1
                        reason = f"disconnect_after={cfg.disconnect_after} (injected fault)"
                        return
                    if faults.drop():
                        continue
                    replies = handle(ev)
                    if replies and cfg.delay_s:
                        time.sleep(cfg.delay_s)
                    for r in replies:
                        if not emit(r):
                            reason, level = gone, logging.WARNING
                            return
            else:
                replies, n = session.feed(data)
                before, nrx = nrx, nrx + n
                if cfg.disconnect_after is not None and before < cfg.disconnect_after <= nrx:
                    stats["disconnects"] += 1  # hang up instead of answering the N-th command
                    reason = f"disconnect_after={cfg.disconnect_after} (injected fault)"
                    return
                if replies and cfg.delay_s:
                    time.sleep(cfg.delay_s)
                for r in replies:
                    if not conn.send(r):
                        reason, level = gone, logging.WARNING
                        return
                    stats["bytes_tx"] += len(r)
    except BaseException as e:
        reason, level = f"{type(e).__name__}: {e}", logging.ERROR
        log.exception("virtual chip %s: the session failed", name)
        raise
    finally:
        conn.close()
        core.release(peer, "closed its link: the chip is free")
        session.close()
        log.log(level, "virtual chip %s: closed the link: %s", name, reason)
        if on_close is not None:
            on_close(session)


def _open_spare() -> Optional[int]:
    """A descriptor held in reserve, so that an accept loop out of descriptors can still take
    (and close) a waiting connection."""
    try:
        return os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return None


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _format_addr(addr) -> str:
    """``host:port`` (``[v6]:port``) of a socket address."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)


_LIBC = None


def _trim_memory() -> None:
    """Give freed memory back to the OS after a link closes (glibc keeps large freed blocks in
    its heap otherwise, so a server's RSS would only ever grow)."""
    global _LIBC
    if not sys.platform.startswith("linux"):
        return
    try:
        if _LIBC is None:
            import ctypes
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        _LIBC = False


class VirtualChip:
    """A running virtual chip. ``url`` opens it with :func:`hwloop.devices.open.open_device`.

    Every link gets its own session (reply cache, half-received message, error queue, thread);
    all of it is freed when the link closes. ``sessions`` lists the open links' sessions,
    ``fault_stats`` the fault counters of the last 256 links.
    """

    #: Connections beyond ``max_connections`` are accepted and closed at once (logged).
    MAX_CONNECTIONS = 64
    #: A link that sends nothing for this long is closed (None: never).
    IDLE_TIMEOUT_S = 3600.0

    def __init__(self, device: TTFSDevice, transport: str, dialect: str, faults: FaultConfig,
                 idle_timeout: Optional[float] = IDLE_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS):
        self.core = ChipCore(device)
        self.transport = transport
        self.dialect = dialect
        self.faults = faults
        self.idle_timeout = idle_timeout if idle_timeout and idle_timeout > 0 else None
        self.max_connections = max(1, int(max_connections))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[_Conn] = []
        self._lock = threading.Lock()
        self.sessions: list = []
        self.fault_stats: collections.deque = collections.deque(maxlen=256)
        self.stats = {"connections": 0, "bytes_rx": 0, "bytes_tx": 0, "bad_frames": 0,
                      "disconnects": 0, "internal_errors": 0, "refused": 0, "accept_errors": 0,
                      "open": 0}
        self.host: Optional[str] = None
        self.port: Optional[int] = None
        self.pty_path: Optional[str] = None
        self._listener: Optional[socket.socket] = None
        self._slave_fd: Optional[int] = None

    # -- addresses -------------------------------------------------------------------------------
    @property
    def _host_in_url(self) -> str:
        return f"[{self.host}]" if self.host and ":" in self.host else str(self.host)

    @property
    def address(self) -> str:
        return self.pty_path if self.transport == "pty" else f"{self._host_in_url}:{self.port}"

    @property
    def url(self) -> str:
        """``socket://host:port`` or the pty path (frame); ``TCPIP::host::port::SOCKET`` or
        ``ASRL<pty>::INSTR`` (scpi). IPv6 hosts are bracketed (``socket://[::1]:PORT``)."""
        if self.transport == "pty":
            return self.pty_path if self.dialect == "frame" else f"ASRL{self.pty_path}::INSTR"
        if self.dialect == "frame":
            return f"socket://{self._host_in_url}:{self.port}"
        return f"TCPIP::{self._host_in_url}::{self.port}::SOCKET"

    # -- lifecycle -------------------------------------------------------------------------------
    def _spawn(self, target, *args) -> threading.Thread:
        t = threading.Thread(target=target, args=args, daemon=True, name="hwloop-virtual-chip")
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()
        return t

    def _run_conn(self, conn: _Conn, peer_name: str) -> None:
        with self._lock:
            idx = self.stats["connections"]
            self.stats["connections"] += 1
            self.stats["open"] += 1
            self._conns.append(conn)
        faults = _Faults(self.faults, idx)
        self.fault_stats.append(faults.stats)
        name = f"{self.address} (connection {idx}, {peer_name})"
        peer = Peer(f"{peer_name} (connection {idx})", conn.alive)

        def on_session(session) -> None:
            with self._lock:
                self.sessions.append(session)

        def on_close(session) -> None:
            with self._lock:
                if session in self.sessions:
                    self.sessions.remove(session)
                if conn in self._conns:
                    self._conns.remove(conn)
                self.stats["open"] -= 1

        try:
            _serve_conn(conn, self.core, self.dialect, faults, self._stop, self.stats,
                        on_session, name=name, peer=peer, idle_timeout=self.idle_timeout,
                        on_close=on_close)
        finally:
            with self._lock:
                if conn in self._conns:  # _serve_conn failed before its own clean-up
                    self._conns.remove(conn)
                    self.stats["open"] -= 1
            _trim_memory()

    def _accept_loop(self, ls: socket.socket) -> None:
        """Accept links until :meth:`stop`. No error ends it: running out of descriptors
        (EMFILE/ENFILE) or memory is logged (at most every 10 s per kind), the waiting
        connection is taken with a spare descriptor and closed (so its client sees a hang-up
        instead of waiting), and accepting resumes after a short back-off."""
        spare = _open_spare()
        backoff = 0.0
        last_log: dict[str, float] = {}
        suppressed: dict[str, int] = {}

        def warn(kind: str, text: str, *args) -> None:
            now = time.monotonic()
            if now - last_log.get(kind, -1e9) >= 10.0:
                extra = suppressed.pop(kind, 0)
                log.warning("virtual chip %s: " + text + (f" ({extra} more since the last "
                                                          "report)" if extra else ""),
                            self.address, *args)
                last_log[kind] = now
            else:
                suppressed[kind] = suppressed.get(kind, 0) + 1

        while not self._stop.is_set():
            if backoff:
                self._stop.wait(backoff)
            try:
                s, addr = ls.accept()
            except socket.timeout:
                backoff = 0.0
                continue
            except OSError as e:
                if self._stop.is_set() or ls.fileno() < 0:
                    break
                self.stats["accept_errors"] += 1
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    warn("fds", "cannot accept a connection: %s; refusing new connections "
                         "until descriptors are free (raise `ulimit -n`, or close idle "
                         "links)", e)
                    if spare is not None:  # take the waiting connections and close them
                        os.close(spare)
                        spare = None
                        for _ in range(64):
                            try:
                                if not select.select([ls], [], [], 0)[0]:
                                    break
                                ls.accept()[0].close()
                            except OSError:
                                break
                            self.stats["refused"] += 1
                        spare = _open_spare()
                    backoff = min(1.0, max(0.05, backoff * 2))
                elif e.errno in (errno.ECONNABORTED, errno.EINTR, errno.EAGAIN,
                                 errno.EPROTO):
                    backoff = 0.0
                else:
                    warn(f"errno{e.errno}", "accept failed: %s; retrying", e)
                    backoff = min(1.0, max(0.05, backoff * 2))
                continue
            backoff = 0.0
            peer_name = _format_addr(addr)
            try:
                if spare is None:
                    spare = _open_spare()
                with self._lock:
                    full = self.stats["open"] >= self.max_connections
                if full:
                    self.stats["refused"] += 1
                    warn("cap", "refused a connection from %s: %d links open "
                         "(max_connections)", peer_name, self.max_connections)
                    s.close()
                    continue
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._spawn(self._run_conn, _Conn(sock=s), peer_name)
            except (OSError, RuntimeError) as e:  # a reset client, no thread to be had
                warn("spawn", "could not serve a connection from %s: %s", peer_name, e)
                with contextlib.suppress(OSError):
                    s.close()
        if spare is not None:
            with contextlib.suppress(OSError):
                os.close(spare)

    def start_tcp(self, host: str, port: int) -> None:
        ls = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((host, port))
        ls.listen(16)
        ls.settimeout(0.1)
        self._listener = ls
        self.host, self.port = host, ls.getsockname()[1]
        self._spawn(self._accept_loop, ls)

    def start_pty(self) -> None:
        import tty
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._slave_fd = slave  # held open so the master never sees EIO between clients
        self.pty_path = os.ttyname(slave)
        self._spawn(self._run_conn, _Conn(fd=master), "pty")

    def disconnect(self) -> None:
        """Close every open link now (a cable pull); a TCP chip keeps accepting new ones."""
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.close()
        if self.transport == "pty" and self._slave_fd is not None:
            try:
                os.close(self._slave_fd)
            except OSError:
                pass
            self._slave_fd = None

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
        self.disconnect()
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout)

    def wait(self) -> None:
        """Block until :meth:`stop` (or Ctrl-C)."""
        try:
            while not self._stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def __enter__(self) -> "VirtualChip":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(device: TTFSDevice, transport: str = "pty", host: str = "127.0.0.1", port: int = 0,
          dialect: str = "frame", faults: Optional[FaultConfig] = None, *,
          foreground: bool = False, allow_remote: bool = False,
          announce: Optional[Callable[[str], None]] = None,
          idle_timeout: Optional[float] = VirtualChip.IDLE_TIMEOUT_S,
          max_connections: int = VirtualChip.MAX_CONNECTIONS) -> VirtualChip:
    """Serve ``device`` as a virtual chip.

    Args:
        transport: "pty" (a pseudo-terminal; its slave path is ``chip.pty_path``) or "tcp".
        host, port: TCP address; port 0 picks a free port (``chip.port``). Only loopback hosts
            unless ``allow_remote``.
        dialect: "frame" (byte-stuffed frames, for pyserial) or "scpi" (for VISA).
        faults: link faults to inject.
        foreground: serve until Ctrl-C (the CLI); otherwise return at once, serving from
            daemon threads (tests).
        announce: called with a one-line description (address, url) once listening.
        idle_timeout: close a link that sends nothing for this many seconds (None or 0: never;
            default one hour); closing it frees the chip if that link controlled it.
        max_connections: links open at once (TCP); more are accepted and closed at once.

    One link at a time controls the chip (docs/protocol.md, "Ownership"): the first that
    sends a command that changes it; the others may query until it closes, releases or is
    taken over.
    """
    if transport not in ("pty", "tcp"):
        raise ValueError(f"transport must be 'pty' or 'tcp', got {transport!r}")
    if dialect not in ("frame", "scpi"):
        raise ValueError(f"dialect must be 'frame' or 'scpi', got {dialect!r}")
    faults = faults or FaultConfig()
    if dialect == "scpi" and (faults.bit_flip_rate or faults.drop_rate or faults.dup_rate):
        raise ValueError("the scpi dialect has no integrity layer: only delay_s and "
                         "disconnect_after faults apply")
    if transport == "tcp" and not allow_remote and not _is_loopback(host):
        raise ValueError(f"refusing to bind {host!r}: the virtual chip binds loopback only unless "
                         "allow_remote=True (--allow-remote)")
    if transport == "pty" and sys.platform.startswith("win"):
        raise ValueError("pty transport needs a POSIX system; use transport='tcp'")
    chip = VirtualChip(device, transport, dialect, faults, idle_timeout=idle_timeout,
                       max_connections=max_connections)
    if transport == "tcp":
        chip.start_tcp(host, port)
    else:
        chip.start_pty()
    if announce is not None:
        announce(f"virtual chip {chip.core.info.device_id} ({dialect} dialect) at "
                 f"{chip.address}  url: {chip.url}")
    if foreground:
        if not log.handlers and not logging.getLogger().handlers:
            # the CLI: say on stderr when and why a link is closed
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        chip.wait()
    return chip
