"""The virtual chip as a server a lab leaves running (issue #12, items 1-3).

* finished links free everything they held (reply cache, half-received messages, thread):
  after 200 connect/program/run/close cycles and 50 idle connections the server's RSS is back
  within 20 % of where it started, and it still answers;
* the accept loop survives running out of descriptors (EMFILE) and logs it;
* idle links are closed after ``idle_timeout``; at most ``max_connections`` are open;
* one link at a time controls the chip; the others get a BUSY error naming its address, may
  still query, and take the chip once the owner disconnects (or take it over).

The chip under test runs in its own process (``tests/chip_proc.py``) where RSS or descriptor
limits are measured; loopback only, every loop bounded in count and time.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hwloop.wire.serial_device import SerialDevice
from hwloop.chip.core import ChipCore, Peer
from hwloop.chip.frame_session import FrameSession
from hwloop.chip.server import serve
from hwloop.wire.visa_device import VisaDevice
from hwloop.errors import DeviceError
from hwloop.wire.codec import Err, READ_RANGE, WRITE_WEIGHTS_HDR
from hwloop.wire.frame import Cmd, Frame, FrameReader, LOCK_PAYLOAD, LockOp, parse_error_payload

from fakes import FakeB1Device, grid_inputs, random_params, small_spec
from test_transports import SPEC, assert_same, setup

HERE = Path(__file__).resolve().parent
BIG = small_spec(n_in=1024, hidden=1024, n_out=4)  # layer 1: 1 048 576 codes


class ChipProcess:
    def __init__(self, tmp_path, *args, env=None):
        self.err_path = tmp_path / "chip.stderr"
        self._err = open(self.err_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "chip_proc.py"), *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err, text=True, env=env)
        self.url = self.proc.stdout.readline().strip()  # after imports: a few seconds
        assert self.url.startswith(("socket://", "TCPIP::")), self.stderr()
        self.host, self.port = "127.0.0.1", int(self.url.split(":")[-1].split("::")[0]) \
            if self.url.startswith("socket://") else int(self.url.split("::")[2])

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stderr(self) -> str:
        self._err.flush()
        return self.err_path.read_text()

    def stop(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(5)
        except (subprocess.TimeoutExpired, OSError):
            self.proc.kill()  # our own child, by its handle
            self.proc.wait(5)
        self._err.close()


@pytest.fixture
def chip_process(tmp_path):
    procs = []

    def make(*args, **kw):
        p = ChipProcess(tmp_path, *args, **kw)
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.stop()


def _cycle(url: str, w, x, big: bool) -> None:
    """One client: connect, program, run, close; a ``big`` one also reads a 1024x1024 layer
    back four times (2 MiB each), which its session's reply cache holds until it closes."""
    if big:
        with SerialDevice(url, timeout=2.0, reply_chunk_bytes=65000) as dev:
            dev.program(BIG)
            dev.run(grid_inputs(BIG, 2, seed=4))
            for _ in range(4):
                dev.read_weights(1)
        return
    with SerialDevice(url, timeout=2.0) as dev:
        dev.program(SPEC)
        dev.write_weights(0, *w[0])
        dev.run(x)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc for RSS")
def test_soak_connections_are_freed_and_the_server_keeps_answering(chip_process):
    chip = chip_process()
    w, _ = random_params(SPEC, seed=1)
    x = grid_inputs(SPEC, 8, seed=2)
    t0 = time.monotonic()
    for i in range(4):  # warm-up: first-use allocations of the interpreter and numpy
        _cycle(chip.url, w, x, big=i % 2 == 1)
    rss0 = chip.rss_kb()
    for i in range(200):  # every 10th cycle is a big one
        _cycle(chip.url, w, x, big=i % 10 == 9)
    idle = []
    for _ in range(50):
        s = socket.create_connection((chip.host, chip.port), timeout=2.0)
        idle.append(s)
    with SerialDevice(chip.url, timeout=2.0) as dev:  # still answers with 50 idle links open
        assert dev.status()["programmed"]
    for s in idle:
        s.close()
    deadline = time.monotonic() + 5.0
    rss1 = chip.rss_kb()
    while rss1 > 1.2 * rss0 and time.monotonic() < deadline:
        time.sleep(0.1)
        rss1 = chip.rss_kb()
    with SerialDevice(chip.url, timeout=2.0) as dev:
        assert dev.status()["programmed"]
    print(f"soak: RSS {rss0} kB after warm-up, {rss1} kB after 200 cycles and 50 idle links, "
          f"{time.monotonic() - t0:.1f} s")
    assert rss1 <= 1.2 * rss0, (rss0, rss1)
    assert "Traceback" not in chip.stderr()


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin",
                    reason="POSIX descriptor limits")
