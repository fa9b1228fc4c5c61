"""Small networks, parameters and inputs that the conformance suite and the bring-up
diagnostics program on a device (sized from its :class:`~hwloop.devices.base.DeviceInfo`).

Windows and input times lie on a 1/64 tau_c grid, so that a chip that speaks in clock ticks
(any power-of-two ticks per tau_c >= 64) represents them exactly.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from hwloop import quant
from hwloop.devices.base import (NEURON_KINDS, STAGE_KINDS, DeviceInfo, DeviceRecord, LayerSpec,
                                 NetworkSpec, TTFSDevice)

F64 = torch.float64
INF = math.inf

__all__ = ["suite_spec", "probe_spec", "tiny_spec", "suite_params", "grid_inputs", "program",
           "records_equal", "record_diff", "cat_records", "stage_windows", "code_range"]


def code_range(info: DeviceInfo) -> tuple[int, int]:
    """[lo, hi] of the weight codes of ``info`` (:func:`hwloop.quant.code_range`)."""
    return quant.code_range(info.weight_bits)


def _dense(n_in: int, n_out: int, t_min: float, t_max: float, kind: str = "dense") -> LayerSpec:
    return LayerSpec(kind=kind, in_shape=(n_in,), out_shape=(n_out,), weight_shape=(n_out, n_in),
                     t_min=t_min, t_max=t_max)


def suite_spec(info: DeviceInfo, n_in: int = 12, hidden: int = 10, n_out: int = 4) -> NetworkSpec:
    """dense(n_in -> hidden) [-> dense(hidden -> hidden)] -> readout(n_out), windows (1, 3),
    (3, 5): the network most checks run (two hidden layers when ``max_layers`` >= 3)."""
    n_in = max(1, min(n_in, info.max_fan_in))
    hidden = max(1, min(hidden, info.max_neurons_per_layer, info.max_fan_in))
    n_out = max(1, min(n_out, info.max_neurons_per_layer))
    layers = [_dense(n_in, hidden, 1.0, 3.0)]
    if info.max_layers >= 3:
        layers.append(_dense(hidden, hidden, 3.0, 5.0))
    last = layers[-1]
    layers.append(_dense(hidden, n_out, last.t_min, last.t_max, kind="readout"))
    return NetworkSpec(input_shape=(n_in,), t_max0=1.0, layers=tuple(layers))


def probe_spec(info: DeviceInfo, neurons: int = 8, t_min: float = 1.0,
               t_max: float = 3.0) -> NetworkSpec:
    """One input -> ``neurons`` neurons (one synapse each) -> a readout of 2: the
    single-synapse network of the transfer-curve measurements."""
    n = max(1, min(neurons, info.max_neurons_per_layer))
    return NetworkSpec(input_shape=(1,), t_max0=1.0, layers=(
        _dense(1, n, t_min, t_max), _dense(n, min(2, info.max_neurons_per_layer), t_min, t_max,
                                            kind="readout")))


def tiny_spec() -> NetworkSpec:
    """1 input -> 1 neuron -> readout of 1 (batch-limit checks: cheap per sample)."""
    return NetworkSpec(input_shape=(1,), t_max0=1.0, layers=(
        _dense(1, 1, 1.0, 3.0), _dense(1, 1, 1.0, 3.0, kind="readout")))


def suite_params(spec: NetworkSpec, info: DeviceInfo, seed: int = 0):
    """Random codes over the device's whole code range and thresholds that make a good share of
    neurons fire: ``({layer: (codes, scale)}, {layer: thresholds})``."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = code_range(info)
    weights, thresholds = {}, {}
    for i, l in enumerate(spec.layers):
        if not l.weight_shape:
            continue
        codes = torch.randint(lo, hi + 1, l.weight_shape, generator=g, dtype=torch.int64)
        weights[i] = (codes, 0.5 / hi)
        width = float(l.t_max - l.t_min)
        if l.kind in NEURON_KINDS:
            thresholds[i] = width - 0.4 + torch.rand(l.out_shape, generator=g, dtype=F64) * 0.6
        else:  # readout offsets
            thresholds[i] = torch.rand(l.out_shape, generator=g, dtype=F64) - 0.5
    return weights, thresholds


