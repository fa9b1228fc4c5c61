"""The emulator (hwloop.emulator.device), the mapping (hwloop.mapping) and the time-stepped
reference (hwloop.emulator.reference)."""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from hwloop import convert
from hwloop.emulator.device import EmulatorDevice
from hwloop.emulator.profile import validate_profile
from hwloop.emulator.reference import reference_run
from hwloop.energy import network_energy
from hwloop.errors import DeviceError, DeviceLimitError, WriteVerifyError
from hwloop.mapping import (apply_windows, dequantized_network, latency_windows, network_to_spec,
                            program_network)
from hwloop.quant import code_range
from hwloop.ttfs.architectures import build_relu
from hwloop.ttfs.layers import NeuronLayer

REPO = Path(__file__).resolve().parents[1]
IDEAL = yaml.safe_load((REPO / "devices" / "emulator-ideal.yaml").read_text())
INF = math.inf


def profile(**kw):
    """The ideal profile with some fields replaced (``mismatch`` as a dict of sds)."""
    return validate_profile({**IDEAL, **kw}, "test")


def mism(**sd):
    return {"mismatch": sd}


def device(prof=None, chip_seed=None, jitter_seed=0, **kw):
    return EmulatorDevice(prof if prof is not None else profile(**kw), chip_seed=chip_seed,
                          jitter_seed=jitter_seed)


@pytest.fixture(scope="module")
def fc():
    torch.manual_seed(0)
    relu = nn.Sequential(nn.Flatten(), nn.Linear(36, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(),
                         nn.Linear(16, 5)).double()
    x = torch.rand(32, 1, 6, 6, dtype=torch.float64)
    return convert(relu, x), x


@pytest.fixture(scope="module")
def conv():
    """Conv net with a batch norm after a ReLU (negative scales: min pools; input shift in front
    of a zero-padded conv: position-dependent thresholds)."""
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.2, -0.8, 0.9, -1.1]))
        bn.bias.copy_(torch.tensor([0.1, -0.05, 0.2, 0.0]))
        bn.running_mean.copy_(torch.tensor([0.2, 0.1, 0.3, 0.1]))
        bn.running_var.copy_(torch.tensor([1.5, 0.7, 1.1, 0.9]))
    relu = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), bn, nn.MaxPool2d(2),
                         nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(6 * 3 * 3, 12), nn.ReLU(), nn.Linear(12, 4)).double().eval()
    x = torch.rand(16, 1, 12, 12, dtype=torch.float64)
    return convert(relu, x), x


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(2)
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    return convert(build_relu("lenet5", (1, 28, 28)).double(), x), x


def assert_times_close(a, b, tol):
    assert a.shape == b.shape
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    assert torch.equal(fa, fb), f"{int((fa != fb).sum())} spikes differ in presence"
    if fa.any():
        err = float((a[fa] - b[fb]).abs().max())
        assert err <= tol, err


def first_layer(net):
    return next(i for i, l in enumerate(net.layers) if isinstance(l, NeuronLayer))


# ---------------------------------------------------------------------- ideal = B1 closed form
@pytest.mark.parametrize("name", ["fc", "conv", "lenet"])
def test_ideal_equals_closed_form(name, request):
    net, x = request.getfixturevalue(name)
    dev = EmulatorDevice.from_profile(REPO / "devices" / "emulator-ideal.yaml")
    program_network(dev, net)
    rec = dev.run(net.encode(x))
    with torch.no_grad():
        ref = net.spike_times(x)
        logits = net(x)
    assert len(rec.spike_times) == len(ref) == len(net.stage_shapes())
    for a, b in zip(rec.spike_times, ref):
        assert_times_close(a, b, 1e-9)
    assert float((rec.readout - logits).abs().max()) <= 1e-9
    assert torch.equal(rec.readout.argmax(1), logits.argmax(1))
    assert any(torch.isfinite(t).any() and not torch.isfinite(t).all() for t in rec.spike_times[1:])


