"""Exact B1 gradients from recorded spike times (paper Eq. (3)-(4)).

This is the backward pass the hardware-in-the-loop trainer uses: the forward pass happened on a
device, which measured the spike times of every stage; the gradient is evaluated at those
measured times with the nominal (host-side) parameters:

    dL/dW^(n) = dL/dV^(N+1) . dV^(N+1)/dt^(N) . dt^(N)/dt^(N-1) ... dt^(n)/dW^(n)      (3)
    dt^(n)/dt^(n-1) = M^(n-1) (1/B^(n)) W^(n),  M = diag(neuron fired before t_max)  (4)

Written in activations x = t_max - t (B = 1): the error signal of a neuron layer is masked by
its firing mask M (the ReLU derivative), max pooling routes it to the earliest spike of the pool
(the latest for a channel with sign -1), and the readout is linear in x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from hwloop.ttfs.layers import Flatten, NeuronLayer, Readout, SpikingConv2d, SpikingDense, SpikingMaxPool2d
from hwloop.ttfs.network import TTFSNetwork


def backward_from_spike_times(net: TTFSNetwork, stage_times: list[torch.Tensor],
                              grad_logits: torch.Tensor, l1: float = 0.0) -> dict[str, torch.Tensor]:
    """dL/d(parameter) for every trainable parameter of a B1 network.

    Args:
        net: the B1 network holding the nominal weights, thresholds (D) and windows.
        stage_times: spike times of every stage, as :meth:`TTFSNetwork.spike_times` orders them
            (input first), ``(B, *stage_shape)`` each, tau_c, ``+inf`` = silent. Typically
            measured by a device (``DeviceRecord.spike_times``).
        grad_logits: dL/dlogits, ``(B, n_classes)``.
        l1: weight lambda of an activity penalty lambda * mean_batch(sum of the activations
            t_max - t of every neuron layer) (paper Table 2, "+L1"); see :func:`l1_penalty`.

    Returns:
        ``{name: gradient}`` keyed like ``net.named_parameters()`` (``layers.<i>.weight``,
        ``layers.<i>.D``, ``layers.<i>.in_shift``, ``layers.<i>.bias`` for the readout).

    Raises:
        ValueError: the network is not B1, or the number of stages does not match.
    """
    if net.model != "b1":
        raise ValueError("backward_from_spike_times implements the B1 model (B = 1); got "
                         f"model={net.model!r}")
    n_stages = len(net.stage_shapes())
    if len(stage_times) != n_stages:
        raise ValueError(f"expected {n_stages} stage tensors (input first), got {len(stage_times)}")
    dtype = grad_logits.dtype
    acts = [a.to(dtype) for a in net.activations([t.to(dtype) for t in stage_times])]
    grads: dict[str, torch.Tensor] = {}

    # stage index of each layer's input
    stage_in, s = [], 0
    for layer in net.layers:
        stage_in.append(s)
        if isinstance(layer, (NeuronLayer, SpikingMaxPool2d)):
            s += 1

    g = None  # dL/dx of the current layer's output activation
    for li in range(len(net.layers) - 1, -1, -1):
        layer = net.layers[li]
        x_in = acts[stage_in[li]]
        x_in = x_in.reshape(x_in.shape[0], *net.shapes[li])
        name = f"layers.{li}"
        if isinstance(layer, Readout):
            g = _backward_readout(layer, x_in, grad_logits, name, grads)
        elif isinstance(layer, Flatten):
            g = g.reshape(x_in.shape)
        elif isinstance(layer, SpikingMaxPool2d):
            g = _backward_pool(layer, x_in, stage_times[stage_in[li]].to(dtype), g)
        elif isinstance(layer, NeuronLayer):
            g = _backward_neuron(layer, x_in, stage_times[stage_in[li] + 1].to(dtype), g, l1,
                                 name, grads)
        else:  # pragma: no cover
            raise TypeError(type(layer))
    return grads


def _backward_readout(layer: Readout, x_in: torch.Tensor, grad_logits: torch.Tensor, name: str,
                      grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """The linear readout: its weight and bias gradients; returns dL/dx of its input."""
    grads[f"{name}.weight"] = grad_logits.T @ x_in
    grads[f"{name}.bias"] = grad_logits.sum(0)
    return grad_logits @ layer.weight.detach().to(grad_logits.dtype)


def _backward_pool(layer: SpikingMaxPool2d, x_in: torch.Tensor, t_in: torch.Tensor,
                   g: torch.Tensor) -> torch.Tensor:
    """Max pooling: route the error to each window's earliest spike (latest where sign -1)."""
    key = -t_in
    if layer.sign is not None:
        key = torch.where(layer.sign.view(-1, 1, 1) > 0, -t_in, t_in)
    # the pool's own geometry (padding, dilation, ceil mode where it has them); the
    # gradient goes to each window's winner, summed where overlapping windows (stride <
    # kernel) share one (max_unpool2d would keep only one of them)
    _, idx = F.max_pool2d(key, layer.kernel_size, layer.stride,
                          getattr(layer, "padding", 0), getattr(layer, "dilation", 1),
                          getattr(layer, "ceil_mode", False), return_indices=True)
    b, c, h, w = x_in.shape
    return torch.zeros(b, c, h * w, dtype=g.dtype).scatter_add_(
        2, idx.flatten(2), g.reshape(b, c, -1)).reshape(b, c, h, w)


