"""Fitting the circuit model to probe measurements; :func:`calibrate_device` runs it all.

Model identified per neuron i of a dense/conv2d layer (time after t_min, window width w,
programmed threshold theta_i and weights W_ij, input activations x_j = t_min - t_j clamped):

    t_i - t_min = d_i + s_i (theta_i + o_i w) - sum_j k_ij W_ij x_j  (+ random jitter)

* s_i: slope, tau_c per potential unit in the window (1 / B_i; emulator: c_i / r_i);
* d_i: delay, tau_c (emulator: comparator delay deviation);
* o_i: threshold offset relative to w (emulator: comparator offset; a fixed voltage, so a
  fixed fraction of the base threshold);
* k_ij: input gain, tau_c per potential unit per tau_c of input (emulator: g_ij / r_i).

Readout k: ``readout_k = sum_j rho_kj W_kj x_j + q_k offset_k`` (emulator: rho = g / c,
q = 1 / c). Only these combinations are identifiable from spike times: c_i and r_i, for
instance, enter only through s_i = c_i / r_i and k_ij = g_ij / r_i (docs/calibration.md).

Estimators:

* threshold sweep (zero weights, L levels x several widths, R repeats per level): per neuron,
  least squares of the repeat means on (1, theta, w) -> d, s, s o; repeat variance -> jitter;
* synapse probes: least squares of the probed layer's spike times (or readout values) on the
  measured input activations, with an intercept -> k_ij (rho_kj);
* time grid (K steps per window, ceil registration): means are corrected by -dt/2 (uniform
  phases, see :func:`sweep_levels`), and the jitter SD is found by inverting the expected
  variance of a ceil-quantised Gaussian (:func:`quantised_variance`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from pydantic import ValidationError

from hwloop.calibrate.probes import (F64, Prober, activations_in, one_hot_inputs,
                                     k_hot_inputs, relay_codes, silent_inputs, stage_of,
                                     sweep_levels, with_widths)
from hwloop.calibrate.record import (FACTOR_RANGE, OFFSET_RANGE, SE_MARGIN, SYNAPSE_RANGE, Array,
                                     CalibrationRecord, LayerCalibration,
                                     describe_validation_error, mismatch_digest)
from hwloop.devices.base import NEURON_KINDS, NetworkSpec, TTFSDevice, check_fits
from hwloop.errors import CalibrationError
from hwloop.mapping import network_to_spec
from hwloop.ttfs import convert
from hwloop.ttfs.architectures import build_relu

__all__ = ["CalibrationOptions", "calibrate_device", "fit_sweep", "jitter_from_repeats",
           "quantised_variance", "invert_quantised_variance", "METHOD", "METHOD_VERSION"]

METHOD = "threshold-sweep+synapse-probes"
METHOD_VERSION = "1"


@dataclass
class CalibrationOptions:
    """Knobs of :func:`calibrate_device` (defaults: docs/calibration.md)."""

    repeats: int = 16
    levels: int = 12
    #: window widths (tau_c) of the threshold sweep; >= 2 to separate delay and offset
    widths: Sequence[float] = (2.0, 8.0, 32.0)
    #: window width (tau_c) of every layer during synapse probes
    synapse_width: float = 8.0
    synapse_gains: bool = True
    #: samples per input feature for the deeper-layer synapse fits
    samples_per_input: float = 12.0
    #: active neurons per pattern wanted in the stage feeding a deeper probed layer
    active_inputs: float = 3.0
    seed: int = 0
    verify: bool = True
    log: Optional[object] = None  # callable(str)


# ---------------------------------------------------------------------- time grid statistics
def _phi(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.erfc(-z / math.sqrt(2.0))


def quantised_variance(rho: float, n_phase: int = 256) -> float:
    """E_u Var(ceil(u + rho Z)) for u ~ U(0, 1), Z ~ N(0, 1): the expected variance, in ticks^2,
    of repeats of a spike time registered at the next tick when the jitter SD is ``rho`` ticks
    and the phase within a tick is uniform."""
    if rho <= 0:
        return 0.0
    u = (torch.arange(n_phase, dtype=F64) + 0.5) / n_phase
    kmax = int(math.ceil(8 * rho)) + 2
    k = torch.arange(-kmax, kmax + 2, dtype=F64)
    p = _phi((k[None, :] - u[:, None]) / rho) - _phi((k[None, :] - 1 - u[:, None]) / rho)
    m1 = (p * k).sum(1)
    m2 = (p * k * k).sum(1)
    return float((m2 - m1 * m1).mean())


_RHO_TABLE_MAX = 4.0


@functools.lru_cache(maxsize=1)
def _variance_table() -> tuple[torch.Tensor, torch.Tensor]:
    """(rho, E Var) on a log grid of rho in [1e-3, 4] ticks, computed in one batch."""
    rho = torch.logspace(-3, math.log10(_RHO_TABLE_MAX), 241, dtype=F64)
    u = (torch.arange(128, dtype=F64) + 0.5) / 128
    kmax = int(math.ceil(8 * _RHO_TABLE_MAX)) + 2
    k = torch.arange(-kmax, kmax + 2, dtype=F64)
    z = k[None, None, :] - u[None, :, None]                          # (1, U, K)
    p = _phi(z / rho[:, None, None]) - _phi((z - 1) / rho[:, None, None])
    m1, m2 = (p * k).sum(-1), (p * k * k).sum(-1)
    return rho, (m2 - m1 * m1).mean(-1)


def invert_quantised_variance(v: float) -> float:
    """The jitter SD in ticks whose :func:`quantised_variance` is ``v``: interpolated in a
    table up to 4 ticks, Sheppard's ``rho^2 + 1/12`` above."""
    if not v > 0:
        return 0.0
    rho, var = _variance_table()
    if v >= float(var[-1]):
        return math.sqrt(max(v - 1.0 / 12.0, float(rho[-1]) ** 2))
    if v <= float(var[0]):
        return float(rho[0]) * math.sqrt(v / float(var[0]))
    j = int(torch.searchsorted(var, torch.tensor([v], dtype=F64))[0])
    lv0, lv1 = math.log(float(var[j - 1])), math.log(float(var[j]))
    lr0, lr1 = math.log(float(rho[j - 1])), math.log(float(rho[j]))
    return math.exp(lr0 + (math.log(v) - lv0) * (lr1 - lr0) / (lv1 - lv0))


