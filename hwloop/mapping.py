"""Putting a :class:`~hwloop.ttfs.TTFSNetwork` on a :class:`~hwloop.devices.base.TTFSDevice`.

* :func:`network_to_spec`: the topology and windows a device sees (:class:`NetworkSpec`).
* :func:`program_network`: program the topology, quantise and write every weight layer, write
  thresholds (readout: its bias as offsets), read everything back and verify.
* :func:`write_network_weights`: the per-step part of hardware-in-the-loop training (quantise the
  float shadow weights, write, verify).
* :func:`dequantized_network`: the network the host believes is on the chip (weights = codes x
  scale).
* :func:`layer_thresholds`: the one rule for what a layer's thresholds are: computed with the
  weights codes x scale that are (to be) written, never with float weights that are not on the
  chip (a conv input shift's contribution depends on the weights). Used by
  :func:`program_network` and by :meth:`hwloop.train.hil.HILTrainer.write_back`.
* :func:`latency_windows` / :func:`apply_windows`: Methods (ii)/(iv): shrink every window to hold
  a percentile of the ReLU activations on training data, laid end to end.

Float weights: when the device has no weight quantisation (``device.float_weights``, the ideal
emulator) and no ``weight_bits`` is asked for, the float64 weights are written as they are with
scale 1.0.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch

from hwloop.devices.base import LayerSpec, NetworkSpec, TTFSDevice
from hwloop.devices.profile import default_clip_percentile
from hwloop.errors import DeviceLimitError, WriteVerifyError
from hwloop.quant import _quantiles, quantize_weights
from hwloop.ttfs.layers import Flatten, NeuronLayer, Readout, SpikingConv2d, SpikingDense, SpikingMaxPool2d
from hwloop.ttfs.network import TTFSNetwork

__all__ = [
    "ProgramState", "apply_windows", "dequantized_network", "latency_windows", "layer_thresholds",
    "network_thresholds", "network_to_spec", "program_network", "quantize_network",
    "write_network_thresholds", "write_network_weights",
]


@dataclass
class ProgramState:
    """What the host wrote to a device.

    Attributes:
        spec: the programmed topology and windows.
        weights: ``{layer_index: (codes, scale)}`` for every weight layer (codes int64, or
            float64 with scale 1.0 when ``weight_bits`` is None).
        thresholds: ``{layer_index: values}``: theta per neuron for dense/conv2d, the readout's
            offsets (its bias) for the readout.
        weight_bits: q used for the codes; None = float weights.
        clip_percentile: the outlier percentile used (None with float weights).
    """

    spec: NetworkSpec
    weights: dict[int, tuple[torch.Tensor, float]] = field(default_factory=dict)
    thresholds: dict[int, torch.Tensor] = field(default_factory=dict)
    weight_bits: Optional[int] = None
    clip_percentile: Optional[float] = None


def network_to_spec(net: TTFSNetwork) -> NetworkSpec:
    """The :class:`NetworkSpec` of a network (windows from the net; the readout repeats the last
    neuron layer's window, or [t_max0 - 1, t_max0] if there is none)."""
    layers: list[LayerSpec] = []
    last_window = (net.t_max0 - 1.0, net.t_max0)
    for i, layer in enumerate(net.layers):
        in_shape, out_shape = tuple(net.shapes[i]), tuple(net.shapes[i + 1])
        if isinstance(layer, SpikingDense):
            last_window = (float(layer.t_min), float(layer.t_max))
            layers.append(LayerSpec(kind="dense", in_shape=in_shape, out_shape=out_shape,
                                    weight_shape=tuple(layer.weight.shape),
                                    t_min=last_window[0], t_max=last_window[1]))
        elif isinstance(layer, SpikingConv2d):
            last_window = (float(layer.t_min), float(layer.t_max))
            layers.append(LayerSpec(kind="conv2d", in_shape=in_shape, out_shape=out_shape,
                                    weight_shape=tuple(layer.weight.shape),
                                    kernel_size=layer.kernel_size, stride=layer.stride,
                                    padding=layer.padding, t_min=last_window[0],
                                    t_max=last_window[1]))
        elif isinstance(layer, SpikingMaxPool2d):
            plain = {"padding": (0, 0), "dilation": (1, 1), "ceil_mode": False}
            geometry = {k: getattr(layer, k) for k in plain if hasattr(layer, k)}
            odd = {k: v for k, v in geometry.items()
                   if (tuple(v) if isinstance(v, (tuple, list)) else v) != plain[k]}
            if odd:
                raise DeviceLimitError(
                    f"layer {i}: max pool with {odd} has no device equivalent (the device "
                    "protocol's pools have a kernel and a stride only); it runs and trains in "
                    "software (hwloop train), but cannot be programmed on a chip")
            sign = None if layer.sign is None else tuple(int(s) for s in layer.sign)
            layers.append(LayerSpec(kind="maxpool2d", in_shape=in_shape, out_shape=out_shape,
                                    kernel_size=layer.kernel_size, stride=layer.stride,
                                    pool_sign=sign))
        elif isinstance(layer, Flatten):
            layers.append(LayerSpec(kind="flatten", in_shape=in_shape, out_shape=out_shape))
        elif isinstance(layer, Readout):
            layers.append(LayerSpec(kind="readout", in_shape=in_shape, out_shape=out_shape,
                                    weight_shape=tuple(layer.weight.shape),
                                    t_min=last_window[0], t_max=last_window[1]))
        else:  # pragma: no cover - TTFSNetwork only holds the kinds above
            raise TypeError(f"layer {i}: {type(layer).__name__} has no device equivalent")
    return NetworkSpec(input_shape=tuple(net.input_shape), t_max0=float(net.t_max0), layers=tuple(layers))


def _weight_layers(net: TTFSNetwork) -> list[int]:
    return [i for i, l in enumerate(net.layers) if isinstance(l, (NeuronLayer, Readout))]


def _resolve_bits(device: TTFSDevice, weight_bits: Optional[int]) -> Optional[int]:
    info = device.info()
    if weight_bits is None:
        return None if getattr(device, "float_weights", False) else int(info.weight_bits)
    if int(weight_bits) > int(info.weight_bits):
        raise DeviceLimitError(f"weight_bits={weight_bits} exceeds the device's weight_bits="
                               f"{info.weight_bits} ({info.device_id})")
    return int(weight_bits)


def quantize_network(net: TTFSNetwork, weight_bits: Optional[int],
                     clip_percentile: Optional[float] = None) -> dict[int, tuple[torch.Tensor, float]]:
    """``{layer_index: (codes, scale)}`` for every weight layer (float64 weights and scale 1.0
    when ``weight_bits`` is None). Warns (UserWarning naming the layer index) for a layer that
    loses most of its signal to quantisation (:func:`hwloop.quant.quantize_weights`)."""
    out = {}
    for i in _weight_layers(net):
        w = net.layers[i].weight.detach()
        if weight_bits is None:
            out[i] = (w.to(torch.float64).clone(), 1.0)
        else:
            out[i] = quantize_weights(w, weight_bits, clip_percentile, layer=i)
    return out


@torch.no_grad()
def layer_thresholds(net: TTFSNetwork, i: int, codes: torch.Tensor, scale: float) -> torch.Tensor:
    """What a device is programmed with for weight layer ``i`` of ``net``, given the weights
    ``codes * scale`` that are (to be) written to it.

    theta per neuron (``(out_features,)`` dense, ``(out_ch, H_out, W_out)`` conv2d) for a neuron
    layer, the readout's offsets (its bias, ``(n_classes,)``) for the readout; float64, tau_c.
    Everything but the weights (D, base thresholds, a conv ``in_shift``) comes from ``net``.
    The weights matter for a conv layer with an input shift, whose contribution
    ``conv(in_shift, W)`` is moved into the thresholds: it is computed with ``codes * scale``
    (cast to the layer's dtype, as :func:`dequantized_network` does), i.e. with what is on the
    chip, so that the chip computes the host's nominal network exactly. With float weights
    pass the float64 weights as ``codes`` and scale 1.0.

    Raises:
        TypeError: layer ``i`` has no weights (max pool, flatten).
        ValueError: ``codes`` does not have the layer's weight shape.
    """
    layer = net.layers[i]
    if isinstance(layer, Readout):
        return layer.bias.detach().to(torch.float64).clone()
    if not isinstance(layer, NeuronLayer):
        raise TypeError(f"layer {i}: {type(layer).__name__} has no weights and no thresholds")
    if tuple(codes.shape) != tuple(layer.weight.shape):
        raise ValueError(f"layer {i}: codes must have the weight shape {tuple(layer.weight.shape)}, "
                         f"got {tuple(codes.shape)}")
    in_shape = tuple(net.shapes[i])
    if getattr(layer, "in_shift", None) is None:  # thresholds do not depend on the weights
        return layer.neuron_thresholds(in_shape).to(torch.float64)
    probe = copy.deepcopy(layer)
    probe.weight.copy_((codes.detach().to(torch.float64) * float(scale)).to(probe.weight.dtype))
    return probe.neuron_thresholds(in_shape).to(torch.float64)


def network_thresholds(net: TTFSNetwork,
                       weights: Optional[dict[int, tuple[torch.Tensor, float]]] = None) -> dict[int, torch.Tensor]:
    """theta per neuron of every neuron layer, and the readout's offsets (its bias).

    ``weights`` (``{layer: (codes, scale)}``, e.g. :attr:`ProgramState.weights`): compute them
    with the written weights (:func:`layer_thresholds`); None: with ``net``'s own weights."""
    out = {}
    for i, layer in enumerate(net.layers):
        if not isinstance(layer, (NeuronLayer, Readout)):
            continue
        if weights is None:
            out[i] = (layer.bias.detach().to(torch.float64).clone() if isinstance(layer, Readout)
                      else layer.neuron_thresholds(tuple(net.shapes[i])).to(torch.float64))
        else:
            out[i] = layer_thresholds(net, i, *weights[i])
    return out


def write_network_weights(device: TTFSDevice, net: TTFSNetwork, weight_bits: Optional[int] = None,
                          clip_percentile: Optional[float] = None,
                          verify: bool = True) -> dict[int, tuple[torch.Tensor, float]]:
    """Quantise and write every weight layer; read back and verify.

    Returns the written ``{layer: (codes, scale)}``. Raises :class:`WriteVerifyError` naming
    the layers whose read-back differs.
    """
    bits = _resolve_bits(device, weight_bits)
    written = quantize_network(net, bits, clip_percentile)
    for i, (codes, scale) in written.items():
        device.write_weights(i, codes, scale)
    if verify:
        bad = []
        for i, (codes, scale) in written.items():
            rc, rs = device.read_weights(i)
            if (tuple(rc.shape) != tuple(codes.shape) or float(rs) != float(scale)
                    or not torch.equal(rc.to(codes.dtype), codes)):
                bad.append(i)
        if bad:
            raise WriteVerifyError(f"weights read back from layers {bad} differ from what was "
                                   "written", layers=bad)
    return written


def write_network_thresholds(device: TTFSDevice, net: TTFSNetwork, verify: bool = True,
                             weights: Optional[dict[int, tuple[torch.Tensor, float]]] = None
                             ) -> dict[int, torch.Tensor]:
    """Write theta of every neuron layer and the readout offsets; read back and verify.

    Pass the written ``weights`` (``{layer: (codes, scale)}``) when weights are quantised: a
    conv input shift's contribution to the thresholds then uses them (:func:`layer_thresholds`);
    None uses ``net``'s own weights (right for float weights or the dequantised network). After
    :meth:`~hwloop.devices.base.TTFSDevice.set_windows` the base thresholds change with the
    widths (B1: base = width), so write the thresholds again.

    Raises:
        WriteVerifyError: read-back differs (names the layers)."""
    written = network_thresholds(net, weights)
    for i, v in written.items():
        device.write_thresholds(i, v)
    if verify:
        bad = [i for i, v in written.items()
               if not torch.equal(device.read_thresholds(i).to(torch.float64), v)]
        if bad:
            raise WriteVerifyError(f"thresholds read back from layers {bad} differ from what was "
                                   "written", layers=bad)
    return written


def program_network(device: TTFSDevice, net: TTFSNetwork, weight_bits: Optional[int] = None,
                    clip_percentile: Optional[float] = None, verify: bool = True) -> ProgramState:
    """Program ``net`` on ``device``: topology, weights (quantised), thresholds; verified.

    Args:
        device: an open device.
        net: the network (its windows are programmed as they are; shrink them first with
            :func:`latency_windows` / :func:`apply_windows` if the profile asks for it).
        weight_bits: code width; None = the device's (float weights on a float-weight device).
        clip_percentile: outlier percentile (None: 1, or 4 for <= 4 bits).
        verify: read back and compare.

    Raises:
        DeviceLimitError: the network does not fit, or ``weight_bits`` exceeds the device's.
        WriteVerifyError: read-back differs (names the layers).
    """
    spec = network_to_spec(net)
    bits = _resolve_bits(device, weight_bits)
    device.program(spec)
    weights = write_network_weights(device, net, bits, clip_percentile, verify)
    # thresholds of the network the host believes is on the chip: a conv input shift's
    # contribution (moved into the thresholds) is computed with the written weights
    thresholds = write_network_thresholds(device, net, verify, weights=weights)
    clip = None
    if bits is not None:
        clip = default_clip_percentile(bits) if clip_percentile is None else float(clip_percentile)
    return ProgramState(spec=spec, weights=weights, thresholds=thresholds, weight_bits=bits,
                        clip_percentile=clip)


def dequantized_network(net: TTFSNetwork, state: ProgramState) -> TTFSNetwork:
    """A copy of ``net`` whose weights are the written values codes x scale (the nominal
    weights the host believes are on the chip). Thresholds, windows, biases are unchanged."""
    out = copy.deepcopy(net)
    with torch.no_grad():
        for i, (codes, scale) in state.weights.items():
            w = out.layers[i].weight
            w.copy_((codes.to(torch.float64) * float(scale)).to(w.dtype))
    return out


@torch.no_grad()
def latency_windows(net: TTFSNetwork, data: torch.Tensor, percentile: float) -> list[float]:
    """Window widths holding ``percentile`` % of each layer's ReLU activations (Methods (ii),
    (iv)).

    The activations are those of the equivalent ReLU network (no clipping) on ``data``
    (intensities in [0, 1]); only active units count (x > 0: "percent of firing times").
    percentile 100 gives the largest activation. A layer without any active unit keeps width
    1 tau_c. Windows are to be laid end to end from t_max^(0) (:func:`apply_windows`).
    """
    if not 0 < float(percentile) <= 100:
        raise ValueError(f"percentile must lie in (0, 100], got {percentile}")
    probe = copy.deepcopy(net).to(torch.float64)
    probe.set_clamp_early(False)
    probe.set_widths([1e6] * len(probe.neuron_layers()))  # B1: activations do not depend on windows
    stages = probe.spike_times(data.to(torch.float64))
    acts = probe.activations(stages)
    widths = []
    for i, layer in enumerate(probe.layers):
        if isinstance(layer, NeuronLayer):
            a = acts[probe._stage_index(i)]
            pos = a[a > 0]
            if pos.numel() == 0:
                widths.append(1.0)
                continue
            q = float(percentile) / 100.0
            w = float(pos.max()) if q >= 1.0 else _quantiles(pos, [q])[0]
            widths.append(max(w, 1e-6))
    return widths


def apply_windows(net: TTFSNetwork, widths: list[float], clamp_early: bool = True) -> TTFSNetwork:
    """A copy of ``net`` with windows of ``widths`` laid end to end from t_max^(0); early spikes
    count as at t_min (``clamp_early``), as on a device. B1: base thresholds follow the width,
    so D stays the ReLU bias and activations below the width are unchanged."""
    out = copy.deepcopy(net)
    out.set_widths([float(w) for w in widths])
    out.set_clamp_early(clamp_early)
    return out
