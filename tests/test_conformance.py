"""The conformance suite (hwloop.testing.check_device) passes on every built-in backend and
fails, by name, the check of each deliberately broken driver of tests/broken_drivers.py; the
bring-up diagnostics write their report and plots."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest

from broken_drivers import BROKEN, base_device
from hwloop.devices.open import open_device
from hwloop.testing import CHECKS, check_device

ROOT = Path(__file__).resolve().parents[1]
ALL = {name for name, _ in CHECKS}


def assert_passes(rep, skips=()):
    assert rep.failed() == [], rep.format_table()
    assert {r.name for r in rep.results if r.status == "skip"} == set(skips), rep.format_table()
    assert {r.name for r in rep.results} == ALL


@pytest.mark.parametrize("profile,update,skips,mode", [
    ("emulator-analog", {"jitter_sd": 0.0, "adaptive_windows": True}, (), "exact"),
    ("emulator-harsh", {}, ("set_windows_applied",), "statistical"),  # fixed windows, jitter
    ("emulator-ideal", {}, (), "exact"),
])
def test_suite_passes_on_the_emulator(profile, update, skips, mode):
    from hwloop.emulator.device import EmulatorDevice
    from hwloop.emulator.profile import load_profile
    prof = load_profile(ROOT / "devices" / f"{profile}.yaml").model_copy(update=update)
    rep = check_device(EmulatorDevice.from_profile(prof, chip_seed=3, jitter_seed=0))
    assert_passes(rep, skips + ("timeout", "hangup"))  # in process: no link to stall or cut
    assert rep.mode == mode
    json.dumps(rep.to_dict())  # the report is JSON as it is
    if mode == "statistical":
        assert rep.tolerances["stat_ratio_max"] == 2.5 and rep.tolerances["repetitions"] == 8


def _hooks(chip, delay=1.5):
    """stall: the virtual chip delays every reply by ``delay`` s; on leaving, wait until the
    delayed reply has gone out. hangup: the chip closes the link."""
    @contextlib.contextmanager
    def stall():
        chip.faults.delay_s = delay
        try:
            yield
        finally:
            chip.faults.delay_s = 0.0
            time.sleep(delay)
    return stall, chip.disconnect


@pytest.mark.parametrize("transport,dialect,kw", [
    ("tcp", "frame", {"timeout": 0.3, "retries": 1}),
    ("tcp", "scpi", {"timeout": 0.5}),
])
def test_suite_passes_over_serial_and_visa(transport, dialect, kw):
    from hwloop.chip.server import serve
    chip = serve(base_device(), transport=transport, dialect=dialect)
    try:
        stall, hangup = _hooks(chip)
        rep = check_device(open_device(chip.url, **kw), stall=stall, hangup=hangup)
    finally:
        chip.stop()
    assert_passes(rep)
    assert rep["timeout"].numbers["seconds"] < 1.5


@pytest.mark.parametrize("broken", list(BROKEN), ids=lambda c: c.__name__)
def test_each_broken_driver_fails_the_check_naming_its_fault(broken):
    rep = check_device(broken())
    want = BROKEN[broken]
    assert want in rep.failed(), rep.format_table()
    assert rep[want].detail  # says why


def test_the_correct_driver_underneath_passes():
    assert_passes(check_device(base_device()), ("timeout", "hangup"))


def test_only_and_unknown_checks():
    rep = check_device(base_device(), only=["weights_roundtrip", "closed_link"])
    assert [r.name for r in rep.results] == ["weights_roundtrip", "closed_link"] and rep.passed
    with pytest.raises(ValueError, match="unknown checks"):
        check_device(base_device(), only=["nope"])


def _png_ok(path: Path) -> bool:
    import matplotlib.image as mpimg
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and mpimg.imread(path).shape[0] > 100


def test_cli_check_device_characterise_harsh(tmp_path, capsys):
    from hwloop.cli import main
    out = tmp_path / "chk"
    assert main(["check-device", "devices/emulator-harsh.yaml", "--characterise",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "0 failed" in text and "characterisation:" in text
    conf = json.loads((out / "conformance.json").read_text())
    assert conf["passed"] and conf["mode"] == "statistical"
    rep = json.loads((out / "characterisation.json").read_text())
    for name in ("transfer_weight.png", "transfer_input.png", "jitter_linearity.png"):
        assert _png_ok(out / name), name
    assert rep["expected_resolution_tau_c"] == 0.125  # 16 steps over a 2 tau_c window
    assert rep["resolution_tau_c"] == pytest.approx(0.125)
    assert 0.05 < rep["jitter_tau_c"]["median"] < 0.2  # the profile's 0.1 tau_c, on a 1/8 grid
    assert rep["dead_neurons"] == [] and rep["stuck_neurons"] == []
    assert all(l["points"] >= 3 and 0.5 < -l["slope"] < 2 for l in rep["linearity"])


def test_characterise_finds_dead_and_stuck_neurons(tmp_path):
    from broken_drivers import Wrapper
    from hwloop.testing import characterise

    class DeadAndStuck(Wrapper):
        def run(self, x):
            rec = self.inner.run(x)
            rec.spike_times[1][:, 2] = float("inf")  # neuron 2 never fires
            rec.spike_times[1][:, 5] = 1.5           # neuron 5 always at 1.5
            return rec

    rep = characterise(DeadAndStuck(), tmp_path, plots=False, repetitions=4)
    assert rep["dead_neurons"] == [2] and rep["stuck_neurons"] == [5]
    assert rep["jitter_tau_c"]["max"] == 0.0  # no jitter in the base chip
    assert rep["resolution_tau_c"] == pytest.approx(2 / 32)  # the analog profile's 32 steps


def test_cli_check_device_exit_code_on_failure(tmp_path, monkeypatch):
    from broken_drivers import LostSpike
    from hwloop.cli import main
    import hwloop.devices.open as device_open
    monkeypatch.setattr(device_open, "open_named_device", lambda name, seed=None: LostSpike())
    assert main(["check-device", "whatever.yaml", "--out", str(tmp_path)]) == 1
    assert "counts_consistent" in json.loads((tmp_path / "conformance.json").read_text())["failed"]