def jitter_from_repeats(times: torch.Tensor, dt: Optional[float] = None) -> tuple[float, float, int]:
    """Random jitter SD from repeats: ``times`` is ``(cells, R)`` (one cell = one neuron at one
    setting). Cells with a silent repeat are dropped. Returns (sd, standard error, dof).

    ``dt`` (time grid step): invert the expected variance of ceil-registered times."""
    ok = torch.isfinite(times).all(1)
    t = times[ok]
    if t.shape[0] == 0 or t.shape[1] < 2:
        return math.nan, math.nan, 0
    var = t.var(dim=1, unbiased=True)
    dof = int(t.shape[0] * (t.shape[1] - 1))
    pooled = float(var.mean())
    if dt:
        sd = dt * invert_quantised_variance(pooled / (dt * dt))
    else:
        sd = math.sqrt(max(pooled, 0.0))
    se = sd / math.sqrt(2.0 * max(dof, 1))
    return sd, se, dof


# ---------------------------------------------------------------------- sweep fit
def _fit_sweep_once(theta, w, t_rel, ok):
    M, n = theta.shape
    m = ok.to(F64)
    X = torch.stack([torch.ones_like(theta), theta, w], -1)      # (M, n, 3)
    Xm = X * m[..., None]
    A = torch.einsum("mnp,mnq->npq", Xm, X) + torch.eye(3, dtype=F64) * 1e-12
    b = torch.einsum("mnp,mn->np", Xm, torch.where(ok, t_rel, torch.zeros_like(t_rel)))
    sol = torch.linalg.solve(A, b)                                 # (n, 3)
    res = torch.where(ok, t_rel - (X * sol[None]).sum(-1), torch.zeros_like(t_rel))
    return sol, res


