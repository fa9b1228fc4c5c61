"""The ReLU twin of a TTFS network as an ONNX model, checked with onnxruntime.

:func:`twin_to_onnx` writes the graph itself with ``onnx.helper`` (no torch exporter: the
TorchScript one is deprecated and the dynamo one needs onnxscript): Linear -> Gemm, Conv2d ->
Conv, ReLU -> Relu, MaxPool2d -> MaxPool (padding, dilation, ceil mode kept), a signed pool
(min pool for channels behind a negative batch-norm scale) -> Where(sign, MaxPool(x),
-MaxPool(-x)), a conv input shift -> Add, Flatten -> Flatten(axis=1). Input ``input``
``(batch, *net.input_shape)`` in [0, 1], output ``logits`` ``(batch, n_classes)``, float32, opset 17.

Needs the optional packages ``onnx`` and ``onnxruntime`` (``pip install 'hwloop[onnx]'``).
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np
import torch
from torch import nn

from hwloop.errors import ConversionError
from hwloop.interop.onnx_import import require_onnx
from hwloop.ttfs.layers import ChannelShift, SignedMaxPool2d, _pair
from hwloop.ttfs.pooling import relu_twin

OPSET = 17
IR_VERSION = 8  # what opset 17 needs; readable by older onnxruntime releases too


def _pool_attrs(m) -> dict:
    k, s = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size)
    p, d = _pair(getattr(m, "padding", 0)), _pair(getattr(m, "dilation", 1))
    return {"kernel_shape": list(k), "strides": list(s), "pads": [p[0], p[1], p[0], p[1]],
            "dilations": list(d), "ceil_mode": int(bool(getattr(m, "ceil_mode", False)))}


def twin_to_onnx(net, twin: nn.Module | None = None):
    """``onnx.ModelProto`` of ``relu_twin(net)`` (or of ``twin``, an ``nn.Sequential`` of the
    modules ``to_relu`` makes). Raises ConversionError for a module it cannot write."""
    onnx = require_onnx()
    from onnx import TensorProto, helper, numpy_helper

    twin = relu_twin(net) if twin is None else twin
    nodes, inits = [], []
    cur, k = "input", 0

    def const(name, t):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(t), name))
        return name

    def emit(op, ins, **attrs):
        nonlocal k
        k += 1
        out = f"{op.lower()}_{k}"
        nodes.append(helper.make_node(op, ins, [out], name=f"{op}_{k}", **attrs))
        return out

    for i, m in enumerate(twin):
        f32 = lambda t: t.detach().to(torch.float32).cpu().numpy()  # noqa: E731
        if isinstance(m, nn.Linear):
            cur = emit("Gemm", [cur, const(f"fc{i}.weight", f32(m.weight)), const(f"fc{i}.bias", f32(m.bias))],
                       transB=1)
        elif isinstance(m, nn.Conv2d):
            p = _pair(m.padding)
            cur = emit("Conv", [cur, const(f"conv{i}.weight", f32(m.weight)),
                                const(f"conv{i}.bias", f32(m.bias))],
                       kernel_shape=list(m.kernel_size), strides=list(m.stride),
                       pads=[p[0], p[1], p[0], p[1]], dilations=[1, 1], group=1)
        elif isinstance(m, nn.ReLU):
            cur = emit("Relu", [cur])
        elif isinstance(m, nn.MaxPool2d):
            cur = emit("MaxPool", [cur], **_pool_attrs(m))
        elif isinstance(m, SignedMaxPool2d):
            mx = emit("MaxPool", [cur], **_pool_attrs(m))
            mn = emit("Neg", [emit("MaxPool", [emit("Neg", [cur])], **_pool_attrs(m))])
            sign = (m.sign > 0).cpu().numpy().reshape(1, -1, 1, 1)
            cur = emit("Where", [const(f"pool{i}.sign", sign), mx, mn])
        elif isinstance(m, ChannelShift):
            cur = emit("Add", [cur, const(f"shift{i}", f32(m.shift).reshape(1, -1, 1, 1))])
        elif isinstance(m, nn.Flatten):
            cur = emit("Flatten", [cur], axis=1)
        else:
            raise ConversionError(f"twin module {i} ({type(m).__name__}) has no ONNX form here")
    nodes[-1].output[0] = "logits"
    n_out = int(net.layers[-1].out_features)
    graph = helper.make_graph(
        nodes, "hwloop_relu_twin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *net.input_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="hwloop")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def run_onnxruntime(model, x: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` (a ModelProto or a path) on ``x`` ``(B, *input_shape)``, float32,
    with onnxruntime's CPU provider."""
    require_onnx()
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ConversionError("checking an ONNX model needs onnxruntime: pip install 'hwloop[onnx]'") from exc
    src = os.fspath(model) if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    (out,) = sess.run(None, {name: x.detach().to(torch.float32).cpu().numpy()})
    return torch.from_numpy(out)


def check_onnx(model, twin: nn.Module, x: torch.Tensor, tol: float = 1e-5) -> float:
    """Max |onnxruntime logits - float32 twin logits| on ``x``; raises ConversionError when it
    exceeds ``tol * (1 + max |twin logits|)``."""
    twin32 = _float32(twin)
    with torch.no_grad():
        ref = twin32(x.to(torch.float32))
    got = run_onnxruntime(model, x)
    err = float((got - ref).abs().max())
    if not err <= tol * (1.0 + float(ref.abs().max())):
        raise ConversionError(f"onnxruntime disagrees with the ReLU twin: max |difference| {err:.3g} "
                              f"> {tol:g} (relative to the logits' scale)")
    return err


def _float32(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m).to(torch.float32).eval()


def export_onnx(net, path: Union[str, os.PathLike], x: torch.Tensor | None = None,
                tol: float = 1e-5) -> dict:
    """Write ``relu_twin(net)`` to ``path`` as ONNX; with ``x``, check it with onnxruntime.

    Returns ``{"path", "nodes", "max_abs_diff"}`` (``max_abs_diff`` None without ``x``).
    Raises ConversionError (missing extra, failed check) or OSError (unwritable path).
    """
    onnx = require_onnx()
    twin = relu_twin(net)
    model = twin_to_onnx(net, twin)
    err = check_onnx(model, twin, x, tol) if x is not None else None
    tmp = f"{os.fspath(path)}.tmp"
    onnx.save(model, tmp)
    os.replace(tmp, path)
    return {"path": os.fspath(path), "nodes": len(model.graph.node), "max_abs_diff": err}