def test_record_layout_counts_vtmax_energy(fc):
    net, x = fc
    dev = device()
    program_network(dev, net)
    rec = dev.run(net.encode(x))
    B, L = x.shape[0], len(net.neuron_layers())
    assert rec.spike_counts.shape == (B, L) and rec.spike_counts.dtype == torch.int64
    assert rec.energy_j.shape == (B, L) and rec.energy_j.dtype == torch.float64
    assert rec.neurons_per_layer == [24, 16]
    with torch.no_grad():
        stages = net.spike_times(x)
    assert rec.spikes_per_neuron() == pytest.approx(net.spikes_per_neuron(stages)["total"])
    # V(t_max) of a silent neuron = V(t_min) + width (B = 1); 0 where fired
    i = first_layer(net)
    layer = net.layers[i]
    t0 = stages[0].flatten(1)
    with torch.no_grad():
        v_min = F.linear(torch.where(torch.isfinite(t0), layer.t_min - t0, 0.0), layer.weight)
    fired = torch.isfinite(rec.spike_times[1])
    expect = torch.where(fired, 0.0, v_min + layer.width)
    assert torch.allclose(rec.v_tmax[0], expect, atol=1e-9)
    # energy = the Methods' formula with the profile's constants
    p = dev.profile
    thetas = [net.layers[j].neuron_thresholds(net.shapes[j]) for j in range(len(net.layers))
              if isinstance(net.layers[j], NeuronLayer)]
    vpu = [p.threshold_voltage_v / (b - a) for a, b in net.windows()]
    e = network_energy([torch.isfinite(t) for t in rec.spike_times[1:]], thetas, rec.v_tmax,
                       p.capacitance_f, p.transmission_energy_j, vpu)
    assert torch.allclose(rec.energy_j, e, rtol=1e-12, atol=0)
    assert float(rec.energy_j.sum(1).min()) > 0


# ---------------------------------------------------------------------- programming contract
def test_network_to_spec(conv):
    net, _ = conv
    spec = network_to_spec(net)
    kinds = [l.kind for l in spec.layers]
    assert kinds == ["conv2d", "maxpool2d", "conv2d", "maxpool2d", "flatten", "dense", "readout"]
    assert spec.layers[1].pool_sign == (1, -1, 1, -1)
    assert spec.windows() == net.windows()
    assert (spec.layers[-1].t_min, spec.layers[-1].t_max) == net.windows()[-1]
    assert spec.layers[2].weight_shape == (6, 4, 3, 3) and spec.layers[2].padding == (1, 1)


def test_program_state_and_read_back(conv):
    net, _ = conv
    dev = device(weight_bits=6)
    state = program_network(dev, net)
    assert state.weight_bits == 6 and state.clip_percentile == 1.0
    lo, hi = code_range(6)
    for i, (codes, scale) in state.weights.items():
        rc, rs = dev.read_weights(i)
        assert rc.dtype == torch.int64 and torch.equal(rc, codes) and rs == scale
        assert int(rc.min()) >= lo and int(rc.max()) <= hi
    # conv thresholds are per output position (input shift moved into them, computed with the
    # written weights: those of the dequantized net)
    th = dev.read_thresholds(2)
    assert th.shape == (6, 6, 6)
    nominal = dequantized_network(net, state)
    assert torch.equal(th, nominal.layers[2].neuron_thresholds(net.shapes[2]).double())
    assert not torch.equal(th[:, 0, 0], th[:, 2, 2])  # border positions differ
    assert torch.equal(dev.read_thresholds(6), net.layers[6].bias.detach())


def test_write_verify_error_names_layers(fc, monkeypatch):
    net, _ = fc
    dev = device(weight_bits=8)
    real = dev.read_weights

    def corrupt(layer):
        codes, scale = real(layer)
        if layer == 3:
            codes = codes.clone()
            codes.view(-1)[0] += 1
        return codes, scale

    monkeypatch.setattr(dev, "read_weights", corrupt)
    with pytest.raises(WriteVerifyError) as exc:
        program_network(dev, net)
    assert exc.value.layers == [3] and "[3]" in str(exc.value)