def fit_sweep(theta: torch.Tensor, width: torch.Tensor, t_rel: torch.Tensor,
              ok: torch.Tensor, noise: float = 0.0) -> dict[str, torch.Tensor]:
    """Per-neuron least squares of ``t_rel = d + s theta + (s o) w`` over settings.

    Two passes: settings whose residual exceeds 4 robust SDs (floored at 4 x ``noise``, the
    expected SD of a repeat mean) are dropped and the fit repeated. This removes the settings
    where the comparator was already above threshold at t_min (time clamped at d, independent
    of theta), which a large negative threshold offset causes at the lowest levels.

    Args:
        theta, t_rel, ok: ``(M, n)``: threshold written, mean spike time after t_min (already
            grid-corrected), usable mask, for M settings (levels x widths) and n neurons.
        width: ``(M,)`` window width of each setting.

    Returns dict of ``(n,)`` tensors: delay, slope, threshold_offset, residual_rms, n_used.
    """
    M, n = theta.shape
    w = width.to(F64)[:, None].expand(M, n)
    sol, res = _fit_sweep_once(theta, w, t_rel, ok)
    mad = torch.where(ok, res.abs(), torch.full_like(res, math.nan)).nanmedian(0).values
    tol = torch.clamp(4.0 * 1.4826 * torch.nan_to_num(mad, nan=0.0), min=4.0 * noise + 1e-9)
    ok2 = ok & (res.abs() <= tol[None, :])
    # keep the first pass where the second would leave too few settings
    enough = ok2.sum(0) >= 4
    ok2 = torch.where(enough[None, :], ok2, ok)
    sol, res = _fit_sweep_once(theta, w, t_rel, ok2)
    n_used = ok2.to(F64).sum(0)
    bad = n_used < 4
    d, s, so = sol[:, 0], sol[:, 1], sol[:, 2]
    rms = torch.sqrt((res * res).sum(0) / (n_used - 3).clamp(min=1))
    s_safe = torch.where(s.abs() > 1e-9, s, torch.ones_like(s))
    o = so / s_safe
    d, s, o, rms = (torch.where(bad, torch.full_like(v, math.nan), v) for v in (d, s, o, rms))
    return {"delay": d, "slope": s, "threshold_offset": o, "residual_rms": rms, "n_used": n_used,
            "dropped": (ok & ~ok2).to(F64).sum(0)}