def test_accept_loop_survives_running_out_of_descriptors(chip_process):
    chip = chip_process("--nofile", "40")
    idle = []
    try:
        for _ in range(50):  # more links than the server has descriptors for
            idle.append(socket.create_connection((chip.host, chip.port), timeout=2.0))
        deadline = time.monotonic() + 5.0
        while "open files" not in chip.stderr() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for s in idle:
            s.close()
    log = chip.stderr()
    assert "cannot accept a connection" in log and "Too many open files" in log, log
    # the descriptors come back as the idle links close; the chip accepts again
    deadline = time.monotonic() + 10.0
    while True:
        try:
            with SerialDevice(chip.url, timeout=1.0) as dev:
                assert dev.status()["programmed"] is False
            break
        except DeviceError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_idle_links_are_closed_and_connections_are_capped(caplog):
    chip = serve(FakeB1Device(), transport="tcp", idle_timeout=0.3, max_connections=2)
    try:
        a = socket.create_connection((chip.host, chip.port), timeout=2.0)
        b = socket.create_connection((chip.host, chip.port), timeout=2.0)
        deadline = time.monotonic() + 2.0
        while chip.stats["open"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        c = socket.create_connection((chip.host, chip.port), timeout=2.0)
        c.settimeout(2.0)
        assert c.recv(10) == b""  # over the cap: closed at once
        assert chip.stats["refused"] >= 1
        a.settimeout(2.0)
        assert a.recv(10) == b""  # idle for 0.3 s: closed
        b.close()
        c.close()
        deadline = time.monotonic() + 2.0
        while (chip.stats["open"] or chip.sessions) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert chip.stats["open"] == 0 and chip.sessions == []
        with SerialDevice(chip.url, timeout=1.0) as dev:
            assert dev.status()["programmed"] is False
    finally:
        chip.stop()


def test_reply_cache_is_bounded_in_bytes():
    s = FrameSession(ChipCore(FakeB1Device()), cache_bytes=1 << 20)
    s.handle(Frame(1, Cmd.PROGRAM, 0, BIG.model_dump_json().encode()))
    for seq in range(2, 12):  # ten 256 KiB reads
        s.handle(Frame(seq, Cmd.READ_WEIGHTS, 0, READ_RANGE.pack(1, 0, 131072)))
    held = sum(len(f) for frames in s.cache.values() for f in frames)
    assert held <= (1 << 20) + 300_000 and 2 not in s.by_seq
    assert s.by_seq[11][0] == 11  # the newest reply is always kept


# ------------------------------------------------------------------------------------------------
# Ownership
# ------------------------------------------------------------------------------------------------


def _serial_addr(dev: SerialDevice) -> str:
    host, port = dev._port._socket.getsockname()[:2]
    return f"{host}:{port}"


def _visa_addr(dev: VisaDevice) -> str:
    host, port = dev._session().interface.getsockname()[:2]
    return f"{host}:{port}"


@pytest.mark.parametrize("dialect", ["frame", "scpi"])
def test_one_controlling_link_at_a_time(dialect):
    chip = serve(FakeB1Device(time_step=1 / 64), transport="tcp", dialect=dialect)
    opener = SerialDevice if dialect == "frame" else VisaDevice
    addr = _serial_addr if dialect == "frame" else _visa_addr
    other = small_spec(n_in=12, hidden=6, n_out=4)
    x = grid_inputs(SPEC, 8, seed=3)
    ref = FakeB1Device(time_step=1 / 64)
    setup(ref)
    try:
        a = opener(chip.url, timeout=2.0)
        setup(a)
        b = opener(chip.url, timeout=2.0)
        assert b.status()["programmed"]  # a second link may query ...
        assert b.info().device_id == a.info().device_id
        with pytest.raises(DeviceError) as ei:  # ... but not change the chip
            b.program(other)
        msg = str(ei.value)
        assert "busy" in msg and addr(a) in msg, msg
        with pytest.raises(DeviceError, match="busy"):
            b.run(x)
        assert_same(a.run(x), ref.run(x))  # A still gets its own results
        a.close()  # released on disconnect
        deadline = time.monotonic() + 2.0
        while True:
            try:
                b.program(other)
                break
            except DeviceError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        assert b.status()["spec"]["layers"][0]["out_shape"] == [6]
        # a documented take-over: the new link controls, the old one is refused
        c = opener(chip.url, timeout=2.0, take_over=True)
        setup(c)
        with pytest.raises(DeviceError, match="busy") as ei:
            b.program(other)
        assert addr(c) in str(ei.value)
        assert_same(c.run(x), ref.run(x))
        b.close()
        c.close()
    finally:
        chip.stop()


def test_lock_command_and_staged_writes_of_another_link_are_dropped():
    import json
    core = ChipCore(FakeB1Device())
    pa, pb = Peer("A"), Peer("B")
    sa, sb = FrameSession(core, peer=pa), FrameSession(core, peer=pb)

    def one(s, frame):
        return FrameReader().feed(s.handle(frame)[0])[0]

    lock = lambda s, seq, op: one(s, Frame(seq, Cmd.LOCK, 0, LOCK_PAYLOAD.pack(op)))
    assert json.loads(lock(sa, 1, LockOp.QUERY).payload) == {"owner": None, "you": False}
    assert json.loads(lock(sa, 2, LockOp.REQUEST).payload) == {"owner": "A", "you": True}
    r = lock(sb, 1, LockOp.REQUEST)
    assert r.cmd == Cmd.ERROR and parse_error_payload(r.payload)[0] == Err.BUSY
    assert one(sa, Frame(3, Cmd.PROGRAM, 0, SPEC.model_dump_json().encode())).cmd == \
        Cmd.PROGRAM
    one(sa, Frame(4, Cmd.WRITE_WEIGHTS, 0, WRITE_WEIGHTS_HDR.pack(0, 0, 2, 0.5) +
                  np.array([1, 2], "<i2").tobytes()))
    assert core.status()["staged_weights"] == [0]
    assert json.loads(lock(sb, 2, LockOp.TAKE_OVER).payload)["you"] is True
    assert core.status()["staged_weights"] == []  # A's half-written layer is gone
    r = one(sa, Frame(5, Cmd.RUN_BATCH, 0, b""))
    assert parse_error_payload(r.payload)[0] == Err.BUSY
    assert "B" in parse_error_payload(r.payload)[1]
    assert json.loads(lock(sb, 3, LockOp.RELEASE).payload) == {"owner": None, "you": False}
