"""Max pools of any geometry (from the traced converter) keep the exact B1 gradient, and a pool the
device protocol cannot express is refused when mapping, never programmed wrongly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hwloop
from hwloop.errors import DeviceLimitError
from hwloop.mapping import network_to_spec
from hwloop.ttfs import backward_from_spike_times


def _net(pool):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), pool, nn.Flatten(), nn.LazyLinear(4)).double()
    x = torch.rand(6, 1, 12, 12, dtype=torch.float64)
    m(x)
    return hwloop.convert(m, x, dtype=torch.float64), x


@pytest.mark.parametrize("pool", [nn.MaxPool2d(3, 2), nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 1),
                                  nn.MaxPool2d(2)], ids=["k3s2", "k3s2p1", "k3s1", "k2"])
def test_recorded_time_gradient_equals_relu_autograd(pool):
    """Overlapping windows (stride < kernel) share winners: their gradients add up (the old
    max_unpool2d kept one), and padding is the pool's own."""
    net, x = _net(pool)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    stages, logits = net.run(net.encode(x))
    lg = logits.detach().requires_grad_(True)
    (glog,) = torch.autograd.grad(F.cross_entropy(lg, y), lg)
    grads = backward_from_spike_times(net, stages, glog)
    relu = net.to_relu()
    assert (relu(x) - logits).abs().max() < 1e-9
    F.cross_entropy(relu(x), y).backward()
    conv = next(m for m in relu if isinstance(m, nn.Conv2d))
    assert torch.allclose(grads["layers.0.weight"], conv.weight.grad, atol=1e-9, rtol=0)
    assert float(conv.weight.grad.abs().max()) > 1e-4  # a real gradient, not zeros


def test_padded_pool_is_refused_by_the_device_mapping():
    net, _ = _net(nn.MaxPool2d(3, 2, 1))
    with pytest.raises(DeviceLimitError, match="layer 1: max pool with .*padding"):
        network_to_spec(net)
    net, _ = _net(nn.MaxPool2d(3, 2))  # no padding: the protocol has kernel and stride
    spec = network_to_spec(net)
    assert spec.layers[1].kernel_size == (3, 3) and spec.layers[1].stride == (2, 2)
