"""The frame dialect (serial links: UART, USB-CDC, ``socket://``, pty): frame layout, command
codes and flags, byte stuffing, frame encode/decode, a resynchronising reader and chunking.

A frame on the wire is ``stuff(raw) + b"\\x00"`` (no 0x00 inside). A raw (unstuffed) frame is::

    version u8 | seq u16 | cmd u8 | flags u8 | payload_len u32 | payload | crc32 u32

all little endian; ``crc32`` is :func:`zlib.crc32` of every byte before it. Payloads are laid out
in :mod:`hwloop.wire.codec`. The :class:`FrameReader` accepts any byte stream (garbage, banners,
corrupted or truncated frames, hostile length fields) and yields only frames whose length and
CRC check out; it never buffers more than ``MAX_ENCODED`` bytes.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass
from typing import Union

import numpy as np

from hwloop.errors import ProtocolError
from hwloop.wire.codec import MAX_MESSAGE, PROTOCOL_VERSION, Err

#: version u8, seq u16, cmd u8, flags u8, payload_len u32.
HEADER = struct.Struct("<BHBBI")
HEADER_SIZE = HEADER.size  # 9
CRC = struct.Struct("<I")
CRC_SIZE = CRC.size  # 4
FRAME_OVERHEAD = HEADER_SIZE + CRC_SIZE  # 13
#: Largest raw (decoded) frame, header and CRC included. Every length field is checked against
#: this bound before anything is allocated.
MAX_FRAME = 65536
MAX_PAYLOAD = MAX_FRAME - FRAME_OVERHEAD
#: Delimiter between stuffed frames.
DELIMITER = b"\x00"
#: Byte stuffing (``framing.stuff``): the raw byte values 0x00 and ZERO_SUB trade places; then
#: ESC is sent as ESC ESC_ESC and a 0x00 (a raw ZERO_SUB) as ESC ESC_ZERO.
ZERO_SUB = 0xA5
ESC = 0xA6
ESC_ZERO = 0x01
ESC_ESC = 0x02


def max_stuffed(n: int) -> int:
    """Largest stuffed encoding of ``n`` bytes (without the delimiter): every byte escaped."""
    return 2 * n


#: Largest encoded frame between two delimiters; a reader that sees more discards and resyncs.
MAX_ENCODED = max_stuffed(MAX_FRAME)
#: Chunk header at the start of the payload of every frame with :attr:`Flag.CHUNKED`:
#: chunk index u16, chunk total u16.
CHUNK_HEADER = struct.Struct("<HH")
#: Largest number of chunks in one message.
MAX_CHUNKS = 0xFFFF
#: Sequence numbers run 1..SEQ_MAX and wrap to 1 (0 is never sent).
SEQ_MAX = 0xFFFF


class Cmd(enum.IntEnum):
    """Command codes (the ``cmd`` byte). A reply carries the request's code, or ``ERROR``."""

    HELLO = 0x01
    PROGRAM = 0x02
    STATUS = 0x03
    RESET = 0x04
    SEED_NOISE = 0x05
    #: Ask again for chunks of a cached reply (selective resend); never executes anything.
    RESEND = 0x06
    #: Control of the chip (one controlling link at a time): payload ``op u8``
    #: (:class:`LockOp`); reply UTF-8 JSON ``{"owner": address or null, "you": bool}``. Only to
    #: a chip whose HELLO lists ``FEATURE_LOCK``.
    LOCK = 0x07
    WRITE_WEIGHTS = 0x10
    READ_WEIGHTS = 0x11
    WEIGHTS_CRC = 0x12
    #: Write scattered codes, (index, code) pairs, into the staged layer; only to a chip whose
    #: HELLO lists ``FEATURE_SPARSE`` in ``features``.
    WRITE_WEIGHTS_SPARSE = 0x13
    WRITE_THRESHOLDS = 0x18
    READ_THRESHOLDS = 0x19
    SET_WINDOWS = 0x20
    RUN_BATCH = 0x30
    #: (chip only) a frame arrived damaged; ``seq`` 0, payload ``reason u8``.
    NAK = 0x7E
    ERROR = 0x7F


class Flag(enum.IntFlag):
    """Bits of the ``flags`` byte."""

    NONE = 0x00
    #: Set on every frame sent by the chip.
    REPLY = 0x01
    #: The payload starts with a ``CHUNK_HEADER``; the message spans several frames.
    CHUNKED = 0x02
    #: WRITE_WEIGHTS / WRITE_THRESHOLDS: apply the staged layer after this chunk.
    COMMIT = 0x04
    #: WRITE_WEIGHTS / READ_WEIGHTS: codes are int32 (else int16).
    WIDE = 0x08
    #: RUN_BATCH: spike times are float64 tau_c (else uint32 clock ticks).
    F64_TIMES = 0x10
    #: On a reply frame with empty payload: the request arrived intact and is being executed;
    #: the reply follows (repeated every ``PENDING_INTERVAL_S`` while the chip works).
    PENDING = 0x20


