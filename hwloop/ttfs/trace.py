"""Reading a ReLU model as a chain of exactly convertible operations, from its ``torch.fx`` graph.

:func:`read_ops` traces the model (``torch.fx.symbolic_trace`` semantics; an ``fx.GraphModule``,
e.g. ``torch.export``'s ``ep.module()`` or the ONNX importer's output, is read as it is) and walks
the graph with a concrete example batch. Every operation on the activation is recognised by what
it computes, whether it is a module, a ``torch``/``torch.nn.functional`` function, a tensor method
or an ATen operator, and becomes one :class:`Op`:

==================== ===========================================================================
``linear``           nn.Linear, F.linear (weight a parameter or constant)
``conv2d``           nn.Conv2d, F.conv2d (zero padding; groups and dilation expanded exactly)
``affine``           BatchNorm1d/2d, F.batch_norm (running statistics), ChannelShift,
                     ``x * c``, ``x + c``, ``x / c`` (c a scalar or one value per channel)
``relu``             nn.ReLU, F.relu, torch.relu, .relu(), clamp(min=0)
``maxpool2d``        nn.MaxPool2d, F.max_pool2d, SignedMaxPool2d (any kernel/stride/padding/dilation)
``avgpool2d``        nn.AvgPool2d, F.avg_pool2d
``adaptive_avgpool`` nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d, mean over (H, W)
``reshape``          nn.Flatten, torch.flatten, .view/.reshape/.flatten/.squeeze (batch kept)
==================== ===========================================================================

Dropout (any kind) and identity-like operations are dropped (inference semantics). Everything
else raises :class:`~hwloop.errors.ConversionError` naming the node, its source line and why:
other nonlinearities (tanh, sigmoid, ...), a softmax after the readout, residual adds and
concatenations (the activation may feed one operation only), arithmetic, reordering.

Shapes in :class:`Op` are per sample (no batch dimension). Free of I/O.
"""

from __future__ import annotations

import builtins
import operator
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from hwloop.errors import ConversionError
from hwloop.ttfs.layers import ChannelShift, SignedMaxPool2d
from hwloop.ttfs.recognise import ACT, recognise

_TORCH_DIR = os.path.dirname(torch.__file__)


@dataclass
class Op:
    """One recognised operation. ``in_shape``/``out_shape`` are per sample; ``p`` holds the
    parameters (float64 tensors, python ints/tuples); ``where`` names the node and source line."""

    kind: str
    where: str
    in_shape: tuple
    out_shape: tuple = ()
    p: dict = field(default_factory=dict)