def test_codes_range_and_dtype_enforced(fc):
    net, _ = fc
    dev = device(weight_bits=6)
    program_network(dev, net)
    shape = net.layers[1].weight.shape
    with pytest.raises(DeviceError, match=r"\[-32, 31\]"):
        dev.write_weights(1, torch.full(shape, 32, dtype=torch.int64), 0.1)
    with pytest.raises(DeviceError, match="integers"):
        dev.write_weights(1, torch.zeros(shape, dtype=torch.float64), 1.0)
    with pytest.raises(DeviceError, match="shape"):
        dev.write_weights(1, torch.zeros(3, 3, dtype=torch.int64), 1.0)
    with pytest.raises(DeviceError, match="scale"):
        dev.write_weights(1, torch.zeros(shape, dtype=torch.int64), 0.0)
    with pytest.raises(DeviceError, match="is 'flatten'"):
        dev.write_weights(0, torch.zeros(1), 1.0)
    with pytest.raises(DeviceLimitError):
        program_network(dev, net, weight_bits=8)  # more bits than the device has


def test_limits_checked(fc):
    net, x = fc
    with pytest.raises(DeviceLimitError, match="max_fan_in=20"):
        device(limits={"max_fan_in": 20}).program(network_to_spec(net))
    with pytest.raises(DeviceLimitError, match="max_neurons_per_layer=10"):
        device(limits={"max_neurons_per_layer": 10}).program(network_to_spec(net))
    dev = device(limits={"max_batch": 4})
    program_network(dev, net)
    with pytest.raises(DeviceLimitError, match="max_batch=4"):
        dev.run(net.encode(x[:5]))


def test_set_windows_adaptive_only(fc):
    net, x = fc
    dev = device()
    program_network(dev, net)
    new = [(1.0, 5.0), (5.0, 9.0)]
    dev.set_windows(new)
    assert dev.spec.windows() == new
    assert (dev.spec.layers[-1].t_min, dev.spec.layers[-1].t_max) == (5.0, 9.0)
    with pytest.raises(DeviceError, match="t_max > t_min"):
        dev.set_windows([(1.0, 1.0), (1.0, 2.0)])
    fixed = device(adaptive_windows=False)
    program_network(fixed, net)
    with pytest.raises(DeviceError, match="adaptive_windows"):
        fixed.set_windows(new)


def test_lifecycle(fc):
    net, x = fc
    dev = device()
    with pytest.raises(DeviceError, match="no network programmed"):
        dev.run(net.encode(x))
    with dev as d:
        program_network(d, net)
        d.run(net.encode(x))
        d.reset()
        assert d.spec is None
        with pytest.raises(DeviceError):
            d.read_weights(1)
    with pytest.raises(DeviceError, match="closed"):
        dev.info()
    dev.close()  # idempotent


# ---------------------------------------------------------------------- each non-ideality alone
def _layer1(dev, net, x):
    """(t_min, width, theta, V_nominal(t_min), nominal spike times) of the first neuron layer."""
    i = first_layer(net)
    layer = net.layers[i]
    t_in = net.encode(x)
    x_in = torch.where(torch.isfinite(t_in), layer.t_min - t_in, torch.zeros_like(t_in)).flatten(1)
    with torch.no_grad():
        v = F.linear(x_in, layer.weight)
        t_nom = net.spike_times(x)[1]
    return i, float(layer.t_min), layer.width, dev.read_thresholds(i), v, t_nom


