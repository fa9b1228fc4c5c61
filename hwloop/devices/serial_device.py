"""A TTFS chip on a serial link (UART, USB-CDC, ``socket://``, ``rfc2217://``, ``loop://``).

Speaks the frame dialect of :mod:`hwloop.devices.protocol` through pyserial. Reliability rules
(also in ``docs/protocol.md``):

* every request is retried with the *same* sequence number and bytes when the chip NAKs it,
  when nothing is heard for ``ack_timeout``, or when no valid reply arrives in time; the chip
  answers a repeated frame from its reply cache, so a retried write is never applied twice;
* missing or damaged chunks of a chunked reply are asked for by index (RESEND), answered from
  the same cache;
* timeouts scale with the bytes on the wire (at ``baudrate / 10`` bytes/s on real ports) and
  with the batch size of RUN_BATCH;
* every weight write is verified with WEIGHTS_CRC and every threshold write by read-back;
  a mismatch triggers a full rewrite, and after ``write_retries`` of those
  :class:`WriteVerifyError` names the layers;
* the host keeps a shadow of the programmed codes and sends only what changed: the changed
  chunks, or (when the chip offers it and it is smaller) the changed codes as (index, code)
  pairs with WRITE_WEIGHTS_SPARSE.
"""

from __future__ import annotations

import json
import math
import os
import select
import time
from typing import Any, Optional

import numpy as np
import torch

from hwloop.devices import protocol as P
from hwloop.devices.base import NetworkSpec, WEIGHT_KINDS
from hwloop.devices.framing import Frame, FrameFault, FrameReader, encode_frame, split_chunks
from hwloop.devices.host import HEALTH_KEYS, THRESHOLD_KINDS, HostDevice  # noqa: F401
from hwloop.errors import DeviceError, DeviceLimitError, DeviceTimeout, ProtocolError


def error_from_code(code: int, message: str, context: str) -> DeviceError:
    """The hwloop exception for an ERROR reply (``LIMIT`` -> DeviceLimitError, framing and
    payload errors -> ProtocolError, the rest -> DeviceError)."""
    text = f"{context}: chip error {P.err_name(code)} (0x{code:04x}): {message}"
    if code == P.Err.LIMIT:
        exc = DeviceLimitError(text)
    elif code in P.PROTOCOL_ERRORS:
        exc = ProtocolError(text)
    else:
        exc = DeviceError(text)
    exc.code = int(code)  # the chip's error code, for callers that branch on it
    return exc


