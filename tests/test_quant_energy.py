"""Weight / time quantisation (hwloop.quant) and the energy model (hwloop.energy)."""

import math

import pytest
import torch

from hwloop.energy import layer_energy, network_energy, volts_per_unit
from hwloop.quant import code_range, dequantize, quantize_times, quantize_weights, time_grid

INF = math.inf


# ---------------------------------------------------------------------- weights
@pytest.mark.parametrize("bits", [2, 4, 6, 8, 16])
def test_codes_in_range_and_int64(bits):
    torch.manual_seed(0)
    w = torch.randn(64, 33, dtype=torch.float64)
    codes, scale = quantize_weights(w, bits)
    lo, hi = code_range(bits)
    assert codes.dtype == torch.int64 and codes.shape == w.shape
    assert int(codes.min()) >= lo and int(codes.max()) <= hi
    assert scale > 0
    # weights inside the clipped range are within half a step
    p = 4.0 if bits <= 4 else 1.0
    qlo, qhi = torch.quantile(w.flatten(), torch.tensor([p / 100, 1 - p / 100], dtype=torch.float64))
    inside = (w >= qlo) & (w <= qhi)
    err = (dequantize(codes, scale) - w)[inside].abs().max()
    assert float(err) <= scale / 2 + 1e-12


def test_percentile_clipping_sets_scale():
    w = torch.linspace(-1, 1, 1001, dtype=torch.float64)
    w[0], w[-1] = -100.0, 100.0  # outliers
    codes, scale = quantize_weights(w, 8, clip_percentile=1.0)
    lo, hi = torch.quantile(w, torch.tensor([0.01, 0.99], dtype=torch.float64)).tolist()
    assert scale == pytest.approx(max(-lo / 128, hi / 127), rel=1e-12)
    assert int(codes[0]) == -128 and int(codes[-1]) == 127  # outliers clipped
    # no clipping: the outliers set the range
    _, scale0 = quantize_weights(w, 8, clip_percentile=0)
    assert scale0 == pytest.approx(100 / 127)


def test_default_clip_percentile_from_bits():
    torch.manual_seed(1)
    w = torch.randn(5000, dtype=torch.float64)
    for bits, p in ((4, 4.0), (3, 4.0), (5, 1.0), (8, 1.0)):
        assert quantize_weights(w, bits)[1] == quantize_weights(w, bits, clip_percentile=p)[1]


def test_zero_exact_and_all_zero_layer():
    w = torch.tensor([0.0, 0.3, -0.7, 0.0], dtype=torch.float64)
    codes, scale = quantize_weights(w, 6, clip_percentile=0)
    assert codes[0] == 0 and codes[3] == 0
    codes, scale = quantize_weights(torch.zeros(3, 3), 4)
    assert scale == 1.0 and int(codes.abs().sum()) == 0


def test_bad_arguments():
    with pytest.raises(ValueError):
        quantize_weights(torch.ones(3), 1)
    with pytest.raises(ValueError):
        quantize_weights(torch.ones(3), 8, clip_percentile=50)
    with pytest.raises(ValueError):
        quantize_weights(torch.tensor([1.0, math.nan]), 8)


# ---------------------------------------------------------------------- times
def test_quantize_times_ceil_rule():
    t = torch.tensor([-0.5, 0.0, 0.1, 0.25, 0.26, 0.74, 0.75, 0.76, 0.99, 1.0, 1.2, INF],
                     dtype=torch.float64)
    q = quantize_times(t, 0.0, 1.0, 4)
    expect = [0.0, 0.0, 0.25, 0.25, 0.5, 0.75, 0.75, INF, INF, INF, INF, INF]
    assert q.tolist() == expect