def test_capacitance_scales_charging_exactly(fc):
    net, x = fc
    dev = device(**mism(capacitance_sd=0.1), chip_seed=3)
    program_network(dev, net)
    rec = dev.run(net.encode(x))
    i, t_min, width, theta, v, _ = _layer1(dev, net, x)
    c = dev.frozen[i]["capacitance"]
    assert float((c - 1).abs().max()) > 0.05
    # V = Q / C_i in both phases: V(t_min) = V_nom / c, slope 1 / c => t - t_min = c theta - V_nom
    t = rec.spike_times[1]
    fired = torch.isfinite(t)
    expect = t_min + (c * theta - v)
    assert torch.allclose(t[fired], expect.expand_as(t)[fired], atol=1e-9, rtol=0)
    assert torch.equal(fired, expect < t_min + width)
    v_end = torch.where(fired, 0.0, (v + width) / c)
    assert torch.allclose(rec.v_tmax[0], v_end, atol=1e-12)


def test_ramp_current_scales_window_slope(fc):
    net, x = fc
    dev = device(**mism(ramp_current_sd=0.1), chip_seed=4)
    program_network(dev, net)
    rec = dev.run(net.encode(x))
    i, t_min, width, theta, v, _ = _layer1(dev, net, x)
    r = dev.frozen[i]["ramp"]
    t = rec.spike_times[1]
    fired = torch.isfinite(t)
    expect = t_min + (theta - v) / r
    assert torch.allclose(t[fired], expect.expand_as(t)[fired], atol=1e-9, rtol=0)
    assert torch.equal(fired, expect < t_min + width)


def test_synapse_gain_equals_net_with_scaled_weights(lenet):
    """(A net without conv input shift: the device's thresholds hold the shift's contribution
    computed with the nominal weights, the twin would rescale it.)"""
    net, x = lenet
    dev = device(**mism(synapse_gain_sd=0.1), chip_seed=5)
    program_network(dev, net)
    rec = dev.run(net.encode(x))
    twin = copy.deepcopy(net)
    with torch.no_grad():
        for i, l in enumerate(twin.layers):
            if hasattr(l, "weight"):
                g = dev.frozen[i]["synapse_gain"]
                assert g.shape == l.weight.shape
                l.weight.mul_(g)
        ref, logits = twin.spike_times(x), twin(x)
    for a, b in zip(rec.spike_times, ref):
        assert_times_close(a, b, 1e-9)
    assert torch.allclose(rec.readout, logits, atol=1e-9)


def test_threshold_offset_shifts_by_offset_over_slope(fc):
    net, x = fc
    dev = device(**mism(threshold_offset_sd=0.05), chip_seed=6)
    program_network(dev, net)
    rec = dev.run(net.encode(x))
    i, t_min, width, theta, v, t_nom = _layer1(dev, net, x)
    o = dev.frozen[i]["threshold_offset"]  # fraction of the base threshold (= width), B = 1
    t = rec.spike_times[1]
    both = torch.isfinite(t) & torch.isfinite(t_nom)
    shift = (o * width).expand_as(t)
    assert both.any()
    assert torch.allclose((t - t_nom)[both], shift[both], atol=1e-9, rtol=0)


def test_comparator_delay_shifts_exactly(fc):
    net, x = fc
    dev = device(**mism(comparator_delay_sd=0.02), chip_seed=7)
    program_network(dev, net)
    rec = dev.run(net.encode(x))
    i, t_min, width, theta, v, t_nom = _layer1(dev, net, x)
    d = dev.frozen[i]["comparator_delay"].expand_as(t_nom)
    t = rec.spike_times[1]
    both = torch.isfinite(t) & torch.isfinite(t_nom)
    assert both.any()
    assert torch.allclose((t - t_nom)[both], d[both], atol=1e-12, rtol=0)
    # a spike pushed to t_max or later by the delay is lost
    assert torch.equal(torch.isfinite(t), torch.isfinite(t_nom) & (t_nom + d < t_min + width))


