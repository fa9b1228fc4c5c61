"""`hwloop evaluate --weights` runs on the chip exactly what fine-tuning left there (issue #10
follow-up A): the saved state (codes, scales, thresholds, windows) is programmed as saved, not
quantised afresh; another chip refuses it unless ``--requantize``; weights fine-tuned with a
calibration record are never compensated twice, decided from the file itself.

Each test failed on the main it was filed against: the codes read back differed from the saved
ones (fresh scales), the evaluation differed from the run's final one, ``--chip-seed 7``
programmed the weights without a word, and a weights file moved away from its report.json was
compensated a second time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hwloop.errors import CheckpointError
from hwloop.train import evaluation as ev
from hwloop.train import twin
from hwloop.train.finetune import run_finetune
from hwloop.train.options import FinetuneOptions
from hwloop.train.hil import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = dict(dataset="synthetic", arch="fc2", train_subset=160, test_subset=80, pretrain_epochs=2)


def quiet(_msg: str) -> None:
    pass


def jitter_free_harsh(folder: Path) -> Path:
    """A copy of emulator-harsh.yaml without jitter (same device id emu-harsh-seed2): every
    evaluation of one programmed state gives the same figures."""
    text = (ROOT / "devices" / "emulator-harsh.yaml").read_text()
    assert "jitter_sd: 0.1" in text
    p = folder / "harsh-nojitter.yaml"
    p.write_text(text.replace("jitter_sd: 0.1", "jitter_sd: 0.0", 1))
    return p


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny fine-tuning run on the jitter-free harsh chip; large steps, so that the weights
    move far enough for fresh quantisation scales to change codes."""
    base = tmp_path_factory.mktemp("evw")
    prof = jitter_free_harsh(base)
    opts = FinetuneOptions(device=str(prof), cache_dir=str(base / "cache"), out=str(base / "run"),
                           progress=False, plots=False,
                           finetune=FinetuneConfig(epochs=2, batch_size=32, lr=2e-2,
                                                   max_steps_per_epoch=4), **DATA)
    report = run_finetune(opts, log=quiet)
    return {"base": base, "prof": prof, "opts": opts, "report": report,
            "weights": base / "run" / "final_weights.pt"}


def capture_devices(monkeypatch) -> list[dict]:
    """Record, as each device opened by evaluate is closed, the codes, scales and thresholds
    read back from it."""
    seen: list[dict] = []
    real = ev.open_named_device

    def opener(*a, **kw):
        dev = real(*a, **kw)
        close = dev.close

        def snapshot_then_close():
            spec = dev.spec
            if spec is not None and "codes" not in (seen[-1] if seen else {}):
                snap = {"id": dev.info().device_id, "codes": {}, "thresholds": {}}
                for i, layer in enumerate(spec.layers):
                    if layer.weight_shape:
                        snap["codes"][i] = tuple(x.clone() if torch.is_tensor(x) else x
                                                 for x in dev.read_weights(i))
                    if layer.kind in ("dense", "conv2d", "readout"):
                        snap["thresholds"][i] = dev.read_thresholds(i).clone()
                seen.append(snap)
            close()
        dev.close = snapshot_then_close
        return dev
    monkeypatch.setattr(ev, "open_named_device", opener)
    return seen


def evaluate(run, **kw):
    args = dict(device=str(run["prof"]), weights=str(run["weights"]),
                cache_dir=str(run["base"] / "cache"), log=quiet, **DATA)
    args.update(kw)
    return ev.evaluate_on_device(**args)


def test_saved_state_is_programmed_bit_exactly(run, monkeypatch):
    saved = torch.load(run["weights"], weights_only=True)
    assert {"shadow", "state", "device_id", "calibration"} <= set(saved)
    seen = capture_devices(monkeypatch)
    out = evaluate(run)
    assert len(seen) == 1
    state = saved["state"]
    for i, (codes, scale) in state["weights"].items():
        rc, rs = seen[0]["codes"][int(i)]
        assert torch.equal(rc.to(codes.dtype), codes), f"layer {i}: codes differ from the saved ones"
        assert float(rs) == float(scale), f"layer {i}: scale {rs} != saved {scale}"
    for i, v in state["thresholds"].items():
        assert torch.equal(seen[0]["thresholds"][int(i)].to(torch.float64), v), f"layer {i}"
    assert out["programmed"]["from"] == "saved state"
    # ... and the chip computes what the run measured at its end (no jitter: exactly)
    after = run["report"]["after"]["device"]
    assert out["device"]["accuracy"] == after["accuracy"]
    assert out["device"]["spikes_per_neuron"] == after["spikes_per_neuron"]
    assert out["device"]["spikes_per_neuron_layers"] == after["spikes_per_neuron_layers"]


