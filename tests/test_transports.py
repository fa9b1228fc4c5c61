"""Real stacks on loopback against the virtual chip: pyserial over a pty and ``socket://``,
pyvisa + pyvisa-py on ``TCPIP::127.0.0.1::PORT::SOCKET``. A run through each transport equals the
in-process run exactly; faults do not change results; hang-ups are reported promptly."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from hwloop.devices.open import open_device
from hwloop.wire.serial_device import SerialDevice
from hwloop.chip.server import FaultConfig, serve
from hwloop.wire.visa_device import VisaDevice
from hwloop.errors import DeviceError, DeviceTimeout, WriteVerifyError

from fakes import FakeB1Device, grid_inputs, random_params, small_spec

SPEC = small_spec(n_in=12, hidden=10, n_out=4)


ROOT = Path(__file__).resolve().parents[1]
ANALOG = ROOT / "devices" / "emulator-analog.yaml"
HAVE_EMULATOR = (ROOT / "hwloop" / "emulator" / "device.py").exists() and ANALOG.exists()


def make_device(kind: str = "emulator", jitter_seed=None):
    """The device behind the virtual chip; an identical call builds the in-process reference.

    "emulator": the analog profile (6-bit weights, 32 steps per window, frozen mismatch) with a
    fixed chip seed, random jitter off (or on with a fixed ``jitter_seed``) and adaptive windows
    allowed. "fake": the exact B1 fake of tests/fakes.py on a 1/64 tau_c grid (exact in ticks).
    """
    if kind == "emulator" and HAVE_EMULATOR:
        from hwloop.emulator.device import EmulatorDevice
        from hwloop.emulator.profile import load_profile
        profile = load_profile(ANALOG).model_copy(update={
            "jitter_sd": 0.0 if jitter_seed is None else 0.05, "adaptive_windows": True})
        return EmulatorDevice.from_profile(profile, chip_seed=3,
                                           jitter_seed=0 if jitter_seed is None else jitter_seed)
    return FakeB1Device(time_step=1 / 64)


def setup(dev, spec=SPEC, seed=0):
    dev.program(spec)
    weights, thresholds = random_params(spec, seed=seed, bits=min(dev.info().weight_bits, 16))
    for i, (codes, scale) in weights.items():
        dev.write_weights(i, codes, scale)
    for i, t in thresholds.items():
        dev.write_thresholds(i, t)


def reference(x, spec=SPEC, kind="emulator", **kw):
    dev = make_device(kind, **kw)
    setup(dev, spec)
    return dev.run(x)


def assert_same(a, b):
    assert len(a.spike_times) == len(b.spike_times)
    for s, t in zip(a.spike_times, b.spike_times):
        assert s.dtype == t.dtype and torch.equal(s, t)
    assert torch.equal(a.readout, b.readout)
    assert len(a.v_tmax) == len(b.v_tmax)
    for s, t in zip(a.v_tmax, b.v_tmax):
        assert torch.equal(s, t)
    assert torch.equal(a.spike_counts, b.spike_counts)
    assert a.neurons_per_layer == b.neurons_per_layer
    assert (a.energy_j is None) == (b.energy_j is None)
    if a.energy_j is not None:
        assert torch.equal(a.energy_j, b.energy_j)


@pytest.fixture
def chip_factory():
    chips = []

    def make(kind="emulator", jitter_seed=None, **kw):
        chip = serve(make_device(kind, jitter_seed), **kw)
        chips.append(chip)
        return chip

    yield make
    for c in chips:
        c.stop()


def _check_roundtrip(dev, x, kind="emulator"):
    setup(dev)
    rec = dev.run(x)
    ref = reference(x, kind=kind)
    assert_same(rec, ref)
    if kind == "emulator" and HAVE_EMULATOR:
        assert rec.energy_j is not None  # the emulator's energy crosses the wire too
    assert 0 < int(rec.spike_counts.sum()) < rec.spike_counts.shape[0] * sum(rec.neurons_per_layer)
    codes, scale = dev.read_weights(0)
    w, th = random_params(SPEC, bits=min(dev.info().weight_bits, 16))
    assert torch.equal(codes, w[0][0]) and scale == w[0][1]
    assert torch.equal(dev.read_thresholds(1), th[1])
    return rec


def test_pyserial_over_pty_equals_in_process(chip_factory):
    chip = chip_factory(transport="pty")
    assert chip.pty_path.startswith("/dev/")
    x = grid_inputs(SPEC, 16, seed=1)
    with open_device(chip.url, timeout=1.0) as dev:
        assert isinstance(dev, SerialDevice) and dev.f64
        _check_roundtrip(dev, x)
        assert dev.health["retries"] == 0


def test_socket_equals_in_process(chip_factory):
    chip = chip_factory(transport="tcp")
    assert chip.url.startswith("socket://127.0.0.1:")
    x = grid_inputs(SPEC, 64, seed=2)  # a 64-sample run spans several frames each way
    with SerialDevice(chip.url, timeout=1.0, chunk_bytes=1024) as dev:
        assert dev.f64
        rec = _check_roundtrip(dev, x)
        assert rec.meta["time_format"] == "f64"
        # new windows through the wire change the result exactly as in-process
        wins = [(1.0, 2.5), (2.5, 4.5)]
        dev.set_windows(wins)
        assert dev.status()["spec"]["layers"][2]["t_max"] == 4.5  # the readout follows
        ref = make_device()
        setup(ref)
        ref.set_windows(wins)
        assert_same(dev.run(x), ref.run(x))


def test_socket_with_random_jitter_equals_in_process_given_the_seed(chip_factory):
    chip = chip_factory(transport="tcp", jitter_seed=1234)
    xs = [grid_inputs(SPEC, 8, seed=s) for s in (4, 5)]
    ref = make_device(jitter_seed=1234)
    setup(ref)
    with SerialDevice(chip.url, timeout=1.0) as dev:
        setup(dev)
        for x in xs:  # the chip runs each batch exactly once, retries or not
            assert_same(dev.run(x), ref.run(x))


def test_ticks_are_exact_on_a_power_of_two_grid(chip_factory):
    # the fake reports 256 ticks per tau_c and spikes on a 1/64 tau_c grid: ticks lose nothing
    chip = chip_factory("fake", transport="tcp")
    x = grid_inputs(SPEC, 16, seed=6)
    with SerialDevice(chip.url, timeout=1.0, time_format="ticks") as dev:
        assert not dev.f64 and dev.ratio == 256.0
        rec = _check_roundtrip(dev, x, kind="fake")
        assert rec.meta["time_format"] == "ticks"


def test_visa_tcpip_socket_equals_in_process(chip_factory):
    chip = chip_factory(transport="tcp", dialect="scpi")
    assert chip.url == f"TCPIP::127.0.0.1::{chip.port}::SOCKET"
    x = grid_inputs(SPEC, 32, seed=3)
    with open_device(chip.url, timeout=2.0, chunk_codes=50) as dev:
        assert isinstance(dev, VisaDevice) and dev.f64
        assert dev.idn.split(",")[2] == dev.info().device_id
        _check_roundtrip(dev, x)
        # write only what changed, still verified
        w, _ = random_params(SPEC, bits=dev.info().weight_bits)
        codes = w[0][0].clone()
        codes[0, 0] = -codes[0, 0] if codes[0, 0] != 0 else 1
        before = dev.health["bytes_tx"]
        dev.write_weights(0, codes, w[0][1])
        assert dev.health["bytes_tx"] - before < 2 * 50 * 4 + 400
        assert torch.equal(dev.read_weights(0)[0], codes)


@pytest.mark.parametrize("transport", ["tcp", "pty"])
def test_faults_do_not_change_results(chip_factory, transport):
    chip = chip_factory(transport=transport, faults=FaultConfig(
        bit_flip_rate=1e-4, drop_rate=0.01, dup_rate=0.01, seed=7))
    xs = [grid_inputs(SPEC, 32, seed=10 + i) for i in range(4)]
    # byte_rate=0: a pty has no baud rate, so timeouts need no transfer-time term
    with SerialDevice(chip.url, timeout=0.2, chunk_bytes=1024, retries=8, byte_rate=0) as dev:
        setup(dev)
        for x in xs:
            assert_same(dev.run(x), reference(x))  # the emulator without jitter: stateless
        h = dev.health
    injected = chip.fault_stats[0]
    assert injected["flipped_bits"] + injected["dropped"] > 0
    assert h["retries"] > 0


def test_disconnect_is_a_clear_device_error(chip_factory):
    chip = chip_factory(transport="tcp", faults=FaultConfig(disconnect_after=4))
    dev = SerialDevice(chip.url, timeout=5.0)
    t0 = time.monotonic()
    with pytest.raises(DeviceError) as ei:
        setup(dev)
    assert not isinstance(ei.value, DeviceTimeout)
    assert time.monotonic() - t0 < 2.0
    assert chip.url in str(ei.value) and "hung up" in str(ei.value)
    dev.close()
    dev.close()  # idempotent


@pytest.mark.parametrize("transport", ["tcp", "pty"])
def test_serial_peer_hangup_detected_promptly(chip_factory, transport):
    chip = chip_factory(transport=transport)
    dev = SerialDevice(chip.url, timeout=10.0)
    setup(dev)
    chip.disconnect()
    t0 = time.monotonic()
    with pytest.raises(DeviceError) as ei:
        dev.run(grid_inputs(SPEC, 4))
    assert not isinstance(ei.value, DeviceTimeout)
    assert time.monotonic() - t0 < 2.0
    dev.close()


def test_visa_peer_hangup_detected_promptly(chip_factory):
    # the chip hangs up on the 3rd command after setup: during a query, with a 10 s timeout
    chip = chip_factory(transport="tcp", dialect="scpi")
    dev = VisaDevice(chip.url, timeout=10.0)
    setup(dev)
    chip.disconnect()
    t0 = time.monotonic()
    with pytest.raises(DeviceError) as ei:
        dev.run(grid_inputs(SPEC, 4))
    assert not isinstance(ei.value, DeviceTimeout)
    assert time.monotonic() - t0 < 2.0
    dev.close()
    chip2 = chip_factory(transport="tcp", dialect="scpi",
                         faults=FaultConfig(disconnect_after=12))
    dev = VisaDevice(chip2.url, timeout=10.0)
    t0 = time.monotonic()
    with pytest.raises(DeviceError) as ei:
        setup(dev)
        dev.run(grid_inputs(SPEC, 4))
    assert not isinstance(ei.value, DeviceTimeout)
    assert time.monotonic() - t0 < 3.0
    dev.close()


@pytest.mark.parametrize("dialect", ["frame", "scpi"])
def test_write_verify_error_over_the_wire(chip_factory, dialect):
    chip = chip_factory("fake", transport="tcp", dialect=dialect)
    chip.core.device.stuck[0] = [3]  # one stuck cell in layer 0
    dev = open_device(chip.url, timeout=1.0)
    try:
        dev.program(SPEC)
        w, _ = random_params(SPEC, bits=8)
        codes = w[0][0].clone()
        codes.view(-1)[3] = 5
        with pytest.raises(WriteVerifyError) as ei:
            dev.write_weights(0, codes, w[0][1])
        assert ei.value.layers == [0]
        dev.write_weights(1, *w[1])  # other layers verify fine
    finally:
        dev.close()


def test_device_errors_cross_the_wire(chip_factory):
    from hwloop.errors import DeviceLimitError
    for dialect in ("frame", "scpi"):
        chip = chip_factory(transport="tcp", dialect=dialect)
        with open_device(chip.url, timeout=1.0) as dev:
            with pytest.raises(DeviceLimitError, match="max_fan_in"):
                dev.program(small_spec(n_in=20000))
            with pytest.raises(DeviceError, match="no network programmed"):
                dev.run(grid_inputs(SPEC, 2))


def test_open_device_rejects_unknown_strings():
    with pytest.raises(DeviceError, match="accepted forms"):
        open_device("telnet://nowhere")


def test_server_binds_loopback_only_unless_allowed():
    with pytest.raises(ValueError, match="loopback"):
        serve(make_device(), transport="tcp", host="0.0.0.0")
    with pytest.raises(ValueError, match="scpi"):
        serve(make_device(), transport="tcp", dialect="scpi",
              faults=FaultConfig(bit_flip_rate=1e-3))


def test_cli_serve_runs_a_virtual_chip(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    if not HAVE_EMULATOR:
        pytest.skip("emulator not available")
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from hwloop.cli import main; sys.exit(main())",
         "serve", "--profile", str(ANALOG), "--tcp", "127.0.0.1:0", "--chip-seed", "5"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = proc.stdout.readline()
        assert "socket://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() else "")
        url = line.split("url: ")[1].split()[0]
        with open_device(url, timeout=2.0) as dev:
            assert dev.info().device_id.startswith("emu-analog")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_cli_serve_refuses_remote_bind_without_flag():
    from hwloop.cli import main
    if not HAVE_EMULATOR:
        pytest.skip("emulator not available")
    assert main(["serve", "--profile", str(ANALOG), "--tcp", "0.0.0.0:0"]) == 2


def test_scan_tolerates_backend_failures(monkeypatch):
    import pyvisa
    from hwloop.commands import devices_scan

    found = devices_scan.scan()
    assert isinstance(found, list) and all("kind" in d for d in found)

    def boom(*a, **k):
        raise OSError("no VISA here")

    monkeypatch.setattr(pyvisa, "ResourceManager", boom)
    found = devices_scan.scan()
    visa = [d for d in found if d["kind"] == "visa"]
    assert visa and "no VISA here" in visa[0]["error"]


def test_wide_codes_on_a_32_bit_device(chip_factory):
    if not HAVE_EMULATOR:
        pytest.skip("emulator not available")
    from hwloop.emulator.device import EmulatorDevice
    chip = serve(EmulatorDevice.from_profile(ROOT / "devices" / "emulator-ideal.yaml"),
                 transport="tcp")
    try:
        with SerialDevice(chip.url, timeout=1.0, chunk_bytes=512) as dev:
            assert dev.info().weight_bits == 32
            dev.program(SPEC)
            codes = torch.randint(-2 ** 31, 2 ** 31 - 1, (10, 12), dtype=torch.int64)
            dev.write_weights(0, codes, 1e-9)  # int32 codes (WIDE), several chunks, verified
            got, scale = dev.read_weights(0)
            assert torch.equal(got, codes) and scale == 1e-9
            with pytest.raises(DeviceError, match="integer weight codes"):
                dev.write_weights(0, codes.double() + 0.5, 1.0)
    finally:
        chip.stop()


@pytest.mark.parametrize("dialect", ["frame", "scpi"])
def test_seed_noise_crosses_the_wire(chip_factory, dialect):
    if not HAVE_EMULATOR:
        pytest.skip("emulator not available")
    chip = chip_factory(transport="tcp", dialect=dialect, jitter_seed=99)
    ref = make_device(jitter_seed=1)
    setup(ref)
    x = grid_inputs(SPEC, 8, seed=9)
    with open_device(chip.url, timeout=1.0) as dev:
        setup(dev)
        dev.seed_noise(4321)
        ref.seed_noise(4321)
        assert_same(dev.run(x), ref.run(x))
    # a device without seedable noise (the fake keeps the base no-op) accepts it too
    chip2 = chip_factory("fake", transport="tcp", dialect=dialect)
    with open_device(chip2.url, timeout=1.0) as dev:
        dev.seed_noise(1)


def test_heavy_bit_flips_never_close_the_link(chip_factory, caplog):
    # 10x the rate above: nearly every large frame arrives damaged; the chip NAKs each and keeps
    # the link, and the host gets exact results
    chip = chip_factory(transport="tcp", faults=FaultConfig(bit_flip_rate=1e-3, seed=11))
    with caplog.at_level("INFO", logger="hwloop.chip"):
        with SerialDevice(chip.url, timeout=0.5, chunk_bytes=1024, retries=8) as dev:
            setup(dev)
            for i in range(3):
                x = grid_inputs(SPEC, 16, seed=20 + i)
                assert_same(dev.run(x), reference(x))
            assert dev.health["naks"] + dev.health["crc_errors"] > 0
        deadline = time.monotonic() + 2.0
        while "closed the link" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
    assert chip.stats["connections"] == 1 and chip.stats["bad_frames"] > 0
    assert chip.stats["internal_errors"] == 0
    assert "closed the link: the peer hung up" in caplog.text  # the host's close, logged


def test_chip_logs_why_it_closes_a_link(chip_factory, caplog):
    chip = chip_factory(transport="tcp", faults=FaultConfig(disconnect_after=2))
    with caplog.at_level("INFO", logger="hwloop.chip"):
        dev = SerialDevice(chip.url, timeout=1.0)
        with pytest.raises(DeviceError):
            dev.status()
        dev.close()
    assert "disconnect_after=2" in caplog.text