class SerialDevice(HostDevice):
    """A chip behind a pyserial URL.

    Args:
        url: anything ``serial.serial_for_url`` opens: ``/dev/ttyUSB0``, ``COM3``,
            ``socket://host:port``, ``rfc2217://host:port``, ``loop://``.
        timeout: seconds to wait for a small reply; bulk transfers and runs add to it.
        retries: retransmissions of one frame before :class:`DeviceTimeout`.
        write_retries: full rewrites of a layer after a failed verification.
        baudrate: of real serial ports; also sets the byte-rate term of timeouts.
        byte_rate: bytes/s assumed by timeouts (default baudrate / 10 on real ports and ptys,
            none on ``socket://`` / ``loop://``; 0 = none).
        ack_timeout: seconds of silence (plus the request's transfer time) after which a request
            that got no sign of life at all (no reply, no PENDING, no NAK) is sent again; far
            shorter than ``timeout``, which bounds the wait for a reply once the chip has it.
        per_sample_timeout_s: added per sample of a RUN_BATCH.
        chunk_bytes: largest payload per request frame (and per RESEND list); at most
            ``protocol.MAX_PAYLOAD``.
        reply_chunk_bytes: largest payload per reply frame, asked for in HELLO (default
            ``min(chunk_bytes, 1024)``): on a noisy link a damaged reply chunk costs a RESEND of
            that chunk only, so small reply chunks waste little.
        time_format: "auto" (float64 times when the chip offers them, else ticks), "f64" or
            "ticks".
        port: an already-open pyserial-like object (tests); ``url`` is then only a label.
        sparse: send changed weight codes as (index, code) pairs (WRITE_WEIGHTS_SPARSE) when
            the chip offers it and that is smaller than the changed dense chunks.
    """

    def __init__(self, url: str, *, timeout: float = 2.0, retries: int = 5,
                 write_retries: int = 2, baudrate: int = 115200,
                 per_sample_timeout_s: float = 0.01, chunk_bytes: int = 4096,
                 time_format: str = "auto", port: Any = None, verify: bool = True,
                 byte_rate: Optional[float] = None, ack_timeout: float = 0.05,
                 reply_chunk_bytes: Optional[int] = None, sparse: bool = True):
        self.url = url
        self._init_host(verify=verify, write_retries=write_retries, sparse=sparse,
                        health=HEALTH_KEYS + ("frames_tx", "frames_rx", "stale_frames",
                                              "verify_failures", "naks", "resends", "nudges"))
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.per_sample_timeout_s = float(per_sample_timeout_s)
        self.chunk_bytes = max(256, min(int(chunk_bytes), P.MAX_PAYLOAD))
        self.reply_chunk_bytes = max(256, min(int(reply_chunk_bytes) if reply_chunk_bytes
                                              else min(self.chunk_bytes, 1024), P.MAX_PAYLOAD))
        self.ack_timeout = float(ack_timeout)
        is_virtual = url.startswith(("socket://", "loop://", "rfc2217://")) or port is not None
        if byte_rate is not None:
            self._byte_rate = float(byte_rate) if byte_rate > 0 else None
        else:
            self._byte_rate = None if is_virtual else max(1.0, baudrate / 10.0)
        self._seq = 0
        self._reader = FrameReader()
        self._closed = False
        if port is None:
            import serial
            try:
                port = serial.serial_for_url(url, timeout=min(self.timeout, 0.1),
                                             baudrate=baudrate, write_timeout=None)
            except (serial.SerialException, ValueError, OSError) as e:
                raise DeviceError(f"cannot open serial device {url!r}: {e}") from e
        self._port = port
        # a plain POSIX tty/pty opened by pyserial: read its descriptor directly (_read_some)
        fd = getattr(port, "fd", None)
        self._fd = fd if (type(port).__module__ == "serial.serialposix" and
                          isinstance(fd, int)) else None
        try:
            # pyserial flushes on open, but a chip may have sent a banner since then
            self._port.reset_input_buffer()
            self._write(P.DELIMITER)  # end any partial frame the chip has buffered
            self._hello(time_format)
        except BaseException:
            self.close()
            raise

    # -- link layer ------------------------------------------------------------------------------
    def _ctx(self, cmd: int, seq: Optional[int] = None) -> str:
        dev = getattr(self, "_info", None)
        who = f"{dev.device_id} at {self.url}" if dev is not None else self.url
        return f"{who} {P.cmd_name(cmd)}" + (f" (seq {seq})" if seq is not None else "")

    def _write(self, data: bytes, cmd: int = P.Cmd.HELLO, seq: Optional[int] = None) -> None:
        import serial
        try:
            n = self._port.write(data)
        except serial.SerialTimeoutException as e:
            raise DeviceTimeout(f"{self._ctx(cmd, seq)}: write timed out: {e}") from e
        except (serial.SerialException, OSError) as e:
            raise DeviceError(f"{self._ctx(cmd, seq)}: link failed while writing (peer hung "
                              f"up?): {e}") from e
        if n is not None and n != len(data):
            raise DeviceError(f"{self._ctx(cmd, seq)}: short write ({n} of {len(data)} bytes)")
        self.health["bytes_tx"] += len(data)

    def _read_some(self, remaining: float, cmd: int, seq: int) -> bytes:
        import serial
        want = min(max(remaining, 0.001), 0.1)
        fd = self._fd
        if fd is not None:
            # a POSIX port (tty, pty): wait and read on the descriptor directly; pyserial's
            # read() reprograms the termios settings each time its timeout changes
            try:
                ready = select.select([fd], [], [], want)[0]
                data = os.read(fd, 1 << 16) if ready else b""
            except OSError as e:
                raise DeviceError(f"{self._ctx(cmd, seq)}: link failed while reading (peer hung "
                                  f"up?): {e}") from e
            if ready and not data:
                raise DeviceError(f"{self._ctx(cmd, seq)}: link failed while reading (peer hung "
                                  "up?): the port reports data but returns none")
            if data:
                self.health["bytes_rx"] += len(data)
            return data
        try:
            # wait for the first byte, then take whatever else is there without waiting
            # (``in_waiting`` is only 0/1 on socket:// ports, so it cannot size the read)
            self._port.timeout = want
            data = self._port.read(1)
            if data:
                self._port.timeout = 0
                data += self._port.read(1 << 16)
        except (serial.SerialException, OSError) as e:
            raise DeviceError(f"{self._ctx(cmd, seq)}: link failed while reading (peer hung "
                              f"up?): {e}") from e
        if data:
            self.health["bytes_rx"] += len(data)
        return data

    #: Quiet time after a damaged or missing reply frame before the host asks again, s.
    RESEND_IDLE_S = 0.03

    def _next_seq(self) -> int:
        self._seq = self._seq % P.SEQ_MAX + 1
        return self._seq

    def _xfer_time(self, nbytes: int) -> float:
        return 0.0 if self._byte_rate is None else nbytes / self._byte_rate

    def _transact(self, cmd: int, payload: bytes = b"", flags: int = 0,
                  extra_timeout: float = 0.0, expect_bytes: int = 0) -> tuple[int, bytes]:
        """Send one frame and return (reply flags, reply payload reassembled from chunks).

        Recovery (docs/protocol.md, "Messages, chunks and retries"): the request is sent again,
        byte for byte, when the chip NAKs it, when nothing at all is heard for ``ack_timeout``,
        or when a reply frame arrived damaged before anything intact; missing or damaged chunks
        of a chunked reply are asked for with RESEND (answered from the chip's reply cache).
        An attempt that brings no new chunk within the full timeout counts against
        ``retries``; progress resets the count.
        """
        if self._closed:
            raise DeviceError(f"{self._ctx(cmd)}: device is closed")
        seq = self._next_seq()
        wire = encode_frame(Frame(seq, int(cmd), int(flags), payload))
        long_t = self.timeout + extra_timeout + self._xfer_time(len(wire) + expect_bytes)
        nudge_t = self.ack_timeout + self._xfer_time(len(wire))
        if nudge_t >= long_t:
            nudge_t = None  # the attempt timeout comes first anyway
        max_ask = max(1, min(P.MAX_RESEND, (self.chunk_bytes - P.RESEND_HDR.size) // 2))
        chunks: dict[int, bytes] = {}
        size = 0
        total: Optional[int] = None
        life = False  # the chip has shown that it holds this request (PENDING or a reply frame)
        st = {"sends": 0}

        def send(reason: str) -> None:
            nonlocal heard, corrupt, round_last, round_max, last_io
            if total is not None or life:
                if total is None:
                    ask = [0]  # the whole reply frame (or chunk 0, which names the total)
                else:
                    missing = [i for i in range(total) if i not in chunks]
                    if reason == "quiet" and round_max >= 0:
                        # the stream may only have paused: ask for the gaps it has passed, and
                        # for the last chunk of the round
                        ask = [i for i in missing if i < round_max]
                        if round_last is not None and round_last in missing and \
                                round_last not in ask:
                            ask.append(round_last)
                        ask = ask or missing
                    else:
                        ask = missing
                    ask = ask[:max_ask]
                frame = encode_frame(Frame(seq, P.Cmd.RESEND, 0, P.resend_payload(ask)))
                self._write(frame, cmd, seq)
                self.health["resends"] += 1
                round_last = max(ask) if total is not None else None
            else:
                self._write(wire, cmd, seq)
                if st["sends"]:
                    self.health["retries"] += 1
                round_last = None if total is None else total - 1
            st["sends"] += 1
            self.health["frames_tx"] += 1
            heard = corrupt = False
            round_max = -1
            last_io = time.monotonic()

        heard = corrupt = False
        round_last: Optional[int] = None
        round_max = -1
        last_io = 0.0
        send("request")
        deadline = last_io + long_t
        fruitless = 0
        while True:
            now = time.monotonic()
            wake = deadline
            if nudge_t is not None:
                wake = min(wake, last_io + nudge_t)
            if corrupt or total is not None:
                wake = min(wake, last_io + self.RESEND_IDLE_S)
            data = self._read_some(wake - now, cmd, seq)
            now = time.monotonic()
            nak = round_end = False
            if data:
                last_io = now
                for ev in self._reader.feed(data):
                    if isinstance(ev, FrameFault):
                        # most likely a reply of ours, damaged (or our banner/garbage)
                        self.health["crc_errors" if ev.kind == "crc" else "resyncs"] += 1
                        corrupt = True
                        continue
                    self.health["frames_rx"] += 1
                    if ev.cmd == P.Cmd.NAK and ev.is_reply and ev.version == P.PROTOCOL_VERSION:
                        self.health["naks"] += 1
                        nak = True
                        continue
                    if not ev.is_reply or ev.seq != seq or ev.version != P.PROTOCOL_VERSION:
                        self.health["stale_frames"] += 1
                        continue
                    heard = life = True
                    if ev.flags & P.Flag.PENDING and not ev.payload:
                        continue
                    if ev.cmd == P.Cmd.ERROR:
                        code, msg = P.parse_error_payload(ev.payload)
                        raise error_from_code(code, msg, self._ctx(cmd, seq))
                    if ev.cmd != cmd:
                        raise ProtocolError(f"{self._ctx(cmd, seq)}: reply carries command "
                                            f"{P.cmd_name(ev.cmd)}")
                    if not ev.flags & P.Flag.CHUNKED:
                        return ev.flags, ev.payload
                    if len(ev.payload) < P.CHUNK_HEADER.size:
                        raise ProtocolError(f"{self._ctx(cmd, seq)}: chunk shorter than its "
                                            "header")
                    idx, tot = P.CHUNK_HEADER.unpack_from(ev.payload)
                    if total is None:
                        total = tot
                        if round_last is None:
                            round_last = total - 1
                    if tot != total or idx >= total:
                        raise ProtocolError(f"{self._ctx(cmd, seq)}: inconsistent chunk "
                                            f"{idx}/{tot}")
                    round_max = max(round_max, idx)
                    if idx not in chunks:
                        size += len(ev.payload) - P.CHUNK_HEADER.size
                        if size > P.MAX_MESSAGE:
                            raise ProtocolError(f"{self._ctx(cmd, seq)}: reply exceeds "
                                                "MAX_MESSAGE")
                        chunks[idx] = ev.payload[P.CHUNK_HEADER.size:]
                        deadline = now + long_t  # progress
                        fruitless = 0
                        if len(chunks) == total:
                            return ev.flags, b"".join(chunks[i] for i in range(total))
                    if idx == round_last:
                        round_end = True
            if nak and not heard:
                send("nak")  # our last frame arrived damaged: at once
            elif round_end:
                send("round")  # the round is over; what is missing now is lost
            elif (corrupt or total is not None) and now - last_io >= self.RESEND_IDLE_S:
                send("quiet")
            elif nudge_t is not None and now - last_io >= nudge_t:
                self.health["nudges"] += 1
                send("nudge")  # nothing at all: the request (or RESEND) was lost
            elif now >= deadline:
                if not corrupt:
                    self.health["timeouts"] += 1
                fruitless += 1
                if fruitless > self.retries:
                    raise DeviceTimeout(
                        f"{self._ctx(cmd, seq)}: no valid reply after {st['sends']} attempts "
                        f"({self.retries + 1} of {long_t:.3g} s without progress)")
                send("timeout")
                deadline = time.monotonic() + long_t

    def _send(self, cmd: int, payload: bytes, flags: int = 0, extra_timeout: float = 0.0,
              expect_bytes: int = 0) -> bytes:
        """Send a message, chunked over several frames when larger than ``chunk_bytes``."""
        if len(payload) <= self.chunk_bytes:
            return self._transact(cmd, payload, flags, extra_timeout, expect_bytes)[1]
        parts = split_chunks(payload, self.chunk_bytes - P.CHUNK_HEADER.size)
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            reply = self._transact(cmd, part, flags | P.Flag.CHUNKED,
                                   extra_timeout if last else 0.0, expect_bytes if last else 0)[1]
        return reply

    # -- session ---------------------------------------------------------------------------------
    def _hello(self, time_format: str) -> None:
        reply = self._transact(P.Cmd.HELLO, P.HELLO_REQ.pack(P.PROTOCOL_VERSION,
                                                             self.reply_chunk_bytes))[1]
        if len(reply) < P.HELLO_REPLY.size:
            raise ProtocolError(f"{self.url}: HELLO reply too short")
        (version,) = P.HELLO_REPLY.unpack_from(reply)
        if version != P.PROTOCOL_VERSION:
            raise ProtocolError(f"{self.url}: chip speaks protocol {version}, host "
                                f"{P.PROTOCOL_VERSION}")
        doc = self._accept_hello(reply[P.HELLO_REPLY.size:], "HELLO JSON")
        self._choose_formats(doc, time_format)

    # -- transport hooks of HostDevice -----------------------------------------------------------
    @property
    def _label(self) -> str:
        return self.url

    def _ctx_run(self) -> str:
        return self._ctx(P.Cmd.RUN_BATCH)

    def status(self) -> dict:
        return json.loads(self._transact(P.Cmd.STATUS)[1].decode("utf-8"))

    def _program(self, spec: NetworkSpec) -> None:
        self._send(P.Cmd.PROGRAM, spec.model_dump_json().encode("utf-8"))

    def _reset(self) -> None:
        self._transact(P.Cmd.RESET)

    def _set_windows(self, arr: np.ndarray) -> None:
        self._transact(P.Cmd.SET_WINDOWS, P.WINDOWS_HDR.pack(arr.shape[0]) +
                       arr.astype(P.DT_F64).tobytes())

    def _weight_step(self, wide: bool) -> int:
        return (self.chunk_bytes - P.WRITE_WEIGHTS_HDR.size) // (4 if wide else 2)

    def _code_bytes(self, wide: bool) -> int:
        return P.code_dtype(wide).itemsize

    def _send_weights(self, layer: int, flat: np.ndarray, scale: float, wide: bool,
                      todo: list[int], step: int, sparse: Optional[np.ndarray]) -> None:
        dt = P.code_dtype(wide)
        flags = P.Flag.WIDE if wide else 0
        if sparse is not None:
            per = (self.chunk_bytes - P.WRITE_WEIGHTS_SPARSE_HDR.size) // (4 + dt.itemsize)
            pieces = range(0, sparse.size, per)
            for i, s in enumerate(pieces):
                idx = sparse[s:s + per]
                commit = P.Flag.COMMIT if i == len(pieces) - 1 else 0
                self._transact(P.Cmd.WRITE_WEIGHTS_SPARSE,
                               P.encode_sparse(layer, idx, flat[idx], scale, wide), flags | commit)
        else:
            for i, s in enumerate(todo):
                part = flat[s:s + step]
                payload = P.WRITE_WEIGHTS_HDR.pack(layer, s, part.size, scale) + \
                    part.astype(dt).tobytes()
                commit = P.Flag.COMMIT if i == len(todo) - 1 else 0
                self._transact(P.Cmd.WRITE_WEIGHTS, payload, flags | commit)

    def _weights_crc(self, layer: int) -> tuple[int, float, int]:
        return P.WEIGHTS_CRC_REPLY.unpack(
            self._transact(P.Cmd.WEIGHTS_CRC, P.LAYER.pack(layer))[1])

    def _threshold_step(self) -> int:
        return (self.chunk_bytes - P.WRITE_THRESHOLDS_HDR.size) // 8

    def _send_thresholds(self, layer: int, flat: np.ndarray, todo: list[int],
                         step: int) -> None:
        for i, s in enumerate(todo):
            part = flat[s:s + step]
            payload = P.WRITE_THRESHOLDS_HDR.pack(layer, s, part.size) + \
                part.astype(P.DT_F64).tobytes()
            commit = P.Flag.COMMIT if i == len(todo) - 1 else 0
            self._transact(P.Cmd.WRITE_THRESHOLDS, payload, commit)

    def _read_thr_flat(self, layer: int, n: int) -> np.ndarray:
        step = (P.MAX_MESSAGE - P.COUNT.size) // 8  # the chip splits the reply into frames
        out = np.zeros(n, dtype=np.float64)
        for s in range(0, n, step):
            cnt = min(step, n - s)
            reply = self._transact(P.Cmd.READ_THRESHOLDS, P.READ_RANGE.pack(layer, s, cnt),
                                   expect_bytes=8 * cnt)[1]
            got = P.COUNT.unpack_from(reply)[0] if len(reply) >= P.COUNT.size else -1
            if got != cnt or len(reply) != P.COUNT.size + 8 * cnt:
                raise ProtocolError(f"{self._ctx(P.Cmd.READ_THRESHOLDS)}: asked {cnt} values, got "
                                    f"{got}")
            out[s:s + cnt] = np.frombuffer(reply, P.DT_F64, cnt, P.COUNT.size)
        return out

    def _run_exchange(self, arr: np.ndarray, b: int, expect: int) -> bytes:
        payload = P.RUN_REQ.pack(*arr.shape) + self._input_values(arr).tobytes()
        return self._send(P.Cmd.RUN_BATCH, payload, P.Flag.F64_TIMES if self.f64 else 0,
                          extra_timeout=self.per_sample_timeout_s * b, expect_bytes=expect)

    # -- commands of the frame dialect -----------------------------------------------------------
    def seed_noise(self, seed: int) -> None:
        """Reseed the chip's random jitter (SEED_NOISE); a chip that cannot (UNSUPPORTED or an
        older firmware without the command) ignores it, as the contract allows."""
        try:
            self._transact(P.Cmd.SEED_NOISE, P.SEED.pack(int(seed) & 0xFFFFFFFFFFFFFFFF))
        except DeviceError as e:
            if getattr(e, "code", None) not in (P.Err.UNSUPPORTED, P.Err.UNKNOWN_COMMAND):
                raise

    # -- read-back -------------------------------------------------------------------------------
    def read_weights(self, layer: int) -> tuple[torch.Tensor, float]:
        spec = self._layer(layer, WEIGHT_KINDS)
        n = math.prod(spec.weight_shape)
        wide = self._info.weight_bits > 16
        dt = P.code_dtype(wide)
        # one request per MAX_MESSAGE worth of codes: the chip splits the reply into frames
        step = (P.MAX_MESSAGE - P.READ_WEIGHTS_REPLY.size) // dt.itemsize
        out = np.zeros(n, dtype=np.int64)
        scale = 0.0
        for s in range(0, max(n, 1), step):
            cnt = min(step, n - s)
            reply = self._transact(P.Cmd.READ_WEIGHTS, P.READ_RANGE.pack(layer, s, cnt),
                                   P.Flag.WIDE if wide else 0, expect_bytes=cnt * dt.itemsize)[1]
            if len(reply) < P.READ_WEIGHTS_REPLY.size:
                raise ProtocolError(f"{self._ctx(P.Cmd.READ_WEIGHTS)}: reply of {len(reply)} "
                                    "bytes is shorter than its header")
            scale, got = P.READ_WEIGHTS_REPLY.unpack_from(reply)
            if got != cnt or len(reply) != P.READ_WEIGHTS_REPLY.size + cnt * dt.itemsize:
                raise ProtocolError(f"{self._ctx(P.Cmd.READ_WEIGHTS)}: asked {cnt} codes, got "
                                    f"{got} in {len(reply)} bytes")
            out[s:s + cnt] = np.frombuffer(reply, dt, cnt, P.READ_WEIGHTS_REPLY.size)
        return torch.from_numpy(out.reshape(spec.weight_shape)), float(scale)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._port.close()
        except Exception:
            pass
