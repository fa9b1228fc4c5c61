"""Exact byte exchanges with a scripted chip, in both dialects.

Frame dialect: a scripted pyserial-like port for driving :class:`SerialDevice`::

    port = ScriptedPort([(hello_request_bytes, hello_reply_bytes), (req2, rep2), ...])
    dev = SerialDevice("scripted://", port=port, timeout=0.05)
    ...
    port.assert_done()

Every byte the device writes must match the script exactly, in order (a mismatch fails at once
with both byte strings in hex); a step's reply is released when its whole request has been
written. ``assert_done`` checks that every step ran and nothing is left unread or unmatched.
A reply of ``b""`` simulates a lost reply (the device's read times out).

SCPI dialect: a scripted loopback TCP instrument for driving :class:`VisaDevice` through
pyvisa-py (``TCPIP::127.0.0.1::PORT::SOCKET``)::

    with ScriptedInstrument(visa_hello(INFO) + [(line("HWL:STAT?"), b'{...}\\n')]) as inst:
        dev = VisaDevice(inst.resource, timeout=0.5)
        ...
        inst.assert_done()

The same rules: the command lines and IEEE 488.2 blocks the host writes must match the script
byte for byte, a step's reply is sent when its whole request has arrived, ``b""`` sends nothing
(the host times out) and ``None`` hangs up. A mismatch closes the link and is raised (with both
byte strings) by ``assert_done`` and when the ``with`` block ends, whatever the host raised.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Iterable, Optional

from hwloop.wire.codec import (HELLO_REPLY, HELLO_REQ, PROTOCOL_VERSION, TIME_F64, TIME_TICKS,
                               dumps, hello_json)
from hwloop.wire.frame import (Cmd, DELIMITER, Flag, Frame, NAK_PAYLOAD, NakReason, encode_frame,
                               error_payload, resend_payload)


def req(seq: int, cmd: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """The bytes a host sends for one request frame."""
    return encode_frame(Frame(seq, int(cmd), int(flags), payload))


def rep(seq: int, cmd: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """The bytes a chip sends for one reply frame."""
    return encode_frame(Frame(seq, int(cmd), int(flags) | Flag.REPLY, payload))


def err(seq: int, code: int, message: str) -> bytes:
    return rep(seq, Cmd.ERROR, error_payload(code, message))


def pending(seq: int, cmd: int) -> bytes:
    """The chip's PENDING frame: the request arrived and is being executed."""
    return rep(seq, cmd, b"", Flag.PENDING)


def nak(reason: int = NakReason.CRC) -> bytes:
    """The chip's NAK of a damaged frame (seq 0)."""
    return rep(0, Cmd.NAK, NAK_PAYLOAD.pack(int(reason)))


def resend(seq: int, indices) -> bytes:
    """The host's RESEND of the chunks ``indices`` of the reply to ``seq``."""
    return req(seq, Cmd.RESEND, resend_payload(indices))


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
                   time_formats=(TIME_TICKS, TIME_F64),
                   reply_chunk_bytes=None, features=()) -> tuple[bytes, bytes]:
    """The opening step: a resync 0x00, then HELLO (asking for reply chunks of
    ``reply_chunk_bytes``, by default ``min(chunk_bytes, 1024)`` as SerialDevice does), and the
    chip's reply (listing ``features``, none by default)."""
    want = reply_chunk_bytes or min(chunk_bytes, 1024)
    request = DELIMITER + req(seq, Cmd.HELLO, HELLO_REQ.pack(PROTOCOL_VERSION, want))
    reply = rep(seq, Cmd.HELLO, HELLO_REPLY.pack(PROTOCOL_VERSION) +
                dumps(hello_json(info.model_dump(mode="json"), list(time_formats),
                                     list(features))))
    return request, reply


# ------------------------------------------------------------------------------------------------
# SCPI: a scripted TCP instrument for VisaDevice
# ------------------------------------------------------------------------------------------------

#: The chip's reply to ``SYST:ERR?`` when its error queue is empty.
NO_ERROR = b'0,"No error"\n'


def line(text: str) -> bytes:
    """One SCPI program message (or a text reply) as it travels: ASCII plus ``\\n``."""
    return text.encode("ascii") + b"\n"


def ieee_block(data: bytes) -> bytes:
    """``data`` as an IEEE 488.2 definite-length block ``#<n><length><data>`` (no terminator)."""
    length = str(len(data)).encode("ascii")
    return b"#" + str(len(length)).encode("ascii") + length + bytes(data)


