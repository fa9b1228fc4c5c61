"""`hwloop finetune` runs unchanged against a chip behind the serial or VISA backend.

The virtual chip (the analog emulator behind the real protocol) is served on a pty or on TCP
loopback; fine-tuning through it must give bit-identical weights to the in-process emulator with
the same chip seed, also with link faults, and a disconnect must end in a clear error with the
last checkpoint intact.
"""

from __future__ import annotations

import pytest

from hwloop.emulator.device import EmulatorDevice
from hwloop.chip.server import FaultConfig, serve
from hwloop.errors import DeviceError
from hwloop.train.checkpoint import load_checkpoint
from hwloop.train.finetune import run_finetune
from hwloop.train.options import REPO_ROOT, FinetuneOptions
from hwloop.train.hil import FinetuneConfig

ANALOG = str(REPO_ROOT / "devices" / "emulator-analog.yaml")
CHIP_SEED = 5


def _opts(tmp_path, name, device, chip_seed=None, epochs=1):
    return FinetuneOptions(dataset="synthetic", device=device, chip_seed=chip_seed,
                           out=str(tmp_path / name), cache_dir=str(tmp_path / "cache"),
                           pretrain_epochs=2, train_subset=240, test_subset=120, progress=False,
                           eval_batch_size=60,
                           finetune=FinetuneConfig(epochs=epochs, lr=3e-3, batch_size=40))


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clean")
    return tmp, run_finetune(_opts(tmp, "inproc", ANALOG, CHIP_SEED, epochs=2), log=lambda m: None)


def _chip(**kw):
    return serve(EmulatorDevice.from_profile(ANALOG, chip_seed=CHIP_SEED), **kw)


@pytest.mark.parametrize("transport,dialect,faults", [
    ("pty", "frame", None),
    ("tcp", "frame", FaultConfig(bit_flip_rate=1e-4, drop_rate=0.01, seed=3)),
    ("tcp", "scpi", None),
])
def test_finetune_through_transport_equals_in_process(clean, transport, dialect, faults):
    tmp, ref = clean
    chip = _chip(transport=transport, dialect=dialect, faults=faults)
    try:
        url = chip.url
        rep = run_finetune(_opts(tmp, f"{transport}-{dialect}", url, epochs=2), log=lambda m: None)
    finally:
        chip.stop()
    assert rep["final_weights_sha256"] == ref["final_weights_sha256"]
    assert rep["after"]["device"]["accuracy"] == ref["after"]["device"]["accuracy"]
    assert rep["provenance"]["device_id"] == ref["provenance"]["device_id"]
    if faults is not None:
        health = rep["provenance"]["health"]
        assert health["retries"] + health["crc_errors"] + health["timeouts"] > 0


def test_disconnect_mid_epoch_is_a_clear_error_and_keeps_the_checkpoint(clean):
    tmp, ref = clean
    # enough frames for the set-up and the first epoch (~330 with protocol 3), not for the
    # second (~490 in all)
    chip = _chip(transport="tcp", dialect="frame", faults=FaultConfig(disconnect_after=410))
    opts = _opts(tmp, "disconnect", chip.url, epochs=2)
    try:
        with pytest.raises(DeviceError):
            run_finetune(opts, log=lambda m: None)
    finally:
        chip.stop()
    ckpt = load_checkpoint(tmp / "disconnect" / "checkpoint.pt")
    assert ckpt["epoch"] == 1
    # resume against a fresh chip: the same final weights as the uninterrupted run
    chip2 = _chip(transport="tcp", dialect="frame")
    try:
        rep = run_finetune(opts.model_copy(update={"device": chip2.url, "resume": True}),
                           log=lambda m: None)
    finally:
        chip2.stop()
    assert rep["final_weights_sha256"] == ref["final_weights_sha256"]


@pytest.mark.parametrize("dialect", ["frame", "scpi"])
def test_resume_on_a_virtual_chip_with_another_model_is_refused(clean, dialect):
    """A virtual chip restarted with an edited profile under the same device id (here: random
    jitter 10x) is not the same chip: resume is refused, naming the model digest. The same
    chip restarted on another port resumes (test above)."""
    from hwloop.devices.open import open_device
    from hwloop.emulator.profile import load_profile
    from hwloop.errors import CheckpointError
    tmp, _ = clean
    from hwloop.train.finetune import _Interrupt
    chip = _chip(transport="tcp", dialect=dialect)
    opts = _opts(tmp, f"model-{dialect}", chip.url, epochs=2)
    try:
        with open_device(chip.url) as dev:  # the link carries the chip's model digest
            assert dev.model_sha256 == chip_model(ANALOG)
        with pytest.raises(_Interrupt):  # killed in epoch 2, after the first checkpoint
            run_finetune(opts, log=lambda m: None, stop_after_steps=8)
    finally:
        chip.stop()
    prof = load_profile(ANALOG).model_copy(update={"jitter_sd": 0.2})
    other = serve(EmulatorDevice.from_profile(prof, chip_seed=CHIP_SEED), transport="tcp", dialect=dialect)
    try:
        with pytest.raises(CheckpointError, match="model_sha256"):
            run_finetune(opts.model_copy(update={"device": other.url, "resume": True}), log=lambda m: None)
    finally:
        other.stop()


def chip_model(profile_path) -> str:
    return EmulatorDevice.from_profile(profile_path, chip_seed=CHIP_SEED).model_sha256
