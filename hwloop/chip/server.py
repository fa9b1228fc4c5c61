"""The virtual chip: serves any :class:`TTFSDevice` over a pty or TCP, in the frame or SCPI dialect.

    chip = serve(EmulatorDevice.from_profile("devices/emulator-analog.yaml"), transport="tcp")
    dev = open_device(chip.url)            # socket://127.0.0.1:PORT  (frame dialect)
    ...
    chip.stop()

Every length field is bounded before anything is allocated (``MAX_ENCODED`` per frame,
``MAX_MESSAGE`` per reassembled message, ``SCPI_MAX_LINE`` / ``SCPI_MAX_BLOCK`` for SCPI).
Faults (:class:`FaultConfig`) are injected on the chip side of the link
(:mod:`hwloop.chip.link`), from a seeded generator. The server binds loopback unless
``allow_remote=True``. It logs to ``hwloop.chip``.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import os
import socket
import sys
import threading
from typing import Callable, Optional

from hwloop.chip.core import ChipCore, Peer, log
from hwloop.chip.frame_session import FrameSession
from hwloop.chip.link import Acceptor, Connection, FaultConfig, Faults, serve_link, trim_memory
from hwloop.chip.scpi_session import ScpiSession
from hwloop.devices.base import TTFSDevice

__all__ = ["FaultConfig", "VirtualChip", "serve"]


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class VirtualChip:
    """A running virtual chip. ``url`` opens it with :func:`hwloop.devices.open.open_device`.

    Every link gets its own session (reply cache, half-received message, error queue, thread);
    all of it is freed when the link closes. ``sessions`` lists the open links' sessions,
    ``fault_stats`` the fault counters of the last 256 links.
    """

    #: Connections beyond ``max_connections`` are accepted and closed at once (logged).
    MAX_CONNECTIONS = 64
    #: A link that sends nothing for this long is closed (None: never).
    IDLE_TIMEOUT_S = 3600.0
    #: The session class of each dialect.
    SESSIONS = {"frame": FrameSession, "scpi": ScpiSession}

    def __init__(self, device: TTFSDevice, transport: str, dialect: str, faults: FaultConfig,
                 idle_timeout: Optional[float] = IDLE_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS):
        self.core = ChipCore(device)
        self.transport = transport
        self.dialect = dialect
        self.faults = faults
        self.idle_timeout = idle_timeout if idle_timeout and idle_timeout > 0 else None
        self.max_connections = max(1, int(max_connections))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[Connection] = []
        self._lock = threading.Lock()
        self.sessions: list = []
        self.fault_stats: collections.deque = collections.deque(maxlen=256)
        self.stats = {"connections": 0, "bytes_rx": 0, "bytes_tx": 0, "bad_frames": 0,
                      "disconnects": 0, "internal_errors": 0, "refused": 0, "accept_errors": 0,
                      "open": 0}
        self.host: Optional[str] = None
        self.port: Optional[int] = None
        self.pty_path: Optional[str] = None
        self._listener: Optional[socket.socket] = None
        self._slave_fd: Optional[int] = None

    # -- addresses -------------------------------------------------------------------------------
    @property
    def _host_in_url(self) -> str:
        return f"[{self.host}]" if self.host and ":" in self.host else str(self.host)

    @property
    def address(self) -> str:
        return self.pty_path if self.transport == "pty" else f"{self._host_in_url}:{self.port}"

    @property
    def url(self) -> str:
        """``socket://host:port`` or the pty path (frame); ``TCPIP::host::port::SOCKET`` or
        ``ASRL<pty>::INSTR`` (scpi). IPv6 hosts are bracketed (``socket://[::1]:PORT``)."""
        if self.transport == "pty":
            return self.pty_path if self.dialect == "frame" else f"ASRL{self.pty_path}::INSTR"
        if self.dialect == "frame":
            return f"socket://{self._host_in_url}:{self.port}"
        return f"TCPIP::{self._host_in_url}::{self.port}::SOCKET"

    # -- lifecycle -------------------------------------------------------------------------------
    def _spawn(self, target, *args) -> threading.Thread:
        t = threading.Thread(target=target, args=args, daemon=True, name="hwloop-virtual-chip")
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()
        return t

    def _run_conn(self, conn: Connection, peer_name: str) -> None:
        with self._lock:
            idx = self.stats["connections"]
            self.stats["connections"] += 1
            self.stats["open"] += 1
            self._conns.append(conn)
        faults = Faults(self.faults, idx)
        self.fault_stats.append(faults.stats)
        name = f"{self.address} (connection {idx}, {peer_name})"
        peer = Peer(f"{peer_name} (connection {idx})", conn.alive)
        session = self.SESSIONS[self.dialect](self.core, peer=peer)
        with self._lock:
            self.sessions.append(session)

        def on_close(session) -> None:
            with self._lock:
                if session in self.sessions:
                    self.sessions.remove(session)
                if conn in self._conns:
                    self._conns.remove(conn)
                self.stats["open"] -= 1

        try:
            serve_link(conn, session, faults, self._stop, self.stats, name=name,
                       idle_timeout=self.idle_timeout, on_close=on_close)
        finally:
            with self._lock:
                if conn in self._conns:  # serve_link failed before its own clean-up
                    self._conns.remove(conn)
                    self.stats["open"] -= 1
            trim_memory()

    def _full(self) -> bool:
        with self._lock:
            return self.stats["open"] >= self.max_connections

    def _accept(self, sock: socket.socket, peer_name: str) -> None:
        self._spawn(self._run_conn, Connection(sock=sock), peer_name)

    def start_tcp(self, host: str, port: int) -> None:
        ls = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((host, port))
        ls.listen(16)
        ls.settimeout(0.1)
        self._listener = ls
        self.host, self.port = host, ls.getsockname()[1]
        self._spawn(Acceptor(ls, self._stop, self.stats, self._accept, self._full,
                             self.max_connections, self.address).run)

    def start_pty(self) -> None:
        import tty  # POSIX only: imported where a pty is made (serve refuses pty elsewhere)
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._slave_fd = slave  # held open so the master never sees EIO between clients
        self.pty_path = os.ttyname(slave)
        self._spawn(self._run_conn, Connection(fd=master), "pty")

    def disconnect(self) -> None:
        """Close every open link now (a cable pull); a TCP chip keeps accepting new ones."""
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.close()
        if self.transport == "pty" and self._slave_fd is not None:
            try:
                os.close(self._slave_fd)
            except OSError:
                pass
            self._slave_fd = None

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
        self.disconnect()
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout)

    def wait(self) -> None:
        """Block until :meth:`stop` (or Ctrl-C)."""
        try:
            while not self._stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def __enter__(self) -> "VirtualChip":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(device: TTFSDevice, transport: str = "pty", host: str = "127.0.0.1", port: int = 0,
          dialect: str = "frame", faults: Optional[FaultConfig] = None, *,
          foreground: bool = False, allow_remote: bool = False,
          announce: Optional[Callable[[str], None]] = None,
          idle_timeout: Optional[float] = VirtualChip.IDLE_TIMEOUT_S,
          max_connections: int = VirtualChip.MAX_CONNECTIONS) -> VirtualChip:
    """Serve ``device`` as a virtual chip.

    Args:
        transport: "pty" (a pseudo-terminal; its slave path is ``chip.pty_path``) or "tcp".
        host, port: TCP address; port 0 picks a free port (``chip.port``). Only loopback hosts
            unless ``allow_remote``.
        dialect: "frame" (byte-stuffed frames, for pyserial) or "scpi" (for VISA).
        faults: link faults to inject.
        foreground: serve until Ctrl-C (the CLI); otherwise return at once, serving from
            daemon threads (tests).
        announce: called with a one-line description (address, url) once listening.
        idle_timeout: close a link that sends nothing for this many seconds (None or 0: never;
            default one hour); closing it frees the chip if that link controlled it.
        max_connections: links open at once (TCP); more are accepted and closed at once.

    One link at a time controls the chip (docs/protocol.md, "Ownership"): the first that
    sends a command that changes it; the others may query until it closes, releases or is
    taken over.
    """
    if transport not in ("pty", "tcp"):
        raise ValueError(f"transport must be 'pty' or 'tcp', got {transport!r}")
    if dialect not in ("frame", "scpi"):
        raise ValueError(f"dialect must be 'frame' or 'scpi', got {dialect!r}")
    faults = faults or FaultConfig()
    if dialect == "scpi" and (faults.bit_flip_rate or faults.drop_rate or faults.dup_rate):
        raise ValueError("the scpi dialect has no integrity layer: only delay_s and "
                         "disconnect_after faults apply")
    if transport == "tcp" and not allow_remote and not _is_loopback(host):
        raise ValueError(f"refusing to bind {host!r}: the virtual chip binds loopback only unless "
                         "allow_remote=True (--allow-remote)")
    if transport == "pty" and sys.platform.startswith("win"):
        raise ValueError("pty transport needs a POSIX system; use transport='tcp'")
    chip = VirtualChip(device, transport, dialect, faults, idle_timeout=idle_timeout,
                       max_connections=max_connections)
    if transport == "tcp":
        chip.start_tcp(host, port)
    else:
        chip.start_pty()
    if announce is not None:
        announce(f"virtual chip {chip.core.info.device_id} ({dialect} dialect) at "
                 f"{chip.address}  url: {chip.url}")
    if foreground:
        if not log.handlers and not logging.getLogger().handlers:
            # the CLI: say on stderr when and why a link is closed
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        chip.wait()
    return chip
