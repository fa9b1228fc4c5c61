"""Exact byte exchanges: a scripted pyserial-like port for driving :class:`SerialDevice`.

    port = ScriptedPort([(hello_request_bytes, hello_reply_bytes), (req2, rep2), ...])
    dev = SerialDevice("scripted://", port=port, timeout=0.05)
    ...
    port.assert_done()

Every byte the device writes must match the script exactly, in order (a mismatch fails at once
with both byte strings in hex); a step's reply is released when its whole request has been
written. ``assert_done`` checks that every step ran and nothing is left unread or unmatched.
A reply of ``b""`` simulates a lost reply (the device's read times out).
"""

from __future__ import annotations

import time
from typing import Iterable

from hwloop.devices import protocol as P
from hwloop.devices.framing import Frame, encode_frame


def req(seq: int, cmd: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """The bytes a host sends for one request frame."""
    return encode_frame(Frame(seq, int(cmd), int(flags), payload))


def rep(seq: int, cmd: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """The bytes a chip sends for one reply frame."""
    return encode_frame(Frame(seq, int(cmd), int(flags) | P.Flag.REPLY, payload))


def err(seq: int, code: int, message: str) -> bytes:
    return rep(seq, P.Cmd.ERROR, P.error_payload(code, message))


def pending(seq: int, cmd: int) -> bytes:
    """The chip's PENDING frame: the request arrived and is being executed."""
    return rep(seq, cmd, b"", P.Flag.PENDING)


def nak(reason: int = P.NakReason.CRC) -> bytes:
    """The chip's NAK of a damaged frame (seq 0)."""
    return rep(0, P.Cmd.NAK, P.NAK_PAYLOAD.pack(int(reason)))


def resend(seq: int, indices) -> bytes:
    """The host's RESEND of the chunks ``indices`` of the reply to ``seq``."""
    return req(seq, P.Cmd.RESEND, P.resend_payload(indices))


class ScriptedPort:
    """A fake serial port that answers scripted requests with scripted replies."""

    def __init__(self, script: Iterable[tuple[bytes, bytes]], pending: bytes = b""):
        self.script = [(bytes(a), bytes(b)) for a, b in script]
        self.step = 0
        self.written = bytearray()
        self.rx = bytearray(pending)  # bytes already waiting (a banner)
        self.timeout = 0.05
        self.closed = False
        self.requests: list[bytes] = []

    # -- pyserial API ----------------------------------------------------------------------------
    @property
    def in_waiting(self) -> int:
        return len(self.rx)

    def reset_input_buffer(self) -> None:
        self.rx.clear()

    def write(self, data: bytes) -> int:
        assert not self.closed, "write after close"
        self.written += data
        while self.written:
            if self.step >= len(self.script):
                raise AssertionError(f"unexpected bytes after the end of the script: "
                                     f"{bytes(self.written).hex(' ')}")
            want, reply = self.script[self.step]
            got = bytes(self.written[:len(want)])
            if not want.startswith(got):
                raise AssertionError(
                    f"step {self.step}: request differs\n  expected {want.hex(' ')}\n"
                    f"  written  {bytes(self.written).hex(' ')}")
            if len(got) < len(want):
                break
            del self.written[:len(want)]
            self.requests.append(want)
            self.step += 1
            self.rx += reply
        return len(data)

    def read(self, size: int = 1) -> bytes:
        if not self.rx:
            time.sleep(min(self.timeout or 0.0, 0.002))
            return b""
        out = bytes(self.rx[:size])
        del self.rx[:size]
        return out

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    # -- checks ----------------------------------------------------------------------------------
    def assert_done(self) -> None:
        assert self.step == len(self.script), \
            f"script stopped at step {self.step} of {len(self.script)}"
        assert not self.written, f"unmatched written bytes: {bytes(self.written).hex(' ')}"
        assert not self.rx, f"reply bytes left unread: {bytes(self.rx).hex(' ')}"


def hello_exchange(info, seq: int = 1, chunk_bytes: int = 4096,
                   time_formats=(P.TIME_TICKS, P.TIME_F64),
                   reply_chunk_bytes=None, features=()) -> tuple[bytes, bytes]:
    """The opening step: a resync 0x00, then HELLO (asking for reply chunks of
    ``reply_chunk_bytes``, by default ``min(chunk_bytes, 1024)`` as SerialDevice does), and the
    chip's reply (listing ``features``, none by default)."""
    want = reply_chunk_bytes or min(chunk_bytes, 1024)
    request = P.DELIMITER + req(seq, P.Cmd.HELLO, P.HELLO_REQ.pack(P.PROTOCOL_VERSION, want))
    reply = rep(seq, P.Cmd.HELLO, P.HELLO_REPLY.pack(P.PROTOCOL_VERSION) +
                P.dumps(P.hello_json(info.model_dump(mode="json"), list(time_formats),
                                     list(features))))
    return request, reply
