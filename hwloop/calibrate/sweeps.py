"""Step 1 of :func:`~hwloop.calibrate.fit.calibrate_device`: the threshold sweep (zero weights,
L levels x several widths, R repeats per level), the random jitter from its repeats, and the
per-layer fits of slope / delay / threshold offset (neuron layers) and offset gain (readouts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from hwloop.calibrate.estimators import fit_sweep, jitter_from_repeats
from hwloop.calibrate.options import CalibrationOptions, _fitted, _grid_dt, _to_median
from hwloop.calibrate.probes import F64, Prober, silent_inputs, stage_of, sweep_levels, with_widths
from hwloop.calibrate.record import LayerCalibration
from hwloop.calibrate.validate import FACTOR_RANGE, OFFSET_RANGE
from hwloop.devices.base import NetworkSpec
from hwloop.errors import CalibrationError

__all__ = ["SweepData", "fit_neuron_layer", "fit_readout_offsets", "pool_jitter",
           "run_threshold_sweep"]


@dataclass
class SweepData:
    """What the threshold sweep measured, one entry per setting (level x width) per layer."""

    neuron_idx: list[int]
    readout_idx: list[int]
    thetas: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    means: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    oks: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    reps: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    widths_m: list[float] = field(default_factory=list)
    ro_off: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    ro_val: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for d, idx in ((self.thetas, self.neuron_idx), (self.means, self.neuron_idx),
                       (self.oks, self.neuron_idx), (self.reps, self.neuron_idx),
                       (self.ro_off, self.readout_idx), (self.ro_val, self.readout_idx)):
            for i in idx:
                d.setdefault(i, [])


def _write_setting(pr: Prober, spec: NetworkSpec, data: SweepData, fracs: dict[int, torch.Tensor],
                   m: int, w: float, gen: torch.Generator) -> None:
    """Thresholds of setting ``m`` (neuron layers) and random offsets (readouts)."""
    for i in data.neuron_idx:
        th = (fracs[i][m] * w).reshape(spec.layers[i].out_shape)
        pr.write_thresholds(i, th)
        data.thetas[i].append(th.flatten())
    for i in data.readout_idx:
        off = (torch.rand(spec.layers[i].out_shape, generator=gen, dtype=F64) * 2 - 1) * w
        pr.write_thresholds(i, off)
        data.ro_off[i].append(off.flatten())


def _collect_setting(data: SweepData, sw: NetworkSpec, stage: dict[int, int], stages, readout,
                     dt: Optional[float], w: float) -> None:
    """Repeat means (grid-corrected), usable masks and repeats of one setting."""
    for i in data.neuron_idx:
        t = stages[stage[i]].flatten(1)                    # (R, n)
        t_rel = t - float(sw.layers[i].t_min)
        if dt:
            t_rel = t_rel - 0.5 * dt
        fin = torch.isfinite(t_rel).all(0)
        data.means[i].append(torch.where(fin, t_rel.mean(0), torch.zeros_like(fin, dtype=F64)))
        data.oks[i].append(fin)
        data.reps[i].append(t.T.clone())                          # (n, R)
    for i in data.readout_idx:
        data.ro_val[i].append(readout.mean(0).flatten())
    data.widths_m.append(w)


def run_threshold_sweep(pr: Prober, spec: NetworkSpec, opts: CalibrationOptions,
                        gen: torch.Generator) -> SweepData:
    """Every width, every level: program zero weights, write thresholds, run silent inputs."""
    K = pr.info.time_steps_per_layer
    R, L = int(opts.repeats), int(opts.levels)
    neuron_idx = spec.neuron_layers()
    readout_idx = [i for i, l in enumerate(spec.layers) if l.kind == "readout"]
    stage = stage_of(spec)
    fracs = {i: sweep_levels(L * len(opts.widths), spec.layers[i].n_neurons, gen) for i in neuron_idx}
    data = SweepData(neuron_idx, readout_idx)
    silent = silent_inputs(R, spec)
    m = 0
    for w in opts.widths:
        w = float(w)
        sw = with_widths(spec, [w] * len(neuron_idx))
        pr.program(sw)  # weights zero: V(t_min) = 0 whatever the input
        dt = _grid_dt(K, w)
        for _ in range(L):
            _write_setting(pr, spec, data, fracs, m, w, gen)
            stages, readout = pr.run(silent)
            _collect_setting(data, sw, stage, stages, readout, dt, w)
            m += 1
    return data


def pool_jitter(data: SweepData, K: Optional[int]) -> tuple[float, float]:
    """Jitter SD and its SE: pooled within-cell variance of the repeats (per width: its own time
    grid), the widths weighted by their degrees of freedom."""
    jit_sd, jit_se, jit_dof = [], [], []
    by_width: dict[float, list[torch.Tensor]] = {}
    for i in data.neuron_idx:
        for mm, r in enumerate(data.reps[i]):
            by_width.setdefault(data.widths_m[mm], []).append(r)
    for w, cells in by_width.items():
        sd, se, dof = jitter_from_repeats(torch.cat(cells, 0), _grid_dt(K, w))
        if dof > 0 and math.isfinite(sd):
            jit_sd.append(sd), jit_se.append(se), jit_dof.append(dof)
    if not jit_sd:
        return math.nan, math.nan
    wts = torch.tensor(jit_dof, dtype=F64)
    jitter = float((torch.tensor(jit_sd, dtype=F64) * wts).sum() / wts.sum())
    jitter_se = float(torch.sqrt((torch.tensor(jit_se, dtype=F64) ** 2 * wts ** 2).sum()) / wts.sum())
    return jitter, jitter_se


def fit_neuron_layer(spec: NetworkSpec, i: int, data: SweepData, jitter: float,
                     opts: CalibrationOptions, device_id: str) -> LayerCalibration:
    """Slope, delay and threshold offset of neuron layer ``i`` from the sweep."""
    l = spec.layers[i]
    width_t = torch.tensor(data.widths_m, dtype=F64)
    noise = (jitter if math.isfinite(jitter) else 0.0) / math.sqrt(int(opts.repeats))
    f = fit_sweep(torch.stack(data.thetas[i]), width_t, torch.stack(data.means[i]),
                  torch.stack(data.oks[i]), noise)
    bad = int(torch.isnan(f["slope"]).sum())
    if bad:
        raise CalibrationError(f"layer {i} ({l.kind}): {bad} neurons had fewer than 4 usable sweep "
                               "settings (silent or saturated); widen the probe widths")
    notes = []
    dropped = int((f["dropped"] > 0).sum())
    if dropped:
        notes.append(f"{dropped} neurons had sweep settings dropped as outliers (clamped at t_min)")
    sdo = {"slope": f["slope"], "delay": f["delay"], "threshold_offset": f["threshold_offset"]}
    wmax = max(float(w) for w in opts.widths)
    out = ((sdo["slope"] < FACTOR_RANGE[0]) | (sdo["slope"] > FACTOR_RANGE[1])
           | (sdo["threshold_offset"] < OFFSET_RANGE[0]) | (sdo["threshold_offset"] > OFFSET_RANGE[1])
           | (sdo["delay"].abs() > wmax))
    if bool(out.any()):
        notes.append(_to_median(sdo, out, "sweep", f"layer {i} ({l.kind})"))
    if l.kind == "conv2d":
        notes.append("conv2d: slope/delay/offset identified per neuron (output position); "
                     "synapse gains not identified; compensation applies the per-channel "
                     "mean threshold correction only")
    with _fitted(device_id, f"layer {i} ({l.kind}), threshold sweep"):
        return LayerCalibration(
            index=i, kind=l.kind, in_shape=l.in_shape, out_shape=l.out_shape,
            weight_shape=l.weight_shape, slope=f["slope"].tolist(), delay=f["delay"].tolist(),
            threshold_offset=f["threshold_offset"].tolist(),
            residual_rms={"sweep": float(torch.sqrt((f["residual_rms"] ** 2).mean()))},
            notes=notes)


def fit_readout_offsets(spec: NetworkSpec, i: int, data: SweepData,
                        device_id: str) -> LayerCalibration:
    """Offset gain q_k of readout ``i``: least squares through the origin over the sweep."""
    l = spec.layers[i]
    off, val = torch.stack(data.ro_off[i]), torch.stack(data.ro_val[i])   # (M, n)
    q = (off * val).sum(0) / (off * off).sum(0)
    res = val - off * q
    notes = []
    out = ~((q >= FACTOR_RANGE[0]) & (q <= FACTOR_RANGE[1]))
    if bool(out.any()):
        notes.append(_to_median({"offset_gain": q}, out, "offset gain", f"layer {i} ({l.kind})"))
    with _fitted(device_id, f"layer {i} ({l.kind}), offset sweep"):
        return LayerCalibration(
            index=i, kind=l.kind, in_shape=l.in_shape, out_shape=l.out_shape,
            weight_shape=l.weight_shape, offset_gain=q.tolist(),
            residual_rms={"offset": float(res.pow(2).mean().sqrt())}, notes=notes)
