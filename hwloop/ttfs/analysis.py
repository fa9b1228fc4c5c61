"""Analysis of TTFS learning dynamics (paper Fig. 2 and Fig. 3).

* :func:`spike_time_jacobians`: dt^(n)/dt^(n-1) = M (1/B^(n)) W^(n) of every dense layer, Eq. (4),
  where M masks the neurons of layer n that fired and the inputs that fired.
* :func:`spectral_radii`: the largest eigenvalue modulus of each of those Jacobians.
* :func:`cosine_similarity`: between the weights of two networks (Fig. 3b).
"""

from __future__ import annotations

import torch
from torch import nn

from hwloop.ttfs.layers import SpikingDense
from hwloop.ttfs.network import TTFSNetwork


@torch.no_grad()
def spike_time_jacobians(net: TTFSNetwork, x: torch.Tensor) -> list[torch.Tensor]:
    """Jacobians of the spike times of each dense layer w.r.t. its input spike times.

    Args:
        net: a network of dense layers (B1 or alpha1).
        x: one input sample ``(*input_shape)`` in [0, 1].

    Returns:
        One ``(n_out, n_in)`` matrix per :class:`SpikingDense` layer: entry (i, j) is
        dt_i/dt_j = W_ij / B_i if neuron i and input j both fired, else 0 (Eq. (4)).
    """
    stages = net.spike_times(x.unsqueeze(0))
    jac, s = [], 0
    for layer in net.layers:
        if isinstance(layer, SpikingDense):
            t_in = stages[s].flatten()
            t_out = stages[s + 1].flatten()
            m_out = torch.isfinite(t_out).to(layer.weight.dtype)
            m_in = torch.isfinite(t_in).to(layer.weight.dtype)
            J = m_out[:, None] * (layer.weight / layer.slope()[:, None]) * m_in[None, :]
            jac.append(J)
        if layer.kind in ("dense", "conv2d", "maxpool2d"):
            s += 1
    return jac


def spectral_radii(jacobians: list[torch.Tensor]) -> list[float]:
    """max |eigenvalue| of each square Jacobian."""
    return [float(torch.linalg.eigvals(J.double()).abs().max()) for J in jacobians]


def flat_weights(model: nn.Module, relu_equivalent: bool = True) -> torch.Tensor:
    """All weight matrices of a model as one vector. For a :class:`TTFSNetwork` with
    ``relu_equivalent`` the weights are mapped to the ReLU twin's (w = W / B, Eq. (2))."""
    if isinstance(model, TTFSNetwork) and relu_equivalent:
        model = model.to_relu()
    return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if n.endswith("weight")])


def cosine_similarity(a: nn.Module, b: nn.Module) -> float:
    """Cosine similarity of the (ReLU-equivalent) weights of two networks, Fig. 3b."""
    wa, wb = flat_weights(a).double(), flat_weights(b).double()
    return float(wa @ wb / (wa.norm() * wb.norm()))
