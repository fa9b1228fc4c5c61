"""ONNX graph -> ``torch.fx.GraphModule`` that :func:`hwloop.convert` reads.

A small importer over the ``onnx`` graph (no onnx2torch: it pulls torchvision, which pins and
replaces the installed torch build). Every ONNX node becomes the torch module or function that
computes the same thing (Conv -> ``nn.Conv2d``, Gemm -> ``nn.Linear``, Relu -> ``torch.relu``,
MaxPool -> ``nn.MaxPool2d``, AveragePool -> ``nn.AvgPool2d``, GlobalAveragePool ->
``nn.AdaptiveAvgPool2d(1)``, BatchNormalization -> ``nn.BatchNorm1d/2d``, Flatten/Reshape ->
``torch.flatten``/``torch.reshape``, Add/Sub/Mul/Div with a constant -> the operator, Tanh,
Sigmoid, Softmax, Concat, ... -> their torch functions, so that the converter can name what is not
convertible). Shape computations (Shape, Gather, Concat, ... on constants) are folded with the
ONNX reference evaluator; a reshape keeps the batch free (``-1``). Each fx node records its ONNX
node in ``node.meta["hwloop_source"]``, which conversion errors quote.

Needs the optional ``onnx`` package (``pip install 'hwloop[onnx]'``).
"""

from __future__ import annotations

import math
import operator
import os
import re
from typing import Any, Union

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from hwloop.errors import ConversionError
from hwloop.ttfs.pooling import PaddedSignedMaxPool2d

_BATCH = 2  # batch of the dummy activation that carries the shapes through the import

_UNARY = {"Relu": torch.relu, "Tanh": torch.tanh, "Sigmoid": torch.sigmoid, "Exp": torch.exp,
          "Log": torch.log, "Abs": torch.abs, "Sqrt": torch.sqrt, "Neg": torch.neg, "Erf": torch.erf,
          "Softplus": F.softplus, "Softsign": F.softsign, "Selu": F.selu, "Mish": F.mish,
          "HardSwish": F.hardswish}
_BINARY = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": operator.truediv}


def require_onnx():
    """The ``onnx`` module, or ConversionError naming the extra to install."""
    try:
        import onnx
    except ImportError as exc:
        raise ConversionError("ONNX support needs the optional packages: pip install 'hwloop[onnx]' "
                              "(onnx, onnxruntime)") from exc
    return onnx


def load_onnx(path: Union[str, os.PathLike]) -> tuple[fx.GraphModule, tuple[int, ...]]:
    """Read an ``.onnx`` file: ``(module, per-sample input shape)``. Raises ConversionError
    (also for an unreadable file) and OSError (missing file)."""
    onnx = require_onnx()
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such ONNX file: {path}")
    try:
        model = onnx.load(os.fspath(path))
    except Exception as exc:
        raise ConversionError(f"{path}: not a readable ONNX model ({exc})") from exc
    return import_onnx(model)


def import_onnx(model) -> tuple[fx.GraphModule, tuple[int, ...]]:
    """An ``onnx.ModelProto`` as an fx GraphModule (float parameters as stored) and the
    per-sample input shape ``(C, H, W)`` or ``(features,)``.

    Raises:
        ConversionError: several inputs or outputs, a dynamic per-sample shape, or an ONNX
            operator without a torch equivalent here (named with the ONNX node).
    """
    return _Importer(model).run()


class _V:
    """An activation: its fx node and its dummy value (batch of 2) that carries the shape."""

    def __init__(self, node: fx.Node, value: torch.Tensor):
        self.node, self.value = node, value


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _sym_pads(pads, where: str, n: int = 2) -> tuple:
    pads = list(pads) if pads else [0] * (2 * n)
    if pads[:n] != pads[n:]:
        raise ConversionError(f"{where}: asymmetric padding {pads} is not supported")
    return tuple(int(p) for p in pads[:n])