def _firing_mask(layer: NeuronLayer, x_in: torch.Tensor, t_out: torch.Tensor) -> torch.Tensor:
    """M of Eq. (4): the neuron fired (and, with ``clamp_early``, did not saturate at t_min)."""
    dtype = t_out.dtype
    mask = torch.isfinite(t_out)  # firing mask M, Eq. (4)
    if layer.clamp_early:
        # A spike that would come before t_min counts as at t_min (Methods (ii), (iv)):
        # the clipped ReLU min(a, t_max - t_min) has no gradient where it saturates.
        # Whether a neuron saturated is decided by its nominal pre-activation, since a
        # measured time at t_min also carries comparator delay and jitter.
        with torch.no_grad():
            a = layer.potential(x_in.to(layer.weight.dtype)).to(dtype)
            a = a + layer.D.detach().to(dtype).view(-1, *([1] * (a.ndim - 2)))
        mask = mask & (a <= float(layer.t_max - layer.t_min))
    return mask


def _backward_neuron(layer: NeuronLayer, x_in: torch.Tensor, t_out: torch.Tensor, g: torch.Tensor,
                     l1: float, name: str, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """A neuron layer (Eq. (4)): mask the error by M, then the weight layer's own gradients;
    returns dL/dx of its input."""
    dtype = t_out.dtype
    if l1:
        g = g + l1 / t_out.shape[0]
    mask = _firing_mask(layer, x_in, t_out)
    W = layer.weight.detach().to(dtype)
    da = g * mask.to(dtype)
    if isinstance(layer, SpikingDense):
        grads[f"{name}.weight"] = da.T @ x_in
        grads[f"{name}.D"] = da.sum(0)
        return da @ W
    if isinstance(layer, SpikingConv2d):
        xs = x_in
        if layer.in_shift is not None:
            xs = x_in + layer.in_shift.detach().to(dtype).view(-1, 1, 1)
        grads[f"{name}.weight"] = conv2d_weight(xs, W.shape, da, layer.stride, layer.padding)
        grads[f"{name}.D"] = da.sum((0, 2, 3))
        g = conv2d_input(xs.shape, W, da, layer.stride, layer.padding)
        if layer.in_shift is not None:
            grads[f"{name}.in_shift"] = g.sum((0, 2, 3))
        return g
    raise TypeError(type(layer))  # pragma: no cover


def l1_penalty(net: TTFSNetwork, stage_times: list[torch.Tensor], l1: float) -> torch.Tensor:
    """lambda * mean over the batch of the summed activations (t_max - t) of all neuron layers.

    Differentiable through the closed form; its gradient is what
    :func:`backward_from_spike_times` adds for the same ``l1``.
    """
    acts = net.activations(stage_times)
    total = stage_times[0].new_zeros(())
    s = 0
    for layer in net.layers:
        if isinstance(layer, (NeuronLayer, SpikingMaxPool2d)):
            s += 1
            if isinstance(layer, NeuronLayer):
                total = total + acts[s].flatten(1).sum(1).mean()
    return l1 * total


def apply_gradients(net: TTFSNetwork, grads: dict[str, torch.Tensor]) -> None:
    """Store ``grads`` into ``param.grad`` (accumulating) so any torch optimiser can step."""
    params = dict(net.named_parameters())
    for k, v in grads.items():
        p = params[k]
        v = v.to(p.dtype)
        p.grad = v.clone() if p.grad is None else p.grad + v
