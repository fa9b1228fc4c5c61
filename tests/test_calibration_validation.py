"""A calibration record's values and shapes are validated (issue #10, item 7): an absurd,
non-finite, wrongly sized or truncated value is refused with a :class:`CalibrationError` that
names the file, the field (dotted path, network layer, neuron) and the allowed range, instead of
being used silently or failing later with a traceback.

The records are edits of the shipped example ``calibration/emu-mismatch-seed5.json`` (FC2 on
Fashion-MNIST: network layer 1 dense 784 -> 340 = ``layers.0``, layer 2 the readout 340 -> 10 =
``layers.1``) with the content hash recomputed, i.e. what a hand edit that knows the hash
looks like."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hwloop.calibrate.compensate import Compensation
from hwloop.calibrate.fit import spec_for_arch
from hwloop.calibrate.record import (LayerCalibration, check_record_matches, content_hash,
                                     load_record, save_record)
from hwloop.errors import CalibrationError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "calibration" / "emu-mismatch-seed5.json"
MISMATCH = ROOT / "devices" / "emulator-mismatch.yaml"


@pytest.fixture(scope="module")
def example() -> dict:
    return json.loads(EXAMPLE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def fc2_spec():
    return spec_for_arch("fc2", "fashion-mnist")


def rehash(data: dict) -> dict:
    """Recompute ``content_hash`` as :func:`content_hash` does (NaN allowed here, so that a
    record with NaN gets past the hash and reaches the value checks)."""
    body = {k: v for k, v in data.items() if k != "content_hash"}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    data["content_hash"] = hashlib.sha256(blob.encode()).hexdigest()
    return data


def edited(example: dict, edit) -> dict:
    d = copy.deepcopy(example)
    edit(d)
    return rehash(d)


def write(tmp_path: Path, data: dict, name: str = "chip-7.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(data), encoding="utf-8")  # NaN / inf become NaN / Infinity
    return p


def refused(p: Path, *parts: str) -> str:
    with pytest.raises(CalibrationError) as ei:
        load_record(p)
    msg = str(ei.value)
    assert str(p) in msg, msg
    for part in parts:
        assert part in msg, (part, msg)
    return msg


def set_synapse(d: dict, layer: int, idx: tuple[int, int], value: float) -> None:
    sg = d["layers"][layer]["synapse_gain"]
    a = np.frombuffer(base64.b64decode(sg["b64"]), dtype="<f4").reshape(sg["shape"]).copy()
    a[idx] = value
    sg["b64"] = base64.b64encode(a.astype("<f4").tobytes()).decode()


# ---------------------------------------------------------------------- the helpers themselves
def test_rehash_reproduces_the_stored_hash_and_the_example_loads(example, tmp_path):
    d = rehash(copy.deepcopy(example))
    assert d["content_hash"] == example["content_hash"]
    rec = load_record(write(tmp_path, d))
    assert rec.content_hash == content_hash(rec) == example["content_hash"]


# ---------------------------------------------------------------------- (a) absurd finite values
def test_slope_1e308_with_recomputed_hash_is_refused(example, tmp_path):
    def edit(d):
        d["layers"][0]["slope"][3] = 1e308
    p = write(tmp_path, edited(example, edit))
    msg = refused(p, "layers.0.slope", "network layer 1", "neuron 3", "1e+308", "[0.2, 5]")
    assert "allowed range" in msg


@pytest.mark.parametrize("layer, field, idx, value, allowed", [
    (0, "slope", 0, 6.0, "[0.2, 5]"),
    (0, "slope", 10, -1.0, "[0.2, 5]"),
    (0, "gain", 2, -0.5, "[0.2, 5]"),
    (0, "gain", 2, 1e3, "[0.2, 5]"),
    (1, "gain", 4, 0.0, "[0.2, 5]"),
    (1, "offset_gain", 9, 7.5, "[0.2, 5]"),
    (0, "threshold_offset", 1, 1.5, "[-1, 1]"),
    (0, "delay", 7, -40.0, "[-32, 32]"),     # the widest probe window is 32 tau_c
])
def test_out_of_range_per_neuron_values_are_refused(example, tmp_path, layer, field, idx, value,
                                                     allowed):
    def edit(d):
        d["layers"][layer][field][idx] = value
    p = write(tmp_path, edited(example, edit))
    refused(p, f"layers.{layer}.{field}", f"network layer {layer + 1}", f"neuron {idx}",
            "allowed range", allowed)


@pytest.mark.parametrize("value", [1e3, -0.5])
def test_out_of_range_synapse_gain_is_refused(example, tmp_path, value):
    p = write(tmp_path, edited(example, lambda d: set_synapse(d, 0, (5, 17), value)))
    refused(p, "layers.0.synapse_gain", "network layer 1", "(5, 17)", "allowed range")


@pytest.mark.parametrize("field, value", [("jitter_sd", -0.1), ("t_max0", 0.0),
                                          ("probe_widths", [8.0])])
def test_out_of_range_record_values_are_refused(example, tmp_path, field, value):
    p = write(tmp_path, edited(example, lambda d: d.__setitem__(field, value)))
    refused(p, field)


def test_save_record_refuses_an_invalid_record_and_writes_nothing(example, tmp_path):
    rec = load_record(write(tmp_path, rehash(copy.deepcopy(example))))
    rec.layers[0].slope[3] = 1e308          # an in-memory edit bypasses the model's validation
    out = tmp_path / "out" / "new.json"
    with pytest.raises(CalibrationError, match=r"layers\.0\.slope.*neuron 3.*\[0\.2, 5\]"):
        save_record(out, rec)
    assert not out.exists()


# ---------------------------------------------------------------------- (b) wrong lengths
@pytest.mark.parametrize("layer, field, edit, want, got", [
    (0, "delay", lambda v: v.pop(), 340, 339),
    (0, "slope", lambda v: v.append(1.0), 340, 341),
    (0, "gain", lambda v: v.pop(0), 340, 339),
    (1, "offset_gain", lambda v: v.extend([1.0, 1.0]), 10, 12),
])
def test_per_neuron_list_of_the_wrong_length_is_refused(example, tmp_path, layer, field, edit,
                                                         want, got):
    p = write(tmp_path, edited(example, lambda d: edit(d["layers"][layer][field])))
    refused(p, f"layers.{layer}.{field}", f"network layer {layer + 1}", f"expected {want}",
            f"got {got}")


def test_missing_per_neuron_field_of_a_neuron_layer_is_refused(example, tmp_path):
    p = write(tmp_path, edited(example, lambda d: d["layers"][0].__setitem__("delay", None)))
    refused(p, "layers.0.delay", "network layer 1", "required")


def test_check_record_matches_validates_shapes_and_names_the_file(example, tmp_path, fc2_spec):
    p = write(tmp_path, rehash(copy.deepcopy(example)))
    rec = load_record(p)
    check_record_matches(rec, rec.device_id, fc2_spec)          # the valid record matches
    rec.layers[0].delay.pop()                                    # edited after loading
    with pytest.raises(CalibrationError) as ei:
        check_record_matches(rec, rec.device_id, fc2_spec)
    msg = str(ei.value)
    for part in (str(p), "layers.0.delay", "expected 340", "got 339"):
        assert part in msg, (part, msg)
    # compensating with it is a CalibrationError too, not a reshape traceback
    with pytest.raises(CalibrationError, match=r"layers\.0\.delay.*expected 340.*got 339"):
        Compensation.from_record(rec, fc2_spec)


def test_topology_mismatch_names_the_file(example, tmp_path):
    p = write(tmp_path, rehash(copy.deepcopy(example)))
    rec = load_record(p)
    with pytest.raises(CalibrationError) as ei:
        check_record_matches(rec, rec.device_id, spec_for_arch("fc2", "synthetic"))
    assert str(p) in str(ei.value) and "input shape" in str(ei.value)
    with pytest.raises(CalibrationError) as ei:
        check_record_matches(rec, "emu-mismatch-seed6", spec_for_arch("fc2", "fashion-mnist"))
    assert str(p) in str(ei.value) and "emu-mismatch-seed6" in str(ei.value)


def test_layer_calibration_checks_lengths_when_built_in_memory():
    with pytest.raises(ValueError, match=r"expected 4 values.*got 3"):
        LayerCalibration(index=1, kind="dense", in_shape=(3,), out_shape=(4,), weight_shape=(4, 3),
                         slope=[1.0] * 3, delay=[0.0] * 4, threshold_offset=[0.0] * 4)


# ---------------------------------------------------------------------- (c) NaN / Infinity
@pytest.mark.parametrize("edit, parts", [
    (lambda d: d["layers"][0]["threshold_offset"].__setitem__(5, math.nan),
     ("layers.0.threshold_offset.5", "network layer 1", "neuron 5", "finite")),
    (lambda d: d["layers"][0]["gain"].__setitem__(0, -math.inf),
     ("layers.0.gain.0", "network layer 1", "neuron 0", "finite")),
    (lambda d: d.__setitem__("jitter_sd", math.inf), ("jitter_sd", "finite")),
    (lambda d: d["layers"][1]["residual_rms"].__setitem__("synapse", math.nan),
     ("layers.1.residual_rms.synapse", "network layer 2", "finite")),
    (lambda d: d["layers"][0].__setitem__("synapse_gain_se", math.nan),
     ("layers.0.synapse_gain_se", "finite")),
])
def test_nan_and_infinity_are_refused_naming_file_and_field(example, tmp_path, edit, parts):
    p = write(tmp_path, edited(example, edit))
    assert "NaN" in p.read_text() or "Infinity" in p.read_text()
    refused(p, *parts)


def test_nan_in_per_synapse_gains_is_refused(example, tmp_path):
    p = write(tmp_path, edited(example, lambda d: set_synapse(d, 1, (2, 300), math.nan)))
    refused(p, "layers.1.synapse_gain", "network layer 2", "(2, 300)", "finite")


# ---------------------------------------------------------------------- (d) truncated base64
@pytest.mark.parametrize("cut", [1, 8, 10, 16, 100_000])
def test_truncated_base64_is_refused(example, tmp_path, cut):
    def edit(d):
        sg = d["layers"][0]["synapse_gain"]
        sg["b64"] = sg["b64"][:-cut]
    p = write(tmp_path, edited(example, edit))
    refused(p, "layers.0.synapse_gain.b64", "network layer 1", "(340, 784)")


def test_synapse_gain_shape_not_the_weight_shape_is_refused(example, tmp_path):
    def edit(d):
        sg = d["layers"][1]["synapse_gain"]
        sg["shape"] = [340, 10]            # same number of values, transposed
    p = write(tmp_path, edited(example, edit))
    refused(p, "layers.1.synapse_gain", "network layer 2", "(340, 10)", "(10, 340)")


def test_base64_with_junk_is_refused(example, tmp_path):
    def edit(d):
        sg = d["layers"][1]["synapse_gain"]
        sg["b64"] = "!!" + sg["b64"][2:]
    p = write(tmp_path, edited(example, edit))
    refused(p, "layers.1.synapse_gain.b64", "base64")


# ---------------------------------------------------------------------- (e) compensation
def test_valid_record_compensates_exactly_as_the_model_says(example, tmp_path, fc2_spec):
    """Slopes and intercepts are the record's, unclamped and bit-identical to
    a = d + s o w; gains the per-synapse or row-mean ones; no clamp notes."""
    rec = load_record(write(tmp_path, rehash(copy.deepcopy(example))))
    comp = Compensation.from_record(rec, fc2_spec)
    assert comp.notes == []
    lc, l = rec.layer(1), fc2_spec.layers[1]
    w = float(l.t_max) - float(l.t_min)
    s = torch.tensor(lc.slope, dtype=torch.float64).reshape(lc.out_shape)
    a = (torch.tensor(lc.delay, dtype=torch.float64).reshape(lc.out_shape)
         + s * torch.tensor(lc.threshold_offset, dtype=torch.float64).reshape(lc.out_shape) * w)
    assert torch.equal(comp.layers[1].slope, s) and torch.equal(comp.layers[1].intercept, a)
    k = lc.synapse_gain.tensor() if comp.layers[1].per_synapse else \
        torch.tensor(lc.gain, dtype=torch.float64)[:, None].expand(l.weight_shape)
    assert torch.equal(comp.layers[1].gain, k)
    assert torch.equal(comp.layers[2].offset_gain,
                       torch.tensor(rec.layer(2).offset_gain, dtype=torch.float64))


def test_compensation_refuses_out_of_range_slope_instead_of_clamping(example, tmp_path, fc2_spec):
    """Before: the slope was clamped to [0.2, 5] after the intercept d + s o w had been computed
    from the unclamped slope (thresholds 1e308 off, accuracy 10 %, energy NaN)."""
    p = write(tmp_path, rehash(copy.deepcopy(example)))
    rec = load_record(p)
    rec.layers[0].slope[3] = 1e308
    with pytest.raises(CalibrationError) as ei:
        Compensation.from_record(rec, fc2_spec)
    msg = str(ei.value)
    for part in (str(p), "layers.0.slope", "neuron 3", "[0.2, 5]"):
        assert part in msg, (part, msg)


# ---------------------------------------------------------------------- the command line
def test_cli_evaluate_refuses_the_record_naming_file_and_field(example, tmp_path, capsys):
    from hwloop.cli import main

    def edit(d):
        d["layers"][0]["slope"][3] = 1e308
    p = write(tmp_path, edited(example, edit))
    assert main(["evaluate", "--out", str(tmp_path / "evaluate"), "--device", str(MISMATCH), "--dataset", "synthetic",
                 "--calibration", str(p), "--pretrain-epochs", "1", "--train-subset", "100",
                 "--test-subset", "50"]) == 2
    err = capsys.readouterr().err
    assert str(p) in err and "layers.0.slope" in err and "[0.2, 5]" in err, err


# ---------------------------------------------------------------------- the fit never writes them
def test_fit_sets_failed_estimates_to_the_layer_median_with_a_note():
    """What a short calibration can produce (a neuron saturated in most synapse probes: row gain
    -0.1) is not written as it is (compensation used to clamp it to 0.2, i.e. weights x 5) but
    replaced by the layer's median and named in the record's notes."""
    from hwloop.calibrate.options import _to_median
    s = torch.tensor([1.0, 0.9, 9.0, 1.1, -0.1], dtype=torch.float64)
    d = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64)
    bad = (s < 0.2) | (s > 5.0)
    note = _to_median({"slope": s, "delay": d}, bad, "sweep", "layer 1 (dense)")
    assert s.tolist() == [1.0, 0.9, 1.0, 1.1, 1.0] and d.tolist() == [0.1, 0.2, 0.2, 0.4, 0.2]
    assert "2 neurons (2, 4)" in note and "median" in note
    with pytest.raises(CalibrationError, match="layer 1 \\(dense\\): every neuron"):
        _to_median({"slope": s}, torch.ones(5, dtype=torch.bool), "sweep", "layer 1 (dense)")


def test_fit_reports_a_refused_value_as_calibration_error():
    from hwloop.calibrate.options import _fitted
    with pytest.raises(CalibrationError,
                       match=r"calibration of chip-x, layer 1 \(dense\).*slope.*neuron 2.*\[0\.2, 5\]"):
        with _fitted("chip-x", "layer 1 (dense)"):
            LayerCalibration(index=1, kind="dense", in_shape=(3,), out_shape=(3,),
                             weight_shape=(3, 3), slope=[1.0, 1.0, 50.0], delay=[0.0] * 3,
                             threshold_offset=[0.0] * 3)
