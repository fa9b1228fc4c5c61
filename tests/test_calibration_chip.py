"""A calibration record belongs to one chip, not to one device id (issue #10 follow-up B).

An emulator chip is identified by its frozen mismatch too: the record stores
``mismatch_sha256`` (the profile's mismatch and the chip seed), and a record is refused on a chip
whose mismatch changed under the same id (an edited YAML file, a profile override, a sweep
point over ``mismatch.*``), naming the file and both digests. Records without the digest (older
ones, the shipped example, real chips) are accepted as before.

On the main this was filed against, a record calibrated on a copy of emulator-mismatch.yaml was
accepted after the copy's mismatch was set to 0 (readout error vs the ideal SNN 0.000 -> 0.304,
exit 0): every refusal below failed."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from hwloop.calibrate import CalibrationOptions, calibrate_device, load_record, program_calibrated, save_record
from hwloop.calibrate import record as R
from hwloop.calibrate.record import check_record_matches, content_hash
from hwloop.emulator.device import EmulatorDevice
from hwloop.errors import CalibrationError
from hwloop.mapping import apply_windows, latency_windows, network_to_spec
from hwloop.devices.open import open_named_device
from hwloop.ttfs import convert

ROOT = Path(__file__).resolve().parents[1]
MISMATCH = ROOT / "devices" / "emulator-mismatch.yaml"
SHIPPED = ROOT / "calibration" / "emu-mismatch-seed5.json"
OPTS = dict(repeats=4, levels=4, widths=(2.0, 8.0))


def zero_mismatch(text: str) -> str:
    """The profile text with every mismatch standard deviation set to 0 (same device id)."""
    out = re.sub(r"^(\s+(synapse_gain|capacitance|ramp_current|threshold_offset|comparator_delay)_sd:)"
                 r"\s*[0-9.eE+-]+", r"\1 0.0", text, flags=re.M)
    assert out != text
    return out


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    relu = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 5))
    x = torch.rand(256, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    n = convert(relu, x.double(), dtype=torch.float64)
    return apply_windows(n, [4.0 * w for w in latency_windows(n, x.double(), 99.0)])


@pytest.fixture(scope="module")
def chip(tmp_path_factory, net):
    """A copy of emulator-mismatch.yaml, calibrated; the record saved beside it."""
    base = tmp_path_factory.mktemp("calchip")
    prof = base / "chip.yaml"
    prof.write_text(MISMATCH.read_text())
    dev = open_named_device(str(prof))
    rec = calibrate_device(dev, network_to_spec(net), CalibrationOptions(**OPTS))
    path = base / "chip.json"
    save_record(path, rec)
    return {"prof": prof, "record": path, "device": dev}


def test_record_carries_the_chips_mismatch_digest(chip):
    rec = load_record(chip["record"])
    assert rec.mismatch_sha256 == R.mismatch_digest(chip["device"])
    assert len(rec.mismatch_sha256) == 64


def test_record_accepted_on_the_same_chip_at_other_jitter_or_bits(chip, net):
    """Jitter (fresh every run) and the weight precision are not the frozen mismatch."""
    rec = load_record(chip["record"])
    from hwloop.emulator.profile import load_profile
    base = load_profile(chip["prof"])
    for upd in ({"jitter_sd": 0.1}, {"weight_bits": 6}):
        dev = EmulatorDevice.from_profile(base.model_copy(update=upd))
        program_calibrated(dev, copy.deepcopy(net), rec)


def test_edited_profile_refuses_the_record(chip, net, tmp_path):
    rec = load_record(chip["record"])
    edited = tmp_path / "chip.yaml"
    edited.write_text(zero_mismatch(chip["prof"].read_text()))
    dev = open_named_device(str(edited))
    assert dev.info().device_id == rec.device_id  # the id alone cannot tell
    with pytest.raises(CalibrationError, match="recalibrate"):
        program_calibrated(dev, copy.deepcopy(net), rec)  # the path finetune / evaluate take
    now = R.mismatch_digest(dev)
    pat = rf"{re.escape(str(chip['record']))}.*{rec.mismatch_sha256[:16]}.*{now[:16]}"
    with pytest.raises(CalibrationError, match=pat):
        check_record_matches(rec, dev.info().device_id, network_to_spec(net), device=dev)


def test_profile_override_and_chip_seed_change_the_digest(chip, net):
    rec = load_record(chip["record"])
    over = open_named_device(str(chip["prof"]), profile_overrides={"mismatch.synapse_gain_sd": 0.0})
    assert over.info().device_id == rec.device_id
    with pytest.raises(CalibrationError, match="mismatch_sha256"):
        program_calibrated(over, copy.deepcopy(net), rec)
    a = open_named_device(str(chip["prof"]), chip_seed=5)
    b = open_named_device(str(chip["prof"]), chip_seed=6)
    assert R.mismatch_digest(a) == rec.mismatch_sha256 != R.mismatch_digest(b)


def test_older_records_and_real_chips_are_compared_by_id(chip, net):
    """A record without the digest (the shipped example predates it) loads with its stored hash
    and is accepted on the edited chip as before; a device without a profile is not compared."""
    old = load_record(SHIPPED)
    assert old.mismatch_sha256 is None and old.content_hash == content_hash(old)
    rec = load_record(chip["record"])

    class RealChip:  # no profile attribute: nothing to compare
        pass
    check_record_matches(rec, rec.device_id, network_to_spec(net), device=RealChip())
    stripped = rec.model_copy(update={"mismatch_sha256": None})
    dev = open_named_device(str(chip["prof"]), profile_overrides={"mismatch.synapse_gain_sd": 0.0})
    check_record_matches(stripped, rec.device_id, network_to_spec(net), device=dev)


def test_digest_field_is_validated_and_hashed(chip, tmp_path):
    import json
    data = json.loads(chip["record"].read_text())
    data["mismatch_sha256"] = "not-a-digest"
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match="mismatch_sha256.*sha256 hex digest"):
        load_record(p)
    data["mismatch_sha256"] = "0" * 64  # a valid-looking edit is caught by the content hash
    p.write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match="hash"):
        load_record(p)


def test_cli_evaluate_refuses_the_record_on_an_edited_profile(chip, tmp_path, monkeypatch, capsys):
    from hwloop.cli import main
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    prof = tmp_path / "chip.yaml"
    out = tmp_path / "cal.json"
    prof.write_text(MISMATCH.read_text())
    assert main(["calibrate", "--device", str(prof), "--dataset", "synthetic", "--out", str(out),
                 "--repeats", "4", "--levels", "4", "--widths", "2,8", "--no-plots"]) == 0
    capsys.readouterr()
    prof.write_text(zero_mismatch(prof.read_text()))
    assert main(["evaluate", "--device", str(prof), "--dataset", "synthetic", "--calibration", str(out),
                 "--pretrain-epochs", "1", "--train-subset", "200", "--test-subset", "50",
                 "--no-plots", "--no-progress", "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "mismatch_sha256" in err and "recalibrate" in err



def test_finetune_refuses_the_record_under_a_mismatch_override(tmp_path):
    """A sweep point over mismatch.* runs finetune with profile overrides: same id, other chip."""
    from hwloop.calibrate.fit import spec_for_arch
    from hwloop.train.finetune import run_finetune
    from hwloop.train.options import FinetuneOptions
    from hwloop.train.hil import FinetuneConfig
    prof = tmp_path / "chip.yaml"
    prof.write_text(MISMATCH.read_text())
    rec = calibrate_device(open_named_device(str(prof)), spec_for_arch("fc2", "synthetic"),
                           CalibrationOptions(**OPTS, synapse_gains=False))
    save_record(tmp_path / "cal.json", rec)
    opts = FinetuneOptions(device=str(prof), dataset="synthetic", arch="fc2", train_subset=120,
                           test_subset=40, pretrain_epochs=1, cache_dir=str(tmp_path / "cache"),
                           progress=False, plots=False, out=str(tmp_path / "run"),
                           calibration=str(tmp_path / "cal.json"),
                           profile_overrides={"mismatch.threshold_offset_sd": 0.0},
                           finetune=FinetuneConfig(epochs=1, batch_size=24, max_steps_per_epoch=1))
    with pytest.raises(CalibrationError, match=r"cal\.json.*mismatch_sha256"):
        run_finetune(opts, log=lambda _m: None)
    run_finetune(opts.model_copy(update={"profile_overrides": {}}), log=lambda _m: None)  # same chip: fine
