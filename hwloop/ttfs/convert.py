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


class _Walk:
    """The state of :func:`_build` between operations."""

    def __init__(self, input_shape: tuple):
        self.shape = input_shape      # per-sample shape of the model's tensor at this point
        self.layers: list[nn.Module] = []
        self.open_: Optional[_Open] = None
        self.pending: list[Op] = []   # linear ops since the last stage, folded into the next layer
        self.a_shape = input_shape    # shape of the last stage (where ``pending`` starts)
        self.relu_last = self.flat = False


_SKIP = True  # a handler's answer: the op is the identity here, the shape stays


def _build(ops: list[Op], input_shape: tuple) -> list[nn.Module]:
    st = _Walk(input_shape)
    for op in ops:
        handler = _HANDLERS.get(op.kind)
        if handler is None:  # pragma: no cover - read_ops only emits the kinds of _HANDLERS
            raise ConversionError(f"{op.where}: unknown operation {op.kind}")
        if handler(st, op) is _SKIP:
            continue
        st.shape = op.out_shape
    return _readout(st, ops)


def _on_weight(st: _Walk, op: Op) -> None:
    """Linear or Conv2d: opens a layer, folding in the pending linear ops."""
    k, where, shape = op.kind, op.where, st.shape
    if st.open_ is not None:
        raise ConversionError(f"{where}: two weight layers without a ReLU between them are "
                              "not supported")
    w, b = op.p["weight"], op.p["bias"]
    if k == "linear":
        if len(shape) != 1 or shape[0] != w.shape[1]:
            raise ConversionError(f"{where} expects {w.shape[1]} features, gets shape "
                                  f"{shape} (add a Flatten)")
        w, b = fold_into_dense(st.pending, st.a_shape, w, b)
        st.open_ = _Open("dense", w, b, st.a_shape)
    else:
        if len(shape) != 3 or shape[0] != w.shape[1]:
            raise ConversionError(f"{where} expects {w.shape[1]} input channels, gets "
                                  f"shape {shape}")
        w, b, stride, pd, shift = fold_into_conv(st.pending, st.a_shape, w, b, op.p["stride"],
                                                 op.p["padding"], where)
        st.open_ = _Open("conv2d", w, b, st.a_shape, stride, pd, shift)
    st.pending, st.relu_last = [], False


def _on_affine(st: _Walk, op: Op) -> None:
    """Batch norm or constant arithmetic: into the open layer, else pending for the next one."""
    where, open_ = op.where, st.open_
    s, c = op.p["scale"], op.p["shift"]
    if s.numel() != st.shape[0]:
        raise ConversionError(f"{where} has {s.numel()} features, the tensor has "
                              f"{st.shape[0]} channels")
    if open_ is not None:
        if open_.pool is not None:
            raise ConversionError(f"{where}: batch norm between a max pool and its ReLU "
                                  "is not supported")
        open_.w = open_.w * s.view(-1, *([1] * (open_.w.ndim - 1)))
        open_.b = open_.b * s + c
    elif not st.layers:
        raise ConversionError(f"{where}: batch norm (or constant arithmetic) on the raw "
                              "input is not supported (normalise the data instead)")
    else:
        st.pending.append(op)


def _on_relu(st: _Walk, op: Op) -> Optional[bool]:
    """A ReLU closes the open layer (and its max pool) into a neuron layer."""
    open_ = st.open_
    if open_ is None:
        if st.relu_last and all(p.kind != "affine" for p in st.pending):
            return _SKIP  # relu of a non-negative value (relu, pooled relu) is the identity
        raise ConversionError(f"{op.where}: a ReLU must follow a Linear or Conv2d "
                              "(optionally through BatchNorm / pooling)")
    st.layers.append(_close(open_))
    if open_.pool is not None:
        st.layers.append(open_.pool)
    st.a_shape = st.shape
    st.open_, st.relu_last, st.flat = None, True, False
    return None


