"""Calibration on the emulator, whose true frozen parameters are known (``device.frozen``):
the probes recover per-neuron delays, threshold offsets, slopes and synapse gains; the random
jitter SD; compensation removes the frozen part and leaves the random part; the record round
trips and refuses another chip or topology; the serial and VISA backends give the same record
as in-process."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from hwloop.calibrate import (CalibratedProgramState, CalibrationOptions, calibrate_device,
                              load_record, program_calibrated, save_record)
from hwloop.calibrate.fit import invert_quantised_variance, quantised_variance
from hwloop.calibrate.record import check_record_matches
from hwloop.emulator.device import EmulatorDevice
from hwloop.emulator.profile import load_profile
from hwloop.errors import CalibrationError
from hwloop.mapping import apply_windows, latency_windows, network_to_spec, program_network
from hwloop.ttfs import convert

ROOT = Path(__file__).resolve().parents[1]
MISMATCH = ROOT / "devices" / "emulator-mismatch.yaml"
JITTER = 0.05
OPTS = dict(repeats=16, levels=12)


def profile(jitter=JITTER, **kw):
    return load_profile(MISMATCH).model_copy(update={"jitter_sd": jitter, **kw})


def device(jitter=JITTER, chip_seed=3, jitter_seed=1, **kw):
    return EmulatorDevice.from_profile(profile(jitter, **kw), chip_seed=chip_seed,
                                       jitter_seed=jitter_seed)


def corr(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def rel_rms(est, true):
    return float((est.flatten() - true.flatten()).pow(2).mean().sqrt() / true.std())


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    relu = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(),
                         nn.Linear(24, 5))
    x = torch.rand(512, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    n = convert(relu, x.double(), dtype=torch.float64)
    # deployment windows of a few tau_c (the 99th percentile, widened so that the comparator
    # delays stay a few per cent of the window, as on the FC2 study)
    return apply_windows(n, [4.0 * w for w in latency_windows(n, x.double(), 99.0)])


@pytest.fixture(scope="module")
def calibrated(net):
    dev = device()
    rec = calibrate_device(dev, network_to_spec(net), CalibrationOptions(**OPTS), chip_seed=3)
    return dev, rec


def true_params(dev, i):
    fz = dev.frozen[i]
    s = (fz["capacitance"] / fz["ramp"]).flatten()
    return {"slope": s, "delay": fz["comparator_delay"].flatten(),
            "threshold_offset": fz["threshold_offset"].flatten(),
            "k": fz["synapse_gain"] / fz["ramp"].flatten()[:, None]}


# ---------------------------------------------------------------------- identification
def test_per_neuron_offsets_and_slopes_match_truth(calibrated, net):
    dev, rec = calibrated
    for lc in rec.layers:
        if lc.kind != "dense":
            continue
        t = true_params(dev, lc.index)
        for name in ("delay", "threshold_offset", "slope"):
            est = torch.tensor(getattr(lc, name), dtype=torch.float64)
            assert corr(est, t[name]) >= 0.99, (lc.index, name)
            assert rel_rms(est, t[name]) <= 0.10, (lc.index, name)
        # the combined time offset at the deployment width: a_i(w) = d_i + s_i o_i w
        w = float(net.layers[lc.index].width)
        a_est = (torch.tensor(lc.delay) + torch.tensor(lc.slope) * torch.tensor(lc.threshold_offset) * w)
        a_true = t["delay"] + t["slope"] * t["threshold_offset"] * w
        assert corr(a_est.double(), a_true) >= 0.99
        assert rel_rms(a_est.double(), a_true) <= 0.10


def test_synapse_gains_first_hidden_layer_and_readout(calibrated):
    dev, rec = calibrated
    first = rec.layer(1)
    t = true_params(dev, 1)
    k = first.synapse_gain.tensor()
    assert corr(k, t["k"]) >= 0.99 and rel_rms(k, t["k"]) <= 0.10
    hidden = rec.layer(2)  # reached through a relay programmed on layer 1
    k2 = hidden.synapse_gain.tensor()
    assert corr(k2, true_params(dev, 2)["k"]) >= 0.95
    ro = rec.layer(3)
    fz = dev.frozen[3]
    rho_true = fz["synapse_gain"] / fz["capacitance"][:, None]
    assert torch.allclose(ro.synapse_gain.tensor(), rho_true, atol=1e-4)
    assert torch.allclose(torch.tensor(ro.offset_gain, dtype=torch.float64), 1 / fz["capacitance"],
                          atol=1e-6)
    assert rec.device_runs < 60 and rec.samples > 0


def test_jitter_sd_estimated_within_20_percent(calibrated):
    _, rec = calibrated
    assert abs(rec.jitter_sd - JITTER) <= 0.2 * JITTER
    assert 0 < rec.jitter_sd_se < 0.05 * JITTER


def test_no_jitter_is_measured_as_none(net):
    rec = calibrate_device(device(jitter=0.0), network_to_spec(net),
                           CalibrationOptions(repeats=4, levels=6, synapse_gains=False))
    assert rec.jitter_sd < 1e-9


def test_quantised_variance_inversion():
    for rho in (0.1, 0.4, 1.0, 3.0):
        assert abs(invert_quantised_variance(quantised_variance(rho)) - rho) < 0.01 * rho
    assert abs(quantised_variance(5.0) - (25 + 1 / 12)) < 0.01


def test_jitter_on_a_time_grid(net):
    # 32 steps per window: the jitter is below a tick at the sweep's wider windows
    dev = device(jitter=JITTER, time_steps_per_layer=32)
    rec = calibrate_device(dev, network_to_spec(net),
                           CalibrationOptions(repeats=16, levels=12, widths=(1.0, 2.0),
                                              synapse_gains=False))
    assert abs(rec.jitter_sd - JITTER) <= 0.25 * JITTER
    lc = rec.layer(1)
    assert corr(torch.tensor(lc.delay, dtype=torch.float64), dev.frozen[1]["comparator_delay"]) > 0.9


# ---------------------------------------------------------------------- compensation
@torch.no_grad()
def _stage_errors(dev, net_dev, ideal, x):
    rec = dev.run(net_dev.encode(x))
    ref = ideal.spike_times(x)
    out = []
    for a, b in zip(rec.spike_times[1:], ref[1:]):
        both = torch.isfinite(a) & torch.isfinite(b)
        out.append(float((a - b)[both].pow(2).mean().sqrt()))
    return out, rec


def test_compensation_removes_frozen_mismatch(calibrated, net):
    _, rec = calibrated
    x = torch.rand(1000, 1, 8, 8, generator=torch.Generator().manual_seed(5)).double()
    ideal = copy.deepcopy(net)
    raw_dev, cal_dev = device(jitter=0.0), device(jitter=0.0)
    raw_net, cal_net = copy.deepcopy(net), copy.deepcopy(net)
    program_network(raw_dev, raw_net)
    state = program_calibrated(cal_dev, cal_net, rec)
    assert isinstance(state, CalibratedProgramState) and state.record_hash == rec.content_hash
    raw, _ = _stage_errors(raw_dev, raw_net, ideal, x)
    cal, r = _stage_errors(cal_dev, cal_net, ideal, x)
    for e_raw, e_cal in zip(raw, cal):
        assert e_cal < 0.2 * e_raw
    with torch.no_grad():
        logits = ideal(x)
    raw_l = raw_dev.run(raw_net.encode(x)).readout
    assert float((r.readout - logits).abs().mean()) < 0.5 * float((raw_l - logits).abs().mean())
    # the portable (intended-domain) network is recovered from the device-domain one
    back = state.compensation.to_intended(cal_net)
    assert torch.allclose(back.layers[1].weight, net.layers[1].weight, rtol=1e-10, atol=1e-12)
    assert torch.allclose(back.layers[1].D, net.layers[1].D, rtol=1e-9, atol=1e-9)


def test_calibration_leaves_random_jitter_in_place(calibrated, net):
    _, rec = calibrated
    dev = device(jitter=JITTER, jitter_seed=7)
    cal_net = copy.deepcopy(net)
    program_calibrated(dev, cal_net, rec)
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(9)).double().expand(400, 1, 8, 8)
    t = dev.run(cal_net.encode(x)).spike_times[1]                      # (400, 32)
    ideal = net.spike_times(x[:1])[1][0].detach()
    fired = torch.isfinite(t).all(0) & torch.isfinite(ideal)
    sd = t[:, fired].std(0)
    # every repeat still scatters by about the jitter (input jitter adds a little)
    assert float(sd.mean()) > 0.8 * JITTER
    # ... around the intended time: the frozen part is gone
    bias = (t[:, fired].mean(0) - ideal[fired]).abs()
    assert float(bias.mean()) < 0.5 * JITTER


def test_trainer_writes_stay_consistent_with_the_state(calibrated, net):
    """After program_calibrated the shadow (device domain) re-quantises to exactly the written
    codes and thresholds: HILTrainer.write_back has nothing to rewrite."""
    from hwloop.train.hil import FinetuneConfig, HILTrainer
    _, rec = calibrated
    for bits in (None, 6):
        prof = profile(0.0) if bits is None else profile(0.0, weight_bits=6)
        dev = EmulatorDevice.from_profile(prof, chip_seed=3)
        shadow = copy.deepcopy(net)
        state = program_calibrated(dev, shadow, rec)
        trainer = HILTrainer(dev, shadow, state, FinetuneConfig(epochs=1))
        assert trainer.write_back() == 0
        for i, (codes, scale) in state.weights.items():
            rc, rs = dev.read_weights(i)
            assert torch.equal(rc.to(codes.dtype), codes) and rs == scale


# ---------------------------------------------------------------------- the record
def test_record_round_trip_and_hash(calibrated, tmp_path):
    _, rec = calibrated
    p = tmp_path / "calibration" / f"{rec.device_id}.json"
    h = save_record(p, rec)
    assert [q.name for q in p.parent.iterdir()] == [p.name]  # no temp file left behind
    back = load_record(p)
    assert back.content_hash == h and back.model_dump() == rec.model_dump()
    assert torch.equal(back.layer(1).synapse_gain.tensor(), rec.layer(1).synapse_gain.tensor())
    data = json.loads(p.read_text())
    data["layers"][0]["delay"][0] += 0.01
    p.write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match="hash"):
        load_record(p)
    p.write_text("{not json")
    with pytest.raises(CalibrationError, match="JSON"):
        load_record(p)
    with pytest.raises(CalibrationError, match="cannot read"):
        load_record(tmp_path / "missing.json")


def test_record_refuses_another_chip_or_topology(calibrated, net):
    _, rec = calibrated
    other = device(chip_seed=4)
    with pytest.raises(CalibrationError, match="emu-mismatch-seed3.*emu-mismatch-seed4"):
        program_calibrated(other, copy.deepcopy(net), rec)
    torch.manual_seed(0)
    relu = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 5))
    small = convert(relu, torch.rand(16, 1, 8, 8).double(), dtype=torch.float64)
    with pytest.raises(CalibrationError, match="recalibrate"):
        program_calibrated(device(), small, rec)
    relu = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 24), nn.ReLU(),
                         nn.Linear(24, 5))
    narrow = convert(relu, torch.rand(16, 1, 8, 8).double(), dtype=torch.float64)
    with pytest.raises(CalibrationError, match=r"layer 1: measured dense out \(32,\)"):
        check_record_matches(rec, rec.device_id, network_to_spec(narrow))


# ---------------------------------------------------------------------- transports
def _comparable(rec):
    # in-process only: the profile's name, the chip seed and its mismatch digest (a device over
    # a link has no profile to tell them)
    d = rec.model_dump(mode="json", exclude={"created", "wall_time_s", "content_hash", "profile",
                                             "firmware_version", "chip_seed", "mismatch_sha256"})
    return d


def test_serial_and_visa_give_the_same_record_as_in_process():
    pytest.importorskip("serial")
    pytest.importorskip("pyvisa")
    from hwloop.devices.open import open_device
    from hwloop.chip.server import serve
    from fakes import small_spec

    spec = small_spec(n_in=12, hidden=10, n_out=4)
    opts = dict(repeats=4, levels=4, widths=(2.0, 6.0))
    ref = calibrate_device(device(jitter_seed=11), spec, CalibrationOptions(**opts))
    for dialect, kw in (("frame", {"timeout": 2.0}), ("scpi", {"timeout": 5.0})):
        chip = serve(device(jitter_seed=11), transport="tcp", dialect=dialect)
        try:
            with open_device(chip.url, **kw) as dev:
                rec = calibrate_device(dev, spec, CalibrationOptions(**opts))
        finally:
            chip.stop()
        assert rec.device_id == ref.device_id
        assert _comparable(rec) == _comparable(ref), dialect


# ---------------------------------------------------------------------- commands
def test_cli_calibrate_then_evaluate(tmp_path, monkeypatch, capsys):
    from hwloop.cli import main
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "cal.json"
    assert main(["calibrate", "--device", str(MISMATCH), "--dataset", "synthetic", "--out", str(out),
                 "--repeats", "4", "--levels", "4", "--widths", "2,8"]) == 0
    rec = load_record(out)
    assert rec.device_id == "emu-mismatch-seed5" and rec.arch == "fc2"
    assert [lc.kind for lc in rec.layers] == ["dense", "readout"]
    assert "record:" in capsys.readouterr().out
    assert main(["evaluate", "--out", str(tmp_path / "evaluate"), "--device", str(MISMATCH), "--dataset", "synthetic", "--calibration",
                 str(out), "--pretrain-epochs", "1", "--train-subset", "500", "--test-subset", "200",
                 "--json"]) == 0
    text = capsys.readouterr().out
    res = json.loads(text[text.index("{"):])
    assert res["mode"] == "calibrated" and 0.0 <= res["device"]["accuracy"] <= 1.0
    # another chip refuses the record: exit code 2 with a clear message
    assert main(["evaluate", "--out", str(tmp_path / "evaluate"), "--device", str(MISMATCH), "--chip-seed", "6", "--dataset", "synthetic",
                 "--calibration", str(out), "--pretrain-epochs", "1", "--train-subset", "500",
                 "--test-subset", "200"]) == 2
    assert "emu-mismatch-seed6" in capsys.readouterr().err
