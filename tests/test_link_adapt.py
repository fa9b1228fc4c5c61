"""The frame dialect adapts to the link (issue #12, items 6-7).

* the silence timeout follows the measured round trip (RFC 6298: smoothed RTT + 4 x variance,
  doubled on every silent retry): a chip that takes 60 ms (or 200 ms) per reply costs a few
  retries, not hundreds (or a DeviceTimeout);
* frame sizes follow the observed error rate: at 3e-3 bit flips per byte a fine-tuning epoch
  completes with weights identical to a clean run, and at 1e-3 the host sends at most 5x the
  bytes of a clean run;
* the options reach the host through the device string.
"""

from __future__ import annotations

import pytest

from hwloop.devices.open import open_device
from hwloop.wire.serial_device import SerialDevice
from hwloop.chip.server import FaultConfig, serve
from hwloop.errors import DeviceError

from fakes import FakeB1Device, grid_inputs, random_params, small_spec
from test_transports import SPEC, assert_same, setup


@pytest.mark.parametrize("delay,most", [(0.06, 4), (0.2, 6)])
def test_a_slow_chip_costs_a_few_retries(delay, most):
    # before: ack_timeout fixed at 50 ms, 166 retries at 60 ms and a DeviceTimeout at 200 ms
    chip = serve(FakeB1Device(time_step=1 / 64), transport="tcp",
                 faults=FaultConfig(delay_s=delay))
    ref = FakeB1Device(time_step=1 / 64)
    setup(ref)
    try:
        with SerialDevice(chip.url) as dev:
            setup(dev)
            x = grid_inputs(SPEC, 8, seed=1)
            assert_same(dev.run(x), ref.run(x))
            assert dev.health["retries"] <= most, dev.health
            assert dev.health["rto_ms"] > 1000 * delay  # the timeout has learnt the chip
    finally:
        chip.stop()


def test_rto_follows_rfc6298_with_back_off_and_bounds():
    chip = serve(FakeB1Device(), transport="tcp")
    try:
        with SerialDevice(chip.url, ack_timeout=0.02, max_ack_timeout=0.5) as dev:
            dev._srtt, dev._rttvar = None, 0.0
            dev._rtt_sample(0.1)
            assert dev._srtt == 0.1 and dev._rttvar == 0.05
            assert dev._rto == pytest.approx(0.1 + 4 * 0.05)
            dev._rtt_sample(0.1)
            assert dev._srtt == pytest.approx(0.1) and dev._rttvar == pytest.approx(0.0375)
            for _ in range(200):  # steady: the variance term is floored, not zero
                dev._rtt_sample(0.1)
            assert dev._rto == pytest.approx(0.1 + 0.01 + 0.1 / 4, rel=1e-3)
            dev._rtt_sample(10.0)
            assert dev._rto == 0.5  # max_ack_timeout
            for _ in range(200):
                dev._rtt_sample(0.0)
            assert dev._rto == 0.02  # ack_timeout is the floor
    finally:
        chip.stop()


def test_chunks_shrink_on_a_noisy_link_and_grow_back_when_clean():
    faults = FaultConfig(bit_flip_rate=3e-3, seed=5)
    chip = serve(FakeB1Device(), transport="tcp", faults=faults)
    spec = small_spec(n_in=256, hidden=64, n_out=4)  # layer 0: 32 KiB of int16 codes
    try:
        with SerialDevice(chip.url, timeout=1.0, retries=8) as dev:
            dev.program(spec)
            w, _ = random_params(spec, seed=2)
            for i in range(3):
                dev.write_weights(0, w[0][0], w[0][1] * (1 + i))
            assert dev.chunk_bytes < 1024 and dev.reply_chunk_bytes < 1024, dev.health
            small = dev.chunk_bytes
            faults.bit_flip_rate = 0.0  # the link becomes clean (the injector reads it live)
            for i in range(300):
                dev.status()
            assert dev.chunk_bytes > 2 * small and dev.reply_chunk_bytes > 256
            assert dev.read_weights(0)[0].equal(w[0][0])
    finally:
        chip.stop()