def block_line(head: str, data: bytes) -> bytes:
    """A command whose last argument is a block: ``head`` (up to and including its ``,`` or
    space), the block, ``\\n``."""
    return head.encode("ascii") + ieee_block(data) + b"\n"


def scpi_error(code: int, message: str) -> bytes:
    """The chip's reply to ``SYST:ERR?`` for one queued error."""
    return f'{int(code)},"{message}"\n'.encode("utf-8")


def visa_hello(info, time_formats=(TIME_TICKS, TIME_F64), features=(), tfor: Optional[str] = None,
               idn: bytes = b"hwloop,FakeB1Device,fake-b1-0001,fake-1\n"
               ) -> list[tuple[bytes, bytes]]:
    """The steps of VisaDevice's opening: ``*CLS``, ``*IDN?``, ``HWL:INFO?`` (the chip offers
    ``time_formats`` and ``features``), ``HWL:TFOR`` (``tfor``; by default F64 when offered) and
    its ``SYST:ERR?``."""
    doc = dumps(hello_json(info.model_dump(mode="json"), list(time_formats), list(features)))
    tfor = tfor or ("F64" if TIME_F64 in time_formats else "TICK")
    return [(line("*CLS"), b""), (line("*IDN?"), idn), (line("HWL:INFO?"), doc + b"\n"),
            (line(f"HWL:TFOR {tfor}"), b""), (line("SYST:ERR?"), NO_ERROR)]


class ScriptedInstrument:
    """A loopback TCP instrument (one connection) that answers scripted SCPI requests with
    scripted replies; see the module docstring."""

    def __init__(self, script: Iterable[tuple[bytes, Optional[bytes]]],
                 accept_timeout: float = 10.0):
        self.script = [(bytes(a), None if b is None else bytes(b)) for a, b in script]
        self.step = 0
        self.requests: list[bytes] = []
        self.failure: Optional[str] = None
        self.leftover = bytearray()
        self.hung_up = False
        self._conn: Optional[socket.socket] = None
        self._progress = threading.Condition()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(accept_timeout)
        self.port = self._listener.getsockname()[1]
        self.resource = f"TCPIP::127.0.0.1::{self.port}::SOCKET"
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name="scripted-instrument")
        self._thread.start()

    def _fail(self, text: str) -> None:
        with self._progress:
            if self.failure is None:
                self.failure = text
            self._progress.notify_all()

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError as e:
            if self.step < len(self.script):
                self._fail(f"no connection: {e}")
            return
        self._conn = conn
        buf = bytearray()
        try:
            while True:
                try:
                    data = conn.recv(1 << 16)
                except OSError:
                    return
                if not data:
                    return  # the host closed the link
                buf += data
                while buf:
                    if self.step >= len(self.script):
                        self._fail("unexpected bytes after the end of the script: "
                                   f"{bytes(buf)!r}")
                        return
                    want, reply = self.script[self.step]
                    got = bytes(buf[:len(want)])
                    if not want.startswith(got):
                        self._fail(f"step {self.step}: request differs\n  expected {want!r}\n"
                                   f"  written  {bytes(buf)!r}")
                        return
                    if len(got) < len(want):
                        break
                    del buf[:len(want)]
                    with self._progress:
                        self.requests.append(want)
                        self.step += 1
                        self._progress.notify_all()
                    if reply is None:
                        self.hung_up = True
                        return
                    if reply:
                        conn.sendall(reply)
        finally:
            self.leftover += buf
            try:
                conn.close()
            except OSError:
                pass

    # -- checks ----------------------------------------------------------------------------------
    def assert_done(self, timeout: float = 2.0) -> None:
        """Every step ran (waiting up to ``timeout`` for the last requests to arrive), nothing
        differed and nothing unmatched was written."""
        with self._progress:
            self._progress.wait_for(lambda: self.failure is not None or
                                    self.step == len(self.script), timeout)
        assert self.failure is None, self.failure
        assert self.step == len(self.script), \
            f"script stopped at step {self.step} of {len(self.script)}"
        if not self.hung_up:
            time.sleep(0.01)  # anything written after the last step arrives and fails it
        assert self.failure is None, self.failure
        assert not self.leftover, f"unmatched written bytes: {bytes(self.leftover)!r}"

    def close(self) -> None:
        try:
            self._listener.close()
        except OSError:
            pass
        if self._conn is not None:
            try:
                self._conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(5.0)

    def __enter__(self) -> "ScriptedInstrument":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        if self.failure is not None:
            raise AssertionError(f"{self.resource}: {self.failure}")