class NakReason(enum.IntEnum):
    """The ``reason u8`` payload of a NAK: why the chip threw a piece of the stream away."""

    CRC = 1  # decoded, but the CRC does not match
    ESCAPE = 2  # not valid stuffing (an escape byte not followed by 0x01 / 0x02)
    LENGTH = 3  # shorter than a header, or a length field that disagrees / is out of bounds
    OVERFLOW = 4  # more than MAX_ENCODED bytes without a delimiter


class LockOp(enum.IntEnum):
    """The ``op u8`` payload of LOCK."""

    QUERY = 0  # who controls the chip; changes nothing
    REQUEST = 1  # take control if nobody has it (else BUSY)
    RELEASE = 2  # give control up (a no-op for a link that does not hold it)
    TAKE_OVER = 3  # take control even from another link (that link's next command gets BUSY)


#: LOCK payload: op u8 (:class:`LockOp`).
LOCK_PAYLOAD = struct.Struct("<B")
#: Commands that need control of the chip (they change its state or draw its noise); every
#: other command (HELLO, STATUS, reads, CRC, RESEND, LOCK) is open to every link.
CONTROL_COMMANDS = frozenset({Cmd.PROGRAM, Cmd.RESET, Cmd.SEED_NOISE, Cmd.WRITE_WEIGHTS,
                              Cmd.WRITE_WEIGHTS_SPARSE, Cmd.WRITE_THRESHOLDS, Cmd.SET_WINDOWS,
                              Cmd.RUN_BATCH})
#: NAK payload: reason u8 (:class:`NakReason`).
NAK_PAYLOAD = struct.Struct("<B")
#: RESEND request: number of chunk indices u16, then that many chunk indices u16.
RESEND_HDR = struct.Struct("<H")
#: Most chunk indices one RESEND may name.
MAX_RESEND = 1024
#: A chip that works on a request longer than this sends a PENDING frame at once and again
#: every PENDING_INTERVAL_S until the reply is ready, s.
PENDING_INTERVAL_S = 0.02
#: Commands for which the virtual chip sends PENDING (a real chip may send it for any command).
PENDING_COMMANDS = frozenset({Cmd.PROGRAM, Cmd.RUN_BATCH})
#: ERROR reply header: code u16; then a UTF-8 message.
ERROR_HDR = struct.Struct("<H")


def error_payload(code: int, message: str) -> bytes:
    msg = message.encode("utf-8", "replace")[: MAX_PAYLOAD - ERROR_HDR.size - 64]
    return ERROR_HDR.pack(int(code)) + msg


def parse_error_payload(payload: bytes) -> tuple[int, str]:
    if len(payload) < ERROR_HDR.size:
        return int(Err.BAD_PAYLOAD), "short ERROR payload"
    (code,) = ERROR_HDR.unpack_from(payload)
    return code, payload[ERROR_HDR.size:].decode("utf-8", "replace")


def resend_payload(indices) -> bytes:
    """RESEND payload naming chunk ``indices`` (1..MAX_RESEND of them, each < 65536)."""
    idx = [int(i) for i in indices]
    if not 1 <= len(idx) <= MAX_RESEND:
        raise ValueError(f"a RESEND names 1..{MAX_RESEND} chunks, not {len(idx)}")
    return RESEND_HDR.pack(len(idx)) + np.asarray(idx, dtype="<u2").tobytes()


def parse_resend_payload(payload: bytes) -> list[int]:
    """Chunk indices of a RESEND payload; ValueError when the count is out of bounds or
    disagrees with the payload size."""
    if len(payload) < RESEND_HDR.size:
        raise ValueError("RESEND payload shorter than its header")
    (n,) = RESEND_HDR.unpack_from(payload)
    if not 1 <= n <= MAX_RESEND or len(payload) != RESEND_HDR.size + 2 * n:
        raise ValueError(f"RESEND payload of {len(payload)} bytes does not hold {n} indices "
                         f"(1..{MAX_RESEND})")
    return np.frombuffer(payload, "<u2", n, RESEND_HDR.size).astype(int).tolist()


def cmd_name(cmd: int) -> str:
    try:
        return Cmd(cmd).name
    except ValueError:
        return f"0x{cmd:02x}"


