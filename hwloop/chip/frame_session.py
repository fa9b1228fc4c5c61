"""The frame dialect's side of the chip: one :class:`FrameSession` per link (reassembly of
chunked requests, the reply cache that answers retries and RESENDs, NAKs of damaged frames, and
a command table from command code to handler)."""

from __future__ import annotations

import collections
import struct
import zlib
from typing import Callable, Iterator, Optional

import numpy as np

from hwloop.chip.core import ChipCore, ChipError, Peer, Unit
from hwloop.errors import ProtocolError
from hwloop.wire.codec import (COUNT, DT_F64, FEATURE_LOCK, FEATURE_SPARSE, LAYER,
                               PROTOCOL_VERSION, READ_RANGE, READ_WEIGHTS_REPLY, SEED,
                               WEIGHTS_CRC_REPLY, WINDOWS_HDR, WRITE_THRESHOLDS_HDR,
                               WRITE_WEIGHTS_HDR, Err, code_dtype, decode_run_request,
                               decode_sparse, dumps, HELLO_REPLY, HELLO_REQ)
from hwloop.wire.frame import (CHUNK_HEADER, CONTROL_COMMANDS, MAX_PAYLOAD, NAK_PAYLOAD,
                               PENDING_COMMANDS, PENDING_INTERVAL_S, ChunkAssembler, Cmd, Flag,
                               Frame, FrameFault, FrameReader, LOCK_PAYLOAD, LockOp, NakReason,
                               cmd_name, encode_frame, error_payload, parse_resend_payload,
                               split_chunks)


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
        self.reply_payload = MAX_PAYLOAD
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
        if frame.cmd == Cmd.RESEND and frame.version == PROTOCOL_VERSION:
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
            indices = parse_resend_payload(frame.payload)
        except ValueError as e:
            return self._error(frame.seq, Err.BAD_PAYLOAD, f"RESEND: {e}")
        key = self.by_seq.get(frame.seq)
        if key is None:
            return self._error(frame.seq, Err.NO_REPLY, f"RESEND: no cached reply for seq "
                                                          f"{frame.seq}")
        frames = self.cache[key]
        if len(frames) == 1:
            return frames
        bad = [i for i in indices if i >= len(frames)]
        if bad:
            return self._error(frame.seq, Err.CHUNK, f"RESEND: chunk {bad[0]} of a "
                                                       f"{len(frames)}-chunk reply")
        return [frames[i] for i in dict.fromkeys(indices)]

    def nak(self, fault: FrameFault) -> bytes:
        """The NAK frame for a piece of the stream that was thrown away."""
        reason = {"crc": NakReason.CRC, "escape": NakReason.ESCAPE, "length": NakReason.LENGTH,
                  "overflow": NakReason.OVERFLOW}.get(fault.kind, NakReason.LENGTH)
        self.stats["naks"] += 1
        return encode_frame(Frame(0, Cmd.NAK, Flag.REPLY, NAK_PAYLOAD.pack(reason)))

    def _error(self, seq: int, code: int, message: str) -> list[bytes]:
        self.stats["errors"] += 1
        return [encode_frame(Frame(seq, Cmd.ERROR, Flag.REPLY, error_payload(code, message)))]

    def _process(self, frame: Frame, busy: Optional[Callable] = None) -> list[bytes]:
        seq, cmd = frame.seq, frame.cmd
        if frame.version != PROTOCOL_VERSION:
            return self._error(seq, Err.VERSION, f"protocol version {frame.version} not "
                                                   f"supported; chip speaks {PROTOCOL_VERSION}")
        payload = frame.payload
        try:
            if cmd in CONTROL_COMMANDS:
                self.core.claim(self.peer)  # BUSY while another link controls the chip
            if frame.flags & Flag.CHUNKED:
                if len(payload) < CHUNK_HEADER.size:
                    raise ProtocolError("chunk shorter than its header")
                idx, _ = CHUNK_HEADER.unpack_from(payload)
                if idx == 0 or self.assembly is None:
                    if idx != 0:
                        raise ProtocolError(f"chunk {idx} of {cmd_name(cmd)} without chunk 0")
                    self.assembly = (cmd, ChunkAssembler())
                if self.assembly[0] != cmd:
                    raise ProtocolError(f"chunk of {cmd_name(cmd)} inside a chunked "
                                        f"{cmd_name(self.assembly[0])}")
                if not self.assembly[1].add(payload):
                    return [encode_frame(Frame(seq, cmd, Flag.REPLY, b""))]
                payload = self.assembly[1].message()
                self.assembly = None
            if busy is not None and cmd in PENDING_COMMANDS:
                with busy(seq, cmd):
                    body = self._execute(cmd, frame.flags, payload)
            else:
                body = self._execute(cmd, frame.flags, payload)
        except ChipError as e:
            return self._error(seq, e.code, e.message)
        except ProtocolError as e:
            self.assembly = None
            return self._error(seq, Err.CHUNK, str(e))
        except (struct.error, ValueError) as e:
            return self._error(seq, Err.BAD_PAYLOAD, f"{cmd_name(cmd)}: {e}")
        return self._reply_frames(seq, cmd, body)

    def _reply_frames(self, seq: int, cmd: int, body: bytes) -> list[bytes]:
        if len(body) <= self.reply_payload:
            return [encode_frame(Frame(seq, cmd, Flag.REPLY, body))]
        chunks = split_chunks(body, self.reply_payload - CHUNK_HEADER.size)
        return [encode_frame(Frame(seq, cmd, Flag.REPLY | Flag.CHUNKED, c)) for c in chunks]

    # -- the link's interface -------------------------------------------------------------------
    def receive(self, data: bytes) -> Iterator[Unit]:
        """The units of the frames completed by ``data``: a NAK for each damaged piece, a
        request (droppable, answered from the cache when retried) for each intact frame."""
        for ev in self.reader.feed(data):
            if isinstance(ev, FrameFault):
                yield Unit(run=lambda heartbeat, ev=ev: [self.nak(ev)], commands=0,
                           delayed=False, damaged=True, label="a damaged frame")
            else:
                yield Unit(run=lambda heartbeat, ev=ev: self.handle(ev, self._busy(heartbeat)),
                           droppable=True, fail=lambda e, ev=ev: self._internal(ev, e),
                           label=f"{cmd_name(ev.cmd)} (seq {ev.seq})")

    @staticmethod
    def _busy(heartbeat: Callable) -> Callable:
        """``busy(seq, cmd)`` for :meth:`handle`: the link's heartbeat of PENDING frames."""
        def busy(seq: int, cmd: int):
            pending = encode_frame(Frame(seq, cmd, Flag.REPLY | Flag.PENDING, b""))
            return heartbeat(pending, PENDING_INTERVAL_S)
        return busy

    def _internal(self, frame: Frame, exc: Exception) -> list[bytes]:
        """The INTERNAL error reply for an unexpected failure (a bug, not the host's fault)."""
        return self._error(frame.seq, Err.INTERNAL, f"{cmd_name(frame.cmd)}: "
                                                    f"{type(exc).__name__}: {exc}")

    # -- the command table -----------------------------------------------------------------------
    def _execute(self, cmd: int, flags: int, payload: bytes) -> bytes:
        handler = self.COMMANDS.get(cmd)
        if handler is None:
            raise ChipError(Err.UNKNOWN_COMMAND, f"unknown command 0x{cmd:02x}")
        return handler(self, flags, payload)

    def _hello(self, flags: int, payload: bytes) -> bytes:
        if len(payload) >= HELLO_REQ.size:
            _, want = HELLO_REQ.unpack_from(payload)
            self.reply_payload = min(max(int(want), 64), MAX_PAYLOAD) if want else MAX_PAYLOAD
        return HELLO_REPLY.pack(PROTOCOL_VERSION) + dumps(self.core.hello())

    def _lock(self, flags: int, payload: bytes) -> bytes:
        core = self.core
        if FEATURE_LOCK not in core.features:
            raise ChipError(Err.UNKNOWN_COMMAND, f"unknown command 0x{Cmd.LOCK:02x}")
        (op,) = LOCK_PAYLOAD.unpack(payload)
        if op == LockOp.REQUEST:
            core.claim(self.peer)
        elif op == LockOp.RELEASE:
            core.release(self.peer)
        elif op == LockOp.TAKE_OVER:
            core.take_over(self.peer)
        elif op != LockOp.QUERY:
            raise ValueError(f"LOCK op {op} is not one of 0..3")
        return dumps(core.lock_state(self.peer))

    def _program(self, flags: int, payload: bytes) -> bytes:
        self.core.program(payload)
        return b""

    def _status(self, flags: int, payload: bytes) -> bytes:
        return dumps(self.core.status())

    def _reset(self, flags: int, payload: bytes) -> bytes:
        self.assembly = None
        self.core.reset()
        return b""

    def _seed_noise(self, flags: int, payload: bytes) -> bytes:
        (seed,) = SEED.unpack(payload)
        self.core.seed_noise(seed)
        return b""

    def _write_weights(self, flags: int, payload: bytes) -> bytes:
        layer, offset, count, scale = WRITE_WEIGHTS_HDR.unpack_from(payload)
        dt = code_dtype(bool(flags & Flag.WIDE))
        if len(payload) != WRITE_WEIGHTS_HDR.size + count * dt.itemsize:
            raise ValueError(f"payload of {len(payload)} bytes does not hold {count} codes")
        codes = np.frombuffer(payload, dt, count, WRITE_WEIGHTS_HDR.size).astype(np.int64)
        self.core.write_weights(layer, offset, codes, scale, bool(flags & Flag.COMMIT))
        return b""

    def _write_weights_sparse(self, flags: int, payload: bytes) -> bytes:
        if FEATURE_SPARSE not in self.core.features:
            raise ChipError(Err.UNKNOWN_COMMAND,
                            f"unknown command 0x{Cmd.WRITE_WEIGHTS_SPARSE:02x}")
        layer, idx, codes, scale = decode_sparse(payload, bool(flags & Flag.WIDE))
        self.core.write_weights(layer, 0, codes, scale, bool(flags & Flag.COMMIT), idx)
        return b""

    def _read_weights(self, flags: int, payload: bytes) -> bytes:
        layer, offset, count = READ_RANGE.unpack_from(payload)
        codes, scale = self.core.read_weights(layer, offset, count)
        wide = bool(flags & Flag.WIDE)
        if not wide and codes.size and (codes.min() < -32768 or codes.max() > 32767):
            raise ChipError(Err.RANGE, "codes do not fit int16; set the WIDE flag")
        return READ_WEIGHTS_REPLY.pack(scale, codes.size) + codes.astype(code_dtype(wide)).tobytes()

    def _weights_crc(self, flags: int, payload: bytes) -> bytes:
        (layer,) = LAYER.unpack_from(payload)
        return WEIGHTS_CRC_REPLY.pack(*self.core.weights_crc(layer))

    def _write_thresholds(self, flags: int, payload: bytes) -> bytes:
        layer, offset, count = WRITE_THRESHOLDS_HDR.unpack_from(payload)
        if len(payload) != WRITE_THRESHOLDS_HDR.size + 8 * count:
            raise ValueError(f"payload of {len(payload)} bytes does not hold {count} values")
        vals = np.frombuffer(payload, DT_F64, count, WRITE_THRESHOLDS_HDR.size)
        self.core.write_thresholds(layer, offset, vals.astype(np.float64),
                                   bool(flags & Flag.COMMIT))
        return b""

    def _read_thresholds(self, flags: int, payload: bytes) -> bytes:
        layer, offset, count = READ_RANGE.unpack_from(payload)
        vals = self.core.read_thresholds(layer, offset, count)
        return COUNT.pack(vals.size) + vals.astype(DT_F64).tobytes()

    def _set_windows(self, flags: int, payload: bytes) -> bytes:
        (n,) = WINDOWS_HDR.unpack_from(payload)
        if len(payload) != WINDOWS_HDR.size + 16 * n:
            raise ValueError(f"payload of {len(payload)} bytes does not hold {n} windows")
        self.core.set_windows(np.frombuffer(payload, DT_F64, 2 * n, WINDOWS_HDR.size))
        return b""

    def _run_batch(self, flags: int, payload: bytes) -> bytes:
        f64 = bool(flags & Flag.F64_TIMES)
        return self.core.run(decode_run_request(payload, f64, self.core.ratio), f64)

    #: command code -> handler(session, flags, payload) -> reply body
    COMMANDS = {Cmd.HELLO: _hello, Cmd.LOCK: _lock, Cmd.PROGRAM: _program, Cmd.STATUS: _status,
                Cmd.RESET: _reset, Cmd.SEED_NOISE: _seed_noise, Cmd.WRITE_WEIGHTS: _write_weights,
                Cmd.WRITE_WEIGHTS_SPARSE: _write_weights_sparse, Cmd.READ_WEIGHTS: _read_weights,
                Cmd.WEIGHTS_CRC: _weights_crc, Cmd.WRITE_THRESHOLDS: _write_thresholds,
                Cmd.READ_THRESHOLDS: _read_thresholds, Cmd.SET_WINDOWS: _set_windows,
                Cmd.RUN_BATCH: _run_batch}
