"""The link half of :class:`hwloop.wire.visa_device.VisaDevice`: hang-up detection, waiting for
replies, timeouts told apart from dead links, and resynchronisation of the reply stream.

pyvisa-py keeps polling a TCP socket until its timeout after the peer has closed it; on
``TCPIP::...::SOCKET`` resources replies are awaited here (select + MSG_PEEK) and a hang-up
raises :class:`DeviceError` at once. On other resources a timed-out reply is followed by a short
``*IDN?`` probe that tells a dead link (DeviceError) from a slow chip (DeviceTimeout).

:class:`VisaLink` is a mixin: it uses the device's ``resource``, ``timeout``, ``health``,
``_rm``, ``_inst``, ``_closed``, ``_failed``, ``_unsynced``, ``resync_timeout`` and its
``_send`` (one SCPI line).
"""

from __future__ import annotations

import os
import secrets
import select
import socket
import time
from typing import Optional

import pyvisa

from hwloop.errors import DeviceError, DeviceTimeout


class VisaLink:
    """Link checks, reply waits and resynchronisation of a VISA resource."""

    # -- link ------------------------------------------------------------------------------------
    def _session(self):
        """The pyvisa-py TCPIP socket session, or None for other resources / backends."""
        try:
            sess = self._rm.visalib.sessions[self._inst.session]
        except Exception:
            return None
        return sess if isinstance(getattr(sess, "interface", None), socket.socket) else None

    def _check_connected(self) -> None:
        """pyvisa-py opens a ``::SOCKET`` resource whose connection failed without a word;
        say so here (connection refused, unreachable) instead of a hang-up at the first
        command."""
        sess = self._session()
        if sess is None:
            return
        try:
            sess.interface.getpeername()
            return
        except OSError:
            pass
        try:
            err = sess.interface.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            err = 0
        why = os.strerror(err).lower() if err else "not connected"
        raise DeviceError(f"cannot open VISA resource {self.resource!r}: {why} (is a chip "
                          "served at that address and port?)")

    def _peer_closed(self, sess) -> bool:
        try:
            data = sess.interface.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        return data == b""

    def _hangup(self, what: str) -> DeviceError:
        return DeviceError(f"{self.resource}: peer hung up during {what}")

    def _ensure_alive(self, what: str) -> None:
        if self._closed:
            raise DeviceError(f"{self.resource}: device is closed")
        if self._failed is not None:
            raise DeviceError(f"{self._failed} (failed earlier; close and reopen the device)")
        sess = self._session()
        if sess is not None and not getattr(sess, "_pending_buffer", None) and \
                self._peer_closed(sess):
            raise self._hangup(what)

    def _wait_reply(self, what: str, timeout: float) -> None:
        """Wait until reply bytes are there (socket resources); hang-up -> DeviceError."""
        sess = self._session()
        if sess is None:
            return
        deadline = time.monotonic() + timeout
        while True:
            if getattr(sess, "_pending_buffer", None):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.health["timeouts"] += 1
                raise DeviceTimeout(f"{self.resource}: no reply to {what} within {timeout:.3g} s")
            try:
                r, _, _ = select.select([sess.interface], [], [], min(remaining, 0.2))
            except (OSError, ValueError) as e:
                raise self._hangup(what) from e
            if r:
                if self._peer_closed(sess):
                    raise self._hangup(what)
                return

    def _io(self, what: str, fn, *args, timeout: Optional[float] = None, **kw):
        t = self.timeout if timeout is None else timeout
        try:
            self._inst.timeout = int(t * 1000)
            return fn(*args, **kw)
        except pyvisa.errors.VisaIOError as e:
            if e.error_code == pyvisa.constants.StatusCode.error_timeout:
                self.health["timeouts"] += 1
                if not self._probe():
                    raise DeviceError(f"{self.resource}: no reply to {what} and the chip does not "
                                      f"answer *IDN? (hung up?): {e}") from e
                raise DeviceTimeout(f"{self.resource}: {what} timed out after {t:.3g} s") from e
            raise DeviceError(f"{self.resource}: {what} failed: {e}") from e
        except (OSError, ValueError) as e:
            raise DeviceError(f"{self.resource}: {what} failed (peer hung up?): {e}") from e

    def _probe(self) -> bool:
        sess = self._session()
        if sess is not None:
            return not self._peer_closed(sess)
        try:
            self._inst.timeout = 500
            self._inst.query("*IDN?")
            return True
        except Exception:
            return False

    # -- resynchronisation -----------------------------------------------------------------------
    def _resync(self) -> None:
        """Bring the reply stream back in step after a command that did not complete.

        Device clear (``clear()``) on resources that support it (not ``::SOCKET``, where
        pyvisa-py's clear only drains what has arrived so far), then ``*CLS`` (the unfinished
        command's errors must not be blamed on the next one), ``HWL:TFOR`` (in case the chip
        executed a ``*RST``) and ``HWL:ECHO? <fresh random token>``; every byte read before the
        token's echo is discarded (counted in ``health["discarded_bytes"]``).

        Raises:
            DeviceError: (not a DeviceTimeout) the echo did not come within ``resync_timeout``,
                or the link failed meanwhile; the device is failed and every later call raises
                the same error. An interrupt (KeyboardInterrupt) leaves the device to be
                resynchronised again by the next call.
        """
        what, t_failed = self._unsynced
        bound = self.resync_timeout if self.resync_timeout is not None else \
            self.timeout + 2 * t_failed
        token = f"hwl-sync-{secrets.token_hex(8)}"
        self.health["resyncs"] += 1
        try:
            if self._session() is None:
                try:
                    self._inst.clear()
                except Exception:  # not every resource/backend has a device clear
                    pass
            self._send("*CLS")
            self._send("HWL:TFOR " + ("F64" if getattr(self, "f64", False) else "TICK"))
            self._send(f"HWL:ECHO? {token}")
            self._read_until(token, bound)
        except DeviceError as e:
            self._failed = (f"{self.resource}: replies out of step: {what} did not complete and "
                            f"resynchronising failed (no echo of the HWL:ECHO? marker; waited up "
                            f"to {bound:.3g} s): {e}")
            raise DeviceError(self._failed + "; close and reopen the device") from e
        self._unsynced = None

    def _read_until(self, token: str, bound: float) -> None:
        """Read and discard until the line holding ``token`` has arrived, within ``bound`` s.

        Raises:
            DeviceTimeout: no echo in time. DeviceError: the peer hung up or the read failed.
        """
        want = token.encode("ascii")
        deadline = time.monotonic() + bound
        buf = bytearray()
        discarded = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.health["discarded_bytes"] += discarded + len(buf)
                raise DeviceTimeout(f"{self.resource}: no echo of the resync marker within "
                                    f"{bound:.3g} s")
            self._wait_reply("HWL:ECHO?", remaining)
            try:
                self._inst.timeout = max(1, int((deadline - time.monotonic()) * 1000))
                got = self._inst.read_raw()
            except pyvisa.errors.VisaIOError as e:
                if e.error_code != pyvisa.constants.StatusCode.error_timeout:
                    raise DeviceError(f"{self.resource}: read failed while resynchronising: "
                                      f"{e}") from e
                continue  # the deadline check above decides
            except (OSError, ValueError) as e:
                raise DeviceError(f"{self.resource}: read failed while resynchronising (peer "
                                  f"hung up?): {e}") from e
            self.health["bytes_rx"] += len(got)
            buf += got
            i = buf.find(want)
            if i < 0:
                keep = len(want) - 1  # a token split across two reads
                discarded += max(0, len(buf) - keep)
                del buf[:max(0, len(buf) - keep)]
                continue
            nl = buf.find(b"\n", i + len(want))
            if nl < 0:
                continue  # the rest of the echo line is on its way
            # the token is fresh and random: its echo cannot be part of an earlier reply, and
            # nothing was sent after it, so nothing follows but the end of its line
            discarded += i + (len(buf) - nl - 1)
            self.health["discarded_bytes"] += discarded
            return
