"""What a conversion produced, and whether it is exact: topology and the stage-by-stage check.

* :func:`topology`: one row per layer of a :class:`TTFSNetwork` (kind, shapes, fan-in, window).
* :func:`twin_stage_outputs`: the ReLU twin's activation at every TTFS stage (input, every
  ReLU, every pool).
* :func:`equivalence`: TTFS stage activations (``t_ref - t``, Eq. (2)) against the twin's, and the
  TTFS logits against the original model's, all in float64.

Free of I/O. Activations are dimensionless, times in tau_c.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from hwloop.ttfs.layers import NeuronLayer, Readout, SignedMaxPool2d, SpikingConv2d
from hwloop.ttfs.network import TTFSNetwork
from hwloop.ttfs.pooling import relu_twin


def topology(net: TTFSNetwork) -> list[dict]:
    """Rows ``{"index", "kind", "in_shape", "out_shape", "fan_in", "window"}``; ``fan_in`` is the
    synapses per neuron (in features, or in_ch * kh * kw), ``window`` ``(t_min, t_max)`` in tau_c
    for neuron layers, else None."""
    rows = []
    for i, layer in enumerate(net.layers):
        fan_in = 0
        if isinstance(layer, (NeuronLayer, Readout)):
            fan_in = int(math.prod(layer.weight.shape[1:]))
        window = (float(layer.t_min), float(layer.t_max)) if isinstance(layer, NeuronLayer) else None
        rows.append({"index": i, "kind": layer.kind, "in_shape": tuple(net.shapes[i]),
                     "out_shape": tuple(net.shapes[i + 1]), "fan_in": fan_in, "window": window,
                     "in_shift": isinstance(layer, SpikingConv2d) and layer.in_shift is not None})
    return rows


def twin_stage_outputs(twin: nn.Sequential, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(activations, logits)`` of a twin from :func:`relu_twin`: the input, then the output of
    every ReLU and every max pool, in the order of :meth:`TTFSNetwork.spike_times`."""
    outs, h = [x], x
    for m in twin:
        h = m(h)
        if isinstance(m, (nn.ReLU, nn.MaxPool2d, SignedMaxPool2d)):
            outs.append(h)
    return outs, h


@torch.no_grad()
def equivalence(net: TTFSNetwork, reference: nn.Module, x: torch.Tensor) -> dict:
    """Compare ``net`` with its ReLU twin stage by stage and with ``reference`` at the logits.

    Args:
        net: the converted network (a float64 copy is checked: convert with
            ``dtype=torch.float64`` for a check to rounding, as float32 parameters differ).
        reference: the original ReLU model (a float64 copy is run).
        x: ``(B, *net.input_shape)`` inputs in [0, 1].

    Returns:
        ``{"stages": [{"stage", "shape", "max_abs_diff", "silent_match"}], "logits_max_abs_diff",
        "twin_max_abs_diff", "logits_scale", "exact"}``: ``silent_match`` says a TTFS neuron is
        silent exactly where the ReLU unit is 0; ``exact`` that every difference is within
        1e-9 of the logits' scale.
    """
    net64 = copy.deepcopy(net).to(torch.float64)
    ref64 = copy.deepcopy(reference).to(torch.float64).eval()
    x64 = x.to(torch.float64)
    stages = net64.spike_times(x64)
    acts = net64.activations(stages)
    twin_acts, twin_logits = twin_stage_outputs(relu_twin(net64), x64)
    logits = net64.run(stages[0])[1]
    ref_logits = ref64(x64)
    rows = []
    for k, (a, r, t) in enumerate(zip(acts, twin_acts, stages)):
        rows.append({"stage": k, "shape": tuple(a.shape[1:]),
                     "max_abs_diff": float((a - r).abs().max()) if a.shape == r.shape else math.inf,
                     "silent_match": bool(a.shape == r.shape and torch.equal(torch.isinf(t), r == 0))
                     if k > 0 else True})
    scale = 1.0 + float(ref_logits.abs().max())
    out = {"stages": rows, "logits_max_abs_diff": float((logits - ref_logits).abs().max()),
           "twin_max_abs_diff": float((twin_logits - ref_logits).abs().max()), "logits_scale": scale}
    worst = max([r["max_abs_diff"] for r in rows] + [out["logits_max_abs_diff"], out["twin_max_abs_diff"]])
    out["exact"] = bool(worst <= 1e-9 * scale and len(acts) == len(twin_acts)
                        and all(r["silent_match"] for r in rows))
    return out
