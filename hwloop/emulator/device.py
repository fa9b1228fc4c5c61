"""The in-process TTFS chip emulator: the B1 circuit with frozen mismatch, jitter and
quantisation, in closed form (batched, vectorised, float64).

The circuit (docs/emulator.md has the derivation and every knob):

* one capacitor C_i = C c_i per neuron (capacitance mismatch c_i ~ 1 + N(0, capacitance_sd));
* input phase: an input spike j arriving at t_j switches on a constant current
  I_ij = g_ij W_ij (synapse gain mismatch g_ij ~ 1 + N(0, synapse_gain_sd)) that flows from
  max(t_j, t_min^(n-1)) until t_min^(n) (a spike earlier than its own layer's t_min only takes
  effect from there: Methods (ii), (iv)); with V = Q / C_i this gives, in potential units,

      V_i(t_min) = (1 / c_i) sum_j g_ij W_ij clamp(t_min^(n) - t_j, 0, t_min^(n) - t_min^(n-1));

* window phase [t_min, t_max): inputs are off, a ramp current charges the capacitor at slope
  B_i = r_i / c_i (ramp mismatch r_i ~ 1 + N(0, ramp_current_sd)); the comparator, enabled only
  in the window, compares with theta_i + o_i w_n (o_i ~ N(0, threshold_offset_sd), relative to
  the base threshold w_n = t_max - t_min); the crossing is at

      t_cross = t_min + max(theta_i + o_i w_n - V_i(t_min), 0) / B_i

  (a neuron already above threshold at t_min fires at t_min);
* the spike leaves after the comparator's frozen delay deviation d_i ~ N(0, comparator_delay_sd)
  plus a random jitter N(0, jitter_sd) drawn fresh every run: t_e = t_cross + d_i + jitter; it is
  emitted only if t_cross < t_max and t_e < t_max (the reset at t_max stops both);
* with K time steps per layer, t_e is registered at the next tick of the window's grid
  (:func:`hwloop.quant.quantize_times`: ceil; a tick at t_max means silent). Input spikes get the
  same jitter and grid on the input window [t_max^(0) - 1, t_max^(0)];
* max pooling: the earliest spike of the pool (the latest for sign -1);
* readout: the same synapses and capacitor without comparator, integrated until t_max^(N):
  logits_k = (sum_j g_kj W_kj clamp(t_max^(N) - t_j, 0, w_N) + offset_k) / c_k;
* V(t_max) of a silent neuron: min(V(t_min) + B_i w_n, theta_i + o_i w_n);
* energy per sample and layer: :func:`hwloop.energy.network_energy` with C_i = C c_i, the
  effective thresholds and v_n = threshold_voltage_v / w_n volts per potential unit.

Frozen mismatch is drawn once per chip when a network is programmed, from a generator seeded
with ``chip_seed`` (standard normals drawn in layer order, every non-ideality always drawn, so a
given seed gives the same chip whatever the profile's standard deviations); random jitter comes
from a separate generator (``jitter_seed``, random unless given).

Ideal weights: a profile with ``weight_bits: null`` accepts floating "codes" (the float64
weights themselves) with scale 1.0, so the ideal emulator reproduces
:meth:`hwloop.ttfs.TTFSNetwork.spike_times` to float64 rounding. Its :class:`DeviceInfo`
reports ``weight_bits=32``; integer codes in the 32-bit range are accepted too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Optional, Union

import torch

from hwloop.devices.base import (NEURON_KINDS, WEIGHT_KINDS, DeviceInfo, DeviceRecord,
                                 MappingDefaults, NetworkSpec, TTFSDevice, check_codes, check_fits)
from hwloop.emulator import physics
from hwloop.emulator.profile import DeviceProfile, load_profile
from hwloop.errors import DataError, DeviceError, DeviceLimitError

__all__ = ["EmulatorDevice", "FROZEN_NAMES"]

F64 = torch.float64
#: Frozen parameters of a neuron layer, in the order they are drawn.
FROZEN_NAMES = ("synapse_gain", "capacitance", "ramp", "threshold_offset", "comparator_delay")
#: Frozen parameters of the readout.
READOUT_FROZEN = ("synapse_gain", "capacitance")
#: Gains and capacitances are clamped at this floor (a 1 + N(0, sd) draw below it is unphysical).
MIN_FACTOR = 0.05


class EmulatorDevice(TTFSDevice):
    """A TTFS chip emulated in process from a :class:`DeviceProfile`.

    Attributes:
        profile: the validated profile.
        chip_seed: seed of this chip's frozen mismatch.
        jitter_seed: seed of the random-jitter generator.
        frozen: after :meth:`program`, ``{layer_index: {name: tensor}}`` with the true frozen
            parameters: ``synapse_gain`` (weight shape, factor), ``capacitance`` (out shape,
            factor C_i / C), ``ramp`` (out shape, factor I_B,i / I_B), ``threshold_offset`` (out
            shape, fraction of the base threshold), ``comparator_delay`` (out shape, tau_c);
            the readout has ``synapse_gain`` and ``capacitance`` only.
    """

    def __init__(self, profile: DeviceProfile, chip_seed: Optional[int] = None,
                 jitter_seed: Optional[int] = None):
        self.profile = profile
        self.chip_seed = int(profile.chip_seed if chip_seed is None else chip_seed)
        if self.chip_seed < 0:
            raise ValueError(f"chip_seed must be >= 0, got {chip_seed}")
        self._info = profile.device_info(self.chip_seed)
        self.jitter_seed = (int.from_bytes(os.urandom(8), "little") & (2 ** 63 - 1)
                            if jitter_seed is None else int(jitter_seed))
        self._jitter_gen = torch.Generator().manual_seed(self.jitter_seed)
        self._closed = False
        self.reset()

    @classmethod
    def from_profile(cls, path_or_profile: Union[str, os.PathLike, DeviceProfile],
                     chip_seed: Optional[int] = None,
                     jitter_seed: Optional[int] = None) -> "EmulatorDevice":
        """Open an emulator from a profile (path, name in ``devices/``, or object)."""
        if isinstance(path_or_profile, DeviceProfile):
            profile = path_or_profile
        else:
            profile = load_profile(Path(path_or_profile) if not isinstance(path_or_profile, str)
                                   else path_or_profile)
        return cls(profile, chip_seed=chip_seed, jitter_seed=jitter_seed)

    # ------------------------------------------------------------------ state
    @property
    def float_weights(self) -> bool:
        """True when the profile has no weight quantisation (floating codes, scale 1.0)."""
        return self.profile.weight_bits is None

    @property
    def spec(self) -> Optional[NetworkSpec]:
        """The programmed network (``None`` before :meth:`program`)."""
        return self._spec

    def _check_open(self) -> None:
        if self._closed:
            raise DeviceError(f"device {self._info.device_id} is closed")

    def _check_programmed(self) -> NetworkSpec:
        self._check_open()
        if self._spec is None:
            raise DeviceError(f"device {self._info.device_id}: no network programmed (call program)")
        return self._spec

    def _check_layer(self, layer: int, kinds: tuple[str, ...], what: str) -> None:
        spec = self._check_programmed()
        if not 0 <= int(layer) < len(spec.layers):
            raise DeviceError(f"layer {layer} does not exist (network has {len(spec.layers)} layers)")
        kind = spec.layers[layer].kind
        if kind not in kinds:
            raise DeviceError(f"layer {layer} is {kind!r}; {what} needs one of {list(kinds)}")

    @property
    def model_sha256(self) -> str:
        """SHA-256 of what determines this chip's behaviour: its profile (every field) and its
        chip seed (the frozen mismatch draws). Two instances with equal digests are the same
        chip; a resumed run or a calibration record compares it (an edited YAML file or a
        profile override under the same device id is caught)."""
        doc = {"profile": self.profile.model_dump(mode="json"), "chip_seed": self.chip_seed}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()

    @property
    def mapping_defaults(self) -> MappingDefaults:
        """The profile's mapping hints: float weights, window and weight-clip percentiles."""
        return MappingDefaults(float_weights=self.float_weights,
                               window_percentile=self.profile.window_percentile,
                               weight_clip_percentile=self.profile.weight_clip_percentile)

    def info(self) -> DeviceInfo:
        self._check_open()
        return self._info

    def reset(self) -> None:
        self._check_open()
        self._spec: Optional[NetworkSpec] = None
        self._codes: dict[int, torch.Tensor] = {}
        self._scales: dict[int, float] = {}
        self._thresholds: dict[int, torch.Tensor] = {}
        self._w_eff: dict[int, torch.Tensor] = {}
        self.frozen: dict[int, dict[str, torch.Tensor]] = {}
        self._z: dict[int, dict[str, torch.Tensor]] = {}
        self._consts: dict[int, dict] = {}  # per-layer run constants (see _layer_constants)

    def seed_noise(self, seed: int) -> None:
        """Reseed the random-jitter generator (the frozen mismatch is not affected)."""
        self._check_open()
        self.jitter_seed = int(seed)
        self._jitter_gen.manual_seed(self.jitter_seed)

    def close(self) -> None:
        if not self._closed:
            self._spec = None
            self._closed = True

    # ------------------------------------------------------------------ programming
    def program(self, spec: NetworkSpec) -> None:
        self._check_open()
        check_fits(spec, self._info)
        self.reset()
        self._spec = spec
        self._draw_frozen()
        for i, layer in enumerate(spec.layers):
            if layer.kind in WEIGHT_KINDS:
                dtype = F64 if self.float_weights else torch.int64
                self._codes[i] = torch.zeros(layer.weight_shape, dtype=dtype)
                self._scales[i] = 1.0
                self._update_weights(i)
            if layer.kind in NEURON_KINDS or layer.kind == "readout":
                self._thresholds[i] = torch.zeros(layer.out_shape, dtype=F64)

    def _draw_frozen(self) -> None:
        """Standard normals from the chip seed, in layer order, then scaled by the profile."""
        gen = torch.Generator().manual_seed(self.chip_seed)
        m = self.profile.mismatch
        for i, layer in enumerate(self._spec.layers):
            if layer.kind in NEURON_KINDS:
                names = FROZEN_NAMES
            elif layer.kind == "readout":
                names = READOUT_FROZEN
            else:
                continue
            z = {}
            for name in names:
                shape = layer.weight_shape if name == "synapse_gain" else layer.out_shape
                z[name] = torch.randn(shape, generator=gen, dtype=F64)
            self._z[i] = z
            fz = {"synapse_gain": (1.0 + m.synapse_gain_sd * z["synapse_gain"]).clamp(min=MIN_FACTOR),
                  "capacitance": (1.0 + m.capacitance_sd * z["capacitance"]).clamp(min=MIN_FACTOR)}
            if layer.kind in NEURON_KINDS:
                fz["ramp"] = (1.0 + m.ramp_current_sd * z["ramp"]).clamp(min=MIN_FACTOR)
                fz["threshold_offset"] = m.threshold_offset_sd * z["threshold_offset"]
                fz["comparator_delay"] = m.comparator_delay_sd * z["comparator_delay"]
            self.frozen[i] = fz

    def _update_weights(self, layer: int) -> None:
        w = self._codes[layer].to(F64) * self._scales[layer]
        gain = self.frozen[layer]["synapse_gain"]
        self._w_eff[layer] = w * gain if self.profile.mismatch.synapse_gain_sd else w

    def effective_weights(self, layer: int) -> torch.Tensor:
        """The true synaptic weights g_ij W_ij of a layer (potential units per tau_c)."""
        self._check_layer(layer, WEIGHT_KINDS, "effective_weights")
        return self._w_eff[layer].clone()

    def write_weights(self, layer: int, codes: torch.Tensor, scale: float) -> None:
        self._check_layer(layer, WEIGHT_KINDS, "write_weights")
        spec = self._spec.layers[layer]
        codes = torch.as_tensor(codes)
        if tuple(codes.shape) != tuple(spec.weight_shape):
            raise DeviceError(f"layer {layer}: weights must have shape {tuple(spec.weight_shape)}, "
                              f"got {tuple(codes.shape)}")
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise DeviceError(f"layer {layer}: scale must be finite and > 0, got {scale}")
        if codes.is_floating_point():
            if not self.float_weights:
                raise DeviceError(f"layer {layer}: weight codes must be integers for weight_bits="
                                  f"{self._info.weight_bits}; got dtype {codes.dtype}")
            if not bool(torch.isfinite(codes).all()):
                raise DeviceError(f"layer {layer}: float weights must be finite")
            stored = codes.detach().to(F64).clone()
        else:
            check_codes(codes, self._info.weight_bits, layer)
            stored = codes.detach().to(F64 if self.float_weights else torch.int64).clone()
        self._codes[layer] = stored
        self._scales[layer] = scale
        self._update_weights(layer)

    def read_weights(self, layer: int) -> tuple[torch.Tensor, float]:
        """Codes (int64; float64 for a float-weight profile) and scale as programmed."""
        self._check_layer(layer, WEIGHT_KINDS, "read_weights")
        return self._codes[layer].clone(), self._scales[layer]

    def write_thresholds(self, layer: int, values: torch.Tensor) -> None:
        self._check_layer(layer, NEURON_KINDS + ("readout",), "write_thresholds")
        shape = tuple(self._spec.layers[layer].out_shape)
        values = torch.as_tensor(values, dtype=F64)
        if tuple(values.shape) != shape:
            raise DeviceError(f"layer {layer}: thresholds must have shape {shape}, got "
                              f"{tuple(values.shape)}")
        if not bool(torch.isfinite(values).all()):
            raise DeviceError(f"layer {layer}: thresholds must be finite")
        self._thresholds[layer] = values.detach().clone()
        self._consts.pop(layer, None)

    def read_thresholds(self, layer: int) -> torch.Tensor:
        self._check_layer(layer, NEURON_KINDS + ("readout",), "read_thresholds")
        return self._thresholds[layer].clone()

    def set_windows(self, windows: list[tuple[float, float]]) -> None:
        spec = self._check_programmed()
        if not self.profile.adaptive_windows:
            raise DeviceError(f"device {self._info.device_id} (profile {self.profile.name}) does not "
                              "allow changing windows (adaptive_windows: false)")
        try:
            self._spec = spec.with_windows(windows)
        except ValueError as exc:
            raise DeviceError(f"device {self._info.device_id}: {exc}") from None
        self._consts.clear()

    # ------------------------------------------------------------------ running
    def noise_shapes(self) -> list[tuple[int, ...]]:
        """Per-sample shapes of the jitter draws: the input, then every neuron layer."""
        spec = self._check_programmed()
        return [tuple(spec.input_shape)] + [tuple(spec.layers[i].out_shape)
                                            for i in spec.neuron_layers()]

    def draw_noise(self, batch: int) -> list[Optional[torch.Tensor]]:
        """Standard normals for one run from the jitter generator (``None`` if jitter is off).

        Drawn in float32 (4-5x faster than float64 on CPU; the jitter's own resolution,
        ~1e-7 x jitter_sd, is far below any time scale of the circuit) and returned as float64
        (mixed-dtype arithmetic later would be ~20x slower than the conversion).
        """
        shapes = self.noise_shapes()
        if self.profile.jitter_sd == 0:
            return [None] * len(shapes)
        return [torch.randn((batch, *s), generator=self._jitter_gen, dtype=torch.float32).to(F64)
                for s in shapes]

    def run(self, input_spike_times: torch.Tensor) -> DeviceRecord:
        spec = self._check_programmed()
        t_in = torch.as_tensor(input_spike_times)
        if t_in.ndim != len(spec.input_shape) + 1 or tuple(t_in.shape[1:]) != tuple(spec.input_shape):
            raise DataError(f"input spike times must have shape (B, {', '.join(map(str, spec.input_shape))}), "
                            f"got {tuple(t_in.shape)}")
        if t_in.shape[0] > self._info.max_batch:
            raise DeviceLimitError(f"batch of {t_in.shape[0]} samples; device allows max_batch="
                                   f"{self._info.max_batch}")
        return self.simulate(t_in, self.draw_noise(int(t_in.shape[0])))

    def _layer_constants(self, i: int) -> physics.NeuronConstants:
        """Per-neuron constants of neuron layer ``i`` for the current thresholds and window.

        Cached: they only change with :meth:`write_thresholds`, :meth:`set_windows` and
        :meth:`program` (which drop the cache)."""
        c = self._consts.get(i)
        if c is None:
            p, m = self.profile, self.profile.mismatch
            c = physics.neuron_constants(
                self._spec.layers[i], self._thresholds[i], self.frozen[i],
                capacitance_f=p.capacitance_f, threshold_voltage_v=p.threshold_voltage_v,
                transmission_energy_j=p.transmission_energy_j,
                threshold_offset=bool(m.threshold_offset_sd), capacitance=bool(m.capacitance_sd),
                ramp=bool(m.ramp_current_sd), comparator_delay=bool(m.comparator_delay_sd))
            self._consts[i] = c
        return c

    def simulate(self, input_spike_times: torch.Tensor,
                 noise: list[Optional[torch.Tensor]]) -> DeviceRecord:
        """The closed-form forward pass (:mod:`hwloop.emulator.physics`) with given jitter
        noise (standard normals, one per input and neuron layer, as :meth:`draw_noise` makes
        them; ``None`` = no jitter)."""
        spec = self._check_programmed()
        p = self.profile
        steps, js = p.time_steps_per_layer, float(p.jitter_sd)
        t_in = torch.as_tensor(input_spike_times)
        if t_in.numel() and bool(torch.isnan(t_in.min())):  # min propagates NaN: one pass
            raise DataError("input spike times contain NaN (use +inf for no spike)")
        t = physics.input_stage(t_in, noise[0], js, spec.t_max0, steps)
        gate = spec.t_max0 - 1.0  # start of the window of the stage feeding the next layer
        stages = [t]
        v_list, energies, counts = [], [], []
        readout = None
        k = 1
        for i, layer in enumerate(spec.layers):
            if layer.kind in NEURON_KINDS:
                c = self._layer_constants(i)
                t, v_end, energy, count = physics.neuron_layer(
                    t, gate, layer, self._w_eff[i], c, noise[k], js, steps)
                energies.append(energy)
                counts.append(count)
                v_list.append(v_end)
                gate = c.t_min
                stages.append(t)
                k += 1
            elif layer.kind == "maxpool2d":
                t = physics.max_pool(t, layer)
                stages.append(t)
            elif layer.kind == "flatten":
                t = t.flatten(1)
            elif layer.kind == "readout":
                cap = self.frozen[i]["capacitance"] if p.mismatch.capacitance_sd else None
                readout = physics.readout(t, gate, layer, self._w_eff[i], self._thresholds[i], cap)
                break
        if readout is None:  # pragma: no cover - NetworkSpec from mapping always has a readout
            raise DeviceError("the programmed network has no readout layer")
        return self._record(spec, stages, readout, v_list, energies, counts)

    def _record(self, spec: NetworkSpec, stages, readout, v_list, energies,
                counts) -> DeviceRecord:
        batch = int(stages[0].shape[0])
        energy = (torch.stack(energies, 1) if energies
                  else torch.zeros(batch, 0, dtype=F64))
        spike_counts = (torch.stack(counts, 1).to(torch.int64) if counts
                        else torch.zeros(batch, 0, dtype=torch.int64))
        return DeviceRecord(
            spike_times=stages, readout=readout, v_tmax=v_list, spike_counts=spike_counts,
            neurons_per_layer=[spec.layers[i].n_neurons for i in spec.neuron_layers()],
            energy_j=energy,
            meta={"device_id": self._info.device_id, "profile": self.profile.name,
                  "chip_seed": self.chip_seed, "jitter_seed": self.jitter_seed})