#: The byte translation of step 1 of the stuffing: swaps 0x00 and ``ZERO_SUB`` (an involution,
#: so the same table undoes it).
_SWAP = bytes.maketrans(bytes([0, ZERO_SUB]), bytes([ZERO_SUB, 0]))
_ESC = bytes([ESC])
_ESC_ZERO = bytes([ESC, ESC_ZERO])
_ESC_ESC = bytes([ESC, ESC_ESC])
_ZERO = b"\x00"


def stuff(data: bytes) -> bytes:
    """Byte stuffing of protocol 3: the result holds no 0x00 byte (docs/protocol.md).

    1. swap the byte values 0x00 and ``ZERO_SUB`` (0xA5), so that the zeros that fill binary
       payloads cost nothing;
    2. send every ``ESC`` (0xA6) as ``ESC ESC_ESC`` (0xA6 0x02), then
    3. every 0x00 left (a raw 0xA5) as ``ESC ESC_ZERO`` (0xA6 0x01).

    Only raw bytes 0xA5 and 0xA6 grow (to two bytes each); each step is one C-level pass
    (``bytes.translate`` / ``bytes.replace``).
    """
    return bytes(data).translate(_SWAP).replace(_ESC, _ESC_ESC).replace(_ZERO, _ESC_ZERO)


def unstuff(data: bytes) -> bytes:
    """Inverse of :func:`stuff`.

    Raises:
        ProtocolError: a zero byte inside, or an ``ESC`` not followed by ``ESC_ZERO`` or
            ``ESC_ESC`` (a damaged or truncated escape).
    """
    data = bytes(data)
    if _ZERO in data:
        raise ProtocolError(f"stuffing: zero byte at offset {data.find(0)}")
    n_esc = data.count(_ESC)
    if n_esc:
        n_zero = data.count(_ESC_ZERO)
        if n_esc != n_zero + data.count(_ESC_ESC):
            raise ProtocolError("stuffing: escape byte 0xa6 not followed by 0x01 or 0x02")
        if n_zero:
            data = data.replace(_ESC_ZERO, _ZERO)
        data = data.replace(_ESC_ESC, _ESC)
    return data.translate(_SWAP)


@dataclass(frozen=True)
class Frame:
    seq: int
    cmd: int
    flags: int
    payload: bytes
    version: int = PROTOCOL_VERSION

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & Flag.REPLY)


def frame_raw(frame: Frame) -> bytes:
    """Header, payload and CRC of ``frame`` (before stuffing)."""
    if len(frame.payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(frame.payload)} bytes exceeds MAX_PAYLOAD "
                            f"{MAX_PAYLOAD}")
    body = HEADER.pack(frame.version, frame.seq, frame.cmd, frame.flags,
                         len(frame.payload)) + frame.payload
    return body + CRC.pack(zlib.crc32(body) & 0xFFFFFFFF)


def encode_frame(frame: Frame) -> bytes:
    """The bytes put on the wire for ``frame``: its stuffed bytes plus the 0x00 delimiter."""
    return stuff(frame_raw(frame)) + DELIMITER


def decode_raw(raw: bytes) -> Frame:
    """Parse an unstuffed frame, checking the length field (bounded) and the CRC.

    Raises:
        ProtocolError: too short, a length field that disagrees or exceeds MAX_PAYLOAD, bad CRC.
    """
    if len(raw) < FRAME_OVERHEAD:
        raise ProtocolError(f"frame of {len(raw)} bytes is shorter than the "
                            f"{FRAME_OVERHEAD}-byte minimum")
    version, seq, cmd, flags, plen = HEADER.unpack_from(raw)
    if plen > MAX_PAYLOAD:
        raise ProtocolError(f"length field {plen} exceeds MAX_PAYLOAD {MAX_PAYLOAD}")
    if plen != len(raw) - FRAME_OVERHEAD:
        raise ProtocolError(f"length field {plen} disagrees with the frame size "
                            f"({len(raw) - FRAME_OVERHEAD} payload bytes)")
    (crc,) = CRC.unpack_from(raw, len(raw) - CRC_SIZE)
    calc = zlib.crc32(raw[:-CRC_SIZE]) & 0xFFFFFFFF
    if crc != calc:
        raise BadCrc(f"CRC mismatch: frame says 0x{crc:08x}, computed 0x{calc:08x}")
    return Frame(seq=seq, cmd=cmd, flags=flags, payload=bytes(raw[HEADER_SIZE:-CRC_SIZE]),
                 version=version)


def decode_frame(wire: bytes) -> Frame:
    """Decode one wire frame (with or without its trailing delimiter)."""
    if wire.endswith(DELIMITER):
        wire = wire[:-1]
    return decode_raw(unstuff(wire))