def test_fresh_quantisation_would_have_changed_codes(run):
    """The point of the saved state: re-quantising the fine-tuned shadow picks other scales
    (this run moved the weights far enough for that)."""
    out = evaluate(run, requantize=True)
    saved = evaluate(run)
    assert out["programmed"]["from"] == "quantised afresh"
    assert out["programmed"]["codes_sha256"] != saved["programmed"]["codes_sha256"]


def test_another_chip_is_refused_naming_both_ids_and_requantize_maps(run):
    with pytest.raises(CheckpointError, match=r"'emu-harsh-seed2'.*'emu-harsh-seed7'.*--requantize"):
        evaluate(run, chip_seed=7)
    logs: list[str] = []
    out = evaluate(run, chip_seed=7, requantize=True, log=logs.append)
    assert out["device_id"] == "emu-harsh-seed7" and out["programmed"]["from"] == "quantised afresh"
    assert 0.0 <= out["device"]["accuracy"] <= 1.0
    assert any("quantised afresh for 'emu-harsh-seed7'" in m for m in logs)


def test_refused_before_the_twin_is_trained(run, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the twin was built before the device check")
    monkeypatch.setattr(twin, "relu_twin", boom)
    with pytest.raises(CheckpointError, match="emu-harsh-seed7"):
        evaluate(run, chip_seed=7)


def test_cli_refuses_another_chip_seed(run, tmp_path, capsys):
    from hwloop.cli import main
    argv = ["evaluate", "--device", str(run["prof"]), "--weights", str(run["weights"]),
            "--dataset", "synthetic", "--train-subset", "160", "--test-subset", "80",
            "--pretrain-epochs", "2", "--cache-dir", str(run["base"] / "cache"), "--no-progress",
            "--no-plots"]
    assert main(argv + ["--chip-seed", "7", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "emu-harsh-seed7" in err and "'emu-harsh-seed2'" in err and "--requantize" in err
    assert main(argv + ["--chip-seed", "7", "--requantize", "--out", str(tmp_path / "b")]) == 0
    assert main(argv + ["--out", str(tmp_path / "c")]) == 0
    assert "saved state" in capsys.readouterr().out


def _with_state(run, folder: Path, **fields) -> Path:
    """A copy of the run's weights file (away from its report.json) with fields replaced."""
    sd = torch.load(run["weights"], weights_only=True)
    sd.update(fields)
    p = folder / "final_weights.pt"
    torch.save(sd, p)
    return p


def test_calibrated_weights_are_never_compensated_twice(run, tmp_path, monkeypatch):
    """The file's own ``calibration`` field decides (no report.json beside it): the saved,
    already compensated state is programmed as it is, and --calibration is not applied."""
    from hwloop.calibrate import compensate
    from hwloop.calibrate.record import CalibrationRecord, load_record

    w = _with_state(run, tmp_path, calibration="calibration/some-chip.json")
    assert not (tmp_path / "report.json").exists()
    calls = []
    monkeypatch.setattr(compensate, "program_calibrated", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(ev, "program_calibrated", lambda *a, **k: calls.append(a))
    # a record for this chip and topology, so the early check passes
    rec = load_record(ROOT / "calibration" / "emu-mismatch-seed5.json").model_dump()
    monkeypatch.setattr(ev, "weights_are_device_domain", lambda _w: None)
    import hwloop.calibrate.record as record
    fake = CalibrationRecord.model_validate(rec)
    monkeypatch.setattr(record, "load_record", lambda _p: fake)
    monkeypatch.setattr(record, "check_record_matches", lambda *a, **k: None)
    monkeypatch.setattr(ev, "load_record", lambda _p: fake)
    monkeypatch.setattr(ev, "check_record_matches", lambda *a, **k: None)
    logs: list[str] = []
    out = evaluate(run, weights=str(w), calibration="cal.json", log=logs.append)
    assert calls == []
    assert out["programmed"]["from"] == "saved state"
    assert out["mode"].startswith("fine-tuned with calibration calibration/some-chip.json")
    assert any("not applied again" in m for m in logs)
    # --requantize on another chip: said clearly that the weights were compensated for another
    logs.clear()
    out = evaluate(run, weights=str(w), chip_seed=7, requantize=True, log=logs.append)
    assert calls == [] and out["programmed"]["from"] == "quantised afresh"
    assert any("compensated for 'emu-harsh-seed2'" in m and "not for 'emu-harsh-seed7'" in m for m in logs)


def test_old_weights_file_is_requantised_with_a_note(run, tmp_path):
    sd = torch.load(run["weights"], weights_only=True)
    p = tmp_path / "final_weights.pt"
    torch.save({"shadow": sd["shadow"]}, p)  # the format before the saved state
    logs: list[str] = []
    out = evaluate(run, weights=str(p), log=logs.append)
    assert out["programmed"]["from"] == "quantised afresh"
    assert any("no saved chip state" in m for m in logs)