def test_random_jitter_fresh_every_run(fc):
    net, x = fc
    sd = 0.01
    dev = device(jitter_sd=sd, jitter_seed=11)
    program_network(dev, net)
    t_in = net.encode(x)
    r1, r2 = dev.run(t_in), dev.run(t_in)
    assert not torch.equal(r1.spike_times[0], r2.spike_times[0])
    fin = torch.isfinite(t_in)
    d = (r1.spike_times[0] - t_in)[fin]
    assert abs(float(d.std()) - sd) < 0.1 * sd and abs(float(d.mean())) < 0.1 * sd
    assert not torch.equal(r1.readout, r2.readout)
    # seed_noise replays the jitter
    dev.seed_noise(11)
    assert torch.equal(dev.run(t_in).spike_times[0], r1.spike_times[0])
    # reproducible from the jitter seed; independent of the chip seed's generator
    again = device(jitter_sd=sd, jitter_seed=11, chip_seed=99)
    program_network(again, net)
    assert torch.equal(again.run(t_in).spike_times[0], r1.spike_times[0])


def test_time_quantisation_on_grid(conv):
    net, x = conv
    net = apply_windows(net, latency_windows(net, x, 99))  # Methods (ii): 99 % of activations
    K = 8
    dev = device(time_steps_per_layer=K)
    program_network(dev, net)
    rec = dev.run(net.encode(x))
    spec = dev.spec
    windows = [(spec.t_max0 - 1.0, spec.t_max0)]
    for l in spec.layers:
        if l.kind in ("dense", "conv2d"):
            windows.append((l.t_min, l.t_max))
        elif l.kind == "maxpool2d":
            windows.append(windows[-1])
    assert len(windows) == len(rec.spike_times)
    for t, (a, b) in zip(rec.spike_times, windows):
        fin = torch.isfinite(t)
        assert fin.any()
        k = (t[fin] - a) / ((b - a) / K)
        assert torch.allclose(k, k.round(), atol=1e-9)
        assert float(k.min()) >= -1e-9 and float(k.max()) <= K - 1 + 1e-9
    # each quantised time is the next tick at or after the continuous one (input stage)
    t_in = net.encode(x)
    fin = torch.isfinite(rec.spike_times[0])
    assert bool((rec.spike_times[0][fin] >= t_in[fin] - 1e-12).all())


def test_weight_quantisation_matches_dequantized_net(conv):
    net, x = conv
    dev = device(weight_bits=5)
    state = program_network(dev, net)
    nominal = dequantized_network(net, state)
    for i, (codes, scale) in state.weights.items():
        assert torch.allclose(nominal.layers[i].weight, codes.double() * scale, rtol=0, atol=0)
    rec = dev.run(net.encode(x))
    with torch.no_grad():
        ref, logits = nominal.spike_times(x), nominal(x)
    for a, b in zip(rec.spike_times, ref):
        assert_times_close(a, b, 1e-9)
    assert torch.allclose(rec.readout, logits, atol=1e-9)
    # float weights on the ideal device: dequantized net is the net itself
    ideal_state = program_network(device(), net)
    assert ideal_state.weight_bits is None
    same = dequantized_network(net, ideal_state)
    assert all(torch.equal(a, b) for a, b in zip(same.parameters(), net.parameters()))


_FROZEN_SNIPPET = r"""
import json, sys, torch
from hwloop.emulator.device import EmulatorDevice
from hwloop.emulator.profile import load_profile
from hwloop.mapping import network_to_spec
from hwloop import convert
from torch import nn
torch.manual_seed(0)
relu = nn.Sequential(nn.Flatten(), nn.Linear(36, 24), nn.ReLU(), nn.Linear(24, 5)).double()
net = convert(relu, torch.rand(4, 1, 6, 6, dtype=torch.float64))
dev = EmulatorDevice(load_profile("emulator-analog"), chip_seed=int(sys.argv[1]))
dev.program(network_to_spec(net))
print(json.dumps({f"{i}.{k}": v.flatten().tolist() for i, d in dev.frozen.items() for k, v in d.items()}))
"""


def _frozen_in_subprocess(seed):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _FROZEN_SNIPPET, str(seed)], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=120, check=True).stdout
    return json.loads(out)