class BadCrc(ProtocolError):
    """A frame whose CRC does not match (corrupted in transit)."""


@dataclass(frozen=True)
class FrameFault:
    """Something the reader threw away: ``kind`` is "crc", "escape", "length" or "overflow"."""

    kind: str
    detail: str


class FrameReader:
    """Incremental decoder of a byte stream into frames.

    ``feed(data)`` returns, in order, a :class:`Frame` for every valid frame and a
    :class:`FrameFault` for every piece of the stream that was discarded. Empty pieces (two
    delimiters in a row) are skipped silently, so a sender may start with a 0x00 to resync.
    A piece longer than ``max_encoded`` is discarded without being buffered (``overflow``), and
    the reader skips to the next delimiter.
    """

    def __init__(self, max_encoded: int = MAX_ENCODED):
        self.max_encoded = max_encoded
        self._buf = bytearray()
        self._skipping = False
        self.counts = {"frames": 0, "crc": 0, "escape": 0, "length": 0, "overflow": 0}

    def reset(self) -> None:
        self._buf.clear()
        self._skipping = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Union[Frame, FrameFault]]:
        out: list[Union[Frame, FrameFault]] = []
        start = 0
        n = len(data)
        while start < n:
            idx = data.find(0, start)
            piece = data[start:] if idx < 0 else data[start:idx]
            if not self._skipping:
                if len(self._buf) + len(piece) > self.max_encoded:
                    self._buf.clear()
                    self._skipping = True
                    self.counts["overflow"] += 1
                    out.append(FrameFault("overflow", f"more than {self.max_encoded} bytes "
                                                      "without a delimiter"))
                else:
                    self._buf += piece
            if idx < 0:
                break
            # delimiter
            if self._skipping:
                self._skipping = False
            elif self._buf:
                out.append(self._decode(bytes(self._buf)))
                self._buf.clear()
            start = idx + 1
        return out

    def _decode(self, encoded: bytes) -> Union[Frame, FrameFault]:
        try:
            raw = unstuff(encoded)
        except ProtocolError as e:
            self.counts["escape"] += 1
            return FrameFault("escape", str(e))
        try:
            frame = decode_raw(raw)
        except BadCrc as e:
            self.counts["crc"] += 1
            return FrameFault("crc", str(e))
        except ProtocolError as e:
            self.counts["length"] += 1
            return FrameFault("length", str(e))
        self.counts["frames"] += 1
        return frame


def split_chunks(payload: bytes, chunk_data: int) -> list[bytes]:
    """Split a message into chunk payloads (each prefixed with the CHUNK_HEADER)."""
    if chunk_data <= 0:
        raise ValueError("chunk_data must be positive")
    pieces = [payload[i:i + chunk_data] for i in range(0, len(payload), chunk_data)] or [b""]
    if len(pieces) > MAX_CHUNKS:
        raise ProtocolError(f"message of {len(payload)} bytes needs {len(pieces)} chunks; "
                            f"MAX_CHUNKS is {MAX_CHUNKS}")
    total = len(pieces)
    return [CHUNK_HEADER.pack(i, total) + p for i, p in enumerate(pieces)]


class ChunkAssembler:
    """Reassembles a chunked message; bounds the total size by ``max_message``."""

    def __init__(self, max_message: int = MAX_MESSAGE):
        self.max_message = max_message
        self.total = None
        self.parts: dict[int, bytes] = {}
        self.size = 0

    def add(self, payload: bytes) -> bool:
        """Add one chunk payload (with header); returns True when complete.

        Raises:
            ProtocolError: malformed chunk header, inconsistent totals, or too large a message.
        """
        if len(payload) < CHUNK_HEADER.size:
            raise ProtocolError("chunk shorter than its header")
        idx, total = CHUNK_HEADER.unpack_from(payload)
        if total == 0 or idx >= total:
            raise ProtocolError(f"chunk index {idx} of total {total}")
        if self.total is None:
            self.total = total
        elif total != self.total:
            raise ProtocolError(f"chunk total changed from {self.total} to {total}")
        if idx in self.parts:
            return self.complete
        data = payload[CHUNK_HEADER.size:]
        if self.size + len(data) > self.max_message:
            raise ProtocolError(f"chunked message exceeds MAX_MESSAGE {self.max_message} bytes")
        self.parts[idx] = data
        self.size += len(data)
        return self.complete

    @property
    def complete(self) -> bool:
        return self.total is not None and len(self.parts) == self.total

    def message(self) -> bytes:
        return b"".join(self.parts[i] for i in range(self.total))
