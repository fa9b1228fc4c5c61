"""SCPI (VISA) replies are never matched to the wrong request: after a timeout the host
resynchronises with a fresh ``HWL:ECHO?`` marker before its next command, or fails the device
with a clear error (issue #10, item 3).

The virtual chip serves an emulator whose ``run`` is held back (an Event, so the tests never
wait longer than they must): the host times out, the late reply lands in the socket, and the
next run of the same batch size must still return its own record.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from hwloop.chip.core import ChipCore
from hwloop.chip.scpi_session import ScpiSession
from hwloop.chip.server import serve
from hwloop.wire.visa_device import VisaDevice
from hwloop.errors import DeviceError, DeviceTimeout

from fakes import grid_inputs, random_params
from test_transports import SPEC, assert_same, make_device, reference, setup


class SlowChip:
    """A virtual SCPI chip whose next ``hold`` runs wait for ``release`` (or ``hold_s``)."""

    def __init__(self, hold_s: float, transport: str = "tcp"):
        self.device = make_device()
        self.release = threading.Event()
        self.hold_s = hold_s
        self.holds = 0
        self.heads: list[str] = []
        inner = self.device.run

        def run(x):
            if self.holds > 0:
                self.holds -= 1
                self.release.wait(self.hold_s)
            return inner(x)

        self.device.run = run  # ChipCore calls device.run: the instance attribute wins
        self.chip = serve(self.device, transport=transport, dialect="scpi")
        self._spied = False

    def spy(self) -> None:
        """Record every header the chip's session executes (in ``heads``)."""
        deadline = time.monotonic() + 2.0
        while not self.chip.sessions and time.monotonic() < deadline:
            time.sleep(0.01)
        session = self.chip.sessions[0]
        inner = session._command

        def command(head, args, block):
            self.heads.append(head)
            return inner(head, args, block)

        session._command = command

    def stop(self) -> None:
        self.release.set()
        self.chip.stop()


@pytest.fixture
def slow_chip():
    chips = []

    def make(hold_s: float = 1.0, transport: str = "tcp") -> SlowChip:
        c = SlowChip(hold_s, transport)
        chips.append(c)
        return c

    yield make
    for c in chips:
        c.stop()


@pytest.mark.parametrize("transport", ["tcp", "pty"])
def test_retried_run_after_timeout_returns_its_own_record(slow_chip, transport):
    # the reported bug: the late reply of the timed-out run stayed in the socket and the next
    # run of the same batch size returned it, with no error. 32 samples: the late reply is a
    # binary block of float64 times, full of bytes that look like line ends. Over TCP
    # (``::SOCKET``, the host waits with select) and a pty (``ASRL...::INSTR``: pyvisa's own
    # read timeout, then device clear).
    sc = slow_chip(hold_s=2.0, transport=transport)
    x1, x2 = grid_inputs(SPEC, 32, seed=21), grid_inputs(SPEC, 32, seed=22)
    ref1, ref2 = reference(x1), reference(x2)
    assert not torch.equal(ref1.readout, ref2.readout)  # the batches differ
    with VisaDevice(sc.chip.url, timeout=1.0, per_sample_timeout_s=0.0) as dev:
        setup(dev)
        sc.spy()
        sc.holds = 1
        # TCP: DeviceTimeout; a pty has no hang-up signal, so its *IDN? probe (unanswered by
        # the busy chip) makes it a DeviceError
        with pytest.raises(DeviceTimeout if transport == "tcp" else DeviceError, match="HWL:RUN"):
            dev.run(x1)
        assert dev.health["resyncs"] == 0
        rec = dev.run(x2)  # the chip sends x1's late reply first, then the echo, then x2's
        assert_same(rec, ref2)
        assert dev.health["resyncs"] == 1 and dev.health["discarded_bytes"] > 32 * 12 * 8
        probe = [] if transport == "tcp" else ["*IDN?"]
        assert sc.heads == ["HWL:RUN?"] + probe + ["*CLS", "HWL:TFOR", "HWL:ECHO?", "HWL:RUN?"]
        sc.heads.clear()
        assert_same(dev.run(x1), ref1)  # in step afterwards, with no further round trip
        assert sc.heads == ["HWL:RUN?"] and dev.health["resyncs"] == 1


