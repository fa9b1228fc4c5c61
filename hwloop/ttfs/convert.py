"""Conversion of a trained ReLU network to its exact TTFS twin (paper Eq. (2) reversed).

The model is read from its ``torch.fx`` graph (:func:`hwloop.ttfs.trace.read_ops`): modules and
their functional forms are recognised by what they compute, so an ``nn.Sequential`` (nested ones
included), a hand-written ``forward`` (``F.relu``, ``F.max_pool2d``, ``x.view(x.size(0), -1)``), a
``torch.export`` program and an imported ONNX graph convert alike. The chain may hold Linear,
Conv2d (zero padding; groups and dilation expanded exactly), BatchNorm1d/2d (eval statistics),
ReLU, MaxPool2d (any kernel, stride, padding, dilation, ceil mode), AvgPool2d,
AdaptiveAvgPool2d, flattening, Dropout and Identity, ending with a Linear readout. hwloop's own
:class:`ChannelShift` and :class:`SignedMaxPool2d` (made by ``to_relu``) convert back. Nothing
is converted approximately: any other operation raises :class:`ConversionError` naming the
node, its source line and why.

Stages: every ReLU closes a neuron layer (its preceding weight layer, with a max pool or average
pool that stood before the ReLU); a max pool after a ReLU is a pooling stage (earliest spike; a
padded position is a neuron that never fires). Everything linear between a stage and the next
weight layer is folded into that layer (:mod:`hwloop.ttfs.fold`):

* batch norm before a ReLU (``conv -> BN -> ReLU``): into the preceding layer's weights and bias;
* batch norm after a ReLU (``ReLU -> BN -> conv``, the order of the common CIFAR VGG16): into the
  next layer. The scale multiplies that layer's input weights; the shift becomes a bias, except in
  front of a zero-padded convolution where the padded border positions must not see the shift:
  there it stays an input shift (``SpikingConv2d.in_shift``), exact at every position.
* a negative scale in front of a max pool turns that channel's pool into a min pool
  (``SpikingMaxPool2d.sign = -1``: the latest spike wins).
* average pooling (plain or adaptive) after a ReLU: into the next dense layer's weights (its fan-in
  becomes the pre-pool size) or composed with the next convolution's kernel; before a ReLU: into
  the preceding convolution.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from hwloop.errors import ConversionError
from hwloop.ttfs.fold import fold_into_conv, fold_into_dense, fold_pool_into_conv
from hwloop.ttfs.layers import Flatten, Readout, SpikingConv2d, SpikingDense, SpikingMaxPool2d
from hwloop.ttfs.network import TTFSNetwork
from hwloop.ttfs.pooling import PaddedMaxPool2d
from hwloop.ttfs.trace import Op, read_ops


class _Open:
    """A weight layer waiting for its ReLU (or for the end: the readout)."""

    def __init__(self, kind, w, b, in_shape, stride=(1, 1), padding=(0, 0), in_shift=None):
        self.kind, self.w, self.b, self.in_shape, self.in_shift = kind, w, b, in_shape, in_shift
        self.stride, self.padding = stride, padding
        self.pool: Optional[nn.Module] = None


def _make_pool(p: dict, sign: Optional[torch.Tensor]) -> SpikingMaxPool2d:
    plain = p["padding"] == (0, 0) and p["dilation"] == (1, 1) and not p["ceil_mode"]
    if sign is not None and not bool((sign < 0).any()):
        sign = None
    if plain:
        return SpikingMaxPool2d(p["kernel"], p["stride"], sign)
    return PaddedMaxPool2d(p["kernel"], p["stride"], p["padding"], p["dilation"], p["ceil_mode"], sign)


def convert(relu_model: nn.Module, data: torch.Tensor, model: str = "b1",
            dtype: Optional[torch.dtype] = None, t_max0: float = 1.0,
            alpha: float = 1.0) -> TTFSNetwork:
    """Map a ReLU model onto an equivalent TTFS network.

    Args:
        relu_model: the ReLU network: any module torch.fx can trace, or an ``fx.GraphModule``
            (see the module docstring for what it may compute). Batch norm uses its running
            statistics and dropout is dropped, whatever the module's mode.
        data: ``(B, *input_shape)`` sample inputs in [0, 1], used to infer shapes and initialise
            the windows so that every active unit fires inside its window.
        model: ``"b1"`` (identity mapping, the default) or ``"alpha1"``.
        dtype: parameter dtype of the result (default: that of the ReLU model).
        t_max0: end of the input window, tau_c.
        alpha: alpha of the alpha1 model.

    Returns:
        A :class:`TTFSNetwork` whose logits equal the ReLU model's (float64: to rounding).

    Raises:
        ConversionError: an operation without an exact TTFS twin or an unsupported placement,
            named with its graph node and source line.
        ValueError: an unknown ``model``.
    """
    params = [p for p in relu_model.parameters()]
    if dtype is None:
        dtype = params[0].dtype if params else torch.float32
    input_shape = tuple(data.shape[1:])
    ops = read_ops(relu_model, data)
    with torch.no_grad():
        layers = _build(ops, input_shape)
    net = TTFSNetwork(layers, input_shape, t_max0=t_max0).to(torch.float64)
    net.init_windows(data.to(torch.float64))
    if model == "alpha1":
        _to_alpha1(net, alpha)
    elif model != "b1":
        raise ValueError(f"model must be 'b1' or 'alpha1', got {model!r}")
    return net.to(dtype)


def _close(open_: _Open) -> nn.Module:
    if open_.kind == "dense":
        layer = SpikingDense(open_.w.shape[1], open_.w.shape[0])
    else:
        layer = SpikingConv2d(open_.w.shape[1], open_.w.shape[0], tuple(open_.w.shape[2:]),
                              open_.stride, open_.padding, in_shift=open_.in_shift is not None)
    layer = layer.double()
    if open_.in_shift is not None:
        layer.in_shift.copy_(open_.in_shift)
    layer.weight.copy_(open_.w)
    layer.D.copy_(open_.b)
    return layer


def _build(ops: list[Op], input_shape: tuple) -> list[nn.Module]:
    shape = input_shape           # per-sample shape of the model's tensor at this point
    layers: list[nn.Module] = []
    open_: Optional[_Open] = None
    pending: list[Op] = []        # linear ops since the last stage, folded into the next layer
    a_shape = input_shape         # shape of the last stage (where ``pending`` starts)
    relu_last = flat = False
    for op in ops:
        k, where = op.kind, op.where
        if k in ("linear", "conv2d"):
            if open_ is not None:
                raise ConversionError(f"{where}: two weight layers without a ReLU between them are "
                                      "not supported")
            w, b = op.p["weight"], op.p["bias"]
            if k == "linear":
                if len(shape) != 1 or shape[0] != w.shape[1]:
                    raise ConversionError(f"{where} expects {w.shape[1]} features, gets shape "
                                          f"{shape} (add a Flatten)")
                w, b = fold_into_dense(pending, a_shape, w, b)
                open_ = _Open("dense", w, b, a_shape)
            else:
                if len(shape) != 3 or shape[0] != w.shape[1]:
                    raise ConversionError(f"{where} expects {w.shape[1]} input channels, gets "
                                          f"shape {shape}")
                w, b, st, pd, shift = fold_into_conv(pending, a_shape, w, b, op.p["stride"],
                                                     op.p["padding"], where)
                open_ = _Open("conv2d", w, b, a_shape, st, pd, shift)
            pending, relu_last = [], False
        elif k == "affine":
            s, c = op.p["scale"], op.p["shift"]
            if s.numel() != shape[0]:
                raise ConversionError(f"{where} has {s.numel()} features, the tensor has "
                                      f"{shape[0]} channels")
            if open_ is not None:
                if open_.pool is not None:
                    raise ConversionError(f"{where}: batch norm between a max pool and its ReLU "
                                          "is not supported")
                open_.w = open_.w * s.view(-1, *([1] * (open_.w.ndim - 1)))
                open_.b = open_.b * s + c
            elif not layers:
                raise ConversionError(f"{where}: batch norm (or constant arithmetic) on the raw "
                                      "input is not supported (normalise the data instead)")
            else:
                pending.append(op)
        elif k == "relu":
            if open_ is None:
                if relu_last and all(p.kind != "affine" for p in pending):
                    continue  # relu of a non-negative value (relu, pooled relu) is the identity
                raise ConversionError(f"{where}: a ReLU must follow a Linear or Conv2d "
                                      "(optionally through BatchNorm / pooling)")
            layers.append(_close(open_))
            if open_.pool is not None:
                layers.append(open_.pool)
            a_shape = shape
            open_, relu_last, flat = None, True, False
        elif k == "maxpool2d":
            if len(shape) != 3:
                raise ConversionError(f"{where}: max pooling needs a (C, H, W) feature map")
            sign = op.p["sign"]
            if open_ is not None:
                if open_.kind != "conv2d" or open_.pool is not None or (sign is not None and bool((sign < 0).any())):
                    raise ConversionError(f"{where}: unsupported pooling before a ReLU")
                open_.pool = _make_pool(op.p, None)
            else:
                if not layers:
                    raise ConversionError(f"{where}: max pooling of the raw input is not supported")
                if any(p.kind != "affine" for p in pending):
                    raise ConversionError(f"{where}: max pooling after an average pool: the average "
                                          "is not a spiking stage (it is folded into the next weight "
                                          "layer), so no neuron holds it")
                sign = torch.ones(shape[0], dtype=torch.int8) if sign is None else sign.clone()
                for p in pending:
                    sign = sign * torch.where(p.p["scale"] < 0, -1, 1).to(torch.int8)
                layers.append(_make_pool(op.p, sign))
                a_shape, flat = op.out_shape, False
                if pending:  # the affine now acts on the pooled values (per channel: it commutes)
                    pending = [Op("affine", p.where, op.out_shape, op.out_shape, p.p) for p in pending]
        elif k in ("avgpool2d", "adaptive_avgpool"):
            if len(shape) != 3:
                raise ConversionError(f"{where}: average pooling needs a (C, H, W) feature map")
            if open_ is not None:
                if open_.kind != "conv2d" or open_.pool is not None:
                    raise ConversionError(f"{where}: average pooling before a ReLU folds only into "
                                          "a convolution (without a max pool)")
                open_.w, open_.stride = fold_pool_into_conv(open_.w, open_.b, open_.stride,
                                                            open_.padding, open_.in_shift,
                                                            open_.in_shape, op)
            else:
                pending.append(op)  # folds into the next weight layer
        elif k == "reshape":
            if op.out_shape == shape:
                continue
            if len(op.out_shape) != 1:
                raise ConversionError(f"{where}: reshaping {shape} to {op.out_shape} is not a "
                                      "flatten; only (B, -1) flattening is supported")
            if open_ is not None:
                raise ConversionError(f"{where}: Flatten between a weight layer and its ReLU is "
                                      "not supported")
            if len(a_shape) > 1 and not flat:
                layers.append(Flatten())  # the stage itself is flattened for the dense layer
                flat = True
            if pending:
                pending.append(op)  # folded: the dense weights act on the flattened stage
            else:
                a_shape = op.out_shape
        else:  # pragma: no cover - read_ops only emits the kinds above
            raise ConversionError(f"{where}: unknown operation {k}")
        shape = op.out_shape

    if open_ is None or open_.kind != "dense" or open_.pool is not None or pending:
        last = ops[-1].where + ": " if ops else ""
        raise ConversionError(f"{last}the model must end with a Linear readout layer (no ReLU "
                              "after it: the readout is non-spiking and gives the logits, which "
                              "may be negative, at t_max)")
    readout = Readout(open_.w.shape[1], open_.w.shape[0]).double()
    readout.weight.copy_(open_.w)
    readout.bias.copy_(open_.b)
    layers.append(readout)
    return layers


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