def _lstsq_with_intercept(X: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Y ~ b + X K^T. Returns (K (n_out, n_in), b (n_out,), residuals (S, n_out))."""
    S = X.shape[0]
    Xa = torch.cat([torch.ones(S, 1, dtype=F64), X], 1)
    sol = torch.linalg.lstsq(Xa, Y, driver="gelsd").solution     # (n_in + 1, n_out)
    res = Y - Xa @ sol
    return sol[1:].T.contiguous(), sol[0].clone(), res


# ---------------------------------------------------------------------- the procedure
def _say(opts: CalibrationOptions, msg: str) -> None:
    if opts.log is not None:
        opts.log(msg)


@contextlib.contextmanager
def _fitted(device_id: str, what: str, prefix: tuple = ()) -> Iterator[None]:
    """Turn a value the record's models refuse (out of range, not finite) into a
    :class:`CalibrationError` naming the device, the layer and the field."""
    try:
        yield
    except ValidationError as exc:
        raise CalibrationError(f"calibration of {device_id}, {what}: the fit gave a value a record "
                               f"does not allow: {describe_validation_error(exc, prefix=prefix)} "
                               "(a failed fit or a circuit the model cannot compensate; see "
                               "docs/calibration.md)") from None


def _ids(mask: torch.Tensor, most: int = 8) -> str:
    idx = torch.nonzero(mask.flatten()).flatten().tolist()
    return ", ".join(map(str, idx[:most])) + (f", ... ({len(idx)} in all)" if len(idx) > most else "")


def _to_median(values: dict[str, torch.Tensor], bad: torch.Tensor, what: str, layer: str) -> str:
    """Set the ``bad`` neurons of every tensor in ``values`` (flat, in place) to the median of the
    others: a fit the record would refuse (docs/calibration.md, "What a record must satisfy") is
    a failed fit, and the neuron is then treated as a typical one. Returns the note."""
    good = ~bad
    if not bool(good.any()):
        raise CalibrationError(f"{layer}: every neuron's {what} fit is outside the allowed range; "
                               "the chip does not follow the model (docs/calibration.md)")
    for v in values.values():
        v[bad] = v[good].median()
    n = int(bad.sum())
    return (f"{n} neuron{'s' if n > 1 else ''} ({_ids(bad)}): {what} fit outside the allowed range, "
            f"set to the layer median ({', '.join(values)}): not compensated individually")


def _grid_dt(K: Optional[int], width: float) -> Optional[float]:
    return None if not K else float(width) / float(K)


def calibrate_device(device: TTFSDevice, spec: NetworkSpec, options: Optional[CalibrationOptions] = None,
                     arch: Optional[str] = None, chip_seed: Optional[int] = None) -> CalibrationRecord:
    """Calibrate ``device`` for the topology of ``spec`` (its windows are ignored).

    Leaves the device programmed with the last probe (reprogram the network afterwards).

    Raises:
        DeviceLimitError: the topology does not fit the device.
        CalibrationError: a fit failed (too few usable measurements, named by layer).
    """
    opts = options or CalibrationOptions()
    if len(opts.widths) < 2:
        raise CalibrationError("the threshold sweep needs at least two window widths to separate "
                               "the delay from the threshold offset")
    t0 = time.time()
    pr = Prober(device, verify=opts.verify)
    info = pr.info
    K = info.time_steps_per_layer
    gen = torch.Generator().manual_seed(int(opts.seed))
    neuron_idx = spec.neuron_layers()
    readout_idx = [i for i, l in enumerate(spec.layers) if l.kind == "readout"]
    check_fits(with_widths(spec, [float(opts.widths[0])] * len(neuron_idx)), info)
    R, L = int(opts.repeats), int(opts.levels)
    if R < 2 or L < 3:
        raise CalibrationError(f"need repeats >= 2 and levels >= 3, got {R}, {L}")
    stage = stage_of(spec)

    # ---------------------------------------------------------------- 1. threshold sweep
    fracs = {i: sweep_levels(L * len(opts.widths), spec.layers[i].n_neurons, gen) for i in neuron_idx}
    thetas = {i: [] for i in neuron_idx}
    means = {i: [] for i in neuron_idx}
    oks = {i: [] for i in neuron_idx}
    reps = {i: [] for i in neuron_idx}
    widths_m: list[float] = []
    ro_off, ro_val = {i: [] for i in readout_idx}, {i: [] for i in readout_idx}
    silent = silent_inputs(R, spec)
    m = 0
    for w in opts.widths:
        w = float(w)
        sw = with_widths(spec, [w] * len(neuron_idx))
        pr.program(sw)  # weights zero: V(t_min) = 0 whatever the input
        dt = _grid_dt(K, w)
        for _ in range(L):
            for i in neuron_idx:
                th = (fracs[i][m] * w).reshape(spec.layers[i].out_shape)
                pr.write_thresholds(i, th)
                thetas[i].append(th.flatten())
            for k, i in enumerate(readout_idx):
                off = (torch.rand(spec.layers[i].out_shape, generator=gen, dtype=F64) * 2 - 1) * w
                pr.write_thresholds(i, off)
                ro_off[i].append(off.flatten())
            stages, readout = pr.run(silent)
            for i in neuron_idx:
                t = stages[stage[i]].flatten(1)                    # (R, n)
                t_rel = t - float(sw.layers[i].t_min)
                if dt:
                    t_rel = t_rel - 0.5 * dt
                fin = torch.isfinite(t_rel).all(0)
                means[i].append(torch.where(fin, t_rel.mean(0), torch.zeros_like(fin, dtype=F64)))
                oks[i].append(fin)
                reps[i].append(t.T.clone())                          # (n, R)
            for i in readout_idx:
                ro_val[i].append(readout.mean(0).flatten())
            widths_m.append(w)
            m += 1
    _say(opts, f"threshold sweep: {m} settings x {R} repeats, {pr.count.runs} runs")

    # jitter: pooled within-cell variance of the repeats (per width: its own time grid)
    jit_sd, jit_se, jit_dof = [], [], []
    by_width: dict[float, list[torch.Tensor]] = {}
    for i in neuron_idx:
        for mm, r in enumerate(reps[i]):
            by_width.setdefault(widths_m[mm], []).append(r)
    for w, cells in by_width.items():
        sd, se, dof = jitter_from_repeats(torch.cat(cells, 0), _grid_dt(K, w))
        if dof > 0 and math.isfinite(sd):
            jit_sd.append(sd), jit_se.append(se), jit_dof.append(dof)
    if jit_sd:
        wts = torch.tensor(jit_dof, dtype=F64)
        jitter = float((torch.tensor(jit_sd, dtype=F64) * wts).sum() / wts.sum())
        jitter_se = float(torch.sqrt((torch.tensor(jit_se, dtype=F64) ** 2 * wts ** 2).sum()) / wts.sum())
    else:
        jitter, jitter_se = math.nan, math.nan

    layers: dict[int, LayerCalibration] = {}
    width_t = torch.tensor(widths_m, dtype=F64)
    for i in neuron_idx:
        l = spec.layers[i]
        noise = (jitter if math.isfinite(jitter) else 0.0) / math.sqrt(R)
        f = fit_sweep(torch.stack(thetas[i]), width_t, torch.stack(means[i]), torch.stack(oks[i]), noise)
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
        with _fitted(info.device_id, f"layer {i} ({l.kind}), threshold sweep"):
            layers[i] = LayerCalibration(
                index=i, kind=l.kind, in_shape=l.in_shape, out_shape=l.out_shape,
                weight_shape=l.weight_shape, slope=f["slope"].tolist(), delay=f["delay"].tolist(),
                threshold_offset=f["threshold_offset"].tolist(),
                residual_rms={"sweep": float(torch.sqrt((f["residual_rms"] ** 2).mean()))},
                notes=notes)
    for i in readout_idx:
        l = spec.layers[i]
        off, val = torch.stack(ro_off[i]), torch.stack(ro_val[i])   # (M, n)
        q = (off * val).sum(0) / (off * off).sum(0)
        res = val - off * q
        notes = []
        out = ~((q >= FACTOR_RANGE[0]) & (q <= FACTOR_RANGE[1]))
        if bool(out.any()):
            notes.append(_to_median({"offset_gain": q}, out, "offset gain", f"layer {i} ({l.kind})"))
        with _fitted(info.device_id, f"layer {i} ({l.kind}), offset sweep"):
            layers[i] = LayerCalibration(
                index=i, kind=l.kind, in_shape=l.in_shape, out_shape=l.out_shape,
                weight_shape=l.weight_shape, offset_gain=q.tolist(),
                residual_rms={"offset": float(res.pow(2).mean().sqrt())}, notes=notes)

    # ---------------------------------------------------------------- 2./3. synapse probes
    if opts.synapse_gains:
        fc_prefix_ok = True
        prev_neuron: list[int] = []
        for i, l in enumerate(spec.layers):
            if l.kind in ("conv2d", "maxpool2d"):
                fc_prefix_ok = False
            if l.kind in ("dense", "readout"):
                if fc_prefix_ok:
                    _probe_synapses(pr, spec, i, prev_neuron, layers, opts, gen)
                else:
                    layers[i].notes.append("synapse gains not identified: a conv/pool layer lies "
                                           "between the input and this layer")
            if l.kind in NEURON_KINDS:
                prev_neuron.append(i)
        _say(opts, f"synapse probes done: {pr.count.runs} runs in total")

    from hwloop import __version__ as hv  # late: avoids an import cycle at package import
    prof = getattr(device, "profile", None)
    with _fitted(info.device_id, "the record"):
        rec = CalibrationRecord(
            device_id=info.device_id, firmware_version=info.firmware_version,
            profile=getattr(prof, "name", None), method=METHOD, method_version=METHOD_VERSION,
            hwloop_version=str(hv), arch=arch, input_shape=tuple(spec.input_shape),
            t_max0=float(spec.t_max0), time_steps_per_layer=K, weight_bits=int(info.weight_bits),
            probe_widths=[float(w) for w in opts.widths], repeats=R, levels=L,
            layers=[layers[i] for i in sorted(layers)], jitter_sd=jitter, jitter_sd_se=jitter_se,
            jitter_method=("repeat variance" if not K else
                           "repeat variance of ceil-registered times, inverted (uniform phase)"),
            device_runs=pr.count.runs, samples=pr.count.samples, programs=pr.count.programs,
            writes=pr.count.writes, wall_time_s=round(time.time() - t0, 3),
            chip_seed=chip_seed if chip_seed is not None else getattr(device, "chip_seed", None),
            mismatch_sha256=mismatch_digest(device))
    return rec


def _neuron_params(lc: LayerCalibration, w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_i(w), s_i) flat: intercept d + s o w and slope at window width w."""
    s = torch.tensor(lc.slope, dtype=F64)
    a = torch.tensor(lc.delay, dtype=F64) + s * torch.tensor(lc.threshold_offset, dtype=F64) * w
    return a, s


def _probe_synapses(pr: Prober, spec: NetworkSpec, n: int, prev: list[int],
                    layers: dict[int, LayerCalibration], opts: CalibrationOptions,
                    gen: torch.Generator) -> None:
    """Per-synapse gains of dense layer (or readout) ``n``; ``prev``: the neuron layers before it
    (all dense), programmed as scramblers when there are any."""
    w = float(opts.synapse_width)
    neuron_idx = spec.neuron_layers()
    sp = with_widths(spec, [w] * len(neuron_idx))
    layer = sp.layers[n]
    stage = stage_of(sp)
    R = int(opts.repeats)
    code = pr.code_max
    pr.program(sp)
    if not prev:
        t_in = torch.cat([one_hot_inputs(sp, 1.0).repeat(R, *([1] * len(sp.input_shape))),
                          silent_inputs(R, sp)], 0)
    else:
        # relays: every earlier layer passes a sparse input pattern on (each neuron fed by one
        # random input, two if the layer is wider than its input); with the calibrated slope
        # and offset, theta_eff = 1.1 w: a neuron fires when its input exceeds 0.1 w
        x_typ = 0.65  # mean of U(0.3, 1) input intensities
        keep_frac = 1.0
        for m in prev:
            lm = sp.layers[m]
            n_o, n_i = int(lm.weight_shape[0]), int(lm.weight_shape[1])
            pr.write_weights(m, relay_codes(n_o, n_i, code, gen), w / (x_typ * code))
            a, s = _neuron_params(layers[m], w)
            pr.write_thresholds(m, ((1.1 * w - a) / s).reshape(lm.out_shape))
            keep_frac *= n_o / n_i if n_o <= n_i else 2.0 * n_o / n_i  # active out per active in
            x_typ = 0.6 * w
        n_in = int(layer.weight_shape[1])
        n_input = int(math.prod(sp.input_shape))
        k_in = max(1, int(round(opts.active_inputs / max(keep_frac, 1e-6))))
        k_in = min(k_in, n_input)
        S = max(int(opts.samples_per_input * n_in), 256)
        t_in = torch.cat([k_hot_inputs(S, sp, k_in, gen), silent_inputs(R, sp)], 0)
    feed = stage[n] - 1 if layer.kind == "dense" else stage[n]
    # the probed layer: base time 0.85 w (calibrated), all synapses one code
    if layer.kind == "dense":
        a, s = _neuron_params(layers[n], w)
        pr.write_thresholds(n, ((0.9 * w - a) / s).reshape(layer.out_shape))
    # pre-run with the probed layer's weights at zero: the size of its inputs
    stages, _ = pr.run(t_in)
    X0 = activations_in(sp, n, stages[feed])
    tot = X0.sum(1)
    xmax = float(torch.quantile(tot, 0.99)) if tot.numel() > 1 else float(tot.max())
    if xmax <= 0:
        raise CalibrationError(f"layer {n}: the probe produced no input activity")
    target = 0.5 * w if layer.kind == "dense" else 1.0
    scale = target / (code * xmax)
    pr.write_weights(n, torch.full(tuple(layer.weight_shape), code, dtype=torch.int64), scale)
    stages, readout = pr.run(t_in)
    X = activations_in(sp, n, stages[feed])
    W0 = code * scale
    if layer.kind == "dense":
        T = stages[stage[n]].flatten(1)
        t_rel = T - float(sp.layers[n].t_min)
        # usable: the neuron fired and not at the very start (a potential above threshold at
        # t_min would be clamped there); judged per neuron
        valid = torch.isfinite(T) & (t_rel > 0.02 * w)
        Y = -torch.where(valid, t_rel, torch.zeros_like(t_rel))  # y = -t_rel = -b + W0 sum k x
    else:
        Y = readout.flatten(1)
        valid = torch.ones_like(Y, dtype=torch.bool)
    Xk = X * W0
    good = valid.all(0)                                 # neurons usable on every sample
    if float(good.to(F64).mean()) < 0.5:
        raise CalibrationError(f"layer {n}: {int((~good).sum())} of {good.numel()} neurons were "
                               "silent or saturated in some synapse probes")
    n_out, n_in = Y.shape[1], Xk.shape[1]
    Kmat = torch.empty(n_out, n_in, dtype=F64)
    Kg, _, res = _lstsq_with_intercept(Xk, Y[:, good])
    Kmat[good] = Kg
    used, p = Xk.shape[0], n_in + 1
    sig = float(torch.sqrt((res * res).sum() / (res.shape[1] * max(used - p, 1))))
    Xc = Xk - Xk.mean(0, keepdim=True)
    ss = (Xc * Xc).sum(0)
    se = float(sig / torch.sqrt(ss[ss > 0]).mean()) if bool((ss > 0).any()) else math.nan
    lc = layers[n]
    partial = 0
    for i in torch.nonzero(~good).flatten().tolist():
        rows = valid[:, i]
        Xi = Xk[rows]
        ssi = ((Xi - Xi.mean(0, keepdim=True)) ** 2).sum(0)
        if int(rows.sum()) > n_in + 8 and bool((ssi > 0).all()):
            Ki, _, _ = _lstsq_with_intercept(Xi, Y[rows, i:i + 1])
            Kmat[i] = Ki[0]
        else:  # too few usable probes for every synapse: one gain for the whole row
            Ki, _, _ = _lstsq_with_intercept(Xi.sum(1, keepdim=True), Y[rows, i:i + 1])
            Kmat[i] = float(Ki[0, 0])
            partial += 1
    if int((~good).sum()):
        lc.notes.append(f"{int((~good).sum())} neurons fitted on part of the probes; {partial} of them "
                        "with one gain per row")
    lc = layers[n]
    inactive = ss <= 0
    if bool(inactive.any()):
        lc.notes.append(f"{int(inactive.sum())} inputs never active in the probes: their gains "
                        "were set to the row mean")
        row = Kmat[:, ~inactive].mean(1, keepdim=True)
        Kmat = torch.where(inactive[None, :], row.expand_as(Kmat), Kmat)
    # estimates a record refuses (docs/calibration.md) are failed fits: a synapse outside its
    # range gets its row's mean over the others, a row whose mean is outside the per-neuron
    # range (or has no usable synapse) the layer's median row gain
    m = SE_MARGIN * se if math.isfinite(se) else 0.0
    out = ~((Kmat >= SYNAPSE_RANGE[0] - m) & (Kmat <= SYNAPSE_RANGE[1] + m))
    if bool(out.any()):
        keep = (~out).to(F64)
        row = (Kmat.nan_to_num(0.0) * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True)
        Kmat = torch.where(out, row.expand_as(Kmat), Kmat)
        lc.notes.append(f"{int(out.sum())} synapse gains outside [{SYNAPSE_RANGE[0]:g}, "
                        f"{SYNAPSE_RANGE[1]:g}] (+- {m:.3g}) in rows {_ids(out.any(1))}: set to their "
                        "row mean over the others")
    rows = Kmat.mean(1)
    badrow = ~((rows >= FACTOR_RANGE[0]) & (rows <= FACTOR_RANGE[1]))
    if bool(badrow.any()):
        fill = {"gain": rows.clone()}
        lc.notes.append(_to_median(fill, badrow, "synapse-gain", f"layer {n} ({layer.kind})"))
        Kmat[badrow] = fill["gain"][badrow][:, None]
    with _fitted(pr.info.device_id, f"layer {n} ({layer.kind}), synapse probes",
                 prefix=("synapse_gain",)):
        lc.synapse_gain = Array.from_tensor(Kmat.reshape(layer.weight_shape))
    lc.synapse_gain_se = se if math.isfinite(se) else None  # None: not resolved
    lc.gain = Kmat.mean(1).tolist()
    lc.residual_rms["synapse"] = sig


# ---------------------------------------------------------------------- topology and CLI entry
#: dataset -> (input shape, classes) for the topology to calibrate; "synthetic" is the small
#: task of hwloop.train.finetune.load_data
DATASET_SHAPES = {"fashion-mnist": ((1, 28, 28), 10), "mnist": ((1, 28, 28), 10),
                  "synthetic": ((1, 12, 12), 4)}


def spec_for_arch(arch: str, dataset: str = "fashion-mnist") -> NetworkSpec:
    """The topology (layer kinds and shapes) of ``arch`` on ``dataset``'s input shape. Windows
    are placeholders: calibration chooses its own, and the record is valid at any window."""
    if dataset not in DATASET_SHAPES:
        raise CalibrationError(f"unknown dataset {dataset!r}; known: {sorted(DATASET_SHAPES)}")
    shape, classes = DATASET_SHAPES[dataset]
    try:
        relu = build_relu(arch, shape, classes)
    except ValueError as exc:
        raise CalibrationError(str(exc)) from None
    probe = torch.rand(4, *shape, generator=torch.Generator().manual_seed(0))
    return network_to_spec(convert(relu.eval(), probe))


def default_record_path(device_id: str, folder: str = "calibration") -> str:
    """``calibration/<device-id>.json`` (characters other than [A-Za-z0-9._-] become '_')."""
    return f"{folder}/{re.sub(r'[^A-Za-z0-9._-]', '_', device_id)}.json"