def _on_maxpool(st: _Walk, op: Op) -> None:
    """Max pooling: before a ReLU part of the neuron layer, after one a pooling stage."""
    where, shape, open_ = op.where, st.shape, st.open_
    if len(shape) != 3:
        raise ConversionError(f"{where}: max pooling needs a (C, H, W) feature map")
    sign = op.p["sign"]
    if open_ is not None:
        if open_.kind != "conv2d" or open_.pool is not None or (sign is not None and bool((sign < 0).any())):
            raise ConversionError(f"{where}: unsupported pooling before a ReLU")
        open_.pool = _make_pool(op.p, None)
        return
    if not st.layers:
        raise ConversionError(f"{where}: max pooling of the raw input is not supported")
    if any(p.kind != "affine" for p in st.pending):
        raise ConversionError(f"{where}: max pooling after an average pool: the average "
                              "is not a spiking stage (it is folded into the next weight "
                              "layer), so no neuron holds it")
    sign = torch.ones(shape[0], dtype=torch.int8) if sign is None else sign.clone()
    for p in st.pending:
        sign = sign * torch.where(p.p["scale"] < 0, -1, 1).to(torch.int8)
    st.layers.append(_make_pool(op.p, sign))
    st.a_shape, st.flat = op.out_shape, False
    if st.pending:  # the affine now acts on the pooled values (per channel: it commutes)
        st.pending = [Op("affine", p.where, op.out_shape, op.out_shape, p.p) for p in st.pending]


def _on_avgpool(st: _Walk, op: Op) -> None:
    """Average pooling (plain or adaptive): folded into a weight layer."""
    where, open_ = op.where, st.open_
    if len(st.shape) != 3:
        raise ConversionError(f"{where}: average pooling needs a (C, H, W) feature map")
    if open_ is not None:
        if open_.kind != "conv2d" or open_.pool is not None:
            raise ConversionError(f"{where}: average pooling before a ReLU folds only into "
                                  "a convolution (without a max pool)")
        open_.w, open_.stride = fold_pool_into_conv(open_.w, open_.b, open_.stride,
                                                    open_.padding, open_.in_shift,
                                                    open_.in_shape, op)
    else:
        st.pending.append(op)  # folds into the next weight layer


def _on_reshape(st: _Walk, op: Op) -> Optional[bool]:
    """A (B, -1) flatten: a Flatten stage, folded into the dense weights where ops are pending."""
    where, shape = op.where, st.shape
    if op.out_shape == shape:
        return _SKIP
    if len(op.out_shape) != 1:
        raise ConversionError(f"{where}: reshaping {shape} to {op.out_shape} is not a "
                              "flatten; only (B, -1) flattening is supported")
    if st.open_ is not None:
        raise ConversionError(f"{where}: Flatten between a weight layer and its ReLU is "
                              "not supported")
    if len(st.a_shape) > 1 and not st.flat:
        st.layers.append(Flatten())  # the stage itself is flattened for the dense layer
        st.flat = True
    if st.pending:
        st.pending.append(op)  # folded: the dense weights act on the flattened stage
    else:
        st.a_shape = op.out_shape
    return None


_HANDLERS = {"linear": _on_weight, "conv2d": _on_weight, "affine": _on_affine, "relu": _on_relu,
             "maxpool2d": _on_maxpool, "avgpool2d": _on_avgpool, "adaptive_avgpool": _on_avgpool,
             "reshape": _on_reshape}


def _readout(st: _Walk, ops: list[Op]) -> list[nn.Module]:
    """The open dense layer at the end becomes the readout."""
    open_ = st.open_
    if open_ is None or open_.kind != "dense" or open_.pool is not None or st.pending:
        last = ops[-1].where + ": " if ops else ""
        raise ConversionError(f"{last}the model must end with a Linear readout layer (no ReLU "
                              "after it: the readout is non-spiking and gives the logits, which "
                              "may be negative, at t_max)")
    readout = Readout(open_.w.shape[1], open_.w.shape[0]).double()
    readout.weight.copy_(open_.w)
    readout.bias.copy_(open_.b)
    st.layers.append(readout)
    return st.layers


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
