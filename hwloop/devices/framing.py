"""Framing of the frame dialect: byte stuffing, frame encode/decode, a resynchronising reader.

A frame on the wire is ``stuff(raw) + b"\\x00"``; ``raw`` is laid out as in
:mod:`hwloop.devices.protocol`. The :class:`FrameReader` accepts any byte stream (garbage,
banners, corrupted or truncated frames, hostile length fields) and yields only frames whose
length and CRC check out; it never buffers more than ``MAX_ENCODED`` bytes.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Union

from hwloop.devices import protocol as P
from hwloop.errors import ProtocolError


#: The byte translation of step 1 of the stuffing: swaps 0x00 and ``P.ZERO_SUB`` (an involution,
#: so the same table undoes it).
_SWAP = bytes.maketrans(bytes([0, P.ZERO_SUB]), bytes([P.ZERO_SUB, 0]))
_ESC = bytes([P.ESC])
_ESC_ZERO = bytes([P.ESC, P.ESC_ZERO])
_ESC_ESC = bytes([P.ESC, P.ESC_ESC])
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
    version: int = P.PROTOCOL_VERSION

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & P.Flag.REPLY)


def frame_raw(frame: Frame) -> bytes:
    """Header, payload and CRC of ``frame`` (before stuffing)."""
    if len(frame.payload) > P.MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(frame.payload)} bytes exceeds MAX_PAYLOAD "
                            f"{P.MAX_PAYLOAD}")
    body = P.HEADER.pack(frame.version, frame.seq, frame.cmd, frame.flags,
                         len(frame.payload)) + frame.payload
    return body + P.CRC.pack(zlib.crc32(body) & 0xFFFFFFFF)


def encode_frame(frame: Frame) -> bytes:
    """The bytes put on the wire for ``frame``: its stuffed bytes plus the 0x00 delimiter."""
    return stuff(frame_raw(frame)) + P.DELIMITER


def decode_raw(raw: bytes) -> Frame:
    """Parse an unstuffed frame, checking the length field (bounded) and the CRC.

    Raises:
        ProtocolError: too short, a length field that disagrees or exceeds MAX_PAYLOAD, bad CRC.
    """
    if len(raw) < P.FRAME_OVERHEAD:
        raise ProtocolError(f"frame of {len(raw)} bytes is shorter than the "
                            f"{P.FRAME_OVERHEAD}-byte minimum")
    version, seq, cmd, flags, plen = P.HEADER.unpack_from(raw)
    if plen > P.MAX_PAYLOAD:
        raise ProtocolError(f"length field {plen} exceeds MAX_PAYLOAD {P.MAX_PAYLOAD}")
    if plen != len(raw) - P.FRAME_OVERHEAD:
        raise ProtocolError(f"length field {plen} disagrees with the frame size "
                            f"({len(raw) - P.FRAME_OVERHEAD} payload bytes)")
    (crc,) = P.CRC.unpack_from(raw, len(raw) - P.CRC_SIZE)
    calc = zlib.crc32(raw[:-P.CRC_SIZE]) & 0xFFFFFFFF
    if crc != calc:
        raise BadCrc(f"CRC mismatch: frame says 0x{crc:08x}, computed 0x{calc:08x}")
    return Frame(seq=seq, cmd=cmd, flags=flags, payload=bytes(raw[P.HEADER_SIZE:-P.CRC_SIZE]),
                 version=version)


def decode_frame(wire: bytes) -> Frame:
    """Decode one wire frame (with or without its trailing delimiter)."""
    if wire.endswith(P.DELIMITER):
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

    def __init__(self, max_encoded: int = P.MAX_ENCODED):
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
    if len(pieces) > P.MAX_CHUNKS:
        raise ProtocolError(f"message of {len(payload)} bytes needs {len(pieces)} chunks; "
                            f"MAX_CHUNKS is {P.MAX_CHUNKS}")
    total = len(pieces)
    return [P.CHUNK_HEADER.pack(i, total) + p for i, p in enumerate(pieces)]


class ChunkAssembler:
    """Reassembles a chunked message; bounds the total size by ``max_message``."""

    def __init__(self, max_message: int = P.MAX_MESSAGE):
        self.max_message = max_message
        self.total = None
        self.parts: dict[int, bytes] = {}
        self.size = 0

    def add(self, payload: bytes) -> bool:
        """Add one chunk payload (with header); returns True when complete.

        Raises:
            ProtocolError: malformed chunk header, inconsistent totals, or too large a message.
        """
        if len(payload) < P.CHUNK_HEADER.size:
            raise ProtocolError("chunk shorter than its header")
        idx, total = P.CHUNK_HEADER.unpack_from(payload)
        if total == 0 or idx >= total:
            raise ProtocolError(f"chunk index {idx} of total {total}")
        if self.total is None:
            self.total = total
        elif total != self.total:
            raise ProtocolError(f"chunk total changed from {self.total} to {total}")
        if idx in self.parts:
            return self.complete
        data = payload[P.CHUNK_HEADER.size:]
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
