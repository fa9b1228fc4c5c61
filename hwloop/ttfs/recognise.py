"""Recognising what one fx node computes, for :mod:`hwloop.ttfs.trace`.

:func:`recognise` maps a node that takes the activation (a module call, a ``torch`` /
``torch.nn.functional`` function, a tensor method or an ATen operator) to the canonical
operations of :class:`hwloop.ttfs.trace.Op` (``(kind, params)`` pairs; none for an identity), or
raises :class:`~hwloop.errors.ConversionError` saying why it has no exact TTFS twin. Parameters
come out as float64 copies. Free of I/O.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from hwloop.errors import ConversionError
from hwloop.ttfs.layers import ChannelShift, SignedMaxPool2d, _pair

_NONLINEAR = {"tanh", "sigmoid", "gelu", "silu", "elu", "selu", "celu", "leaky_relu", "leakyrelu",
              "relu6", "hardtanh", "hardswish", "hardsigmoid", "softplus", "softsign", "mish", "prelu",
              "rrelu", "logsigmoid", "tanhshrink", "softshrink", "hardshrink", "threshold", "exp",
              "log", "sqrt", "rsqrt", "abs", "sin", "cos", "square", "pow", "glu", "erf", "neg"}
_SOFTMAX = {"softmax", "log_softmax", "logsoftmax", "_softmax", "_log_softmax", "softmin"}
_BINARY = {"add", "sub", "mul", "truediv", "div", "matmul", "mm", "bmm", "rsub", "floordiv",
           "addmm", "where", "maximum", "minimum", "max", "min", "iadd", "imul"}
_JOIN = {"cat", "concat", "concatenate", "stack", "hstack", "vstack", "split", "chunk", "unbind"}
_REORDER = {"permute", "transpose", "t", "flip", "roll", "movedim", "swapaxes", "pixel_shuffle"}
_IDENTITY = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
             "contiguous", "clone", "detach", "alias", "lift_fresh_copy"}
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout, nn.Identity)

#: stands for the activation among the arguments passed to :func:`recognise`.
ACT = type("ACT", (), {"__repr__": lambda self: "<activation>"})()

SUPPORTED = ("Linear, Conv2d, BatchNorm1d/2d, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, "
             "Flatten/view/reshape, Dropout, Identity (as modules or their functional forms)")


def _bind(args, kwargs, names, defaults=None) -> dict:
    """Positional + keyword arguments by name (``names[0]`` is the activation)."""
    out = dict(defaults or {})
    out.update(zip(names, args))
    out.update(kwargs)
    return out


def _const(v, what: str, where: str) -> Any:
    if v is ACT:
        raise ConversionError(f"{where}: its {what} is computed from the input; only parameters "
                              "and constants can be folded into TTFS weights")
    return v


def _f64(t) -> Optional[torch.Tensor]:
    return None if t is None else torch.as_tensor(t).detach().to(torch.float64).clone()


def _bn_op(rm, rv, w, b, eps, where) -> dict:
    if rm is None or rv is None:
        raise ConversionError(f"{where}: batch norm without running statistics cannot be fused "
                              "(track_running_stats=False)")
    s = 1.0 / torch.sqrt(_f64(rv) + float(eps))
    if w is not None:
        s = s * _f64(w)
    c = -_f64(rm) * s
    if b is not None:
        c = c + _f64(b)
    return {"scale": s, "shift": c}


def _conv_op(w, b, stride, padding, dilation, groups, where) -> dict:
    """F.conv2d arguments as a plain (groups=1, dilation=1) convolution: a grouped kernel is the
    block-diagonal full kernel, a dilated kernel the kernel with zeros inserted (both exact)."""
    w = _f64(w)
    stride, dilation = _pair(stride), _pair(dilation)
    k = tuple(w.shape[2:])
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same" and all((d * (kk - 1)) % 2 == 0 for d, kk in zip(dilation, k)):
            padding = tuple(d * (kk - 1) // 2 for d, kk in zip(dilation, k))
        else:
            raise ConversionError(f"{where}: padding={padding!r} would pad asymmetrically; only "
                                  "symmetric zero padding is supported")
    if groups != 1:
        o, ig = w.shape[:2]
        full = torch.zeros(o, ig * groups, *k, dtype=w.dtype)
        per = o // groups
        for g in range(groups):
            full[g * per:(g + 1) * per, g * ig:(g + 1) * ig] = w[g * per:(g + 1) * per]
        w = full
    if dilation != (1, 1):
        kd = tuple(d * (kk - 1) + 1 for d, kk in zip(dilation, k))
        wd = torch.zeros(*w.shape[:2], *kd, dtype=w.dtype)
        wd[:, :, ::dilation[0], ::dilation[1]] = w
        w = wd
    bias = _f64(b) if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return {"weight": w, "bias": bias, "stride": stride, "padding": _pair(padding)}


def _pool_op(kind, a) -> dict:
    k = _pair(a["kernel_size"])
    s = a.get("stride")
    s = k if s is None or (isinstance(s, (list, tuple)) and len(s) == 0) else _pair(s)
    if kind == "maxpool2d":
        return {"kernel": k, "stride": s, "padding": _pair(a.get("padding", 0)),
                "dilation": _pair(a.get("dilation", 1)), "ceil_mode": bool(a.get("ceil_mode", False)),
                "sign": a.get("sign")}
    return {"kernel": k, "stride": s, "padding": _pair(a.get("padding", 0)),
            "ceil_mode": bool(a.get("ceil_mode", False)),
            "count_include_pad": bool(a.get("count_include_pad", True)),
            "divisor_override": a.get("divisor_override")}


def _adaptive(out, shape, where, kind="adaptive_avgpool") -> tuple[str, dict]:
    if len(shape) != 3:
        raise ConversionError(f"{where}: adaptive pooling needs a (C, H, W) map, got {shape}")
    out = (out, out) if isinstance(out, int) or out is None else tuple(out)
    out = tuple(shape[1 + i] if o is None else int(o) for i, o in enumerate(out))
    if kind == "adaptive_avgpool":
        return "adaptive_avgpool", {"output_size": out}
    if shape[1] % out[0] or shape[2] % out[1]:
        raise ConversionError(f"{where}: adaptive max pooling of {shape[1:]} to {out} has unequal "
                              "windows; only an output size that divides the input is supported")
    k = (shape[1] // out[0], shape[2] // out[1])
    return "maxpool2d", {"kernel": k, "stride": k, "padding": (0, 0), "dilation": (1, 1),
                         "ceil_mode": False, "sign": None}


_NOT_RELU = ("is not ReLU: a B1 TTFS neuron computes exactly max(0, W x + b) (spike time t_max "
             "minus the activation), so it has no exact twin, and hwloop converts nothing approximately")


def _why(name: str, where: str) -> ConversionError:
    """The error for an operation that has no exact TTFS twin."""
    n = (name if name.startswith("_") else name.rstrip("_")).lower()
    if n in ("leaky_relu", "leakyrelu", "prelu", "rrelu", "elu", "selu", "celu"):
        why = (f"{name} {_NOT_RELU}: a negative activation has no spike time (a neuron below "
               "threshold stays silent, activation 0)")
    elif n in ("relu6", "hardtanh", "clamp", "clip"):
        why = f"{name} clips activations at an upper bound, which a B1 neuron does not do"
    elif n in _SOFTMAX:
        why = ("a softmax after the readout is not part of a TTFS network (the readout gives the "
               "logits at t_max); remove it (the argmax is unchanged)")
    elif n in _JOIN:
        why = "concatenating or splitting activations (branches) has no TTFS twin in a feed-forward chain"
    elif n in _REORDER:
        why = f"{name} reorders features, which is not a flatten; only (B, -1) flattening is supported"
    elif n in _BINARY:
        why = (f"elementwise arithmetic ({name}) on an activation is not supported; fold constants "
               "into the weights before converting")
    elif n in _NONLINEAR:
        why = f"{name} {_NOT_RELU}"
    else:
        why = f"{name} is not supported; supported: {SUPPORTED}"
    return ConversionError(f"{where}: {why}")


Ops = list[tuple[str, dict]]


def _module(m: nn.Module, x: torch.Tensor, where: str) -> Ops:
    shape = tuple(x.shape[1:])
    if isinstance(m, _DROPOUT_MODULES):
        return []
    if isinstance(m, nn.Linear):
        return [("linear", {"weight": _f64(m.weight), "bias": _f64(m.bias) if m.bias is not None
                            else torch.zeros(m.out_features, dtype=torch.float64)})]
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros":
            raise ConversionError(f"{where}: padding_mode={m.padding_mode!r} repeats activations at "
                                  "the borders; only zero padding (a silent neuron) is exact")
        return [("conv2d", _conv_op(m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups, where))]
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if isinstance(m, nn.BatchNorm1d) and len(shape) != 1:
            raise ConversionError(f"{where}: BatchNorm1d on a {len(shape)}-d feature map")
        return [("affine", _bn_op(m.running_mean, m.running_var, m.weight, m.bias, m.eps, where))]
    if isinstance(m, ChannelShift):
        sh = _f64(m.shift)
        return [("affine", {"scale": torch.ones_like(sh), "shift": sh})]
    if isinstance(m, nn.ReLU):
        return [("relu", {})]
    if isinstance(m, nn.MaxPool2d):
        if m.return_indices:
            raise ConversionError(f"{where}: max pooling with return_indices is not supported")
        return [("maxpool2d", _pool_op("maxpool2d", {"kernel_size": m.kernel_size, "stride": m.stride,
                                                     "padding": m.padding, "dilation": m.dilation,
                                                     "ceil_mode": m.ceil_mode}))]
    if isinstance(m, SignedMaxPool2d):
        return [("maxpool2d", _pool_op("maxpool2d", {
            "kernel_size": m.kernel_size, "stride": m.stride, "padding": getattr(m, "padding", 0),
            "dilation": getattr(m, "dilation", 1), "ceil_mode": getattr(m, "ceil_mode", False),
            "sign": m.sign.clone()}))]
    if isinstance(m, nn.AvgPool2d):
        return [("avgpool2d", _pool_op("avgpool2d", {
            "kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
            "ceil_mode": m.ceil_mode, "count_include_pad": m.count_include_pad,
            "divisor_override": m.divisor_override}))]
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return [_adaptive(m.output_size, shape, where)]
    if isinstance(m, nn.AdaptiveMaxPool2d) and not m.return_indices:
        return [_adaptive(m.output_size, shape, where, "maxpool2d")]
    if isinstance(m, nn.Flatten):
        return [_flatten(x, m.start_dim, m.end_dim, where)]
    raise _why(type(m).__name__, where)


def _flatten(x: torch.Tensor, start: int, end: int, where: str) -> tuple[str, dict]:
    if int(start) % x.ndim == 0:
        raise ConversionError(f"{where}: flattening from dim 0 merges the batch into the features; "
                              "use start_dim=1")
    return _reshape(x, tuple(x.flatten(int(start), int(end)).shape), where)


def _reshape(x: torch.Tensor, full: tuple, where: str) -> tuple[str, dict]:
    if len(full) == 0 or full[0] != x.shape[0] or math.prod(full) != x.numel():
        raise ConversionError(f"{where}: reshaping {tuple(x.shape[1:])} per sample to {tuple(full)} "
                              "does not keep the batch dimension")
    return ("reshape", {"shape": tuple(int(v) for v in full[1:])})


def _view(x: torch.Tensor, target, where: str) -> tuple[str, dict]:
    """view/reshape with per-sample semantics: the first entry is the batch (-1, x.size(0), or a
    batch baked in by torch.export), the rest the per-sample shape (one -1 allowed)."""
    if len(target) == 1 and isinstance(target[0], (list, tuple, torch.Size)):
        target = tuple(target[0])
    target = [int(t) for t in target]
    n = math.prod(x.shape[1:])
    rest = target[1:]
    if not target or rest.count(-1) > 1 or (target[0] == -1 and -1 in rest):
        raise ConversionError(f"{where}: view/reshape to {tuple(target)} is ambiguous per sample")
    if -1 in rest:
        known = math.prod(r for r in rest if r != -1)
        if known == 0 or n % known:
            raise ConversionError(f"{where}: cannot view {tuple(x.shape[1:])} as {tuple(target)}")
        rest[rest.index(-1)] = n // known
    if math.prod(rest) != n:
        raise ConversionError(f"{where}: view/reshape to {tuple(target)} does not keep the batch "
                              f"dimension (a sample has {n} values, not {math.prod(rest)})")
    return ("reshape", {"shape": tuple(rest)})


def _arith(n: str, args, kwargs, shape: tuple, where: str) -> dict:
    """``x + c``, ``c - x``, ``x * c``, ``x / c`` with a constant ``c`` that is a scalar or one value
    per channel/feature: an affine map ``s x + c`` like a batch norm."""
    a = _bind(args, kwargs, ["input", "other", "alpha"], {"alpha": 1})
    first = a["input"] is ACT
    v = a["other"] if first else a["input"]
    if isinstance(v, torch.Tensor):
        v = v.detach().to(torch.float64)
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        v = torch.tensor(float(v), dtype=torch.float64)
    else:
        raise _why(n, where)
    c_dim = len(shape)
    while v.ndim > c_dim and v.shape[0] == 1:
        v = v[0]
    if v.numel() == 1:
        v = v.reshape(1).expand(shape[0]).clone()
    elif not (v.ndim == c_dim and v.shape[0] == shape[0] and all(d == 1 for d in v.shape[1:])):
        raise ConversionError(f"{where}: arithmetic with a constant of shape {tuple(v.shape)} that is "
                              "not one value per channel cannot be folded exactly")
    v = v.reshape(-1) * float(a["alpha"]) if n in ("add", "sub", "rsub", "iadd", "isub") else v.reshape(-1)
    one = torch.ones_like(v)
    if n in ("add", "iadd"):
        return {"scale": one, "shift": v}
    if n in ("sub", "isub", "rsub"):
        to_x = first if n != "rsub" else not first
        return {"scale": one, "shift": -v} if to_x else {"scale": -one, "shift": v}
    if n in ("mul", "imul"):
        return {"scale": v, "shift": torch.zeros_like(v)}
    if not first or bool((v == 0).any()):
        raise ConversionError(f"{where}: dividing by an activation (or by zero) is not affine")
    return {"scale": 1.0 / v, "shift": torch.zeros_like(v)}


def recognise(kind: str, name: str, aten: bool, module: Optional[nn.Module], args: tuple,
              kwargs: dict, x: torch.Tensor, where: str) -> tuple[Ops, bool]:
    """The canonical operations of one node, and whether it returns a tuple (item 0 = result).

    Args:
        kind: the fx node op (``call_module``, ``call_function``, ``call_method``).
        name: lower-case name of what it computes (see :func:`hwloop.ttfs.trace._name`).
        aten: the target is an ATen operator (argument orders differ for batch norm).
        module: the called module for ``call_module``.
        args, kwargs: the node's arguments, :data:`ACT` in place of the activation.
        x: the activation on the example batch ``(B, *shape)``.
        where: node description for messages.

    Raises:
        ConversionError: no exact TTFS twin, or a parameter computed from the input.
    """
    if kind == "call_module":
        return _module(module, x, where), False
    n = name if name.startswith("_") else name.rstrip("_")
    shape = tuple(x.shape[1:])
    if n in _ARITH:
        return [("affine", _arith(n, args, kwargs, shape, where))], False
    if args and args[0] is not ACT:
        raise _why(name, where)
    handler = _FUNCTIONS.get(n)
    if handler is None:
        raise _why(name, where)
    return handler(_Call(n, name, aten, args, kwargs, x, shape, where))


_ARITH = ("add", "sub", "mul", "truediv", "div", "rsub", "iadd", "isub", "imul", "itruediv")


class _Call:
    """One function or method node, as the handlers of :data:`_FUNCTIONS` see it."""

    def __init__(self, n, name, aten, args, kwargs, x, shape, where):
        self.n, self.name, self.aten, self.args, self.kwargs = n, name, aten, args, kwargs
        self.x, self.shape, self.where = x, shape, where

    def bind(self, names, defaults=None) -> dict:
        return _bind(self.args, self.kwargs, names, defaults)


Found = tuple[Ops, bool]


def _f_relu(c: _Call) -> Found:
    return [("relu", {})], False


def _f_clamp(c: _Call) -> Found:
    a = c.bind(["input", "min", "max"])
    if c.n == "clamp_min":
        a["max"] = None
    if a.get("min") == 0 and a.get("max") is None:
        return [("relu", {})], False
    raise _why(c.name, c.where)


def _f_identity(c: _Call) -> Found:
    return [], False


def _f_native_dropout(c: _Call) -> Found:
    return [], True


def _f_max_pool(c: _Call) -> Found:
    a = c.bind(["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
                "return_indices"])
    return [("maxpool2d", _pool_op("maxpool2d", a))], c.n.endswith("indices") or bool(a.get("return_indices"))


def _f_avg_pool(c: _Call) -> Found:
    a = c.bind(["input", "kernel_size", "stride", "padding", "ceil_mode",
                "count_include_pad", "divisor_override"])
    return [("avgpool2d", _pool_op("avgpool2d", a))], False


def _f_adaptive_avg(c: _Call) -> Found:
    return [_adaptive(c.bind(["input", "output_size"])["output_size"], c.shape, c.where)], False


def _f_adaptive_max(c: _Call) -> Found:
    a = c.bind(["input", "output_size", "return_indices"])
    ops = [_adaptive(a["output_size"], c.shape, c.where, "maxpool2d")]
    return ops, c.aten or bool(a.get("return_indices"))


def _f_linear(c: _Call) -> Found:
    a = c.bind(["input", "weight", "bias"], {"bias": None})
    w = _f64(_const(a["weight"], "weight", c.where))
    b = _const(a["bias"], "bias", c.where)
    return [("linear", {"weight": w, "bias": _f64(b) if b is not None
                        else torch.zeros(w.shape[0], dtype=torch.float64)})], False


def _f_conv(c: _Call) -> Found:
    where = c.where
    names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
    if c.n == "convolution":
        names = names[:6] + ["transposed", "output_padding", "groups"]
    a = c.bind(names, {"bias": None, "stride": 1, "padding": 0, "dilation": 1,
                       "groups": 1, "transposed": False})
    w = _const(a["weight"], "weight", where)
    if a["transposed"] or w.ndim != 4:
        raise ConversionError(f"{where}: only 2-d (non-transposed) convolutions are supported")
    return [("conv2d", _conv_op(w, _const(a["bias"], "bias", where), a["stride"], a["padding"],
                                a["dilation"], a["groups"], where))], False


def _f_batch_norm(c: _Call) -> Found:
    n, where = c.n, c.where
    if c.aten:
        names = ["input", "weight", "bias", "running_mean", "running_var"]
        names += ["momentum", "eps"] if n.endswith("no_training") else ["training", "momentum", "eps"]
    else:
        names = ["input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"]
    a = c.bind(names, {"weight": None, "bias": None, "eps": 1e-5})
    p = _bn_op(*(_const(a[k], k, where) for k in ("running_mean", "running_var", "weight", "bias")),
               a["eps"], where)
    return [("affine", p)], n != "batch_norm"


def _f_mean(c: _Call) -> Found:
    shape, where = c.shape, c.where
    a = c.bind(["input", "dim", "keepdim"], {"dim": None, "keepdim": False})
    dims = a["dim"] if isinstance(a["dim"], (list, tuple)) else [a["dim"]]
    if len(shape) == 3 and None not in dims and {int(d) % 4 for d in dims} == {2, 3}:
        ops = [_adaptive((1, 1), shape, where)]
        return ops + ([] if a["keepdim"] else [("reshape", {"shape": (shape[0],)})]), False
    raise ConversionError(f"{where}: a mean over {a['dim']} is not a spatial average of a (C, H, W) map")


def _f_flatten(c: _Call) -> Found:
    a = c.bind(["input", "start_dim", "end_dim"], {"start_dim": 0, "end_dim": -1})
    return [_flatten(c.x, a["start_dim"], a["end_dim"], c.where)], False


def _f_view(c: _Call) -> Found:
    return [_view(c.x, list(c.args[1:]) or list(c.kwargs.values()), c.where)], False


def _f_squeeze(c: _Call) -> Found:
    n, x, kwargs = c.n, c.x, c.kwargs
    rest = tuple(c.args[1:])
    y = getattr(torch, n)(x, *rest, **kwargs) if rest or kwargs else getattr(torch, n)(x)
    return [_reshape(x, tuple(y.shape), c.where)], False


#: function / method / ATen name -> handler (after the arithmetic, which may take a constant first).
_FUNCTIONS = {
    "relu": _f_relu,
    **dict.fromkeys(("clamp", "clamp_min", "clip"), _f_clamp),
    **dict.fromkeys(_IDENTITY, _f_identity),
    "native_dropout": _f_native_dropout,
    **dict.fromkeys(("max_pool2d", "max_pool2d_with_indices"), _f_max_pool),
    "avg_pool2d": _f_avg_pool,
    **dict.fromkeys(("adaptive_avg_pool2d", "_adaptive_avg_pool2d"), _f_adaptive_avg),
    "adaptive_max_pool2d": _f_adaptive_max,
    "linear": _f_linear,
    **dict.fromkeys(("conv2d", "convolution"), _f_conv),
    **dict.fromkeys(("batch_norm", "native_batch_norm", "_native_batch_norm_legit",
                     "_native_batch_norm_legit_no_training"), _f_batch_norm),
    "mean": _f_mean,
    "flatten": _f_flatten,
    **dict.fromkeys(("view", "reshape", "_unsafe_view"), _f_view),
    **dict.fromkeys(("squeeze", "unsqueeze"), _f_squeeze),
}
