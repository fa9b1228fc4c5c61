"""A TTFS chip on a serial link (UART, USB-CDC, ``socket://``, ``rfc2217://``, ``loop://``).

Speaks the frame dialect of :mod:`hwloop.wire.frame` through pyserial. Reliability rules
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
import socket
from typing import Any, Optional

import numpy as np
import serial
import torch

from hwloop.devices.base import WEIGHT_KINDS, NetworkSpec
from hwloop.errors import DeviceError, DeviceTimeout, ProtocolError
from hwloop.wire.codec import (COUNT, DT_F64, Err, FEATURE_LOCK, HELLO_REPLY, HELLO_REQ, LAYER,
                               MAX_MESSAGE, PROTOCOL_VERSION, READ_RANGE, READ_WEIGHTS_REPLY, SEED,
                               WEIGHTS_CRC_REPLY, WINDOWS_HDR, WRITE_THRESHOLDS_HDR,
                               WRITE_WEIGHTS_HDR, WRITE_WEIGHTS_SPARSE_HDR, code_dtype,
                               encode_sparse)
from hwloop.wire.frame import (CHUNK_HEADER, Cmd, DELIMITER, Flag, FrameReader, LOCK_PAYLOAD,
                               LockOp, MAX_PAYLOAD, SEQ_MAX, cmd_name, split_chunks)
from hwloop.wire.host import HEALTH_KEYS, HostDevice
from hwloop.wire.serial_exchange import _Resplit, exchange
from hwloop.wire.serial_link import LinkAdaptation


class SerialDevice(LinkAdaptation, HostDevice):
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
        adaptive: adapt to the link (docs/protocol.md, "Adaptive timeouts and chunk sizes"):
            the silence timeout follows the measured round trip (smoothed RTT + 4 x variance,
            doubled on every silent retry, RFC 6298) between ``ack_timeout`` and
            ``max_ack_timeout``; request and reply frames shrink when frames arrive damaged
            (down to ``min_chunk_bytes``) and grow back to ``chunk_bytes`` /
            ``reply_chunk_bytes`` on a clean link. False: fixed ``ack_timeout`` and sizes.
        max_ack_timeout: upper bound of the adaptive silence timeout (default ``timeout``).
        min_chunk_bytes: smallest frame payload the adaptation goes down to (default 128).
        take_over: take control of the chip at once, even from another link (LOCK take-over);
            by default this link takes control with its first command that changes the chip,
            and gets a BUSY ``DeviceError`` naming the owner while another link has it.
    """

    def __init__(self, url: str, *, timeout: float = 2.0, retries: int = 5,
                 write_retries: int = 2, baudrate: int = 115200,
                 per_sample_timeout_s: float = 0.01, chunk_bytes: int = 4096,
                 time_format: str = "auto", port: Any = None, verify: bool = True,
                 byte_rate: Optional[float] = None, ack_timeout: float = 0.05,
                 reply_chunk_bytes: Optional[int] = None, sparse: bool = True,
                 take_over: bool = False, adaptive: bool = True,
                 max_ack_timeout: Optional[float] = None, min_chunk_bytes: int = 128):
        self.url = url
        self._init_host(verify=verify, write_retries=write_retries, sparse=sparse,
                        health=HEALTH_KEYS + ("frames_tx", "frames_rx", "stale_frames",
                                              "verify_failures", "naks", "resends", "nudges"))
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.per_sample_timeout_s = float(per_sample_timeout_s)
        self.chunk_bytes = max(256, min(int(chunk_bytes), MAX_PAYLOAD))
        self.reply_chunk_bytes = max(256, min(int(reply_chunk_bytes) if reply_chunk_bytes
                                              else min(self.chunk_bytes, 1024), MAX_PAYLOAD))
        self.ack_timeout = float(ack_timeout)
        self.adaptive = bool(adaptive)
        self.max_ack_timeout = max(float(max_ack_timeout) if max_ack_timeout else self.timeout,
                                   self.ack_timeout)
        self.max_chunk_bytes = self.chunk_bytes
        self.max_reply_chunk_bytes = self.reply_chunk_bytes
        self.min_chunk_bytes = max(64, min(int(min_chunk_bytes), self.reply_chunk_bytes,
                                           self.chunk_bytes))
        self._srtt: Optional[float] = None
        self._rttvar = 0.0
        self._rto = self.ack_timeout
        self._err_bytes = float(self.ERR_PRIOR_BYTES)
        self._err_frames = 0.0
        self._in_hello = True  # no renegotiation inside the opening HELLO
        is_virtual = url.startswith(("socket://", "loop://", "rfc2217://")) or port is not None
        if byte_rate is not None:
            self._byte_rate = float(byte_rate) if byte_rate > 0 else None
        else:
            self._byte_rate = None if is_virtual else max(1.0, baudrate / 10.0)
        self._seq = 0
        self._reader = FrameReader()
        self._closed = False
        if port is None:
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
            self._write(DELIMITER)  # end any partial frame the chip has buffered
            self._hello(time_format)
            self._in_hello = False
            if take_over:
                self.lock(LockOp.TAKE_OVER)
        except BaseException:
            self.close()
            raise

    # -- link layer ------------------------------------------------------------------------------
    def _ctx(self, cmd: int, seq: Optional[int] = None) -> str:
        dev = getattr(self, "_info", None)
        who = f"{dev.device_id} at {self.url}" if dev is not None else self.url
        return f"{who} {cmd_name(cmd)}" + (f" (seq {seq})" if seq is not None else "")

    def _write(self, data: bytes, cmd: int = Cmd.HELLO, seq: Optional[int] = None) -> None:
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
        self._seq = self._seq % SEQ_MAX + 1
        return self._seq

    def _xfer_time(self, nbytes: int) -> float:
        return 0.0 if self._byte_rate is None else nbytes / self._byte_rate

    def _transact(self, cmd: int, payload: bytes = b"", flags: int = 0,
                  extra_timeout: float = 0.0, expect_bytes: int = 0,
                  splittable: bool = False) -> tuple[int, bytes]:
        """Send one frame and return (reply flags, reply payload reassembled from chunks).

        ``splittable``: the caller can send this payload again in smaller frames; when the
        frame is larger than the observed error rate allows and the chip has only NAKed it
        (so it cannot have executed it), :class:`_Resplit` is raised for the caller to do so.

        Recovery (docs/protocol.md, "Messages, chunks and retries"): the request is sent again,
        byte for byte, when the chip NAKs it, when nothing at all is heard for ``ack_timeout``,
        or when a reply frame arrived damaged before anything intact; missing or damaged chunks
        of a chunked reply are asked for with RESEND (answered from the chip's reply cache).
        An attempt that brings no new chunk within the full timeout counts against
        ``retries``; progress resets the count.
        """
        if self._closed:
            raise DeviceError(f"{self._ctx(cmd)}: device is closed")
        st = {"sends": 0, "gap": 0.0, "naks": 0, "damaged": False}
        try:
            result = self._exchange(cmd, payload, flags, extra_timeout, expect_bytes,
                                    splittable, st)
        finally:
            if self.adaptive:
                self._adapt_chunks()
        if self.adaptive and st["sends"] == 1:  # Karn: no sample from a resent request
            self._rtt_sample(st["gap"])
        return result

    def _exchange(self, cmd: int, payload: bytes, flags: int, extra_timeout: float,
                  expect_bytes: int, splittable: bool, st: dict) -> tuple[int, bytes]:
        """One request on the link: :class:`~hwloop.wire.serial_exchange.Exchange`."""
        return exchange(self, cmd, payload, flags, extra_timeout, expect_bytes, splittable, st)

    def _send(self, cmd: int, payload: bytes, flags: int = 0, extra_timeout: float = 0.0,
              expect_bytes: int = 0) -> bytes:
        """Send a message, chunked over several frames when larger than ``chunk_bytes``. When
        the link's error rate calls for smaller frames mid-message, the message starts over
        (a new chunk 0) in smaller chunks; the chip has executed none of it."""
        for attempt in range(32):
            splittable = attempt < 31
            try:
                if len(payload) <= self.chunk_bytes:
                    return self._transact(cmd, payload, flags, extra_timeout, expect_bytes,
                                          splittable=splittable)[1]
                parts = split_chunks(payload, self.chunk_bytes - CHUNK_HEADER.size)
                for i, part in enumerate(parts):
                    last = i == len(parts) - 1
                    reply = self._transact(cmd, part, flags | Flag.CHUNKED,
                                           extra_timeout if last else 0.0,
                                           expect_bytes if last else 0,
                                           splittable=splittable)[1]
                return reply
            except _Resplit:
                continue
        raise AssertionError("unreachable")  # the last attempt does not resplit

    # -- session ---------------------------------------------------------------------------------
    def _hello(self, time_format: str) -> None:
        reply = self._transact(Cmd.HELLO, HELLO_REQ.pack(PROTOCOL_VERSION,
                                                             self.reply_chunk_bytes))[1]
        if len(reply) < HELLO_REPLY.size:
            raise ProtocolError(f"{self.url}: HELLO reply too short")
        (version,) = HELLO_REPLY.unpack_from(reply)
        if version != PROTOCOL_VERSION:
            raise ProtocolError(f"{self.url}: chip speaks protocol {version}, host "
                                f"{PROTOCOL_VERSION}")
        doc = self._accept_hello(reply[HELLO_REPLY.size:], "HELLO JSON")
        self._choose_formats(doc, time_format)

    # -- transport hooks of HostDevice -----------------------------------------------------------
    @property
    def _label(self) -> str:
        return self.url

    def _ctx_run(self) -> str:
        return self._ctx(Cmd.RUN_BATCH)

    def status(self) -> dict:
        return json.loads(self._transact(Cmd.STATUS)[1].decode("utf-8"))

    def _program(self, spec: NetworkSpec) -> None:
        self._send(Cmd.PROGRAM, spec.model_dump_json().encode("utf-8"))

    def _reset(self) -> None:
        self._transact(Cmd.RESET)

    def _set_windows(self, arr: np.ndarray) -> None:
        self._transact(Cmd.SET_WINDOWS, WINDOWS_HDR.pack(arr.shape[0]) +
                       arr.astype(DT_F64).tobytes())

    def _weight_step(self, wide: bool) -> int:
        return (self.chunk_bytes - WRITE_WEIGHTS_HDR.size) // (4 if wide else 2)

    def _code_bytes(self, wide: bool) -> int:
        return code_dtype(wide).itemsize

    def _pieces(self, ranges: list[tuple[int, int]], per_piece, send_piece) -> None:
        """Send the index ranges in pieces of ``per_piece()`` items (the current frame size);
        ``send_piece(a, b, last)`` sends one. A piece the link's error rate turns out too large
        for (:class:`_Resplit`) is sent again in smaller pieces: partial writes are staged on
        the chip and applied on the last (COMMIT), so sending a range again is harmless."""
        work = list(reversed(ranges))
        resplits = 0
        while work:
            a, b = work.pop()
            e = min(b, a + max(1, per_piece()))
            last = not work and e == b
            try:
                send_piece(a, e, last, resplits < 64)
            except _Resplit:
                resplits += 1
                work.append((a, b))
                continue
            if e < b:
                work.append((e, b))

    def _send_weights(self, layer: int, flat: np.ndarray, scale: float, wide: bool,
                      todo: list[int], step: int, sparse: Optional[np.ndarray]) -> None:
        dt = code_dtype(wide)
        flags = Flag.WIDE if wide else 0
        if sparse is not None:
            def piece(a: int, b: int, last: bool, splittable: bool) -> None:
                idx = sparse[a:b]
                self._transact(Cmd.WRITE_WEIGHTS_SPARSE,
                               encode_sparse(layer, idx, flat[idx], scale, wide),
                               flags | (Flag.COMMIT if last else 0), splittable=splittable)

            self._pieces([(0, sparse.size)], lambda: (self.chunk_bytes - WRITE_WEIGHTS_SPARSE_HDR
                                                      .size) // (4 + dt.itemsize), piece)
        else:
            def piece(a: int, b: int, last: bool, splittable: bool) -> None:
                payload = WRITE_WEIGHTS_HDR.pack(layer, a, b - a, scale) + \
                    flat[a:b].astype(dt).tobytes()
                self._transact(Cmd.WRITE_WEIGHTS, payload,
                               flags | (Flag.COMMIT if last else 0), splittable=splittable)

            self._pieces([(s, min(s + step, flat.size)) for s in todo],
                         lambda: self._weight_step(wide), piece)

    def _weights_crc(self, layer: int) -> tuple[int, float, int]:
        return WEIGHTS_CRC_REPLY.unpack(
            self._transact(Cmd.WEIGHTS_CRC, LAYER.pack(layer))[1])

    def _threshold_step(self) -> int:
        return (self.chunk_bytes - WRITE_THRESHOLDS_HDR.size) // 8

    def _send_thresholds(self, layer: int, flat: np.ndarray, todo: list[int],
                         step: int) -> None:
        def piece(a: int, b: int, last: bool, splittable: bool) -> None:
            payload = WRITE_THRESHOLDS_HDR.pack(layer, a, b - a) + \
                flat[a:b].astype(DT_F64).tobytes()
            self._transact(Cmd.WRITE_THRESHOLDS, payload, Flag.COMMIT if last else 0,
                           splittable=splittable)

        self._pieces([(s, min(s + step, flat.size)) for s in todo], self._threshold_step, piece)

    def _read_thr_flat(self, layer: int, n: int) -> np.ndarray:
        step = (MAX_MESSAGE - COUNT.size) // 8  # the chip splits the reply into frames
        out = np.zeros(n, dtype=np.float64)
        for s in range(0, n, step):
            cnt = min(step, n - s)
            reply = self._transact(Cmd.READ_THRESHOLDS, READ_RANGE.pack(layer, s, cnt),
                                   expect_bytes=8 * cnt)[1]
            got = COUNT.unpack_from(reply)[0] if len(reply) >= COUNT.size else -1
            if got != cnt or len(reply) != COUNT.size + 8 * cnt:
                raise ProtocolError(f"{self._ctx(Cmd.READ_THRESHOLDS)}: asked {cnt} values, got "
                                    f"{got}")
            out[s:s + cnt] = np.frombuffer(reply, DT_F64, cnt, COUNT.size)
        return out

    def _run_exchange(self, arr: np.ndarray, b: int, expect: int) -> bytes:
        payload = self._run_request(arr)
        return self._send(Cmd.RUN_BATCH, payload, Flag.F64_TIMES if self.f64 else 0,
                          extra_timeout=self.per_sample_timeout_s * b, expect_bytes=expect)

    # -- commands of the frame dialect -----------------------------------------------------------
    def lock(self, op: int = LockOp.QUERY) -> dict:
        """Control of the chip (LOCK): ``{"owner": address or None, "you": bool}`` after
        ``op`` (QUERY, REQUEST: BUSY DeviceError while another link has it, RELEASE,
        TAKE_OVER)."""
        if FEATURE_LOCK not in self._features:
            raise DeviceError(f"{self._ctx(Cmd.LOCK)}: the chip has no LOCK command")
        return json.loads(self._transact(Cmd.LOCK, LOCK_PAYLOAD.pack(int(op)))[1])

    def seed_noise(self, seed: int) -> None:
        """Reseed the chip's random jitter (SEED_NOISE); a chip that cannot (UNSUPPORTED or an
        older firmware without the command) ignores it, as the contract allows."""
        try:
            self._transact(Cmd.SEED_NOISE, SEED.pack(int(seed) & 0xFFFFFFFFFFFFFFFF))
        except DeviceError as e:
            if getattr(e, "code", None) not in (Err.UNSUPPORTED, Err.UNKNOWN_COMMAND):
                raise

    # -- read-back -------------------------------------------------------------------------------
    def read_weights(self, layer: int) -> tuple[torch.Tensor, float]:
        spec = self._layer(layer, WEIGHT_KINDS)
        n = math.prod(spec.weight_shape)
        wide = self._info.weight_bits > 16
        dt = code_dtype(wide)
        # one request per MAX_MESSAGE worth of codes: the chip splits the reply into frames
        step = (MAX_MESSAGE - READ_WEIGHTS_REPLY.size) // dt.itemsize
        out = np.zeros(n, dtype=np.int64)
        scale = 0.0
        for s in range(0, max(n, 1), step):
            cnt = min(step, n - s)
            reply = self._transact(Cmd.READ_WEIGHTS, READ_RANGE.pack(layer, s, cnt),
                                   Flag.WIDE if wide else 0, expect_bytes=cnt * dt.itemsize)[1]
            if len(reply) < READ_WEIGHTS_REPLY.size:
                raise ProtocolError(f"{self._ctx(Cmd.READ_WEIGHTS)}: reply of {len(reply)} "
                                    "bytes is shorter than its header")
            scale, got = READ_WEIGHTS_REPLY.unpack_from(reply)
            if got != cnt or len(reply) != READ_WEIGHTS_REPLY.size + cnt * dt.itemsize:
                raise ProtocolError(f"{self._ctx(Cmd.READ_WEIGHTS)}: asked {cnt} codes, got "
                                    f"{got} in {len(reply)} bytes")
            out[s:s + cnt] = np.frombuffer(reply, dt, cnt, READ_WEIGHTS_REPLY.size)
        return torch.from_numpy(out.reshape(spec.weight_shape)), float(scale)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        port = self._port
        sock = getattr(port, "_socket", None)
        if type(port).__module__ == "serial.urlhandler.protocol_socket" and sock is not None:
            # what pyserial's close does, without its 0.3 s sleep "for quick reconnects"
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass
            port._socket = None
            port.is_open = False
            return
        try:
            port.close()
        except Exception:
            pass
