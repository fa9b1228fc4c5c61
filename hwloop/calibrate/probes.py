"""Probe design: known programs and input spike patterns, through the TTFSDevice contract only.

A real chip offers nothing but ``program`` / ``write_weights`` / ``write_thresholds`` /
``set_windows`` / ``run`` and the spike times and readout values a run reports, so every probe is
built from those. Runs are batched: one ``run`` carries many patterns (all repeats of a level,
all one-hot patterns of a layer), split into ``max_batch`` chunks where needed.

Three probe families (docs/calibration.md):

1. **Threshold sweep** (every neuron layer at once): all weights zero, so V(t_min) = 0 whatever
   the input; each run writes one threshold level per neuron (levels stratified over
   [0.15, 0.75] of the window, a random phase per neuron) and repeats an all-silent input R
   times. The spike time is d_i + s_i (theta_i + o_i w) after t_min: a line in theta whose
   slope is s_i and whose intercept is a_i(w) = d_i + s_i o_i w. Done at two window widths to
   separate d_i (fixed in tau_c) from o_i (scales with w). The readout's offsets are swept in
   the same runs (readout = q_k offset_k).
2. **Synapse probes of the first layer**: every weight of the layer set to one code, one-hot
   input patterns (x_j = 1) plus all-silent baselines, R repeats each, one batched run.
3. **Synapse probes of deeper dense layers and the readout**: the earlier (already swept)
   layers are programmed as *scramblers* (each neuron fed by a few random inputs of the layer
   before, thresholds set with the calibrated slope and offset so that about half fire), the
   input is random and sparse, and the spike times of the stage feeding the probed layer are
   read from the record: they are the inputs the layer really saw. A least-squares fit over
   many samples gives the per-synapse gains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from hwloop.devices.base import NEURON_KINDS, STAGE_KINDS, NetworkSpec, TTFSDevice
from hwloop.mapping import write_layer
from hwloop.quant import code_range

F64 = torch.float64
INF = math.inf

#: threshold levels of the sweep, as fractions of the window width
SWEEP_LO, SWEEP_HI = 0.15, 0.75


@dataclass
class ProbeCounter:
    runs: int = 0
    samples: int = 0
    programs: int = 0
    writes: int = 0


def with_widths(spec: NetworkSpec, widths: list[float]) -> NetworkSpec:
    """``spec`` with neuron-layer windows of ``widths`` laid end to end from t_max0 (the readout
    repeats the last neuron layer's window)."""
    idx = spec.neuron_layers()
    if len(widths) != len(idx):
        raise ValueError(f"need {len(idx)} widths, got {len(widths)}")
    layers = list(spec.layers)
    t = float(spec.t_max0)
    last = (t - 1.0, t)
    for i, w in zip(idx, widths):
        layers[i] = layers[i].model_copy(update={"t_min": t, "t_max": t + float(w)})
        last = (t, t + float(w))
        t += float(w)
    for i, l in enumerate(layers):
        if l.kind == "readout":
            layers[i] = l.model_copy(update={"t_min": last[0], "t_max": last[1]})
    return spec.model_copy(update={"layers": tuple(layers)})


def stage_of(spec: NetworkSpec) -> dict[int, int]:
    """Layer index -> index of its output stage in ``DeviceRecord.spike_times`` (stage kinds),
    and for the readout the stage it reads."""
    out, s = {}, 0
    for i, l in enumerate(spec.layers):
        if l.kind in STAGE_KINDS:
            s += 1
            out[i] = s
        elif l.kind == "readout":
            out[i] = s
    return out


def input_gate(spec: NetworkSpec, index: int) -> tuple[float, float]:
    """(t_ref, gate) of the integration of layer ``index``: x_j = clamp(t_ref - t_j, 0,
    t_ref - gate), as the device computes it (t_ref = t_min, or t_max of the last neuron layer
    for the readout)."""
    gate = float(spec.t_max0) - 1.0
    for i, l in enumerate(spec.layers):
        if i == index:
            if l.kind == "readout":
                return float(l.t_max), float(l.t_min) if l.t_min is not None else gate
            return float(l.t_min), gate
        if l.kind in NEURON_KINDS:
            gate = float(l.t_min)
    raise IndexError(index)


def activations_in(spec: NetworkSpec, index: int, stage_times: torch.Tensor) -> torch.Tensor:
    """x_j of layer ``index`` from the measured times of the stage feeding it, flattened
    ``(B, fan_in_features)``."""
    t_ref, gate = input_gate(spec, index)
    x = torch.rsub(stage_times.to(F64), t_ref).clamp_(0.0, t_ref - gate)
    x = torch.nan_to_num(x, nan=0.0)
    return x.flatten(1)


class Prober:
    """Counts and batches everything a calibration does to a device."""

    def __init__(self, device: TTFSDevice, verify: bool = True):
        self.device = device
        info = device.info()
        self.info = info
        self.max_batch = int(info.max_batch)
        self.bits = int(info.weight_bits)
        self.K = info.time_steps_per_layer
        self.verify = verify
        self.count = ProbeCounter()
        self.spec: Optional[NetworkSpec] = None

    # ------------------------------------------------------------------ programming
    @property
    def code_max(self) -> int:
        """The largest positive code used for probe weights (exact in any scale)."""
        return int(min(code_range(self.bits)[1], 2 ** 14))

    def program(self, spec: NetworkSpec) -> None:
        self.device.program(spec)
        self.spec = spec
        self.count.programs += 1

    def write_weights(self, layer: int, codes: torch.Tensor, scale: float) -> None:
        """Write probe codes, verified (:func:`hwloop.mapping.write_layer`)."""
        self.count.writes += 1
        write_layer(self.device, layer, codes.to(torch.int64), float(scale), verify=self.verify,
                    what="calibration probe: ")

    def write_thresholds(self, layer: int, values: torch.Tensor) -> None:
        """Write probe thresholds, verified (:func:`hwloop.mapping.write_layer`)."""
        self.count.writes += 1
        write_layer(self.device, layer, thresholds=values.to(F64), verify=self.verify,
                    what="calibration probe: ")

    def zero_weights(self, layer: int) -> None:
        shape = self.spec.layers[layer].weight_shape
        self.write_weights(layer, torch.zeros(shape, dtype=torch.int64), 1.0)

    # ------------------------------------------------------------------ running
    def run(self, t_in: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Run a (possibly large) batch in ``max_batch`` chunks; returns (stage times, readout)."""
        stages, readouts = None, []
        for s in range(0, int(t_in.shape[0]), self.max_batch):
            rec = self.device.run(t_in[s:s + self.max_batch])
            self.count.runs += 1
            self.count.samples += int(rec.readout.shape[0])
            if stages is None:
                stages = [[t.to(F64)] for t in rec.spike_times]
            else:
                for acc, t in zip(stages, rec.spike_times):
                    acc.append(t.to(F64))
            readouts.append(rec.readout.to(F64))
        return [torch.cat(a, 0) for a in stages], torch.cat(readouts, 0)


# ---------------------------------------------------------------------- input patterns
def silent_inputs(n: int, spec: NetworkSpec) -> torch.Tensor:
    return torch.full((n, *spec.input_shape), INF, dtype=F64)


def one_hot_inputs(spec: NetworkSpec, x: float = 1.0) -> torch.Tensor:
    """One pattern per input position: that input spikes at t_max0 - x, all others silent."""
    n = int(math.prod(spec.input_shape))
    t = torch.full((n, n), INF, dtype=F64)
    t.fill_diagonal_(float(spec.t_max0) - float(x))
    return t.reshape(n, *spec.input_shape)


def sparse_inputs(n: int, spec: NetworkSpec, p: float, gen: torch.Generator,
                  lo: float = 0.2) -> torch.Tensor:
    """Random sparse patterns: each input spikes with probability ``p`` with x ~ U(lo, 1)."""
    shape = (n, *spec.input_shape)
    on = torch.rand(shape, generator=gen, dtype=F64) < p
    x = lo + (1.0 - lo) * torch.rand(shape, generator=gen, dtype=F64)
    return torch.where(on, float(spec.t_max0) - x, torch.full_like(x, INF))


def k_hot_inputs(n: int, spec: NetworkSpec, k: int, gen: torch.Generator,
                 lo: float = 0.3) -> torch.Tensor:
    """Random patterns with exactly ``k`` spiking inputs each, x ~ U(lo, 1)."""
    n_in = int(math.prod(spec.input_shape))
    k = max(1, min(int(k), n_in))
    idx = torch.argsort(torch.rand(n, n_in, generator=gen), dim=1)[:, :k]
    x = lo + (1.0 - lo) * torch.rand(n, k, generator=gen, dtype=F64)
    t = torch.full((n, n_in), INF, dtype=F64)
    t.scatter_(1, idx, float(spec.t_max0) - x)
    return t.reshape(n, *spec.input_shape)


def sweep_levels(levels: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """(levels, n) threshold fractions of the window: stratified in [SWEEP_LO, SWEEP_HI], each
    neuron with its own random order and phase (decorrelates a time grid's staircase)."""
    phase = torch.rand(n, generator=gen, dtype=F64)
    order = torch.argsort(torch.rand(levels, n, generator=gen), dim=0).to(F64)
    u = (order + phase) / levels
    return SWEEP_LO + (SWEEP_HI - SWEEP_LO) * u


def relay_codes(n_out: int, n_in: int, code: int, gen: torch.Generator) -> torch.Tensor:
    """(n_out, n_in) codes of a relay layer: each neuron fed by one distinct random input when
    ``n_out <= n_in`` (sparse patterns stay as sparse, no two neurons always fire together),
    else by two random inputs (distinct pairs with high probability)."""
    codes = torch.zeros(n_out, n_in, dtype=torch.int64)
    if n_out <= n_in:
        src = torch.randperm(n_in, generator=gen)[:n_out]
        codes[torch.arange(n_out), src] = code
        return codes
    for i in range(n_out):
        codes[i, torch.randperm(n_in, generator=gen)[:2]] = code
    return codes
