"""hwloop.chip.link: the chip's side of a link whatever its dialect: the seeded fault injector,
the full-duplex connection, and serve_link running a session's units over a socket pair (replies
byte for byte, injected faults, why and how a link closes)."""

from __future__ import annotations

import logging
import socket
import threading
import time

import numpy as np
import pytest

from hwloop.chip.core import ChipCore, Peer
from hwloop.chip.frame_session import FrameSession
from hwloop.chip.link import Connection, FaultConfig, Faults, serve_link
from hwloop.chip.scpi_session import ScpiSession
from hwloop.wire.frame import Cmd, Frame, FrameReader, NakReason, frame_raw, stuff

from bytes_exchange import NO_ERROR, nak, rep, req
from fakes import FakeB1Device


def _stats() -> dict:
    return {"connections": 0, "bytes_rx": 0, "bytes_tx": 0, "bad_frames": 0, "disconnects": 0}


class Link:
    """serve_link in a thread on one end of a socket pair; the test holds the other end."""

    def __init__(self, dialect: str = "frame", faults: FaultConfig = FaultConfig(), **kw):
        self.host, chip_end = socket.socketpair()
        self.host.settimeout(2.0)
        self.core = ChipCore(FakeB1Device())
        self.peer = Peer("test-link")
        self.session = (FrameSession(self.core, peer=self.peer) if dialect == "frame"
                        else ScpiSession(self.core, peer=self.peer))
        self.stop = threading.Event()
        self.stats = _stats()
        self.closed_session = []
        self.thread = threading.Thread(
            target=serve_link, args=(Connection(sock=chip_end), self.session, Faults(faults, 0),
                                     self.stop, self.stats),
            kwargs=dict(name="test", on_close=self.closed_session.append, **kw), daemon=True)
        self.thread.start()

    def recv_exactly(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            got = self.host.recv(n - len(buf))
            if not got:
                break
            buf += got
        return buf

    def close(self) -> None:
        self.stop.set()
        self.host.close()
        self.thread.join(5.0)


@pytest.fixture
def link():
    links = []

    def make(*a, **kw) -> Link:
        links.append(Link(*a, **kw))
        return links[-1]

    yield make
    for l in links:
        l.close()


def test_fault_config_is_checked():
    for bad in (dict(bit_flip_rate=1.5), dict(drop_rate=-0.1), dict(dup_rate=2.0),
                dict(delay_s=-1.0), dict(disconnect_after=0)):
        with pytest.raises(ValueError):
            FaultConfig(**bad)


def test_faults_are_seeded_per_link_and_counted():
    data = bytes(range(256)) * 16
    assert Faults(FaultConfig(), 0).flip(data) is data
    cfg = FaultConfig(bit_flip_rate=0.01, drop_rate=0.3, dup_rate=0.3, seed=7)
    a, b, other = Faults(cfg, 0), Faults(cfg, 0), Faults(cfg, 1)
    fa = a.flip(data)
    assert fa == b.flip(data) and fa != other.flip(data)
    diff = np.unpackbits(np.frombuffer(fa, np.uint8) ^ np.frombuffer(data, np.uint8)).sum()
    assert 0 < diff <= a.stats["flipped_bits"]  # two flips of one bit cancel
    drops = [a.drop() for _ in range(200)]
    assert drops == [b.drop() for _ in range(200)] and 30 < sum(drops) < 90
    assert a.stats["dropped"] == sum(drops)
    assert sum(a.dup() for _ in range(200)) == a.stats["duplicated"] > 0


def test_connection_recv_send_and_hangup():
    mine, theirs = socket.socketpair()
    conn = Connection(sock=theirs)
    assert conn.alive() and conn.recv(0.01) == b""
    mine.sendall(b"hello")
    assert conn.recv(1.0) == b"hello"
    # full duplex: a reply larger than the socket buffers goes out while the peer, which wrote
    # first and reads late, is read into the inbox (recv returns that first)
    data = bytes(range(256)) * 8192  # 2 MiB
    mine.sendall(b"ping")
    got = bytearray()

    def drain():
        time.sleep(0.2)
        while len(got) < len(data):
            got.extend(mine.recv(1 << 16))

    t = threading.Thread(target=drain)
    t.start()
    assert conn.send(data) is True
    t.join(10.0)
    assert bytes(got) == data and conn.recv(0.0) == b"ping"
    mine.close()
    deadline = time.monotonic() + 2.0
    while conn.alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not conn.alive() and conn.recv(0.1) is None
    conn.close()
    conn.close()
    assert conn.closed and not conn.alive()


def test_frame_link_answers_byte_for_byte_and_naks_damage(link):
    l = link()
    status_req = req(1, Cmd.STATUS)
    l.host.sendall(status_req)
    reader = FrameReader()
    got = []
    while not got:
        got = reader.feed(l.host.recv(65536))
    assert got[0].seq == 1 and got[0].cmd == Cmd.STATUS and got[0].is_reply
    assert b'"programmed":false' in got[0].payload
    raw = bytearray(frame_raw(Frame(2, Cmd.STATUS, 0, b"")))
    raw[4] ^= 0x01
    l.host.sendall(stuff(bytes(raw)) + b"\x00")
    want = nak(NakReason.CRC)
    assert l.recv_exactly(len(want)) == want
    assert l.stats["bad_frames"] == 1
    assert l.stats["bytes_rx"] == len(status_req) + len(stuff(bytes(raw))) + 1


def test_scpi_link_answers_lines(link):
    l = link("scpi")
    # one response message per program message, its units' responses joined by ";"; a leading
    # colon goes back to the root of the command tree
    l.host.sendall(b"HWL:ECHO? tok-1;:SYST:ERR?\nHWL:ECHO? tok-2\n")
    want = b"tok-1;" + NO_ERROR + b"tok-2\n"
    assert l.recv_exactly(len(want)) == want


def test_disconnect_after_closes_without_answering_and_frees_the_chip(link, caplog):
    caplog.set_level(logging.INFO, logger="hwloop.chip")
    l = link(faults=FaultConfig(disconnect_after=2))
    l.host.sendall(req(1, Cmd.RESET))
    first = rep(1, Cmd.RESET)
    assert l.recv_exactly(len(first)) == first
    assert l.core.owner is l.peer  # RESET took control
    l.host.sendall(req(2, Cmd.STATUS))
    assert l.host.recv(65536) == b""  # hung up, no reply
    l.thread.join(5.0)
    assert l.stats["disconnects"] == 1 and l.core.owner is None
    assert l.closed_session == [l.session]
    assert "disconnect_after=2 (injected fault)" in caplog.text


def test_delay_and_drop_faults(link):
    l = link(faults=FaultConfig(delay_s=0.2))
    t0 = time.monotonic()
    l.host.sendall(req(1, Cmd.RESET))
    want = rep(1, Cmd.RESET)
    assert l.recv_exactly(len(want)) == want
    assert time.monotonic() - t0 >= 0.2
    d = link(faults=FaultConfig(drop_rate=1.0))
    d.host.sendall(req(1, Cmd.RESET))
    d.host.settimeout(0.3)
    with pytest.raises(socket.timeout):
        d.host.recv(1)


def test_peer_hangup_and_idle_timeout_close_the_link(link, caplog):
    caplog.set_level(logging.INFO, logger="hwloop.chip")
    l = link()
    l.host.close()
    l.thread.join(5.0)
    assert not l.thread.is_alive() and "the peer hung up" in caplog.text
    i = link(idle_timeout=0.1)
    i.thread.join(5.0)
    assert not i.thread.is_alive() and "idle for more than idle_timeout=0.1 s" in caplog.text
