"""The chip's side of a link: connections (a socket or a pty, full duplex), the faults injected
on them, the loop that serves one link whatever its dialect, and the accept loop of a TCP chip.

The link knows no dialect: a session (:class:`~hwloop.chip.frame_session.FrameSession`,
:class:`~hwloop.chip.scpi_session.ScpiSession`) turns received bytes into
:class:`~hwloop.chip.core.Unit` objects, and :func:`serve_link` runs them (fault injection,
heartbeats, replies) and logs why it closes the link.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from hwloop.chip.core import log
from hwloop.wire.frame import MAX_ENCODED


@dataclass
class FaultConfig:
    """Link faults the virtual chip injects (both directions, seeded).

    ``bit_flip_rate``: probability per byte of flipping one random bit; ``drop_rate`` /
    ``dup_rate``: probability per frame of dropping / sending twice; ``delay_s``: added before
    every reply; ``disconnect_after``: close the link when the N-th frame (SCPI: command) arrives,
    without answering it. The SCPI dialect has no integrity layer, so it accepts only
    ``delay_s`` and ``disconnect_after``.
    """

    bit_flip_rate: float = 0.0
    drop_rate: float = 0.0
    dup_rate: float = 0.0
    delay_s: float = 0.0
    disconnect_after: Optional[int] = None
    seed: int = 0

    def __post_init__(self):
        for name in ("bit_flip_rate", "drop_rate", "dup_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}={v} must lie in [0, 1]")
        if self.delay_s < 0:
            raise ValueError(f"delay_s={self.delay_s} must be >= 0")
        if self.disconnect_after is not None and self.disconnect_after < 1:
            raise ValueError(f"disconnect_after={self.disconnect_after} must be >= 1")


class Faults:
    """The seeded fault injector of one link (:class:`FaultConfig`)."""

    def __init__(self, cfg: FaultConfig, conn_index: int):
        self.cfg = cfg
        self.rng = np.random.default_rng([cfg.seed, conn_index])
        self.stats = {"flipped_bits": 0, "dropped": 0, "duplicated": 0}

    def flip(self, data: bytes) -> bytes:
        rate = self.cfg.bit_flip_rate
        if rate <= 0 or not data:
            return data
        k = int(self.rng.binomial(len(data), rate))
        if not k:
            return data
        arr = np.frombuffer(data, np.uint8).copy()
        pos = self.rng.integers(0, len(data), k)
        bits = self.rng.integers(0, 8, k).astype(np.uint8)
        np.bitwise_xor.at(arr, pos, np.left_shift(np.uint8(1), bits))
        self.stats["flipped_bits"] += k
        return arr.tobytes()

    def drop(self) -> bool:
        if self.cfg.drop_rate > 0 and self.rng.random() < self.cfg.drop_rate:
            self.stats["dropped"] += 1
            return True
        return False

    def dup(self) -> bool:
        if self.cfg.dup_rate > 0 and self.rng.random() < self.cfg.dup_rate:
            self.stats["duplicated"] += 1
            return True
        return False


class Connection:
    """A byte link on the chip side: a connected socket or a pty master fd (non-blocking).

    Full duplex: while a reply waits for room in the link, incoming bytes are still read (into
    an inbox that :meth:`recv` returns first), so a host that writes while the chip writes can
    never deadlock the pair.
    """

    def __init__(self, sock: Optional[socket.socket] = None, fd: Optional[int] = None):
        self.sock, self.fd = sock, fd
        if sock is not None:
            sock.setblocking(False)
        else:
            os.set_blocking(fd, False)
        self.closed = False
        self.eof = False
        self.discarded = 0  # bytes thrown away while a reply could not be sent
        self._inbox = bytearray()

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else self.fd

    def alive(self) -> bool:
        """False once the link is closed or the peer has hung up (a peek, consumes nothing;
        safe from another thread)."""
        if self.closed or self.eof:
            return False
        if self.sock is None:
            return True
        try:
            data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        return bool(data)

    def _read_now(self) -> Optional[bytes]:
        try:
            data = self.sock.recv(65536) if self.sock is not None else os.read(self.fd, 65536)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError:
            return None
        return data if data else None

    def recv(self, timeout: float) -> Optional[bytes]:
        """Bytes available within ``timeout`` (b"" if none); None when the peer hung up."""
        if self._inbox:
            data = bytes(self._inbox)
            self._inbox.clear()
            return data
        if self.closed or self.eof:
            return None
        try:
            r, _, _ = select.select([self.fileno()], [], [], timeout)
        except (OSError, ValueError):
            return None
        if not r:
            return b""
        return self._read_now()

    def send(self, data: bytes) -> bool:
        """Send all of ``data``; False when the link is gone. Incoming bytes are read only while
        the link has no room for ours (so that neither side can block the other), into an inbox
        of at most ``4 * MAX_ENCODED`` bytes; a peer that talks past that without reading loses
        the excess (counted in ``discarded``; its frames are retried like damaged ones)."""
        view = memoryview(data)
        while view:
            if self.closed:
                return False
            try:
                r, w, _ = select.select([] if self.eof else [self.fileno()], [self.fileno()], [],
                                        0.5)
            except (OSError, ValueError):
                return False
            if w:
                try:
                    n = self.sock.send(view) if self.sock is not None else os.write(self.fd, view)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    return False
                view = view[n:]
            elif r:
                got = self._read_now()
                if got is None:
                    self.eof = True
                elif len(self._inbox) + len(got) > 4 * MAX_ENCODED:
                    if not self.discarded:
                        log.warning("virtual chip: the peer keeps sending while it does not read; "
                                    "discarding its bytes until it does")
                    self.discarded += len(got)
                else:
                    self._inbox += got
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.sock is not None:
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self.sock.close()
            else:
                os.close(self.fd)
        except OSError:
            pass


class _Sender:
    """Sends through the fault injector, one reply at a time (heartbeats share the link)."""

    def __init__(self, conn: Connection, faults: Faults, stats: dict):
        self.conn, self.faults, self.stats = conn, faults, stats
        self.lock = threading.Lock()

    def emit(self, data: bytes) -> bool:
        """Send ``data`` (maybe dropped, damaged or doubled); False when the link is gone."""
        with self.lock:
            if self.faults.drop():
                return True
            out = self.faults.flip(data)
            for _ in range(2 if self.faults.dup() else 1):
                if not self.conn.send(out):
                    return False
                self.stats["bytes_tx"] += len(out)
        return True

    @contextlib.contextmanager
    def heartbeat(self, data: bytes, interval_s: float):
        """While the body runs: send ``data`` now and every ``interval_s``."""
        done = threading.Event()

        def beat():
            while not done.wait(interval_s):
                if not self.emit(data):
                    return

        self.emit(data)
        t = threading.Thread(target=beat, daemon=True, name="hwloop-chip-pending")
        t.start()
        try:
            yield
        finally:
            done.set()
            t.join()


#: What :func:`serve_link` says when the link failed under a reply.
_GONE = "the link failed while sending a reply (peer hung up?)"


def _run_units(session, data: bytes, sender: _Sender, faults: Faults, stats: dict,
               count: list, name: str) -> Optional[str]:
    """Run the units of ``data``; the reason to close the link, or None to go on."""
    cfg = faults.cfg
    for unit in session.receive(faults.flip(data)):
        before = count[0]
        count[0] += unit.commands
        if unit.damaged:
            stats["bad_frames"] += 1
        if cfg.disconnect_after is not None and before < cfg.disconnect_after <= count[0]:
            stats["disconnects"] += 1  # hang up instead of answering the N-th command
            return f"disconnect_after={cfg.disconnect_after} (injected fault)"
        if unit.droppable and faults.drop():
            continue
        try:
            replies = unit.run(sender.heartbeat)
        except Exception as e:  # a bug, not the host's fault: answer it and keep serving
            if unit.fail is None:
                raise
            log.exception("virtual chip %s: %s failed", name, unit.label)
            stats["internal_errors"] = stats.get("internal_errors", 0) + 1
            replies = unit.fail(e)
        if replies and unit.delayed and cfg.delay_s:
            time.sleep(cfg.delay_s)
        for r in replies:
            if not sender.emit(r):
                return _GONE
    return None


def serve_link(conn: Connection, session, faults: Faults, stop: threading.Event, stats: dict,
               name: str = "link", idle_timeout: Optional[float] = None,
               on_close: Optional[Callable] = None) -> None:
    """Serve one link with ``session`` until the peer hangs up, the chip stops or a fault
    closes it.

    Whatever arrives, damaged or not, is answered (NAK, ERROR) or ignored; the link is only
    closed on purpose (``disconnect_after``), when it is gone, or when the chip stops, and every
    close is logged with its reason (logger ``hwloop.chip``, WARNING for the unexpected ones)
    before the link closes; the session's peer gives up control of the chip.
    """
    sender = _Sender(conn, faults, stats)
    count = [0]  # commands received, for disconnect_after
    reason, level = "the chip stopped", logging.INFO
    last_rx = time.monotonic()
    try:
        while not stop.is_set():
            data = conn.recv(0.25)
            if data is None:
                reason = "the peer hung up" if not conn.closed else "the link was closed"
                break
            if not data:
                if idle_timeout and time.monotonic() - last_rx > idle_timeout:
                    reason = f"idle for more than idle_timeout={idle_timeout:g} s"
                    break
                continue
            last_rx = time.monotonic()
            stats["bytes_rx"] += len(data)
            why = _run_units(session, data, sender, faults, stats, count, name)
            if why is not None:
                reason, level = why, logging.WARNING if why == _GONE else logging.INFO
                break
    except BaseException as e:
        reason, level = f"{type(e).__name__}: {e}", logging.ERROR
        log.exception("virtual chip %s: the session failed", name)
        raise
    finally:
        log.log(level, "virtual chip %s: closed the link: %s", name, reason)
        conn.close()
        session.core.release(session.peer, "closed its link: the chip is free")
        session.close()
        if on_close is not None:
            on_close(session)


def _open_spare() -> Optional[int]:
    """A descriptor held in reserve, so that an accept loop out of descriptors can still take
    (and close) a waiting connection."""
    try:
        return os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return None


def _format_addr(addr) -> str:
    """``host:port`` (``[v6]:port``) of a socket address."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)


