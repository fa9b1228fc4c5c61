"""One request of :class:`hwloop.wire.serial_device.SerialDevice` on the link: the retry / RESEND
state machine (docs/protocol.md, "Messages, chunks and retries").

:class:`Exchange` sends a request frame and collects its reply, in small named steps:

* :meth:`Exchange.send_request` / :meth:`Exchange.send_resend`: (re)send the request byte for
  byte, or ask for missing reply chunks by index (RESEND);
* :meth:`Exchange.await_reply`: wait for bytes until the next thing to do is due;
* :meth:`Exchange.on_frame`, :meth:`Exchange.on_nak`, :meth:`Exchange.on_chunk`: take what
  arrived;
* :meth:`Exchange.recover`: decide what to send next after a NAK, the end of a round of
  chunks, a quiet link, total silence (nudge) or the attempt timeout.

:class:`_Resplit` tells the caller to send a payload again in smaller frames.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from hwloop.errors import DeviceError, DeviceTimeout, ProtocolError
from hwloop.wire.codec import MAX_MESSAGE, PROTOCOL_VERSION, chip_error
from hwloop.wire.frame import (CHUNK_HEADER, Cmd, FRAME_OVERHEAD, Flag, Frame, FrameFault,
                               MAX_RESEND, RESEND_HDR, cmd_name, encode_frame,
                               parse_error_payload, resend_payload)

Reply = tuple[int, bytes]


class _Resplit(Exception):
    """A frame too large for the link's error rate was only ever NAKed: send it again in
    smaller frames (internal to SerialDevice)."""


#: Requests the chip stages (applied only with COMMIT, to the same values when sent again): the
#: host may resend them in smaller frames even after a damaged frame from the chip, which may
#: have been the reply of an executed piece (a RUN_BATCH may not: it would run twice).
STAGED_WRITES = frozenset({Cmd.WRITE_WEIGHTS, Cmd.WRITE_WEIGHTS_SPARSE, Cmd.WRITE_THRESHOLDS})


class Exchange:
    """The state of one request and its reply while it is on the link; ``dev`` is the
    :class:`~hwloop.wire.serial_device.SerialDevice` (its link, health and adaptation state).

    ``st`` is shared with the caller (:meth:`SerialDevice._transact`): ``sends`` (frames sent),
    ``gap`` (the longest silence before an intact reply frame, the RTT sample), ``naks``
    (NAKs of our own frame) and ``damaged`` (a reply frame arrived damaged).
    """

    def __init__(self, dev: Any, cmd: int, payload: bytes, flags: int,
                 extra_timeout: float, expect_bytes: int, splittable: bool, st: dict):
        self.dev, self.cmd, self.payload, self.splittable, self.st = \
            dev, cmd, payload, splittable, st
        self.seq = dev._next_seq()
        self.wire = encode_frame(Frame(self.seq, int(cmd), int(flags), payload))
        self.long_t = dev.timeout + extra_timeout + dev._xfer_time(len(self.wire) + expect_bytes)
        self.nudge_t = self._nudge_after()
        # quiet time before asking again for a damaged or missing reply frame
        self.idle_t = dev.RESEND_IDLE_S if dev._srtt is None else \
            min(max(dev.RESEND_IDLE_S, dev._srtt + 4 * dev._rttvar), dev.max_ack_timeout)
        self.max_ask = max(1, min(MAX_RESEND, (dev.chunk_bytes - RESEND_HDR.size) // 2))
        self.chunks: dict[int, bytes] = {}
        self.size = 0
        self.total: Optional[int] = None
        self.life = False  # the chip has shown that it holds this request (PENDING or a reply)
        self.last_sent = len(self.wire)
        self.heard = self.corrupt = False
        self.round_last: Optional[int] = None
        self.round_max = -1
        self.last_io = 0.0
        self.deadline = 0.0
        self.fruitless = 0
        self.nak = self.round_end = False  # of the bytes read last

    def _ctx(self) -> str:
        return self.dev._ctx(self.cmd, self.seq)

    def _nudge_after(self) -> Optional[float]:
        t = self.dev._rto + self.dev._xfer_time(len(self.wire))
        return None if t >= self.long_t else t  # the attempt timeout comes first anyway

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> Reply:
        """Send the request and return (reply flags, reply payload reassembled from chunks)."""
        self.send("request")
        self.deadline = self.last_io + self.long_t
        while True:
            data = self.await_reply()
            now = time.monotonic()
            self.nak = self.round_end = False
            if data:
                reply = self.take(data, now)
                if reply is not None:
                    return reply
            self.recover(now)

    def await_reply(self) -> bytes:
        """Read what arrives until the deadline, the nudge or the RESEND idle time is due."""
        now = time.monotonic()
        wake = self.deadline
        if self.nudge_t is not None:
            wake = min(wake, self.last_io + self.nudge_t)
        if self.corrupt or self.total is not None:
            wake = min(wake, self.last_io + self.idle_t)
        return self.dev._read_some(wake - now, self.cmd, self.seq)

    # -- sending ---------------------------------------------------------------------------------
    def send(self, reason: str) -> None:
        """Send the request again, or a RESEND once the chip has shown it holds the request."""
        if self.total is not None or self.life:
            self.send_resend(reason)
        else:
            self.send_request()
        self.st["sends"] += 1
        self.dev.health["frames_tx"] += 1
        self.heard = self.corrupt = False
        self.round_max = -1
        self.last_io = time.monotonic()

    def send_request(self) -> None:
        """The request frame, byte for byte (same sequence number)."""
        self.dev._write(self.wire, self.cmd, self.seq)
        self.last_sent = len(self.wire)
        if self.st["sends"]:
            self.dev.health["retries"] += 1
        self.round_last = None if self.total is None else self.total - 1

    def send_resend(self, reason: str) -> None:
        """RESEND of the reply chunks still missing (see :meth:`resend_list`)."""
        ask = self.resend_list(reason)
        frame = encode_frame(Frame(self.seq, Cmd.RESEND, 0, resend_payload(ask)))
        self.dev._write(frame, self.cmd, self.seq)
        self.last_sent = len(frame)
        self.dev.health["resends"] += 1
        self.round_last = max(ask) if self.total is not None else None

    def resend_list(self, reason: str) -> list[int]:
        """The chunk indices to ask for (at most ``max_ask``)."""
        if self.total is None:
            return [0]  # the whole reply frame (or chunk 0, which names the total)
        missing = [i for i in range(self.total) if i not in self.chunks]
        if reason == "quiet" and self.round_max >= 0:
            # the stream may only have paused: ask for the gaps it has passed, and for the
            # last chunk of the round
            ask = [i for i in missing if i < self.round_max]
            if self.round_last is not None and self.round_last in missing and \
                    self.round_last not in ask:
                ask.append(self.round_last)
            ask = ask or missing
        else:
            ask = missing
        return ask[:self.max_ask]

    # -- receiving -------------------------------------------------------------------------------
    def take(self, data: bytes, now: float) -> Optional[Reply]:
        """Feed bytes to the frame reader; the reply once it is complete."""
        gap = now - self.last_io
        self.last_io = now
        for ev in self.dev._reader.feed(data):
            if isinstance(ev, FrameFault):
                self.on_fault(ev)
                continue
            reply = self.on_frame(ev, gap, now)
            if reply is not None:
                return reply
        return None

    def on_fault(self, ev: FrameFault) -> None:
        """Most likely a reply of ours, damaged (or our banner/garbage)."""
        dev = self.dev
        dev.health["crc_errors" if ev.kind == "crc" else "resyncs"] += 1
        self.corrupt = True
        self.st["damaged"] = True
        dev._observe(dev.reply_chunk_bytes + FRAME_OVERHEAD, 1)

    def on_nak(self) -> None:
        self.dev.health["naks"] += 1
        self.nak = True
        if not self.heard:
            self.dev._observe(self.last_sent, 1)  # our last frame arrived damaged
            self.st["naks"] += 1

    def on_frame(self, ev: Frame, gap: float, now: float) -> Optional[Reply]:
        """An intact frame: a NAK, our request echoed, a stale frame, or a reply (frame)."""
        dev, cmd, seq = self.dev, self.cmd, self.seq
        dev.health["frames_rx"] += 1
        dev._observe(len(ev.payload) + FRAME_OVERHEAD, 0)
        if ev.cmd == Cmd.NAK and ev.is_reply and ev.version == PROTOCOL_VERSION:
            self.on_nak()
            return None
        if not ev.is_reply and ev.version == PROTOCOL_VERSION and ev.seq == seq \
                and ev.cmd == cmd:
            raise DeviceError(
                f"{self._ctx()}: the link sends our own request back (a loopback such as "
                f"loop:// or a looped cable): no chip answers on {dev.url}")
        if not ev.is_reply or ev.seq != seq or ev.version != PROTOCOL_VERSION:
            dev.health["stale_frames"] += 1
            return None
        self.st["gap"] = max(self.st["gap"], gap)  # the longest silence the chip kept
        if not self.heard:
            dev._observe(self.last_sent, 0)  # our last frame arrived intact
        self.heard = self.life = True
        if ev.flags & Flag.PENDING and not ev.payload:
            return None
        if ev.cmd == Cmd.ERROR:
            code, msg = parse_error_payload(ev.payload)
            raise chip_error(code, msg, self._ctx())
        if ev.cmd != cmd:
            raise ProtocolError(f"{self._ctx()}: reply carries command {cmd_name(ev.cmd)}")
        if not ev.flags & Flag.CHUNKED:
            return ev.flags, ev.payload
        return self.on_chunk(ev, now)

    def on_chunk(self, ev: Frame, now: float) -> Optional[Reply]:
        """One chunk of a chunked reply; the reassembled reply once every chunk is there."""
        if len(ev.payload) < CHUNK_HEADER.size:
            raise ProtocolError(f"{self._ctx()}: chunk shorter than its header")
        idx, tot = CHUNK_HEADER.unpack_from(ev.payload)
        if self.total is None:
            self.total = tot
            if self.round_last is None:
                self.round_last = tot - 1
        if tot != self.total or idx >= self.total:
            raise ProtocolError(f"{self._ctx()}: inconsistent chunk {idx}/{tot}")
        self.round_max = max(self.round_max, idx)
        if idx not in self.chunks:
            self.size += len(ev.payload) - CHUNK_HEADER.size
            if self.size > MAX_MESSAGE:
                raise ProtocolError(f"{self._ctx()}: reply exceeds MAX_MESSAGE")
            self.chunks[idx] = ev.payload[CHUNK_HEADER.size:]
            self.deadline = now + self.long_t  # progress
            self.fruitless = 0
            if len(self.chunks) == self.total:
                return ev.flags, b"".join(self.chunks[i] for i in range(self.total))
        if idx == self.round_last:
            self.round_end = True
        return None

    # -- recovery --------------------------------------------------------------------------------
    def recover(self, now: float) -> None:
        """Send again when something calls for it (in this order): a NAK of our frame, the end
        of a round of chunks, a quiet link with a reply under way, silence, the timeout."""
        if self.nak and not self.heard:
            self.after_nak()
        elif self.round_end:
            self.send("round")  # the round is over; what is missing now is lost
        elif (self.corrupt or self.total is not None) and now - self.last_io >= self.idle_t:
            self.send("quiet")
        elif self.nudge_t is not None and now - self.last_io >= self.nudge_t:
            self.nudge()
        elif now >= self.deadline:
            self.on_timeout()

    def after_nak(self) -> None:
        """Our last frame arrived damaged: send it again at once, or (only NAKs so far, so the
        chip has not executed it) have the caller send it in smaller frames."""
        dev, st = self.dev, self.st
        # a damaged frame from the chip may be a damaged NAK as well as the reply of an executed
        # request: it blocks the resplit only where executing twice would matter
        if self.splittable and not self.life and st["naks"] >= 2 and \
                (not st["damaged"] or self.cmd in STAGED_WRITES) and \
                len(self.payload) > dev._target_chunk(dev.chunk_bytes, dev.max_chunk_bytes):
            dev.health["resplits"] = dev.health.get("resplits", 0) + 1
            raise _Resplit()
        self.send("nak")

    def nudge(self) -> None:
        """Nothing at all was heard: the request (or RESEND) was lost; RFC 6298 back-off."""
        dev = self.dev
        dev.health["nudges"] += 1
        if dev.adaptive and not self.heard:
            dev._rto = min(2 * dev._rto, dev.max_ack_timeout)
            self.nudge_t = self._nudge_after()
        self.send("nudge")

    def on_timeout(self) -> None:
        """An attempt without progress; after ``retries`` of them, :class:`DeviceTimeout`."""
        dev = self.dev
        if not self.corrupt:
            dev.health["timeouts"] += 1
        self.fruitless += 1
        if self.fruitless > dev.retries:
            raise DeviceTimeout(
                f"{self._ctx()}: no valid reply after {self.st['sends']} attempts "
                f"({dev.retries + 1} of {self.long_t:.3g} s without progress)")
        self.send("timeout")
        self.deadline = time.monotonic() + self.long_t


def exchange(dev: Any, cmd: int, payload: bytes, flags: int, extra_timeout: float,
             expect_bytes: int, splittable: bool, st: dict) -> Reply:
    """Run one :class:`Exchange` of ``dev``."""
    return Exchange(dev, cmd, payload, flags, extra_timeout, expect_bytes, splittable, st).run()
