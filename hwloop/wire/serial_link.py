"""Link adaptation of :class:`hwloop.wire.serial_device.SerialDevice` (docs/protocol.md,
"Adaptive timeouts and chunk sizes"): the silence timeout follows the measured round trip
(RFC 6298), and frame payloads shrink when frames arrive damaged and grow back on a clean link.

:class:`LinkAdaptation` is a mixin: it keeps its state on the device (``_srtt``, ``_rttvar``,
``_rto``, ``_err_bytes``, ``_err_frames``, the chunk sizes and their bounds, ``health``) and
renegotiates the reply frame size with the device's ``_transact`` (HELLO).
"""

from __future__ import annotations

from hwloop.wire.codec import HELLO_REQ, PROTOCOL_VERSION
from hwloop.wire.frame import Cmd


class LinkAdaptation:
    """RTT estimate, error-rate estimate and the frame sizes they call for."""

    #: Clean bytes the error estimate starts from, and the frames it decays over (it covers
    #: about the last ERR_WINDOW_FRAMES frames, both directions).
    ERR_PRIOR_BYTES = 32 * 1024
    ERR_WINDOW_FRAMES = 256
    #: Damaged frames needed before the chunk sizes change at all.
    ERR_MIN_FRAMES = 4
    #: Frame size at which a frame is damaged with probability about 1 - exp(-ERR_TARGET).
    ERR_TARGET = 0.5

    def _rtt_sample(self, r: float) -> None:
        """RFC 6298: smoothed RTT and its variance; RTO = SRTT + max(G, 4 RTTVAR)."""
        r = max(r, 0.0)
        if self._srtt is None:
            self._srtt, self._rttvar = r, r / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - r)
            self._srtt = 0.875 * self._srtt + 0.125 * r
        g = 0.01 + self._srtt / 4  # granularity: a shared host's scheduling jitter
        self._rto = min(max(self._srtt + max(g, 4 * self._rttvar), self.ack_timeout),
                        self.max_ack_timeout)
        self.health["rto_ms"] = round(1000 * self._rto, 3)

    def _observe(self, nbytes: int, damaged: int) -> None:
        """One frame (either direction) of ``nbytes`` seen intact (0) or damaged (>= 1)."""
        k = 1.0 - 1.0 / self.ERR_WINDOW_FRAMES  # forget old frames: grow back when clean
        self._err_bytes = self._err_bytes * k + nbytes
        self._err_frames = self._err_frames * k + damaged

    def _target_chunk(self, current: int, most: int) -> int:
        """The frame payload size for the error rate observed so far (shrinks at once, grows
        back by at most 2x per decision)."""
        if not self.adaptive or self._err_frames < self.ERR_MIN_FRAMES and current >= most:
            return current
        rate = self._err_frames / max(self._err_bytes, 1.0)
        want = most if rate <= 0 else int(self.ERR_TARGET / rate)
        want = max(self.min_chunk_bytes, min(most, want))
        if want < 0.75 * current:
            return want
        if want > 1.5 * current or (want == most > current and
                                    self.ERR_TARGET / max(rate, 1e-12) > 1.5 * current):
            return min(want, 2 * current)
        return current

    def _adapt_chunks(self) -> None:
        self.chunk_bytes = self._target_chunk(self.chunk_bytes, self.max_chunk_bytes)
        self.health["chunk_bytes"] = self.chunk_bytes
        want = self._target_chunk(self.reply_chunk_bytes, self.max_reply_chunk_bytes)
        if want != self.reply_chunk_bytes and not self._in_hello:
            # a new HELLO sets the chip's reply frame size (it changes nothing else)
            self._in_hello = True
            try:
                self._transact(Cmd.HELLO, HELLO_REQ.pack(PROTOCOL_VERSION, want))
                self.reply_chunk_bytes = want
                self.health["reply_chunk_bytes"] = want
            finally:
                self._in_hello = False
