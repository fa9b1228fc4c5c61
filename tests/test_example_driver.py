"""The worked example of docs/drivers.md: the XC-1 driver (hwloop_example_chip), registered by
entry point, passes the conformance suite against its virtual chip and runs `hwloop finetune`."""

from __future__ import annotations

import json
from importlib.metadata import entry_points

import pytest
import torch

from hwloop.devices.base import LayerSpec, NetworkSpec
from hwloop.devices.open import backend_for, open_device
from hwloop.errors import DeviceError, DeviceLimitError
from hwloop.testing import check_device
from hwloop_example_chip.driver import ExampleChipDevice
from hwloop_example_chip.server import serve_example_chip


@pytest.fixture
def chip():
    chips = []

    def make(**kw):
        c = serve_example_chip(chip_seed=3, jitter_seed=0, **kw)
        chips.append(c)
        return c

    yield make
    for c in chips:
        c.stop()


def test_found_by_entry_point():
    eps = [ep for ep in entry_points(group="hwloop.devices") if ep.name == "xchip"]
    assert eps and eps[0].value == "hwloop_example_chip:open_device"
    assert backend_for("xchip://127.0.0.1:1") == "entry-point"
    with pytest.raises(DeviceError, match="accepted forms"):
        open_device("nochip://127.0.0.1:1")


@pytest.mark.parametrize("jitter", [0.0, None], ids=["exact", "jitter"])
def test_passes_the_conformance_suite(chip, jitter):
    c = chip(jitter_sd=jitter)
    dev = open_device(c.url, timeout=0.5, chip_seed=99, retries=3)  # foreign keywords ignored
    assert isinstance(dev, ExampleChipDevice) and dev.info().device_id == "xc1-seed3"
    rep = check_device(dev, stall=c.stall, hangup=c.hangup)
    assert rep.failed() == [], rep.format_table()
    assert not [r.name for r in rep.results if r.status == "skip"], rep.format_table()
    assert rep.mode == ("exact" if jitter == 0.0 else "statistical")


def test_chip_errors_map_to_hwloop_errors(chip):
    c = chip(jitter_sd=0.0)
    with open_device(c.url, timeout=1.0) as dev:
        conv = NetworkSpec(input_shape=(1, 4, 4), layers=(
            LayerSpec(kind="conv2d", in_shape=(1, 4, 4), out_shape=(1, 2, 2), weight_shape=(1, 1, 3, 3),
                      kernel_size=(3, 3), stride=(1, 1), padding=(0, 0), t_min=1.0, t_max=3.0),))
        with pytest.raises(DeviceLimitError, match="layer_kinds"):
            dev.program(conv)
        with pytest.raises(DeviceError, match="no network"):
            dev.run(torch.zeros(1, 1))
        # the chip itself refuses a bad row and discards the whole staged layer (atomic commit)
        spec = NetworkSpec(input_shape=(2,), layers=(
            LayerSpec(kind="dense", in_shape=(2,), out_shape=(2,), weight_shape=(2, 2), t_min=1.0, t_max=3.0),
            LayerSpec(kind="readout", in_shape=(2,), out_shape=(1,), weight_shape=(1, 2), t_min=1.0, t_max=3.0)))
        dev.program(spec)
        dev.write_weights(0, torch.tensor([[1, 2], [3, 4]]), 0.25)
        with pytest.raises(DeviceError, match="RANGE"):
            dev._bulk(["WROW 0 0 5 6", "WROW 0 1 99 0", "WCOMMIT 0 0.5"], "raw write")
        assert torch.equal(dev.read_weights(0)[0], torch.tensor([[1, 2], [3, 4]]))
        assert dev.read_weights(0)[1] == 0.25


def test_finetune_cli_runs_on_the_example_chip(chip, tmp_path, monkeypatch):
    from hwloop.cli import main
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    c = chip()
    out = tmp_path / "run"
    rc = main(["finetune", "--device", c.url, "--dataset", "synthetic", "--epochs", "1",
               "--pretrain-epochs", "1", "--train-subset", "120", "--test-subset", "60",
               "--batch-size", "40", "--out", str(out), "--no-progress"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["provenance"]["device_id"] == "xc1-seed3"
    assert 0.0 <= rep["after"]["device"]["accuracy"] <= 1.0
    assert c.commands > 100  # it all went through the XC-1 command set
