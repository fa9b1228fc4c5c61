"""Putting a :class:`~hwloop.ttfs.TTFSNetwork` on a :class:`~hwloop.devices.base.TTFSDevice`.

* :func:`network_to_spec`: the topology and windows a device sees (:class:`NetworkSpec`).
* :func:`write_layer`: **the one write-and-verify path** of the host: write one layer's codes
  and scale and/or thresholds, and read them back to compare only when the driver does not
  verify its own writes (``device.verifies_writes``: a serial/VISA driver checks every write by
  CRC); retried, :class:`~hwloop.errors.WriteVerifyError` naming the layer otherwise.
  :func:`program_network`, :func:`reprogram`, :meth:`hwloop.train.hil.HILTrainer.write_back`,
  its scale rescale and the calibration probes (:mod:`hwloop.calibrate.probes`) all write
  through it.
* :func:`program_network`: program the topology, quantise and write every weight layer, write
  thresholds (readout: its bias as offsets), verified.
* :func:`reprogram`: put a saved :class:`ProgramState` back on a device exactly, verified.
* :func:`write_network_weights` / :func:`write_network_thresholds`: the two passes of
  :func:`program_network`.
* :func:`weight_layer_indices`: the one rule for which layers hold weights (and thresholds).
* :func:`mapping_hints`: a device's mapping defaults from the contract
  (:attr:`TTFSDevice.mapping_defaults`: float weights, window and clip percentiles; an emulator
  fills them from its profile).
* :func:`dequantized_network`: the network the host believes is on the chip (weights = codes x
  scale).
* :func:`layer_thresholds`: the one rule for what a layer's thresholds are: computed with the
  weights codes x scale that are (to be) written, never with float weights that are not on the
  chip (a conv input shift's contribution depends on the weights). Used by
  :func:`program_network` and by :meth:`hwloop.train.hil.HILTrainer.write_back`.
* :func:`latency_windows` / :func:`apply_windows`: Methods (ii)/(iv): shrink every window to hold
  a percentile of the ReLU activations on training data, laid end to end.

Float weights: when the device has no weight quantisation (``device.mapping_defaults.float_weights``, the ideal
emulator) and no ``weight_bits`` is asked for, the float64 weights are written as they are with
scale 1.0.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from hwloop.devices.base import LayerSpec, NetworkSpec, TTFSDevice
from hwloop.errors import DeviceLimitError, WriteVerifyError
from hwloop.quant import _quantiles, code_range, default_clip_percentile, quantize_weights
from hwloop.ttfs.layers import Flatten, NeuronLayer, Readout, SpikingConv2d, SpikingDense, SpikingMaxPool2d
from hwloop.ttfs.network import TTFSNetwork

__all__ = [
    "MappingHints", "ProgramState", "WriteCount", "apply_windows", "dequantized_network",
    "latency_windows", "layer_thresholds", "mapping_hints", "network_thresholds",
    "network_to_spec", "program_network", "quantize_fixed", "quantize_network", "reprogram",
    "weight_layer_indices", "write_layer", "write_network_thresholds", "write_network_weights",
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
        compensation: optional; the calibration compensation the codes and thresholds were
            computed with (a :class:`hwloop.calibrate.compensate.Compensation`, set by
            :func:`hwloop.calibrate.compensate.program_calibrated`), None for an uncalibrated
            chip. Anything with ``effective_weight(layer, weight) -> weight`` will do.
        record_hash: optional; the content hash of that calibration record ("" if none).
    """

    spec: NetworkSpec
    weights: dict[int, tuple[torch.Tensor, float]] = field(default_factory=dict)
    thresholds: dict[int, torch.Tensor] = field(default_factory=dict)
    weight_bits: Optional[int] = None
    clip_percentile: Optional[float] = None
    compensation: Optional[Any] = None
    record_hash: str = ""

    def effective_weight(self, layer: int, codes: torch.Tensor, scale: float) -> torch.Tensor:
        """The weights the chip effectively applies for ``(codes, scale)`` of ``layer``
        (float64): codes x scale, times the calibrated gains when there is a compensation.
        The trainer's nominal network uses it."""
        w = codes.to(torch.float64) * float(scale)
        return w if self.compensation is None else self.compensation.effective_weight(layer, w)