def test_no_extra_round_trip_without_a_timeout(slow_chip):
    sc = slow_chip()
    x = grid_inputs(SPEC, 8, seed=23)
    with VisaDevice(sc.chip.url, timeout=1.0) as dev:
        setup(dev)
        sc.spy()
        for _ in range(3):
            assert_same(dev.run(x), reference(x))
        assert dev.status()["programmed"]
        assert sc.heads == ["HWL:RUN?"] * 3 + ["HWL:STAT?"]
        assert dev.health["resyncs"] == 0 and dev.health["discarded_bytes"] == 0


def test_interrupted_read_resynchronises(slow_chip, monkeypatch):
    # not only timeouts: a read abandoned for any reason (here an interrupt) leaves the reply
    # in the socket; the next command must not take it for its own
    sc = slow_chip(hold_s=0.3)
    x1, x2 = grid_inputs(SPEC, 8, seed=24), grid_inputs(SPEC, 8, seed=25)
    with VisaDevice(sc.chip.url, timeout=1.0) as dev:
        setup(dev)
        sc.holds = 1
        real = dev._wait_reply

        def interrupted(what, timeout):
            monkeypatch.setattr(dev, "_wait_reply", real)
            raise KeyboardInterrupt

        monkeypatch.setattr(dev, "_wait_reply", interrupted)
        with pytest.raises(KeyboardInterrupt):
            dev.run(x1)
        assert_same(dev.run(x2), reference(x2))
        assert dev.health["resyncs"] == 1
        codes, scale = dev.read_weights(0)  # other queries stay in step too
        assert scale == random_params(SPEC, bits=dev.info().weight_bits)[0][0][1]


def test_timeout_during_resync_is_a_clear_error_not_a_hang(slow_chip):
    sc = slow_chip(hold_s=30.0)  # released by the test (or the fixture), never waited out
    x = grid_inputs(SPEC, 8, seed=26)
    dev = VisaDevice(sc.chip.url, timeout=0.5, per_sample_timeout_s=0.0, resync_timeout=0.4)
    try:
        setup(dev)
        sc.holds = 1
        with pytest.raises(DeviceTimeout):
            dev.run(x)
        t0 = time.monotonic()
        with pytest.raises(DeviceError) as ei:
            dev.run(x)  # the chip is still busy: the marker's echo cannot come in time
        assert time.monotonic() - t0 < 2.0
        assert not isinstance(ei.value, DeviceTimeout)  # not retryable: the device is failed
        msg = str(ei.value)
        assert sc.chip.url in msg and "HWL:RUN?" in msg and "HWL:ECHO?" in msg
        assert "out of step" in msg and "reopen" in msg
        for call in (dev.status, lambda: dev.run(x), lambda: dev.read_thresholds(1)):
            t0 = time.monotonic()
            with pytest.raises(DeviceError, match="failed earlier") as ei:
                call()  # every later call, at once, names what happened
            assert "HWL:RUN? did not complete" in str(ei.value)
            assert time.monotonic() - t0 < 0.5
        assert dev.health["resyncs"] == 1
    finally:
        dev.close()
    sc.release.set()
    with VisaDevice(sc.chip.url, timeout=2.0) as dev2:  # a reopened link works
        setup(dev2)
        assert_same(dev2.run(x), reference(x))


def test_chip_echoes_the_marker():
    s = ScpiSession(ChipCore(make_device()))
    out, n = s.feed(b"HWL:ECHO? hwl-sync-0123abcd\nhwl:echo? A.b_c-9\n")
    assert out == [b"hwl-sync-0123abcd\n", b"A.b_c-9\n"] and n == 2
    out, _ = s.feed(b"HWL:ECHO? a,b\nHWL:ECHO?\nHWL:ECHO? " + b"x" * 65 + b"\n")
    assert out == [b"\n"] * 3  # a failed query answers empty, and queues its error
    out, _ = s.feed(b"SYST:ERR?\n")
    assert out[0].startswith(b"-104,")