def test_options_reach_the_host_through_the_device_string():
    chip = serve(FakeB1Device(), transport="tcp")
    try:
        with open_device(chip.url + "?ack_timeout=0.2&chunk_bytes=512&adaptive=0"
                         "&max_ack_timeout=3") as dev:
            assert isinstance(dev, SerialDevice)
            assert (dev.ack_timeout, dev.chunk_bytes, dev.adaptive, dev.max_ack_timeout) == \
                (0.2, 512, False, 3.0)
        with pytest.raises(DeviceError, match="unknown option 'bogus'"):
            open_device(chip.url + "?bogus=1")
        with pytest.raises(DeviceError, match="not a float"):
            open_device(chip.url + "?ack_timeout=fast")
    finally:
        chip.stop()


# ------------------------------------------------------------------------------------------------
# Fine-tuning through a noisy link
# ------------------------------------------------------------------------------------------------

from hwloop.train.finetune import run_finetune  # noqa: E402
from hwloop.train.options import REPO_ROOT, FinetuneOptions  # noqa: E402
from hwloop.train.hil import FinetuneConfig  # noqa: E402

ANALOG = str(REPO_ROOT / "devices" / "emulator-analog.yaml")
CHIP_SEED = 5


def _opts(tmp, name, device, chip_seed=None):
    return FinetuneOptions(dataset="synthetic", device=device, chip_seed=chip_seed,
                           out=str(tmp / name), cache_dir=str(tmp / "cache"),
                           pretrain_epochs=2, train_subset=80, test_subset=40, progress=False,
                           eval_batch_size=40,
                           finetune=FinetuneConfig(epochs=1, lr=3e-3, batch_size=40))


def _through(tmp, name, rate):
    from hwloop.emulator.device import EmulatorDevice
    chip = serve(EmulatorDevice.from_profile(ANALOG, chip_seed=CHIP_SEED), transport="tcp",
                 faults=FaultConfig(bit_flip_rate=rate, seed=11) if rate else None)
    try:
        return run_finetune(_opts(tmp, name, chip.url), log=lambda m: None)
    finally:
        chip.stop()


@pytest.fixture(scope="module")
def finetune_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("linkadapt")
    ref = run_finetune(_opts(tmp, "inproc", ANALOG, CHIP_SEED), log=lambda m: None)
    return tmp, ref, _through(tmp, "clean", 0.0)


@pytest.mark.slow  # 15 s: in `make test-all`. It failed 1 run in 4 before staged writes could be
# resent in smaller frames after a damaged NAK (serial_exchange.STAGED_WRITES); 12 of 12 after
def test_finetune_at_3e_3_bit_flips_per_byte_equals_a_clean_run(finetune_runs):
    tmp, ref, clean = finetune_runs
    rep = _through(tmp, "noisy3", 3e-3)
    assert rep["final_weights_sha256"] == ref["final_weights_sha256"] == \
        clean["final_weights_sha256"]
    h = rep["provenance"]["health"]
    assert h["naks"] > 0 and h["chunk_bytes"] < 1024
    assert rep["provenance"]["protocol_version"] == 3


def test_bytes_at_1e_3_are_within_5x_of_a_clean_run(finetune_runs):
    tmp, ref, clean = finetune_runs
    rep = _through(tmp, "noisy1", 1e-3)
    assert rep["final_weights_sha256"] == ref["final_weights_sha256"]
    h, h0 = rep["provenance"]["health"], clean["provenance"]["health"]
    ratio = h["bytes_tx"] / h0["bytes_tx"]
    total = (h["bytes_tx"] + h["bytes_rx"]) / (h0["bytes_tx"] + h0["bytes_rx"])
    print(f"1e-3: sent {ratio:.2f}x, sent+received {total:.2f}x the clean run's bytes")
    assert ratio <= 5.0 and total <= 5.0