def test_quantized_times_on_grid_and_not_earlier():
    torch.manual_seed(2)
    t_min, t_max, K = 3.0, 5.5, 16
    t = t_min + (t_max - t_min) * torch.rand(10000, dtype=torch.float64)
    q = quantize_times(t, t_min, t_max, K)
    fin = torch.isfinite(q)
    grid = time_grid(t_min, t_max, K)
    k = (q[fin] - t_min) / ((t_max - t_min) / K)
    assert torch.allclose(k, k.round(), atol=1e-9)
    assert bool((q[fin] >= t[fin] - 1e-12).all())  # registered at the next tick
    assert bool((q[fin] - t[fin] < (t_max - t_min) / K + 1e-12).all())
    # silent exactly for t > the last tick
    assert torch.equal(~fin, t > grid[-1] + 1e-9 * (t_max - t_min) / K)


def test_quantize_times_out_in_place():
    t = torch.tensor([0.1, 0.6, INF], dtype=torch.float64)
    out = quantize_times(t, 0.0, 1.0, 2, out=t)
    assert out is t and t.tolist() == [0.5, INF, INF]


# ---------------------------------------------------------------------- energy
def test_energy_three_neuron_example():
    """Hand computation (Methods): C = 100 fF, T_r = 45 pJ, window width 2 tau_c at a 0.5 V
    base threshold -> 0.25 V per potential unit.

    n1 fires, theta 2.0 -> 0.50 V: 45e-12 + 0.5 * 1e-13 * 0.25     = 4.50125e-11 J
    n2 fires, theta 1.5 -> 0.375 V: 45e-12 + 0.5 * 1e-13 * 0.140625 = 4.500703125e-11 J
    n3 silent, V(t_max) 0.8 -> 0.2 V: 0.5 * 1e-13 * 0.04            = 2e-15 J
    total 9.002153125e-11 J
    """
    (u,) = volts_per_unit(0.5, [(1.0, 3.0)])
    assert u == 0.25
    spiked = torch.tensor([[True, True, False]])
    theta = torch.tensor([2.0, 1.5, 1.9], dtype=torch.float64)
    v = torch.tensor([[0.0, 0.0, 0.8]], dtype=torch.float64)
    e = layer_energy(spiked, theta, v, 1e-13, 45e-12, u)
    assert e.shape == (1,)
    assert abs(float(e[0]) - 9.002153125e-11) < 1e-15
    # same with float masks, per-neuron capacitance tensors, batch-shaped thresholds
    e2 = layer_energy(spiked.double(), theta.expand(1, 3), v, torch.full((3,), 1e-13), 45e-12, u)
    assert abs(float(e2[0]) - 9.002153125e-11) < 1e-15
    # V(t_max) of a neuron that fired is ignored
    e3 = layer_energy(spiked, theta, torch.tensor([[5.0, 5.0, 0.8]], dtype=torch.float64),
                      1e-13, 45e-12, u)
    assert abs(float(e3[0]) - 9.002153125e-11) < 1e-15


def test_network_energy_shape_and_sum():
    torch.manual_seed(3)
    B = 5
    s1, s2 = torch.rand(B, 4) > 0.5, torch.rand(B, 2, 3, 3) > 0.5
    th1, th2 = torch.rand(4, dtype=torch.float64), torch.rand(2, 3, 3, dtype=torch.float64)
    v1, v2 = torch.rand(B, 4, dtype=torch.float64), torch.rand(B, 2, 3, 3, dtype=torch.float64)
    e = network_energy([s1, s2], [th1, th2], [v1, v2], [1e-13, 2e-13], 1e-12, [0.1, 0.2])
    assert e.shape == (B, 2) and e.dtype == torch.float64
    f1 = s1.double()
    manual = (f1 * (1e-12 + 0.5e-13 * (0.1 * th1) ** 2) + (1 - f1) * 0.5e-13 * (0.1 * v1) ** 2).sum(1)
    assert torch.allclose(e[:, 0], manual, rtol=0, atol=1e-24)
    with pytest.raises(ValueError):
        network_energy([s1], [th1, th2], [v1], 1e-13, 0.0)