@dataclass(frozen=True)
class MappingHints:
    """What a device tells beyond the contract (:func:`mapping_hints`)."""

    float_weights: bool = False  # it stores float weights (the ideal emulator)
    window_percentile: Optional[float] = None  # its profile's deployment window percentile
    weight_clip_percentile: Optional[float] = None  # its profile's outlier percentile


def mapping_hints(device: TTFSDevice) -> MappingHints:
    """The mapping hints of a device, from the contract's :attr:`TTFSDevice.mapping_defaults`
    (a chip behind a link gets the defaults; the emulator's come from its profile)."""
    d = device.mapping_defaults
    return MappingHints(float_weights=bool(d.float_weights),
                        window_percentile=d.window_percentile,
                        weight_clip_percentile=d.weight_clip_percentile)


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


def weight_layer_indices(net: TTFSNetwork) -> list[int]:
    """The layers of ``net`` that hold weights and thresholds (neuron layers, the readout)."""
    return [i for i, l in enumerate(net.layers) if isinstance(l, (NeuronLayer, Readout))]


def _resolve_bits(device: TTFSDevice, weight_bits: Optional[int]) -> Optional[int]:
    info = device.info()
    if weight_bits is None:
        return None if mapping_hints(device).float_weights else int(info.weight_bits)
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
    for i in weight_layer_indices(net):
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
    return {i: layer_thresholds(net, i, *(weights[i] if weights is not None
                                          else (net.layers[i].weight.detach(), 1.0)))
            for i in weight_layer_indices(net)}


def quantize_fixed(w: torch.Tensor, scale: float, bits: Optional[int]) -> torch.Tensor:
    """Codes of ``w`` on a fixed step ``scale`` (rounded, clipped to the q-bit range,
    :func:`hwloop.quant.code_range`).

    ``bits=None``: a float device (ideal emulator) stores the float64 weights themselves."""
    if bits is None:
        return w.detach().to(torch.float64).clone()
    lo, hi = code_range(bits)
    return torch.clamp(torch.round(w.detach().to(torch.float64) / scale), lo, hi).to(torch.int64)


# ---------------------------------------------------------------------------- the write path
@dataclass
class WriteCount:
    """Device calls made by :func:`write_layer`: ``writes`` (``write_weights`` /
    ``write_thresholds``) and ``reads`` (read-backs to verify)."""

    writes: int = 0
    reads: int = 0

    @property
    def calls(self) -> int:
        return self.writes + self.reads


def write_layer(device: TTFSDevice, i: int, codes: Optional[torch.Tensor] = None,
                scale: float = 1.0, thresholds: Optional[torch.Tensor] = None, *,
                retries: int = 0, verify: bool = True, count: Optional[WriteCount] = None,
                what: str = "") -> WriteCount:
    """Write layer ``i``'s ``codes`` and ``scale`` and/or its ``thresholds`` (None: not
    written) and make sure the chip holds them: the one write-and-verify path of the host.

    A driver whose ``verifies_writes`` is true checks each write itself (CRC, or read-back in
    the driver) and raises :class:`WriteVerifyError` on a mismatch: nothing is read back
    again. Otherwise (and with ``verify``) both are read back and compared exactly (codes,
    shape and scale; thresholds as float64); a mismatch is written again up to ``retries``
    times. ``count`` (updated in place, also when it raises) counts the device calls.

    Returns:
        ``count`` (a new :class:`WriteCount` if None was given).

    Raises:
        WriteVerifyError: the read-back still differs after ``retries`` retries
            (``layers == [i]``; ``what`` prefixes the message).
    """
    count = WriteCount() if count is None else count
    for _ in range(int(retries) + 1):
        if codes is not None:
            device.write_weights(i, codes, scale)
            count.writes += 1
        if thresholds is not None:
            device.write_thresholds(i, thresholds)
            count.writes += 1
        if not verify or device.verifies_writes:
            return count  # the driver checked the chip's copy itself (CRC / read-back)
        ok = True
        if codes is not None:
            rc, rs = device.read_weights(i)
            count.reads += 1
            ok &= (tuple(rc.shape) == tuple(codes.shape) and float(rs) == float(scale)
                   and torch.equal(rc.to(codes.dtype), codes))
        if thresholds is not None:
            count.reads += 1
            ok &= torch.equal(device.read_thresholds(i).to(torch.float64),
                              thresholds.to(torch.float64))
        if ok:
            return count
    parts = " and ".join(p for p, v in (("weights", codes), ("thresholds", thresholds)) if v is not None)
    raise WriteVerifyError(f"{what}layer {i}: {parts} read back differ from what was written"
                           + (f" after {retries} retries" if retries else ""), layers=[i])