def apply_op(op: Op, x: torch.Tensor) -> torch.Tensor:
    """What ``op`` computes on ``x`` ``(B, *op.in_shape)`` (float64 parameters cast to x.dtype)."""
    p, k = {n: (v.to(x.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for n, v in op.p.items()}, op.kind
    if k == "linear":
        return F.linear(x, p["weight"], p["bias"])
    if k == "conv2d":
        return F.conv2d(x, p["weight"], p["bias"], p["stride"], p["padding"])
    if k == "affine":
        shape = (-1,) + (1,) * (x.ndim - 2)
        return x * p["scale"].view(shape) + p["shift"].view(shape)
    if k == "relu":
        return torch.relu(x)
    if k == "maxpool2d":
        args = (p["kernel"], p["stride"], p["padding"], p["dilation"], p["ceil_mode"])
        mx = F.max_pool2d(x, *args)
        if p["sign"] is None or bool((p["sign"] > 0).all()):
            return mx
        return torch.where(p["sign"].view(-1, 1, 1) > 0, mx, -F.max_pool2d(-x, *args))
    if k == "avgpool2d":
        return F.avg_pool2d(x, p["kernel"], p["stride"], p["padding"], p["ceil_mode"],
                            p["count_include_pad"], p["divisor_override"])
    if k == "adaptive_avgpool":
        return F.adaptive_avg_pool2d(x, p["output_size"])
    if k == "reshape":
        return x.reshape(x.shape[0], *p["shape"])
    raise ValueError(f"unknown op kind {k!r}")


class _Tracer(fx.Tracer):
    """fx tracer that records source lines and keeps hwloop's own twin modules as leaves."""

    def __init__(self):
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (ChannelShift, SignedMaxPool2d)) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """The model's fx graph (a GraphModule is returned as it is). Raises ConversionError."""
    if isinstance(model, fx.GraphModule):
        return model
    try:
        return fx.GraphModule(model, _Tracer().trace(model))
    except Exception as exc:  # fx raises many types (TraceError, TypeError on proxies, ...)
        raise ConversionError(
            f"{type(model).__name__} could not be traced with torch.fx ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}); hwloop needs a forward without data-dependent "
            "control flow (or a torch.export / ONNX graph)") from exc


def _source(node: fx.Node) -> str:
    if "hwloop_source" in node.meta:
        return str(node.meta["hwloop_source"])
    st = node.meta.get("stack_trace") or getattr(node, "stack_trace", None) or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*([^\n]*)', st)
    user = [f for f in frames if not os.path.abspath(f[0]).startswith(_TORCH_DIR)]
    if not user:
        return ""
    path, line, code = user[-1]
    return f" at {os.path.basename(path)}:{line}: `{code.strip()}`"


def _name(node: fx.Node, gm: fx.GraphModule) -> str:
    """Lower-case name of what the node computes ('relu', 'max_pool2d', 'batchnorm2d', ...)."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__.lower()
    if node.op == "call_method":
        return str(node.target)
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.name.split("::")[-1]
    return getattr(t, "__name__", str(t))


def _where(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        desc = f"module '{node.target}': {type(gm.get_submodule(node.target)).__name__}"
    elif node.op == "call_method":
        desc = f"method .{node.target}()"
    elif isinstance(node.target, torch._ops.OpOverload):
        desc = str(node.target)
    else:
        mod = getattr(node.target, "__module__", None) or ""
        desc = f"{mod + '.' if mod else ''}{getattr(node.target, '__name__', node.target)}"
    return f"node '{node.name}' ({desc}){_source(node)}"


class _Act:
    """The activation flowing through the chain (value on the example batch)."""

    def __init__(self, value: torch.Tensor, node: fx.Node):
        self.value, self.node = value, node


class _Tuple:
    """A tuple-valued operation (ATen batch norm, pool with indices): item 0 is the activation."""

    def __init__(self, act: _Act):
        self.act = act


class _Dead:
    """A by-product (pool indices, batch statistics) that must not be used."""

    def __init__(self, node: fx.Node):
        self.node = node


def _leaves(obj):
    if isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _leaves(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _leaves(o)
    else:
        yield obj



def _fetch(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj.detach() if isinstance(obj, torch.Tensor) else obj


def _evaluate(node: fx.Node, gm: fx.GraphModule, args, kwargs, where: str):
    """A node that does not touch the activation: computed as it is (shapes, constants)."""
    try:
        if node.op == "call_module":
            return gm.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)
    except Exception as exc:
        raise ConversionError(f"{where}: could not be evaluated as a constant ({exc})") from exc


def read_ops(model: nn.Module, example: torch.Tensor) -> list[Op]:
    """The chain of :class:`Op` that ``model`` applies to its input.

    Args:
        model: a ReLU model with one tensor input and one tensor output (traced with torch.fx,
            or an ``fx.GraphModule`` used as it is).
        example: ``(B, *input_shape)`` sample inputs (two are run, in float64, for the shapes).

    Returns:
        The operations in order, each with per-sample ``in_shape``/``out_shape``.

    Raises:
        ConversionError: the model cannot be traced, is not a single chain (branches, residual
            adds, several inputs or outputs), or uses an operation without an exact TTFS twin;
            the message names the node, its source line and why.
    """
    gm = trace(model)
    x = example.detach().to(torch.float64)
    x = (x[:1].expand(2, *x.shape[1:]) if x.shape[0] < 2 else x[:2]).clone()
    env: dict[fx.Node, Any] = {}
    ops: list[Op] = []
    head: Optional[_Act] = None
    used: set[int] = set()
    for node in gm.graph.nodes:
        where = _where(node, gm) if node.op.startswith("call") else f"node '{node.name}'"
        if node.op == "placeholder":
            if head is None:
                env[node] = head = _Act(x, node)
            elif node.args:
                env[node] = node.args[0]
            else:
                raise ConversionError(f"{where}: a second input; hwloop converts models with one "
                                      "input tensor")
            continue
        if node.op == "get_attr":
            env[node] = _fetch(gm, node.target)
            continue
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        for v in _leaves((args, kwargs)):
            if isinstance(v, _Dead):
                raise ConversionError(f"{where}: uses the indices or batch statistics of node "
                                      f"'{v.node.name}'; only its result can be converted")
        if node.op == "output":
            out = args[0]
            while isinstance(out, (tuple, list)) and len(out) == 1:
                out = out[0]
            if not isinstance(out, _Act) or out is not head or id(out) in used:
                raise ConversionError("the model's output must be the one tensor at the end of its "
                                      "chain of operations (no several outputs, no side branches)")
            return ops
        if node.op == "call_module" and node.target == "_guards_fn":
            env[node] = None  # torch.export's shape guards (the batch size is free here)
            continue
        acts = {id(v): v for v in _leaves((args, kwargs)) if isinstance(v, (_Act, _Tuple))}
        if not acts:
            env[node] = _evaluate(node, gm, args, kwargs, where)
            continue
        env[node] = _step(node, gm, args, kwargs, list(acts.values()), where, ops, used)
        if isinstance(env[node], _Act):
            head = env[node]
        elif isinstance(env[node], _Tuple):
            head = env[node].act
    raise ConversionError("the model's graph has no output")  # pragma: no cover


def _step(node, gm, args, kwargs, acts, where, ops, used):
    name = _name(node, gm)
    first = acts[0]
    # metadata of the activation: x.size(0), x.shape, x.dim(), len(x)
    if node.op == "call_method" and name in ("size", "dim", "ndimension", "numel") and args[0] is first:
        return getattr(first.value, name)(*args[1:], **kwargs)
    if node.op == "call_function" and node.target is builtins.getattr and args[0] is first:
        if args[1] in ("shape", "ndim", "dtype", "device", "is_cuda"):
            return getattr(first.value, args[1])
        raise ConversionError(f"{where}: reads .{args[1]} of an activation")
    if node.op == "call_function" and node.target is builtins.len:
        return len(first.value)
    if node.op == "call_function" and node.target is operator.getitem:
        if isinstance(args[0], _Tuple):
            return args[0].act if args[1] == 0 else _Dead(node)
        raise ConversionError(f"{where}: indexes or slices an activation; only (B, -1) "
                              "flattening is supported")
    if len(acts) > 1:
        names = ", ".join(f"'{a.node.name}'" for a in acts if isinstance(a, _Act))
        raise ConversionError(
            f"{where}: combines several activations ({names}), e.g. a residual add or a "
            "concatenation; a TTFS layer receives only the spikes of the layer before it, so "
            "skip connections and branches have no exact twin")
    if isinstance(first, _Tuple):
        raise ConversionError(f"{where}: uses a tuple-valued result directly")
    if id(first) in used:
        raise ConversionError(
            f"{where}: uses the output of node '{first.node.name}' a second time (a branch or "
            "skip connection); a TTFS network is a single chain of layers")
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    swap = lambda v: ACT if v is first else v  # noqa: E731
    r_args = tuple(fx.node.map_aggregate(a, swap) for a in args)
    r_kwargs = {k: fx.node.map_aggregate(v, swap) for k, v in kwargs.items()}
    canon, is_tuple = recognise(node.op, name, isinstance(node.target, torch._ops.OpOverload),
                                module, r_args, r_kwargs, first.value, where)
    used.add(id(first))
    v = first.value
    for kind, p in canon:
        op = Op(kind, where, tuple(v.shape[1:]), p=p)
        try:
            v = apply_op(op, v)
        except RuntimeError as exc:
            raise ConversionError(f"{where}: {' '.join(str(exc).split())}") from exc
        op.out_shape = tuple(v.shape[1:])
        ops.append(op)
    new = _Act(v, node)
    return _Tuple(new) if is_tuple else new