_LIBC = None


def trim_memory() -> None:
    """Give freed memory back to the OS after a link closes (glibc keeps large freed blocks in
    its heap otherwise, so a server's RSS would only ever grow)."""
    global _LIBC
    if not sys.platform.startswith("linux"):
        return
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        _LIBC = False


class Acceptor:
    """The accept loop of a TCP chip: hands every connection to ``serve(sock, peer_name)``
    until ``stop`` is set. No error ends it: running out of descriptors (EMFILE/ENFILE) or
    memory is logged (at most every 10 s per kind), the waiting connections are taken with a
    spare descriptor and closed (so their clients see a hang-up instead of waiting), and
    accepting resumes after a short back-off. ``full()`` True refuses a connection (closed at
    once, logged); ``stats`` counts ``accept_errors`` and ``refused``."""

    def __init__(self, listener: socket.socket, stop: threading.Event, stats: dict,
                 serve: Callable[[socket.socket, str], None], full: Callable[[], bool],
                 max_connections: int, label: str):
        self.ls, self.stop, self.stats = listener, stop, stats
        self.serve, self.full = serve, full
        self.max_connections, self.label = max_connections, label
        self.spare: Optional[int] = None
        self.backoff = 0.0
        self._last_log: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def _warn(self, kind: str, text: str, *args) -> None:
        now = time.monotonic()
        if now - self._last_log.get(kind, -1e9) >= 10.0:
            extra = self._suppressed.pop(kind, 0)
            log.warning("virtual chip %s: " + text + (f" ({extra} more since the last "
                                                      "report)" if extra else ""),
                        self.label, *args)
            self._last_log[kind] = now
        else:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1

    def run(self) -> None:
        self.spare = _open_spare()
        while not self.stop.is_set():
            if self.backoff:
                self.stop.wait(self.backoff)
            try:
                s, addr = self.ls.accept()
            except socket.timeout:
                self.backoff = 0.0
                continue
            except OSError as e:
                if self.stop.is_set() or self.ls.fileno() < 0:
                    break
                self._accept_failed(e)
                continue
            self.backoff = 0.0
            self._take(s, _format_addr(addr))
        if self.spare is not None:
            with contextlib.suppress(OSError):
                os.close(self.spare)

    def _accept_failed(self, e: OSError) -> None:
        self.stats["accept_errors"] += 1
        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            self._warn("fds", "cannot accept a connection: %s; refusing new connections until "
                       "descriptors are free (raise `ulimit -n`, or close idle links)", e)
            if self.spare is not None:  # take the waiting connections and close them
                os.close(self.spare)
                self.spare = None
                self._refuse_waiting()
                self.spare = _open_spare()
            self.backoff = min(1.0, max(0.05, self.backoff * 2))
        elif e.errno in (errno.ECONNABORTED, errno.EINTR, errno.EAGAIN, errno.EPROTO):
            self.backoff = 0.0
        else:
            self._warn(f"errno{e.errno}", "accept failed: %s; retrying", e)
            self.backoff = min(1.0, max(0.05, self.backoff * 2))

    def _refuse_waiting(self) -> None:
        for _ in range(64):
            try:
                if not select.select([self.ls], [], [], 0)[0]:
                    break
                self.ls.accept()[0].close()
            except OSError:
                break
            self.stats["refused"] += 1

    def _take(self, s: socket.socket, peer_name: str) -> None:
        try:
            if self.spare is None:
                self.spare = _open_spare()
            if self.full():
                self.stats["refused"] += 1
                self._warn("cap", "refused a connection from %s: %d links open "
                           "(max_connections)", peer_name, self.max_connections)
                s.close()
                return
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.serve(s, peer_name)
        except (OSError, RuntimeError) as e:  # a reset client, no thread to be had
            self._warn("spawn", "could not serve a connection from %s: %s", peer_name, e)
            with contextlib.suppress(OSError):
                s.close()
