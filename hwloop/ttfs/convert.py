"""Conversion of a trained ReLU network to its exact TTFS twin (paper Eq. (2) reversed).

Supported: an ``nn.Sequential`` (nested ones are flattened) of Linear, Conv2d (any stride and
zero padding, groups=1, dilation=1), BatchNorm1d/2d (eval statistics), ReLU, MaxPool2d (no
padding), Flatten, Dropout and Identity, ending with a Linear readout. hwloop's own
:class:`ChannelShift` and :class:`SignedMaxPool2d` (made by ``to_relu``) convert back.

Batch norm is fused exactly wherever it stands:

* before a ReLU (``conv -> BN -> ReLU``): into the preceding layer's weights and bias;
* after a ReLU (``ReLU -> BN -> conv``, the order of the common CIFAR VGG16): into the next
  layer. The scale multiplies that layer's input weights; the shift becomes a bias, except in
  front of a zero-padded convolution where the padded border positions must not see the shift:
  there it stays an input shift (``SpikingConv2d.in_shift``), exact at every position.
* a negative scale in front of a max pool turns that channel's pool into a min pool
  (``SpikingMaxPool2d.sign = -1``: the latest spike wins).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from hwloop.errors import ConversionError
from hwloop.ttfs.layers import (ChannelShift, Flatten, Readout, SignedMaxPool2d, SpikingConv2d,
                                SpikingDense, SpikingMaxPool2d, _pair)
from hwloop.ttfs.network import TTFSNetwork


def _flatten_modules(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, nn.Sequential):
        out = []
        for m in model:
            out += _flatten_modules(m)
        return out
    return [model]


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if bn.running_mean is None or bn.running_var is None:
        raise ConversionError(f"{bn.__class__.__name__} without running statistics cannot be fused "
                              "(track_running_stats=False)")
    s = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.double()
    c = -bn.running_mean.double() * s
    if bn.bias is not None:
        c = c + bn.bias.double()
    return s, c


class _Open:
    """A weight layer waiting for its ReLU (or for the end: the readout)."""

    def __init__(self, kind, w, b, module, in_shift=None):
        self.kind, self.w, self.b, self.module, self.in_shift = kind, w, b, module, in_shift
        self.pool: Optional[nn.Module] = None


def convert(relu_model: nn.Module, data: torch.Tensor, model: str = "b1",
            dtype: Optional[torch.dtype] = None, t_max0: float = 1.0,
            alpha: float = 1.0) -> TTFSNetwork:
    """Map a ReLU ``nn.Sequential`` onto an equivalent TTFS network.

    Args:
        relu_model: the ReLU network (see the module docstring for what it may contain).
        data: ``(B, *input_shape)`` sample inputs in [0, 1], used to infer shapes and initialise
            the windows so that every active unit fires inside its window.
        model: ``"b1"`` (identity mapping, the default) or ``"alpha1"``.
        dtype: parameter dtype of the result (default: that of the ReLU model).
        t_max0: end of the input window, tau_c.
        alpha: alpha of the alpha1 model.

    Returns:
        A :class:`TTFSNetwork` whose logits equal the ReLU model's (float64: to rounding).

    Raises:
        ConversionError: an unsupported layer or placement, named with its index.
    """
    mods = _flatten_modules(relu_model)
    params = [p for p in relu_model.parameters()]
    if dtype is None:
        dtype = params[0].dtype if params else torch.float32
    input_shape = tuple(data.shape[1:])
    shape = input_shape
    layers: list[nn.Module] = []
    open_: Optional[_Open] = None
    pending: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (s, c) per channel / feature
    relu_seen_last = False

    def where(i, m):
        return f"layer {i} ({m.__class__.__name__})"

    with torch.no_grad():
        for i, m in enumerate(mods):
            if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)):
                continue
            if isinstance(m, nn.Linear):
                if open_ is not None:
                    raise ConversionError(f"{where(i, m)}: two weight layers without a ReLU between "
                                          "them are not supported")
                if len(shape) != 1 or shape[0] != m.in_features:
                    raise ConversionError(f"{where(i, m)} expects {m.in_features} features, gets shape "
                                          f"{shape} (add a Flatten)")
                w = m.weight.double().clone()
                b = m.bias.double().clone() if m.bias is not None else torch.zeros(m.out_features, dtype=torch.float64)
                if pending is not None:
                    s, c = pending
                    b = b + w @ c
                    w = w * s[None, :]
                    pending = None
                open_ = _Open("dense", w, b, m)
                shape = (m.out_features,)
                relu_seen_last = False
            elif isinstance(m, nn.Conv2d):
                if open_ is not None:
                    raise ConversionError(f"{where(i, m)}: two weight layers without a ReLU between "
                                          "them are not supported")
                if m.groups != 1 or _pair(m.dilation) != (1, 1) or isinstance(m.padding, str) \
                        or m.padding_mode != "zeros":
                    raise ConversionError(f"{where(i, m)}: only groups=1, dilation=1 and numeric zero "
                                          "padding are supported")
                if len(shape) != 3 or shape[0] != m.in_channels:
                    raise ConversionError(f"{where(i, m)} expects {m.in_channels} input channels, gets "
                                          f"shape {shape}")
                w = m.weight.double().clone()
                b = m.bias.double().clone() if m.bias is not None else torch.zeros(m.out_channels, dtype=torch.float64)
                in_shift = None
                pad = _pair(m.padding)
                if pending is not None:
                    s, c = pending
                    if pad == (0, 0):
                        b = b + (w * c.view(1, -1, 1, 1)).sum((1, 2, 3))
                    else:
                        if bool(((s == 0) & (c != 0)).any()):
                            raise ConversionError(f"{where(i, m)}: a batch norm with zero scale in front "
                                                  "of a zero-padded convolution cannot be fused")
                        in_shift = torch.where(s != 0, c / torch.where(s != 0, s, torch.ones_like(s)),
                                               torch.zeros_like(c))
                    w = w * s.view(1, -1, 1, 1)
                    pending = None
                open_ = _Open("conv2d", w, b, m, in_shift)
                k, st = _pair(m.kernel_size), _pair(m.stride)
                shape = (m.out_channels, (shape[1] + 2 * pad[0] - k[0]) // st[0] + 1,
                         (shape[2] + 2 * pad[1] - k[1]) // st[1] + 1)
                relu_seen_last = False
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                if m.num_features != shape[0]:
                    raise ConversionError(f"{where(i, m)} has {m.num_features} features, the tensor has "
                                          f"{shape[0]} channels")
                if isinstance(m, nn.BatchNorm1d) and len(shape) != 1:
                    raise ConversionError(f"{where(i, m)}: BatchNorm1d on a {len(shape)}-d feature map")
                s, c = _bn_affine(m)
                if open_ is not None:
                    if open_.pool is not None:
                        raise ConversionError(f"{where(i, m)}: batch norm between a max pool and its "
                                              "ReLU is not supported")
                    open_.w = open_.w * s.view(-1, *([1] * (open_.w.ndim - 1)))
                    open_.b = open_.b * s + c
                else:
                    if not layers:
                        raise ConversionError(f"{where(i, m)}: batch norm on the raw input is not "
                                              "supported (normalise the data instead)")
                    pending = (s, c) if pending is None else (pending[0] * s, pending[1] * s + c)
            elif isinstance(m, ChannelShift):
                sh = m.shift.double()
                pending = (torch.ones_like(sh), sh) if pending is None else (pending[0], pending[1] + sh)
            elif isinstance(m, nn.ReLU):
                if open_ is None:
                    if relu_seen_last and pending is None:
                        continue  # relu(relu(x)) = relu(x)
                    raise ConversionError(f"{where(i, m)}: a ReLU must follow a Linear or Conv2d "
                                          "(optionally through BatchNorm / MaxPool)")
                if open_.kind == "dense":
                    layer = SpikingDense(open_.w.shape[1], open_.w.shape[0])
                else:
                    cm = open_.module
                    layer = SpikingConv2d(cm.in_channels, cm.out_channels, cm.kernel_size, cm.stride,
                                          cm.padding, in_shift=open_.in_shift is not None)
                layer = layer.double()
                if open_.in_shift is not None:
                    layer.in_shift.copy_(open_.in_shift)
                layer.weight.copy_(open_.w)
                layer.D.copy_(open_.b)
                layers.append(layer)
                if open_.pool is not None:
                    layers.append(open_.pool)
                open_ = None
                relu_seen_last = True
            elif isinstance(m, (nn.MaxPool2d, SignedMaxPool2d)):
                if isinstance(m, nn.MaxPool2d):
                    if _pair(m.padding) != (0, 0) or _pair(m.dilation) != (1, 1) or m.ceil_mode \
                            or m.return_indices:
                        raise ConversionError(f"{where(i, m)}: only padding=0, dilation=1, "
                                              "ceil_mode=False max pooling is supported")
                    k = _pair(m.kernel_size)
                    st = _pair(m.stride if m.stride is not None else m.kernel_size)
                    sign = torch.ones(shape[0], dtype=torch.int8)
                else:
                    k, st, sign = m.kernel_size, m.stride, m.sign.clone()
                if len(shape) != 3:
                    raise ConversionError(f"{where(i, m)}: max pooling needs a (C, H, W) feature map")
                if open_ is not None:
                    if open_.pool is not None or bool((sign < 0).any()):
                        raise ConversionError(f"{where(i, m)}: unsupported pooling before a ReLU")
                    open_.pool = SpikingMaxPool2d(k, st)
                else:
                    if not layers:
                        raise ConversionError(f"{where(i, m)}: max pooling of the raw input is not "
                                              "supported")
                    if pending is not None:
                        sign = sign * torch.where(pending[0] < 0, -1, 1).to(torch.int8)
                    layers.append(SpikingMaxPool2d(k, st, sign if bool((sign < 0).any()) else None))
                shape = (shape[0], (shape[1] - k[0]) // st[0] + 1, (shape[2] - k[1]) // st[1] + 1)
            elif isinstance(m, nn.Flatten):
                if m.start_dim != 1 or m.end_dim != -1:
                    raise ConversionError(f"{where(i, m)}: only Flatten(start_dim=1, end_dim=-1)")
                if open_ is not None:
                    raise ConversionError(f"{where(i, m)}: Flatten between a weight layer and its ReLU "
                                          "is not supported")
                if len(shape) > 1:
                    if pending is not None:
                        n = int(torch.tensor(shape[1:]).prod())
                        pending = (pending[0].repeat_interleave(n), pending[1].repeat_interleave(n))
                    layers.append(Flatten())
                    shape = (int(torch.tensor(shape).prod()),)
            else:
                raise ConversionError(f"{where(i, m)} is not supported; supported: Linear, Conv2d, "
                                      "BatchNorm1d/2d, ReLU, MaxPool2d, Flatten, Dropout, Identity")

        if open_ is None or open_.kind != "dense" or open_.pool is not None:
            raise ConversionError("the model must end with a Linear readout layer (no ReLU after it)")
        readout = Readout(open_.w.shape[1], open_.w.shape[0]).double()
        readout.weight.copy_(open_.w)
        readout.bias.copy_(open_.b)
        layers.append(readout)

    net = TTFSNetwork(layers, input_shape, t_max0=t_max0).to(torch.float64)
    net.init_windows(data.to(torch.float64))
    if model == "alpha1":
        _to_alpha1(net, alpha)
    elif model != "b1":
        raise ValueError(f"model must be 'b1' or 'alpha1', got {model!r}")
    return net.to(dtype)


def _to_alpha1(net: TTFSNetwork, alpha: float) -> None:
    """Re-parameterise a B1 network as the equivalent alpha1 network ("smart alpha1 init"):
    B_i = alpha / (1 - sum_j w_ij), W = B w, D chosen so b = -theta/B + width (Eq. (2))."""
    with torch.no_grad():
        for k, layer in enumerate(net.neuron_layers()):
            w, b = layer.weight.clone(), layer.D.clone()
            rows = w.flatten(1).sum(1)
            bad = int((rows >= 1).sum())
            if bad:
                raise ConversionError(
                    f"alpha1 mapping of neuron layer {k}: {bad} neurons have sum_j w_ij >= 1, so "
                    "B_i = alpha / (1 - sum_j w_ij) would not be positive")
            B = alpha / (1 - rows)
            width = layer.width
            layer.model, layer.alpha = "alpha1", float(alpha)
            layer.weight.copy_(w * B.view(-1, *([1] * (w.ndim - 1))))
            layer.base_threshold.fill_(width)
            layer.D.copy_(width - B * (width - b))
