"""Issue #10, item 4: a sparse layer must not quantise to all zeros.

The clip percentiles of Methods (iii) used to be taken over all weights, zeros included: with
fewer than about 2p % non-zero weights both percentiles were 0 and the layer became codes 0,
scale 1, silently.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import hwloop
from hwloop.data.datasets import synthetic_dataset
from hwloop.emulator.device import EmulatorDevice
from hwloop.emulator.profile import load_profile
from hwloop.mapping import dequantized_network, program_network, quantize_network
from hwloop.quant import code_range, dequantize, quantize_weights, signal_loss
from hwloop.train.options import REPO_ROOT
from hwloop.train.hil import evaluate_device, evaluate_net

IDEAL = str(REPO_ROOT / "devices" / "emulator-ideal.yaml")


def _sparse(shape, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    keep = torch.rand(shape, generator=g) < density
    return w * keep


def _rel_err(codes, scale, w):
    return float((dequantize(codes, scale) - w).norm() / w.norm())


@pytest.mark.parametrize("bits,density", [(4, 0.03), (4, 0.005), (6, 0.01), (8, 0.003)])
def test_sparse_layer_keeps_its_weights(bits, density):
    w = _sparse((200, 150), density)
    assert 0 < int((w != 0).sum()) < 0.08 * w.numel()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a healthy sparse layer does not warn
        codes, scale = quantize_weights(w, bits, layer=3)
    lo, hi = code_range(bits)
    assert scale > 0 and int(codes.min()) >= lo and int(codes.max()) <= hi
    assert int((codes != 0).sum()) > 0.8 * int((w != 0).sum())  # most survive
    assert bool((codes[w == 0] == 0).all())  # zeros stay exactly zero
    assert _rel_err(codes, scale, w) < (0.25 if bits == 4 else 0.1)


def test_dense_layer_scale_unchanged():
    """No exact zeros: the percentiles are those of Methods (iii) as before."""
    w = torch.randn(64, 33, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lo, hi = torch.quantile(w.flatten(), torch.tensor([0.04, 0.96], dtype=torch.float64)).tolist()
    _, scale = quantize_weights(w, 4)
    assert scale == pytest.approx(max(-lo / 8, hi / 7), rel=1e-12)


def test_all_zero_layer_stays_zero_with_finite_scale():
    codes, scale = quantize_weights(torch.zeros(5, 4, dtype=torch.float64), 4, layer=2)
    assert int(codes.abs().sum()) == 0 and scale == 1.0


def test_lost_signal_warns_naming_the_layer():
    """A few outliers and no clipping: the bulk of the weights rounds to code 0."""
    w = 0.05 * torch.randn(4000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w[:4] = 10.0
    with pytest.warns(UserWarning, match=r"layer 5\b.*signal.*code 0"):
        codes, scale = quantize_weights(w, 4, clip_percentile=0, layer=5)
    assert int(codes[0]) == 7 and scale > 0
    zeroed, mass, _ = signal_loss(w, codes, scale)
    assert zeroed > 0.99 and mass > 0.5


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_ordinary_layers_do_not_warn(bits):
    """Gaussian weights, and percentile clipping of outliers, are not a loss of signal."""
    w = torch.randn(64, 33, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w.view(-1)[:3] = 100.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_weights(w, bits)


def test_quantize_network_names_a_lossy_layer():
    x, _ = synthetic_dataset(64, (1, 4, 4), 3, seed=0)
    relu = nn.Sequential(nn.Flatten(), nn.Linear(16, 40), nn.ReLU(), nn.Linear(40, 3)).double()
    net = hwloop.convert(relu, x.double())
    with torch.no_grad():
        net.layers[1].weight[0, 0] = 50.0  # sets the range alone: the rest rounds to 0
    with pytest.warns(UserWarning, match=r"layer 1\b"):
        quantize_network(net, 4, clip_percentile=0)


def test_sparse_net_on_a_4bit_chip_matches_float():
    """End to end: a 3 %-dense hidden layer at 4 bits keeps the float ReLU accuracy."""
    x, y = synthetic_dataset(600, (1, 8, 8), 4, seed=2, noise=0.3)
    x = x.double()
    torch.manual_seed(2)
    relu = nn.Sequential(nn.Flatten(), nn.Linear(64, 400), nn.ReLU(), nn.Linear(400, 4)).double()
    opt = torch.optim.Adam(relu.parameters(), lr=1e-2)
    mask = torch.rand(400, 64, generator=torch.Generator().manual_seed(3)) < 0.03
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(relu(x), y).backward()
        opt.step()
        with torch.no_grad():
            relu[1].weight.mul_(mask)
    acc_float = evaluate_net(relu, x, y)["accuracy"]
    assert acc_float > 0.6
    net = hwloop.convert(copy.deepcopy(relu), x[:256])
    prof = load_profile(IDEAL).model_copy(update={"weight_bits": 4})
    dev = EmulatorDevice.from_profile(prof)
    state = program_network(dev, net)
    codes, _ = state.weights[1]
    assert int((codes != 0).sum()) > 0.8 * int(mask.sum())
    acc_chip = evaluate_device(dev, net, x, y)["accuracy"]
    assert acc_chip >= acc_float - 0.1, (acc_float, acc_chip)
    assert evaluate_net(dequantized_network(net, state), x, y)["accuracy"] == pytest.approx(acc_chip, abs=0.02)


def test_signal_clipped_away_warns_by_name():
    """3 % of the weights at +-0.5 carry the signal, 97 % are ~1e-4: the 4-bit clip percentile
    sets the range at the small ones and clips the large ones (relative error ~1), which must
    warn, naming the layer."""
    import warnings as _w

    from hwloop.quant import quantize_weights, signal_loss
    g = torch.Generator().manual_seed(0)
    w = 1e-4 * torch.randn(40, 100, generator=g, dtype=torch.float64)
    big = torch.rand(40, 100, generator=g) < 0.03
    w[big] = 0.5 * torch.sign(torch.randn(int(big.sum()), generator=g, dtype=torch.float64))
    with _w.catch_warnings(record=True) as caught:
        _w.simplefilter("always")
        codes, scale = quantize_weights(w, 4, layer=3)
    assert signal_loss(w, codes, scale)[2] > 0.9
    msgs = [str(c.message) for c in caught]
    assert any("layer 3" in m and "clipped away" in m for m in msgs), msgs
