"""Reading a ReLU model from a file, and the sample batch that conversion and export check on.

:func:`load_model` accepts:

* ``.onnx``: an ONNX model (:mod:`hwloop.interop.onnx_import`; needs ``hwloop[onnx]``);
* ``.pt2``: a ``torch.export`` program (``torch.export.save``);
* any other suffix (``.pt``, ``.pth``): a state dict read with ``weights_only=True`` (never
  executes code), plus an architecture name of :mod:`hwloop.ttfs.architectures`. A pickled
  module (``torch.save(model)``) and TorchScript are refused with the way out: they would need
  unsafe unpickling, and TorchScript cannot be traced by torch.fx.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from hwloop.data import load_dataset
from hwloop.data.datasets import synthetic_dataset
from hwloop.errors import ConversionError, DataError
from hwloop.ttfs.architectures import ARCHITECTURES, build_relu

DEFAULT_SHAPE = (1, 28, 28)


def parse_shape(text: Optional[str]) -> Optional[tuple[int, ...]]:
    """``"1,28,28"`` -> ``(1, 28, 28)``; None stays None. Raises DataError."""
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in str(text).replace("x", ",").split(",") if v.strip())
    except ValueError as exc:
        raise DataError(f"input shape must be integers like 1,28,28, got {text!r}") from exc
    if not shape or any(v <= 0 for v in shape):
        raise DataError(f"input shape must be positive integers like 1,28,28, got {text!r}")
    return shape


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def _free_batch(gm: torch.fx.GraphModule, batch: int) -> torch.fx.GraphModule:
    """A torch.export module specialised to its example batch, made to run on any batch: the
    shape guards are dropped and a view/reshape to ``[batch, ...]`` becomes ``[-1, ...]``."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
        elif (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
              and node.target._schema.name.split("::")[-1] in ("view", "reshape", "_unsafe_view")
              and len(node.args) > 1 and isinstance(node.args[1], (list, tuple))):
            shape = list(node.args[1])
            if shape and shape[0] == batch and -1 not in shape[1:]:
                node.args = (node.args[0], [-1] + shape[1:]) + tuple(node.args[2:])
    gm.recompile()
    return gm


def load_model(path: Union[str, os.PathLike], arch: Optional[str] = None,
               input_shape: Optional[tuple[int, ...]] = None,
               n_classes: Optional[int] = None) -> tuple[nn.Module, tuple[int, ...], str]:
    """``(model, per-sample input shape, kind)`` of a model file (kind: onnx, export, state_dict).

    Args:
        path: the file.
        arch: architecture of a state dict (one of ``ARCHITECTURES``).
        input_shape: per-sample input shape of a state dict's architecture (default 1x28x28).
        n_classes: readout size of a state dict's architecture (default: from its last weight).

    Raises:
        FileNotFoundError: no such file.
        ConversionError: unreadable or unsupported file, missing or mismatching ``arch``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such model file: {path}")
    if path.suffix.lower() == ".onnx":
        from hwloop.interop.onnx_import import load_onnx  # optional extra: onnx

        gm, shape = load_onnx(path)
        return gm, shape, "onnx"
    if path.suffix.lower() == ".pt2":
        try:
            ep = torch.export.load(str(path))
        except Exception as exc:
            raise ConversionError(f"{path}: not a readable torch.export program ({exc})") from exc
        user = set(ep.graph_signature.user_inputs)
        vals = [n.meta["val"] for n in ep.graph.nodes if n.op == "placeholder" and n.name in user]
        if len(vals) != 1:
            raise ConversionError(f"{path}: the program has {len(vals)} inputs; hwloop converts "
                                  "models with one input tensor")
        return _free_batch(ep.module(), int(vals[0].shape[0])), tuple(int(d) for d in vals[0].shape[1:]), "export"
    if _is_torchscript(path):
        raise ConversionError(f"{path} is TorchScript, which torch.fx cannot trace: save the model "
                              "with torch.export.save (.pt2), export it to ONNX, or save its "
                              "state_dict() and pass --arch")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConversionError(
            f"{path}: not a weights-only file ({' '.join(str(exc).split())[:200]}); a pickled "
            "module (torch.save(model)) is not loaded, as unpickling can run code: save "
            "model.state_dict() and pass --arch, or use torch.export.save / ONNX") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{path}: expected a state dict (names -> tensors)")
    if arch is None:
        raise ConversionError(f"{path} is a state dict: name its architecture with --arch "
                              f"(one of {', '.join(ARCHITECTURES)})")
    if n_classes is None:
        mats = [v for v in obj.values() if v.ndim == 2]
        if not mats:
            raise ConversionError(f"{path}: no Linear weight found to size the readout")
        n_classes = int(mats[-1].shape[0])
    shape = tuple(input_shape or DEFAULT_SHAPE)
    try:
        model = build_relu(arch, shape, n_classes)
        model.load_state_dict(obj, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise ConversionError(f"{path} does not fit --arch {arch} with input shape {shape} and "
                              f"{n_classes} classes: {' '.join(str(exc).split())[:300]}") from exc
    return model.eval(), shape, "state_dict"


def sample_batch(shape: tuple[int, ...], n: int = 64, dataset: str = "synthetic",
                 data_dir: Optional[str] = None, seed: int = 0) -> torch.Tensor:
    """``(n, *shape)`` float32 inputs in [0, 1]: synthetic (default) or the first ``n`` test images
    of a dataset. Raises DataError (bad ``n``, a dataset whose images have another shape) or
    DatasetNotFound."""
    if n < 1:
        raise DataError(f"--samples must be >= 1, got {n}")
    if dataset == "synthetic":

        return synthetic_dataset(n, tuple(shape), seed=seed)[0]

    x = load_dataset(dataset, "test", data_dir)[0][:n]
    if tuple(x.shape[1:]) != tuple(shape):
        raise DataError(f"{dataset} images have shape {tuple(x.shape[1:])}, the model expects "
                        f"{tuple(shape)}")
    return x.to(torch.float32)
