"""The converted-network file that ``hwloop convert --out`` writes and ``hwloop export`` reads.

One :func:`torch.save` file, readable with ``torch.load(..., weights_only=True)`` (it can never
execute code)::

    {"format": "hwloop-ttfs-network", "version": 1, "input_shape": [...], "t_max0": float,
     "layers": [{"kind": "dense", ...}, ...], "state_dict": {...}, "info": {...}}

``layers`` holds each layer's constructor arguments; ``state_dict`` the weights, thresholds and
windows; ``info`` free metadata (source file, equivalence check).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from hwloop.errors import DataError
from hwloop.ttfs.layers import Flatten, Readout, SpikingConv2d, SpikingDense, SpikingMaxPool2d
from hwloop.ttfs.network import TTFSNetwork
from hwloop.ttfs.pooling import PaddedMaxPool2d

FORMAT, VERSION = "hwloop-ttfs-network", 1


def _layer_config(layer) -> dict:
    if isinstance(layer, SpikingDense):
        return {"kind": "dense", "in": layer.in_features, "out": layer.out_features,
                "model": layer.model, "alpha": layer.alpha, "clamp_early": layer.clamp_early}
    if isinstance(layer, SpikingConv2d):
        return {"kind": "conv2d", "in": layer.in_channels, "out": layer.out_channels,
                "kernel": list(layer.kernel_size), "stride": list(layer.stride),
                "padding": list(layer.padding), "in_shift": layer.in_shift is not None,
                "model": layer.model, "alpha": layer.alpha, "clamp_early": layer.clamp_early}
    if isinstance(layer, SpikingMaxPool2d):
        cfg = {"kind": "maxpool2d", "kernel": list(layer.kernel_size), "stride": list(layer.stride),
               "sign": None if layer.sign is None else [int(s) for s in layer.sign]}
        if isinstance(layer, PaddedMaxPool2d):
            cfg.update(padding=list(layer.padding), dilation=list(layer.dilation),
                       ceil_mode=layer.ceil_mode)
        return cfg
    if isinstance(layer, Flatten):
        return {"kind": "flatten"}
    if isinstance(layer, Readout):
        return {"kind": "readout", "in": layer.in_features, "out": layer.out_features}
    raise TypeError(f"{type(layer).__name__} cannot be saved")


def _build_layer(cfg: dict):
    k = cfg["kind"]
    if k == "dense":
        layer = SpikingDense(cfg["in"], cfg["out"], cfg["model"], cfg["alpha"])
    elif k == "conv2d":
        layer = SpikingConv2d(cfg["in"], cfg["out"], cfg["kernel"], cfg["stride"], cfg["padding"],
                              cfg["model"], cfg["alpha"], in_shift=cfg["in_shift"])
    elif k == "maxpool2d":
        sign = None if cfg["sign"] is None else torch.tensor(cfg["sign"], dtype=torch.int8)
        if "padding" in cfg:
            return PaddedMaxPool2d(cfg["kernel"], cfg["stride"], cfg["padding"], cfg["dilation"],
                                   cfg["ceil_mode"], sign)
        return SpikingMaxPool2d(cfg["kernel"], cfg["stride"], sign)
    elif k == "flatten":
        return Flatten()
    elif k == "readout":
        return Readout(cfg["in"], cfg["out"])
    else:
        raise DataError(f"unknown layer kind {k!r} in a network file")
    layer.clamp_early = bool(cfg.get("clamp_early", False))
    return layer


def save_network(net: TTFSNetwork, path: Union[str, os.PathLike],
                 info: Optional[dict[str, Any]] = None) -> Path:
    """Write ``net`` to ``path`` (atomically: a temporary file, then a rename). Returns the path.
    Raises OSError for an unwritable path."""
    path = Path(path)
    record = {"format": FORMAT, "version": VERSION, "input_shape": list(net.input_shape),
              "t_max0": float(net.t_max0), "layers": [_layer_config(l) for l in net.layers],
              "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
              "info": dict(info or {})}
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(record, tmp)
    os.replace(tmp, path)
    return path


def load_network(path: Union[str, os.PathLike]) -> TTFSNetwork:
    """Read a network file written by :func:`save_network` (dtype as saved).

    Raises:
        FileNotFoundError: no such file.
        DataError: not a hwloop network file, or a newer version.
    """
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: not a hwloop network file ({exc})") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise DataError(f"{path}: not a hwloop network file (written by `hwloop convert --out`)")
    if int(record.get("version", 0)) > VERSION:
        raise DataError(f"{path}: network file version {record['version']} is newer than this "
                        f"hwloop reads ({VERSION})")
    layers = [_build_layer(c) for c in record["layers"]]
    net = TTFSNetwork(layers, tuple(record["input_shape"]), t_max0=record["t_max0"])
    sd = record["state_dict"]
    dtype = next((v.dtype for v in sd.values() if v.is_floating_point()), torch.float32)
    net = net.to(dtype)
    net.load_state_dict(sd)
    return net