def grid_inputs(spec: NetworkSpec, batch: int, seed: int = 0, step: float = 1.0 / 64,
                silent_frac: float = 0.2) -> torch.Tensor:
    """Input spike times on a ``step`` grid in [t_max0 - 1, t_max0), some silent (+inf)."""
    g = torch.Generator().manual_seed(seed)
    n = int(math.prod(spec.input_shape))
    k = torch.randint(0, int(round(1 / step)), (batch, n), generator=g)
    t = spec.t_max0 - 1.0 + k.to(F64) * step
    t[torch.rand(batch, n, generator=g) < silent_frac] = INF
    return t.reshape(batch, *spec.input_shape)


def program(dev: TTFSDevice, spec: NetworkSpec, weights: dict, thresholds: dict) -> None:
    """Program ``spec`` and write every layer's codes and thresholds."""
    dev.program(spec)
    for i, (codes, scale) in weights.items():
        dev.write_weights(i, codes, scale)
    for i, t in thresholds.items():
        dev.write_thresholds(i, t)


def stage_windows(spec: NetworkSpec) -> list[Optional[tuple[float, float]]]:
    """(t_min, t_max) of every spiking stage of a record: None for the input, the layer's window
    for a neuron layer, the window of the neuron layer in front for a pooling layer."""
    out: list[Optional[tuple[float, float]]] = [None]
    last = None
    for l in spec.layers:
        if l.kind in NEURON_KINDS:
            last = (float(l.t_min), float(l.t_max))
        if l.kind in STAGE_KINDS:
            out.append(last)
    return out


def _fields(rec: DeviceRecord):
    yield from (("spike_times", i, t) for i, t in enumerate(rec.spike_times))
    yield "readout", 0, rec.readout
    yield from (("v_tmax", i, t) for i, t in enumerate(rec.v_tmax))
    yield "spike_counts", 0, rec.spike_counts
    if rec.energy_j is not None:
        yield "energy_j", 0, rec.energy_j


def record_diff(a: DeviceRecord, b: DeviceRecord) -> Optional[str]:
    """None when two records are bit for bit equal, else the first field that differs."""
    fa, fb = list(_fields(a)), list(_fields(b))
    if len(fa) != len(fb) or a.neurons_per_layer != b.neurons_per_layer:
        return "structure (number of stages, layers or energy presence)"
    for (name, i, x), (_, _, y) in zip(fa, fb):
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        if x.shape != y.shape:
            return f"{name}[{i}] shape {tuple(x.shape)} vs {tuple(y.shape)}"
        if not torch.equal(x, y):
            both = torch.isfinite(x) & torch.isfinite(y) if x.is_floating_point() else None
            if both is not None and bool(both.any()):
                d = float((x.double() - y.double())[both].abs().max())
            else:
                d = float("nan")
            n = int((x != y).sum())
            return f"{name}[{i}]: {n} values differ (max |diff| {d:.3g})"
    return None


def records_equal(a: DeviceRecord, b: DeviceRecord) -> bool:
    return record_diff(a, b) is None


def cat_records(recs: list[DeviceRecord]) -> DeviceRecord:
    """Concatenate records of consecutive batches along the batch dimension."""
    r0 = recs[0]
    energy = None if r0.energy_j is None else torch.cat([r.energy_j for r in recs])
    return DeviceRecord(
        spike_times=[torch.cat([r.spike_times[i] for r in recs]) for i in range(len(r0.spike_times))],
        readout=torch.cat([r.readout for r in recs]),
        v_tmax=[torch.cat([r.v_tmax[i] for r in recs]) for i in range(len(r0.v_tmax))],
        spike_counts=torch.cat([r.spike_counts for r in recs]),
        neurons_per_layer=list(r0.neurons_per_layer), energy_j=energy, meta=dict(r0.meta))