class _Importer:
    def __init__(self, model):
        from onnx import numpy_helper

        self.model, self.g = model, model.graph
        self.root, self.graph = nn.Module(), fx.Graph()
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in self.g.initializer}
        self.acts: dict[str, _V] = {}
        self.used = {i for n in self.g.node for i in n.input} | {o.name for o in self.g.output}
        self.signed, self.skip = self._signed_pools()
        self.n = 0
        self.source = ""

    # ------------------------------------------------------------------ emitting
    def _uname(self, base: str) -> str:
        self.n += 1
        return f"{re.sub(r'[^0-9a-zA-Z_]', '_', base).lower()}_{self.n}"

    def _tag(self, node: fx.Node) -> fx.Node:
        node.meta["hwloop_source"] = self.source
        return node

    def module(self, mod: nn.Module, x: str, base: str) -> _V:
        name = self._uname(base)
        self.root.add_module(name, mod.eval())
        with torch.no_grad():
            return _V(self._tag(self.graph.call_module(name, (self.acts[x].node,))), mod(self.acts[x].value))

    def arg(self, name: str):
        """An fx argument for an ONNX input: the activation, a float, or a constant tensor."""
        if name in self.acts:
            return self.acts[name]
        v = self.consts[name]
        if v.size == 1:
            return float(v.reshape(-1)[0])
        buf = self._uname("const")
        self.root.register_buffer(buf, torch.from_numpy(np.array(v)))
        return _V(self.graph.get_attr(buf), getattr(self.root, buf))

    def function(self, fn, args: tuple, kwargs: dict | None = None) -> _V:
        kwargs = kwargs or {}
        fa = tuple(a.node if isinstance(a, _V) else a for a in args)
        va = tuple(a.value if isinstance(a, _V) else a for a in args)
        if fn is torch.cat:
            fa, va = (list(fa),), (list(va),)
        with torch.no_grad():
            return _V(self._tag(self.graph.call_function(fn, fa, kwargs)), fn(*va, **kwargs))

    # ------------------------------------------------------------------ the walk
    def run(self) -> tuple[fx.GraphModule, tuple[int, ...]]:
        inputs = [i for i in self.g.input if i.name not in self.consts]
        if len(inputs) != 1:
            raise ConversionError(f"the ONNX graph has {len(inputs)} inputs; hwloop converts models "
                                  "with one input tensor")
        dims = inputs[0].type.tensor_type.shape.dim
        shape = tuple(int(d.dim_value) for d in dims[1:])
        if not shape or any(d <= 0 for d in shape):
            raise ConversionError(f"ONNX input '{inputs[0].name}' needs a static per-sample shape, "
                                  f"got {[d.dim_param or d.dim_value for d in dims]}")
        from onnx import helper

        np_dtype = helper.tensor_dtype_to_np_dtype(inputs[0].type.tensor_type.elem_type)
        x = self.graph.placeholder("x")
        self.acts[inputs[0].name] = _V(x, torch.rand(_BATCH, *shape).to(torch.from_numpy(np.zeros(1, np_dtype)).dtype))
        for node in self.g.node:
            self.source = f" from ONNX node '{node.name or node.output[0]}' ({node.op_type})"
            self._node(node)
        if len(self.g.output) != 1 or self.g.output[0].name not in self.acts:
            raise ConversionError("the ONNX graph must have one output computed from its input")
        self.graph.output(self.acts[self.g.output[0].name].node)
        return fx.GraphModule(self.root, self.graph), shape

    def _signed_pools(self) -> tuple[dict, set]:
        """hwloop's own signed pool, ``Where(sign, MaxPool(x), Neg(MaxPool(Neg(x))))``: the Where
        node's name -> (x, MaxPool attributes, sign); the four helper nodes are skipped."""
        nodes = list(self.g.node)
        prod = {o: i for i, n in enumerate(nodes) for o in n.output}
        uses: dict[str, int] = {}
        for n in self.g.node:
            for i in n.input:
                uses[i] = uses.get(i, 0) + 1
        signed, skip = {}, set()
        get = lambda name: nodes[prod[name]] if name in prod else None  # noqa: E731
        for n in nodes:
            if n.op_type != "Where" or n.input[0] not in self.consts:
                continue
            a, b = get(n.input[1]), get(n.input[2])
            p = get(b.input[0]) if b is not None and b.op_type == "Neg" else None
            q = get(p.input[0]) if p is not None and p.op_type == "MaxPool" else None
            if (a is None or a.op_type != "MaxPool" or q is None or q.op_type != "Neg"
                    or q.input[0] != a.input[0] or _attrs(a) != _attrs(p)
                    or any(uses.get(t.output[0], 0) != 1 for t in (a, b, p, q))):
                continue
            signed[n.output[0]] = (a.input[0], a, self.consts[n.input[0]])
            skip |= {t.output[0] for t in (a, b, p, q)}
        return signed, skip

    def _fold(self, node) -> None:
        from onnx.reference import ReferenceEvaluator

        feeds = {n: self.consts[n] for n in node.input if n}
        outs = ReferenceEvaluator(node).run(None, feeds)
        for name, v in zip(node.output, outs):
            self.consts[name] = np.asarray(v)

    def _node(self, node) -> None:
        op, ins, a = node.op_type, list(node.input), _attrs(node)
        where = self.source.strip()
        if node.output[0] in self.skip:
            return
        if node.output[0] in self.signed:
            x, pool, sign = self.signed[node.output[0]]
            self.acts[node.output[0]] = self._signed_pool(x, pool, sign, where)
            return
        acts = [n for n in ins if n in self.acts]
        if not acts:
            self._fold(node)
            return
        if op == "Shape":
            s = np.array(self.acts[ins[0]].value.shape, dtype=np.int64)
            self.consts[node.output[0]] = s[a.get("start", 0):a.get("end", len(s))]
            return
        out = node.output[0]
        if any(o in self.used for o in node.output[1:]):
            raise ConversionError(f"{where}: uses a second output of {op} (indices, mask or batch "
                                  "statistics); only its result can be converted")
        if op in ("Identity", "Dropout"):
            self.acts[out] = self.acts[ins[0]]
            return
        if ins[0] not in self.acts and op not in _BINARY and op != "Concat":
            raise ConversionError(f"{where}: only the first input may be the activation")
        self.acts[out] = self._emit(op, ins, a, where)

    def _emit(self, op: str, ins: list, a: dict, where: str):
        handler = _EMITTERS.get(op)
        if handler is None and op in _UNARY:
            return self.function(_UNARY[op], (self.acts[ins[0]],))
        if handler is None:
            raise ConversionError(f"{where}: the ONNX operator {op} has no hwloop equivalent (supported: "
                                  "Conv, Gemm, MatMul, Relu, MaxPool, AveragePool, GlobalAveragePool, "
                                  "BatchNormalization, Flatten, Reshape, Squeeze, Unsqueeze, ReduceMean, "
                                  "Dropout, Identity, Clip(min=0), Add/Sub/Mul/Div with a constant)")
        x = ins[0]
        xv = self.acts[x].value if x in self.acts else None
        return handler(self, _Node(op, ins, a, where, x, xv))

    # one emitter per ONNX operator (see _EMITTERS); ``n.x`` is the activation's name, ``n.xv``
    # its dummy value
    def _e_conv(self, n: "_Node") -> _V:
        ins, a, where = n.ins, n.a, n.where
        w = torch.from_numpy(self.consts[ins[1]].copy())
        if w.ndim != 4:
            raise ConversionError(f"{where}: only 2-d convolutions are supported")
        k, g = tuple(w.shape[2:]), int(a.get("group", 1))
        st, dil = tuple(a.get("strides", (1, 1))), tuple(a.get("dilations", (1, 1)))
        pad = self._auto_pad(a, n.xv, k, st, dil, where)
        m = nn.Conv2d(w.shape[1] * g, w.shape[0], k, st, pad, dil, g, bias=len(ins) > 2 and bool(ins[2]),
                      dtype=w.dtype)
        with torch.no_grad():
            m.weight.copy_(w)
            if m.bias is not None:
                m.bias.copy_(torch.from_numpy(self.consts[ins[2]].copy()))
        return self.module(m, n.x, "conv")

    def _e_gemm(self, n: "_Node") -> _V:
        op, ins, a = n.op, n.ins, n.a
        if ins[1] not in self.consts or n.xv.ndim != 2 or a.get("transA", 0):
            raise ConversionError(f"{n.where}: only activation x constant weight products on "
                                  "(batch, features) are supported")
        b = self.consts[ins[1]]
        w = (b if a.get("transB", 0) else b.T) * float(a.get("alpha", 1.0))
        bias = None
        if op == "Gemm" and len(ins) > 2 and ins[2]:
            bias = np.array(np.broadcast_to(self.consts[ins[2]] * float(a.get("beta", 1.0)),
                                            (w.shape[0],)))
        m = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=torch.from_numpy(w.copy()).dtype)
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(np.array(w)))
            if bias is not None:
                m.bias.copy_(torch.from_numpy(bias))
        return self.module(m, n.x, "linear")

    def _e_pool(self, n: "_Node") -> _V:
        op, a, where = n.op, n.a, n.where
        k = tuple(a["kernel_shape"])
        st = tuple(a.get("strides", (1,) * len(k)))
        dil = tuple(a.get("dilations", (1,) * len(k)))
        pad = self._auto_pad(a, n.xv, k, st, dil, where)
        if op == "MaxPool":
            m = nn.MaxPool2d(k, st, pad, dil, ceil_mode=bool(a.get("ceil_mode", 0)))
        else:
            if dil != (1, 1):
                raise ConversionError(f"{where}: dilated average pooling is not supported")
            m = nn.AvgPool2d(k, st, pad, bool(a.get("ceil_mode", 0)), bool(a.get("count_include_pad", 0)))
        return self.module(m, n.x, op)

    def _e_global_pool(self, n: "_Node") -> _V:
        m = nn.AdaptiveAvgPool2d(1) if n.op == "GlobalAveragePool" else nn.AdaptiveMaxPool2d(1)
        return self.module(m, n.x, n.op)

    def _e_batch_norm(self, n: "_Node") -> _V:
        ins = n.ins
        scale = torch.from_numpy(np.array(self.consts[ins[1]]))
        m = (nn.BatchNorm2d if n.xv.ndim == 4 else nn.BatchNorm1d)(
            scale.shape[0], eps=float(n.a.get("epsilon", 1e-5)), dtype=scale.dtype)
        with torch.no_grad():
            for attr, c in zip(("weight", "bias", "running_mean", "running_var"), ins[1:5]):
                getattr(m, attr).copy_(torch.from_numpy(np.array(self.consts[c])))
        return self.module(m, n.x, "batchnorm")

    def _e_flatten(self, n: "_Node") -> _V:
        xv = n.xv
        axis = int(n.a.get("axis", 1)) % xv.ndim
        if axis == 1:
            return self.function(torch.flatten, (self.acts[n.x], 1))
        lead = int(math.prod(xv.shape[:axis]))
        return self.function(torch.reshape, (self.acts[n.x], (lead, -1)))

    def _e_reshape(self, n: "_Node") -> _V:
        return self.function(torch.reshape, (self.acts[n.x], self._reshape_target(n.xv, n.ins[1], n.a)))

    def _axes(self, n: "_Node"):
        """The axes attribute, or (opset >= 13) the constant second input."""
        axes = n.a.get("axes")
        if axes is None and len(n.ins) > 1 and n.ins[1]:
            axes = self.consts[n.ins[1]].tolist()
        return axes

    def _e_squeeze(self, n: "_Node") -> _V:
        axes = [int(v) for v in (self._axes(n) or [])]
        if n.op == "Squeeze":
            return self.function(torch.squeeze, (self.acts[n.x], tuple(axes)) if axes else (self.acts[n.x],))
        cur = self.acts[n.x]
        for ax in sorted(v % (n.xv.ndim + len(axes)) for v in axes):
            cur = self.function(torch.unsqueeze, (cur, ax))
        return cur

    def _e_reduce_mean(self, n: "_Node") -> _V:
        axes = self._axes(n)
        dims = tuple(int(v) for v in axes) if axes else tuple(range(n.xv.ndim))
        return self.function(torch.mean, (self.acts[n.x], dims), {"keepdim": bool(n.a.get("keepdims", 1))})

    def _e_clip(self, n: "_Node") -> _V:
        lo = n.a.get("min", self._scalar(n.ins, 1))
        hi = n.a.get("max", self._scalar(n.ins, 2))
        return self.function(torch.clamp, (self.acts[n.x],), {"min": lo, "max": hi})

    def _e_leaky_relu(self, n: "_Node") -> _V:
        return self.function(F.leaky_relu, (self.acts[n.x], float(n.a.get("alpha", 0.01))))

    def _e_softmax(self, n: "_Node") -> _V:
        fn = torch.softmax if n.op == "Softmax" else torch.log_softmax
        return self.function(fn, (self.acts[n.x], int(n.a.get("axis", -1))))

    def _e_binary(self, n: "_Node") -> _V:
        return self.function(_BINARY[n.op], (self.arg(n.ins[0]), self.arg(n.ins[1])))

    def _e_concat(self, n: "_Node") -> _V:
        return self.function(torch.cat, tuple(self.arg(c) for c in n.ins), {"dim": int(n.a.get("axis", 0))})

    def _e_transpose(self, n: "_Node") -> _V:
        return self.function(torch.permute, (self.acts[n.x], tuple(n.a.get("perm", ()))))

    def _signed_pool(self, x: str, pool, sign: np.ndarray, where: str) -> _V:

        a = _attrs(pool)
        k = tuple(a["kernel_shape"])
        st = tuple(a.get("strides", (1, 1)))
        dil = tuple(a.get("dilations", (1, 1)))
        pad = self._auto_pad(a, self.acts[x].value, k, st, dil, where)
        sgn = torch.where(torch.from_numpy(np.array(sign)).reshape(-1), 1, -1).to(torch.int8)
        return self.module(PaddedSignedMaxPool2d(k, st, sgn, pad, dil, bool(a.get("ceil_mode", 0))),
                           x, "signed_pool")

    def _scalar(self, ins: list, i: int) -> Any:
        if len(ins) > i and ins[i]:
            return float(self.consts[ins[i]].reshape(-1)[0])
        return None

    def _auto_pad(self, a: dict, xv: torch.Tensor, k, st, dil, where: str) -> tuple:
        mode = a.get("auto_pad", b"NOTSET")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        if mode in ("NOTSET", ""):
            return _sym_pads(a.get("pads"), where, len(k))
        if mode == "VALID":
            return (0,) * len(k)
        pads = []
        for n, kk, s, d in zip(xv.shape[2:], k, st, dil):
            total = max((-(-n // s) - 1) * s + d * (kk - 1) + 1 - n, 0)
            if total % 2:
                raise ConversionError(f"{where}: auto_pad={mode} pads asymmetrically here")
            pads.append(total // 2)
        return tuple(pads)

    def _reshape_target(self, xv: torch.Tensor, shape_name: str, a: dict) -> tuple:
        target = [int(v) for v in self.consts[shape_name].reshape(-1)]
        if not a.get("allowzero", 0):
            target = [int(xv.shape[i]) if v == 0 else v for i, v in enumerate(target)]
        y = xv.reshape(target)
        if y.shape[0] == xv.shape[0] and target and target[0] in (-1, xv.shape[0]):
            return (-1,) + tuple(y.shape[1:])  # the batch stays free
        return tuple(target)


class _Node:
    """One ONNX node as :meth:`_Importer._emit` hands it to an emitter."""

    def __init__(self, op: str, ins: list, a: dict, where: str, x: str, xv):
        self.op, self.ins, self.a, self.where, self.x, self.xv = op, ins, a, where, x, xv


#: ONNX operator -> emitter (the operators of ``_UNARY`` map to their torch function directly).
_EMITTERS = {
    "Conv": _Importer._e_conv,
    **dict.fromkeys(("Gemm", "MatMul"), _Importer._e_gemm),
    **dict.fromkeys(("MaxPool", "AveragePool"), _Importer._e_pool),
    **dict.fromkeys(("GlobalAveragePool", "GlobalMaxPool"), _Importer._e_global_pool),
    "BatchNormalization": _Importer._e_batch_norm,
    "Flatten": _Importer._e_flatten,
    "Reshape": _Importer._e_reshape,
    **dict.fromkeys(("Squeeze", "Unsqueeze"), _Importer._e_squeeze),
    "ReduceMean": _Importer._e_reduce_mean,
    "Clip": _Importer._e_clip,
    "LeakyRelu": _Importer._e_leaky_relu,
    **dict.fromkeys(("Softmax", "LogSoftmax"), _Importer._e_softmax),
    **dict.fromkeys(_BINARY, _Importer._e_binary),
    "Concat": _Importer._e_concat,
    "Transpose": _Importer._e_transpose,
}