def _write_all(device: TTFSDevice, items: dict, verify: bool, what: str) -> None:
    """:func:`write_layer` for ``{layer: (codes, scale, thresholds)}``; every layer is written
    before a :class:`WriteVerifyError` names all those that did not verify."""
    bad = []
    for i, (codes, scale, theta) in items.items():
        try:
            write_layer(device, i, codes, scale, theta, verify=verify)
        except WriteVerifyError as exc:
            if exc.layers != [i]:
                raise
            bad.append(i)
    if bad:
        raise WriteVerifyError(f"{what}: layers {bad} did not verify (read back differs from "
                               "what was written)", layers=bad)


def write_network_weights(device: TTFSDevice, net: TTFSNetwork, weight_bits: Optional[int] = None,
                          clip_percentile: Optional[float] = None,
                          verify: bool = True) -> dict[int, tuple[torch.Tensor, float]]:
    """Quantise and write every weight layer, verified (:func:`write_layer`).

    Returns the written ``{layer: (codes, scale)}``. Raises :class:`WriteVerifyError` naming
    the layers whose read-back differs.
    """
    bits = _resolve_bits(device, weight_bits)
    written = quantize_network(net, bits, clip_percentile)
    _write_all(device, {i: (c, s, None) for i, (c, s) in written.items()}, verify, "weights")
    return written


def write_network_thresholds(device: TTFSDevice, net: TTFSNetwork, verify: bool = True,
                             weights: Optional[dict[int, tuple[torch.Tensor, float]]] = None
                             ) -> dict[int, torch.Tensor]:
    """Write theta of every neuron layer and the readout offsets, verified (:func:`write_layer`).

    Pass the written ``weights`` (``{layer: (codes, scale)}``) when weights are quantised: a
    conv input shift's contribution to the thresholds then uses them (:func:`layer_thresholds`);
    None uses ``net``'s own weights (right for float weights or the dequantised network). After
    :meth:`~hwloop.devices.base.TTFSDevice.set_windows` the base thresholds change with the
    widths (B1: base = width), so write the thresholds again.

    Raises:
        WriteVerifyError: read-back differs (names the layers)."""
    written = network_thresholds(net, weights)
    _write_all(device, {i: (None, 1.0, v) for i, v in written.items()}, verify, "thresholds")
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
        verify: verify every write (:func:`write_layer`: by read-back unless the driver
            verifies its own writes).

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


def reprogram(device: TTFSDevice, state: ProgramState) -> None:
    """Put a saved :class:`ProgramState` back on a device exactly (its spec, codes, scales and
    thresholds), verified (:func:`write_layer`).

    Raises:
        WriteVerifyError: names every layer that did not verify."""
    device.program(state.spec)
    items = {i: (codes, float(scale), state.thresholds.get(i))
             for i, (codes, scale) in state.weights.items()}
    items.update({i: (None, 1.0, v) for i, v in state.thresholds.items() if i not in items})
    _write_all(device, dict(sorted(items.items())), True, "reprogramming the saved state")


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
