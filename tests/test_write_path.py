"""One write-and-verify path (issue #11): :func:`hwloop.mapping.write_layer` reads back only
when the driver does not verify its own writes, and every caller (programming, HIL write-back,
the scale rescale, resume, calibration probes) goes through it.

Before: ``program_network``, ``reprogram`` and the calibration probes read back every layer
even on a serial/VISA link whose driver had already checked each write by CRC."""

from __future__ import annotations

import pytest
import torch

import hwloop
from fakes import FakeB1Device, random_params, small_spec
from hwloop.calibrate.probes import Prober
from hwloop.chip.server import serve
from hwloop.devices.open import open_device
from hwloop.emulator.device import EmulatorDevice
from hwloop.errors import WriteVerifyError
from hwloop.mapping import ProgramState, WriteCount, program_network, reprogram, write_layer
from hwloop.train.hil import FinetuneConfig, HILTrainer
from hwloop.train.options import REPO_ROOT
from hwloop.ttfs.architectures import build_relu

ANALOG = str(REPO_ROOT / "devices" / "emulator-analog.yaml")


class Counting(FakeB1Device):
    """A read-back driver that counts its read-backs."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.reads = 0
        self.corrupt: set[int] = set()

    def read_weights(self, layer):
        self.reads += 1
        codes, scale = super().read_weights(layer)
        if layer in self.corrupt:
            codes = codes.clone()
            codes.view(-1)[0] += 1
        return codes, scale

    def read_thresholds(self, layer):
        self.reads += 1
        return super().read_thresholds(layer)


class CrcVerified(Counting):
    """A driver that checks every write itself (CRC): nothing may be read back again."""

    @property
    def verifies_writes(self) -> bool:
        return True


def _programmed(cls):
    dev = cls()
    spec = small_spec()
    dev.program(spec)
    return dev, spec, *random_params(spec)


def test_crc_verifying_driver_is_never_read_back():
    dev, spec, weights, thresholds = _programmed(CrcVerified)
    count = write_layer(dev, 0, *weights[0], thresholds[0], retries=3)
    assert (count.writes, count.reads, dev.reads) == (2, 0, 0)
    assert torch.equal(dev.read_weights(0)[0], weights[0][0])


def test_read_back_driver_is_read_back_and_retried():
    dev, spec, weights, thresholds = _programmed(Counting)
    count = write_layer(dev, 0, *weights[0], thresholds[0])
    assert (count.writes, count.reads, dev.reads) == (2, 2, 2)
    count = write_layer(dev, 1, thresholds=thresholds[1])  # thresholds only
    assert (count.writes, count.reads) == (1, 1)
    dev.corrupt.add(2)
    count = WriteCount()
    with pytest.raises(WriteVerifyError) as ei:
        write_layer(dev, 2, *weights[2], retries=2, count=count)
    assert ei.value.layers == [2] and "layer 2" in str(ei.value)
    assert (count.writes, count.reads) == (3, 3)  # counted although it raised
    dev.reads = 0
    write_layer(dev, 2, *weights[2], verify=False)
    assert dev.reads == 0


def test_reprogram_and_probes_respect_a_verifying_driver():
    dev, spec, weights, thresholds = _programmed(CrcVerified)
    state = ProgramState(spec=spec, weights=weights, thresholds=thresholds)
    reprogram(dev, state)
    pr = Prober(dev)
    pr.spec = spec
    pr.write_weights(0, *weights[0])
    pr.write_thresholds(0, thresholds[0])
    assert dev.reads == 0 and pr.count.writes == 2
    dev2 = Counting()
    reprogram(dev2, state)
    assert dev2.reads == len(weights) + len(thresholds)
    dev2.corrupt.add(1)
    with pytest.raises(WriteVerifyError) as ei:
        reprogram(dev2, state)
    assert ei.value.layers == [1]


def _problem(n=96):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 12, 12, generator=g)
    y = (x.flatten(1)[:, :4].argmax(1)).to(torch.int64)
    relu = build_relu("fc2", (1, 12, 12), 4)
    return x, y, hwloop.convert(relu, x[:64])


def test_serial_link_step_reads_back_nothing_the_crc_verified():
    """A fine-tuning step over the frame link (CRC-verified writes) makes no read_weights /
    read_thresholds calls; the same step in process (read-back driver) does."""
    x, y, net = _problem()
    chip = serve(EmulatorDevice.from_profile(ANALOG, chip_seed=3), transport="tcp", dialect="frame")
    try:
        dev = open_device(chip.url, timeout=5.0)
        try:
            assert dev.verifies_writes
            reads = []
            for name in ("read_weights", "read_thresholds"):
                real = getattr(dev, name)
                setattr(dev, name, lambda *a, _r=real, _n=name: (reads.append(_n), _r(*a))[1])
            state = program_network(dev, net)
            assert reads == []  # programming: verified by CRC only
            trainer = HILTrainer(dev, net, state, FinetuneConfig(lr=0.05, batch_size=32))
            written = sum(trainer.step(x[32 * s:32 * (s + 1)], y[32 * s:32 * (s + 1)])[0].layers_written
                          for s in range(3))
            assert written > 0 and reads == []
        finally:
            dev.close()
    finally:
        chip.stop()
    inproc = EmulatorDevice.from_profile(ANALOG, chip_seed=3)
    assert not inproc.verifies_writes
    _, y2, net2 = _problem()
    state = program_network(inproc, net2)
    trainer = HILTrainer(inproc, net2, state, FinetuneConfig(lr=0.05, batch_size=32))
    calls0 = trainer.device_calls
    res, _ = trainer.step(x[:32], y2[:32])
    # every write of the step was read back once: device calls = 1 run + 2 x writes (+ windows)
    assert trainer.device_calls - calls0 >= 1 + 2 * res.layers_written
