"""The contract every TTFS device backend implements.

Units at this interface (see ``docs/protocol.md`` for the wire units):

* spike times are floats in units of tau_c, absolute on the network's time axis
  (input window [t_max^(0) - 1, t_max^(0)], layer n window [t_min^(n), t_max^(n))); a silent
  neuron's spike time is ``+inf``;
* weights are signed integer codes with one float scale per layer: W = codes * scale;
* thresholds theta_i are in the units of the membrane potential of Eq. (1) with tau_c = 1
  (weight units x tau_c), one per neuron (a conv layer has one per output position);
* energies are joules.

A backend converts to its own units (clock ticks, DAC codes) internally. Layers are numbered by
their index in :attr:`NetworkSpec.layers`.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from hwloop.errors import DeviceError, DeviceLimitError

LayerKindName = Literal["dense", "conv2d", "maxpool2d", "flatten", "readout"]
#: Kinds of layer that hold neurons with a capacitor (and thus thresholds and weights).
NEURON_KINDS = ("dense", "conv2d")
#: Kinds of layer whose output is a spiking stage of :attr:`DeviceRecord.spike_times`.
STAGE_KINDS = ("dense", "conv2d", "maxpool2d")
#: Kinds of layer that carry weights.
WEIGHT_KINDS = ("dense", "conv2d", "readout")
#: Kinds of layer with a value per neuron written by ``write_thresholds`` (thresholds; the
#: readout's constant offsets).
THRESHOLD_KINDS = NEURON_KINDS + ("readout",)


class LayerSpec(BaseModel):
    """One layer of the network programmed on a device.

    Shapes are per sample: ``(features,)`` for dense layers, ``(channels, height, width)`` for
    convolutional and pooling layers.
    """

    model_config = ConfigDict(frozen=True)

    kind: LayerKindName
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    #: (out, in) for dense and readout, (out_ch, in_ch, kh, kw) for conv2d, () otherwise.
    weight_shape: tuple[int, ...] = ()
    kernel_size: Optional[tuple[int, int]] = None
    stride: Optional[tuple[int, int]] = None
    padding: Optional[tuple[int, int]] = None
    #: maxpool2d only: +1 per channel takes the earliest spike of the pool, -1 the latest
    #: (a negative fused batch-norm scale in front of the pool turns max into min).
    pool_sign: Optional[tuple[int, ...]] = None
    #: Window [t_min, t_max) of a neuron layer in tau_c; for the readout, the read-out time is
    #: t_max of the last spiking layer and (t_min, t_max) repeat that layer's window.
    t_min: Optional[float] = None
    t_max: Optional[float] = None

    @property
    def n_neurons(self) -> int:
        """Number of neurons (capacitors) in this layer; 0 for pooling and flatten."""
        if self.kind in NEURON_KINDS or self.kind == "readout":
            return int(math.prod(self.out_shape))
        return 0

    @property
    def fan_in(self) -> int:
        """Synapses per neuron: in features (dense/readout) or in_ch*kh*kw (conv2d)."""
        if self.kind in ("dense", "readout"):
            return int(self.weight_shape[1])
        if self.kind == "conv2d":
            return int(math.prod(self.weight_shape[1:]))
        return 0


class NetworkSpec(BaseModel):
    """The topology and windows of a network as a device sees it (no parameter values)."""

    model_config = ConfigDict(frozen=True)

    input_shape: tuple[int, ...]
    #: t_max^(0): the end of the input window, tau_c. Input spikes lie in [t_max0 - 1, t_max0].
    t_max0: float = 1.0
    layers: tuple[LayerSpec, ...]

    def stage_layers(self) -> list[int]:
        """Indices of the layers whose output is a spiking stage (dense, conv2d, maxpool2d)."""
        return [i for i, l in enumerate(self.layers) if l.kind in STAGE_KINDS]

    def neuron_layers(self) -> list[int]:
        """Indices of the spiking neuron layers (dense, conv2d)."""
        return [i for i, l in enumerate(self.layers) if l.kind in NEURON_KINDS]

    def windows(self) -> list[tuple[float, float]]:
        """(t_min, t_max) of every neuron layer, in order, tau_c."""
        return [(l.t_min, l.t_max) for l in self.layers if l.kind in NEURON_KINDS]

    def with_windows(self, windows) -> "NetworkSpec":
        """This spec with new (t_min, t_max) per neuron layer (tau_c); the readout repeats the
        window of the last neuron layer, as :class:`LayerSpec` defines it.

        Raises:
            ValueError: wrong number of windows, or a window that is not finite with t_max > t_min.
        """
        wins = [(float(a), float(b)) for a, b in windows]
        idx = self.neuron_layers()
        if len(wins) != len(idx):
            raise ValueError(f"need {len(idx)} windows (one per neuron layer), got {len(wins)}")
        layers = list(self.layers)
        for i, (a, b) in zip(idx, wins):
            if not (math.isfinite(a) and math.isfinite(b) and b > a):
                raise ValueError(f"layer {i}: window must satisfy t_max > t_min, got ({a}, {b})")
            layers[i] = layers[i].model_copy(update={"t_min": a, "t_max": b})
        if idx:
            last = layers[idx[-1]]
            for i, layer in enumerate(layers):
                if layer.kind == "readout":
                    layers[i] = layer.model_copy(update={"t_min": last.t_min, "t_max": last.t_max})
        return self.model_copy(update={"layers": tuple(layers)})


class DeviceInfo(BaseModel):
    """What a device says about itself (HELLO / ``*IDN?``)."""

    model_config = ConfigDict(frozen=True)

    device_id: str
    firmware_version: str = "0"
    protocol_version: int = 1
    max_layers: int = Field(ge=1)
    max_neurons_per_layer: int = Field(ge=1)
    max_fan_in: int = Field(ge=1)
    weight_bits: int = Field(ge=2, le=32)
    #: Time steps per layer window; ``None`` for continuous time.
    time_steps_per_layer: Optional[int] = Field(default=None, ge=1)
    clock_period_s: float = Field(gt=0)
    tau_c_s: float = Field(gt=0)
    layer_kinds: tuple[str, ...] = ("dense", "conv2d", "maxpool2d", "flatten", "readout")
    max_batch: int = Field(default=4096, ge=1)
    #: Whether the device accepts new windows while a network is programmed (Eq. (8) on chip).
    adaptive_windows: bool = True


@dataclass
class DeviceRecord:
    """What one ``run`` measured, for a batch of B samples.

    Attributes:
        spike_times: one tensor per spiking stage, aligned with
            :meth:`hwloop.ttfs.TTFSNetwork.spike_times`: the input as the device saw it (after
            input jitter), then every dense/conv2d/maxpool2d layer in order. Shapes
            ``(B, *stage_shape)``, float64, tau_c, ``+inf`` for silent.
        readout: ``(B, n_classes)`` readout potentials at t_max^(N) (the logits), including the
            readout offsets written with ``write_thresholds``.
        v_tmax: one tensor per neuron layer, ``(B, *out_shape)``: the potential V(t_max) of each
            silent neuron; 0.0 where the neuron fired.
        spike_counts: ``(B, n_neuron_layers)`` int64, spikes per sample per neuron layer.
        neurons_per_layer: neurons of each neuron layer.
        energy_j: ``(B, n_neuron_layers)`` joules per sample per layer (Methods, "Estimation of
            the dominant factor of energy consumption"), or ``None`` if the backend does not
            compute it (then :mod:`hwloop.energy` does, from this record and the profile).
    """

    spike_times: list[torch.Tensor]
    readout: torch.Tensor
    v_tmax: list[torch.Tensor]
    spike_counts: torch.Tensor
    neurons_per_layer: list[int]
    energy_j: Optional[torch.Tensor] = None
    meta: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.readout.shape[0])

    def spikes_per_neuron(self) -> float:
        """Average spikes per neuron per sample over all neuron layers (paper: "SNN sparsity")."""
        total_neurons = sum(self.neurons_per_layer)
        return float(self.spike_counts.sum()) / (self.batch_size * total_neurons)


@dataclass(frozen=True)
class MappingDefaults:
    """What a device suggests for mapping a network onto it (:attr:`TTFSDevice.mapping_defaults`).

    Attributes:
        float_weights: the device stores float weights (no weight quantisation: the ideal
            emulator); codes are then the weights themselves and the scale 1.0.
        window_percentile: the deployment window percentile it was characterised with
            (Methods (iv)), or ``None`` for the caller's / the mapping's default.
        weight_clip_percentile: the outlier percentile removed on each side before quantising
            (Methods (iii)), or ``None`` for the default of the bit width.
    """

    float_weights: bool = False
    window_percentile: Optional[float] = None
    weight_clip_percentile: Optional[float] = None


class TTFSDevice(abc.ABC):
    """Abstract TTFS chip: program a network, write and verify weights, run batches.

    Typical use::

        with open_device("devices/emulator-analog.yaml") as dev:
            dev.program(spec)
            for layer, (codes, scale) in enumerate(quantized):
                dev.write_weights(layer, codes, scale)
            record = dev.run(input_times)

    Errors: :class:`DeviceLimitError` when a network does not fit (from :meth:`program`),
    :class:`DeviceError` for anything the device refuses, :class:`DeviceTimeout` when it does
    not answer.
    """

    @abc.abstractmethod
    def info(self) -> DeviceInfo:
        """The device's identity and limits."""

    @abc.abstractmethod
    def program(self, spec: NetworkSpec) -> None:
        """Load a topology and its windows; weights and thresholds start at zero.

        Raises:
            DeviceLimitError: the network does not fit; the message names the limit.
        """

    @abc.abstractmethod
    def write_weights(self, layer: int, codes: torch.Tensor, scale: float) -> None:
        """Write a layer's weights as integer codes (shape ``LayerSpec.weight_shape``).

        Codes must lie in [-2^(q-1), 2^(q-1) - 1] for q = ``info().weight_bits``.
        """

    @abc.abstractmethod
    def read_weights(self, layer: int) -> tuple[torch.Tensor, float]:
        """Read back a layer's programmed codes (int64) and scale."""

    @abc.abstractmethod
    def write_thresholds(self, layer: int, values: torch.Tensor) -> None:
        """Set a neuron layer's thresholds theta_i (shape ``out_shape``), or for the readout
        layer its constant offsets (the ``(t_max - t_min) A_i`` term of the Methods'
        "Output layer")."""

    @abc.abstractmethod
    def read_thresholds(self, layer: int) -> torch.Tensor:
        """Read back what :meth:`write_thresholds` programmed (float64)."""

    @abc.abstractmethod
    def set_windows(self, windows: list[tuple[float, float]]) -> None:
        """Set (t_min, t_max) of every neuron layer, tau_c (Eq. (8) on chip).

        Raises:
            DeviceError: the device does not allow changing windows (``adaptive_windows``).
        """

    @abc.abstractmethod
    def run(self, input_spike_times: torch.Tensor) -> DeviceRecord:
        """Run a batch: ``input_spike_times`` is ``(B, *input_shape)`` in tau_c, ``+inf`` for
        no spike. Returns the :class:`DeviceRecord` of the batch."""

    def reset(self) -> None:
        """Return to the power-on state (no network programmed)."""

    @property
    def verifies_writes(self) -> bool:
        """True when :meth:`write_weights` and :meth:`write_thresholds` verify what the chip
        stored themselves (CRC or read-back inside the driver) and raise
        :class:`WriteVerifyError` on a mismatch; callers may then skip their own read-back."""
        return False

    @property
    def mapping_defaults(self) -> MappingDefaults:
        """Hints for mapping a network onto this device (float weights, window and weight-clip
        percentiles), read by :func:`hwloop.mapping.mapping_hints`. A chip behind a link knows
        none of them: the default is ``MappingDefaults()`` (quantised weights, no percentile
        suggested); a backend that knows better (the emulator, from its profile) overrides this."""
        return MappingDefaults()

    def seed_noise(self, seed: int) -> None:
        """Reseed the random jitter, where the backend can (the emulator); a physical chip's
        trial-to-trial noise cannot be seeded and ignores this. Used so that a resumed run
        replays the same jitter as an uninterrupted one."""

    def close(self) -> None:
        """Release the transport; idempotent."""

    def __enter__(self) -> "TTFSDevice":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_fits(spec: NetworkSpec, info: DeviceInfo) -> None:
    """Raise :class:`DeviceLimitError` naming the first limit of ``info`` that ``spec`` breaks."""
    if len(spec.layers) > info.max_layers:
        raise DeviceLimitError(
            f"network has {len(spec.layers)} layers; device {info.device_id} allows max_layers="
            f"{info.max_layers}")
    for i, layer in enumerate(spec.layers):
        if layer.kind not in info.layer_kinds:
            raise DeviceLimitError(
                f"layer {i} is {layer.kind!r}; device {info.device_id} supports layer_kinds="
                f"{list(info.layer_kinds)}")
        if layer.n_neurons > info.max_neurons_per_layer:
            raise DeviceLimitError(
                f"layer {i} ({layer.kind}) has {layer.n_neurons} neurons; device allows "
                f"max_neurons_per_layer={info.max_neurons_per_layer}")
        if layer.fan_in > info.max_fan_in:
            raise DeviceLimitError(
                f"layer {i} ({layer.kind}) has fan-in {layer.fan_in}; device allows max_fan_in="
                f"{info.max_fan_in}")
        if layer.kind in NEURON_KINDS and not (layer.t_min is not None and layer.t_max is not None
                                               and layer.t_max > layer.t_min):
            raise DeviceLimitError(f"layer {i}: window must satisfy t_max > t_min, got "
                                   f"({layer.t_min}, {layer.t_max})")


def check_codes(codes: torch.Tensor, bits: int, layer: int) -> None:
    """Raise :class:`DeviceError` unless every code lies in [-2^(q-1), 2^(q-1) - 1]."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise DeviceError(f"layer {layer}: weight codes must lie in [{lo}, {hi}] for "
                          f"weight_bits={bits}; got [{int(codes.min())}, {int(codes.max())}]")