def test_frozen_mismatch_deterministic_across_processes():
    a = _frozen_in_subprocess(5)
    torch.manual_seed(0)
    relu = nn.Sequential(nn.Flatten(), nn.Linear(36, 24), nn.ReLU(), nn.Linear(24, 5)).double()
    net = convert(relu, torch.rand(4, 1, 6, 6, dtype=torch.float64))
    dev = EmulatorDevice.from_profile("emulator-analog", chip_seed=5)
    dev.program(network_to_spec(net))
    here = {f"{i}.{k}": v.flatten().tolist() for i, d in dev.frozen.items() for k, v in d.items()}
    assert set(a) == set(here) and a == here
    assert set(here) >= {"1.synapse_gain", "1.capacitance", "1.ramp", "1.threshold_offset",
                         "1.comparator_delay", "2.synapse_gain", "2.capacitance"}
    # another chip seed is another chip
    dev2 = EmulatorDevice.from_profile("emulator-analog", chip_seed=6)
    dev2.program(network_to_spec(net))
    assert not torch.equal(dev2.frozen[1]["capacitance"], dev.frozen[1]["capacitance"])
    # reprogramming the same chip gives the same mismatch
    before = dev.frozen[1]["ramp"].clone()
    dev.program(network_to_spec(net))
    assert torch.equal(dev.frozen[1]["ramp"], before)


# ---------------------------------------------------------------------- closed form vs reference
@pytest.mark.parametrize("steps", [None, 16])
def test_closed_form_matches_time_stepped_reference(conv, steps):
    net, x = conv
    net = apply_windows(net, latency_windows(net, x, 95))  # narrow windows, early spikes
    prof = profile(weight_bits=5, time_steps_per_layer=steps, jitter_sd=0.03,
                   **mism(synapse_gain_sd=0.08, capacitance_sd=0.05, ramp_current_sd=0.05,
                          threshold_offset_sd=0.05, comparator_delay_sd=0.02))
    dev = EmulatorDevice(prof, chip_seed=8, jitter_seed=9)
    program_network(dev, net)
    t_in = net.encode(x[:8])
    noise = dev.draw_noise(8)
    rec = dev.simulate(t_in, noise)
    dt = 2e-3
    ref = reference_run(dev, t_in, noise, dt=dt)
    for a, b in zip(rec.spike_times, ref.spike_times):
        assert_times_close(a, b, dt)
    assert torch.allclose(rec.readout, ref.readout, atol=dt * 10, rtol=0)
    for a, b in zip(rec.v_tmax, ref.v_tmax):
        assert torch.allclose(a, b, atol=dt * 10, rtol=0)
    assert torch.equal(rec.spike_counts, ref.spike_counts)
    assert torch.allclose(rec.energy_j, ref.energy_j, rtol=1e-6, atol=0)
    # the non-idealities really moved things
    with torch.no_grad():
        nominal = net.spike_times(x[:8])
    assert float((rec.spike_times[1] - nominal[1]).nan_to_num(0, 0, 0).abs().max()) > 1e-3


# ---------------------------------------------------------------------- latency windows
def test_latency_windows_and_early_spikes(fc):
    net, x = fc
    with torch.no_grad():
        acts = net.activations(net.spike_times(x))
    w100 = latency_windows(net, x, 100)
    assert w100 == pytest.approx([float(acts[1].max()), float(acts[2].max())])
    w90 = latency_windows(net, x, 90)
    assert all(a < b for a, b in zip(w90, w100))
    short = apply_windows(net, w90)
    wins = short.windows()
    assert wins[0][0] == net.t_max0 and wins[1][0] == wins[0][1]  # end to end
    assert wins[0][1] - wins[0][0] == pytest.approx(w90[0])
    dev = device()
    program_network(dev, short)
    rec = dev.run(short.encode(x))
    with torch.no_grad():
        ref = short.spike_times(x)  # clamp_early: an early spike counts as at t_min
    for a, b in zip(rec.spike_times, ref):
        assert_times_close(a, b, 1e-9)
    early = rec.spike_times[1] == wins[0][0]
    frac = float(early.sum()) / float(torch.isfinite(rec.spike_times[1]).sum())
    assert 0.03 < frac < 0.2  # ~10 % of the spikes are early
