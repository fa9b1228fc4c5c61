"""Conformance checks of running the chip: repeatability, replies, spike-time windows, silence,
batch limit, counts, energy, time units and seed noise. Each takes the
:class:`~hwloop.testing.checks_common.SuiteContext` and returns ``(detail, numbers)`` or raises
:class:`~hwloop.testing.checks_common.Fail` / :class:`~hwloop.testing.checks_common.Skip`."""

from __future__ import annotations

import math
import time

import torch

from hwloop.devices.base import NEURON_KINDS
from hwloop.errors import DeviceLimitError
from hwloop.testing.checks_common import (F64, INF, SLOPE_RANGE, STAT_TOL, Fail, Skip, SuiteContext, expect_raises,
                                          outside_windows, stat_ratio)
from hwloop.testing.nets import cat_records, code_range, grid_inputs, probe_spec, record_diff, tiny_spec


def check_run_repeatable(c: SuiteContext):
    base = c.baseline()
    c.setup()
    n, x, k = c.n, c.x, 7
    conds = {}
    conds["same input again"] = [c.run(x) for _ in range(n)]
    conds["batch split 7 + 9"] = [cat_records([c.run(x[:k]), c.run(x[k:])]) for _ in range(n)]
    after = []
    for _ in range(n):
        c.run(c.y)
        after.append(c.run(x))
    conds["after an unrelated batch"] = after
    c.setup()
    conds["after reprogramming"] = [c.run(x) for _ in range(n)]
    bad = {}
    for name, recs in conds.items():
        err = c.compare(recs, base)
        if err:
            bad[name] = err
    nums = {"conditions": list(conds), "runs_per_condition": n}
    if c.mode == "statistical":
        nums["ratios"] = {name: stat_ratio(recs, base, c.spec) for name, recs in conds.items()}
    if bad:
        raise Fail("; ".join(f"{k}: {v}" for k, v in bad.items()), **nums)
    how = "bit for bit" if c.mode == "exact" else f"within ratio <= {STAT_TOL} ({n} runs each)"
    return f"{len(conds)} conditions agree with the first run {how}", nums


def check_reply_matches_request(c: SuiteContext):
    c.setup()
    info = c.info
    dt_in = 1.0 / info.time_steps_per_layer if info.time_steps_per_layer else 0.0
    sigma = _input_jitter(c)
    tol = dt_in + 4 * sigma + c.tick + 1e-9
    worst = 0.0
    for j, b in enumerate((3, 5, 2, 4)):
        x = grid_inputs(c.spec, b, seed=c.seed + 20 + j, silent_frac=0.3)
        rec = c.run(x)
        if rec.batch_size != b or rec.spike_times[0].shape[0] != b:
            raise Fail(f"a batch of {b} got a record of {rec.batch_size} samples "
                       "(a reply to another request?)")
        seen = rec.spike_times[0].reshape(b, -1).to(F64)
        sent = x.reshape(b, -1)
        if bool((torch.isfinite(seen) & ~torch.isfinite(sent)).any()):
            raise Fail(f"run {j}: the record's input stage has spikes where the request had none "
                       "(a reply to another request?)")
        both = torch.isfinite(seen) & torch.isfinite(sent)
        if bool(both.any()):
            d = float((seen - sent)[both].abs().max())
            worst = max(worst, d)
            if d > tol:
                raise Fail(f"run {j}: input stage differs from the request by {d:.3g} tau_c > "
                           f"{tol:.3g} (quantisation + 4 sigma jitter + half a tick)",
                           max_input_diff=d, tolerance=tol)
    return f"4 runs of distinct sizes: each record matches its request (max input shift {worst:.3g} " \
           f"<= {tol:.3g} tau_c)", {"max_input_diff": worst, "tolerance": tol}


def _input_jitter(c: SuiteContext) -> float:
    """Standard deviation of the input stage over repeated runs of ``x`` (0 when exact)."""
    if c.mode == "exact":
        return 0.0
    t = torch.stack([r.spike_times[0].to(F64) for r in c.baseline()])
    fin = torch.isfinite(t).all(0)
    if not bool(fin.any()):
        return 0.0
    return float(t[:, fin].std(0).max())


def check_spike_times_in_windows(c: SuiteContext):
    recs = c.baseline()
    bad = outside_windows(recs, c.spec, c.tick)
    if bad:
        raise Fail(bad)
    fired = sum(int(torch.isfinite(t).sum()) for r in recs for t in r.spike_times[1:])
    if fired == 0:
        raise Fail("no neuron fired on the suite network (expected a good share)")
    return f"{fired} spikes, all inside [t_min, t_max) of their layer (tolerance {c.tick:.3g} tau_c)", \
        {"spikes": fired, "tolerance": c.tick}


def check_silent_is_silent(c: SuiteContext):
    spec = c.spec
    c.dev.program(spec)
    for i, l in enumerate(spec.layers):
        if l.weight_shape:
            c.dev.write_weights(i, torch.zeros(l.weight_shape, dtype=torch.int64), 0.5 / code_range(c.info)[1])
        if l.kind in NEURON_KINDS:  # unreachable: above the ramp's whole rise over the window
            c.dev.write_thresholds(i, torch.full(l.out_shape, 4.0 * (l.t_max - l.t_min), dtype=F64))
        elif l.kind == "readout":
            c.dev.write_thresholds(i, torch.zeros(l.out_shape, dtype=F64))
    for rep in range(c.n):
        rec = c.dev.run(c.x)
        for s, t in enumerate(rec.spike_times[1:], 1):
            if bool(torch.isfinite(t).any()):
                raise Fail(f"stage {s}: {int(torch.isfinite(t).sum())} spikes from neurons that "
                           "cannot reach their threshold (zero weights, threshold 4x the window)")
        if int(rec.spike_counts.sum()) != 0:
            raise Fail(f"spike counts {rec.spike_counts.sum().item()} on a silent network")
        if float(rec.readout.abs().max()) > 1e-9:
            raise Fail(f"readout {float(rec.readout.abs().max()):.3g} with zero weights and offsets")
        for li, v in enumerate(rec.v_tmax):
            if not bool((v > 0).all()):
                raise Fail(f"neuron layer {li}: V(t_max) of silent neurons must be the ramp's end "
                           f"(> 0); got min {float(v.min()):.3g}")
    c.setup()
    rec = c.dev.run(torch.full((4,) + tuple(spec.input_shape), INF, dtype=F64))
    if bool(torch.isfinite(rec.spike_times[0]).any()):
        raise Fail("silent inputs (+inf) came back as spikes in the input stage")
    return "unreachable thresholds give no spikes, zero counts and readout, V(t_max) > 0; silent " \
           "inputs stay silent", {}


def check_batch_limit(c: SuiteContext):
    spec = tiny_spec()
    c.dev.program(spec)
    c.dev.write_weights(0, torch.ones((1, 1), dtype=torch.int64), 0.5)
    c.dev.write_thresholds(0, torch.full((1,), 1.0, dtype=F64))
    mb = c.info.max_batch
    n_ok = min(mb, 4096)
    x = torch.zeros((n_ok, 1), dtype=F64)
    t0 = time.monotonic()
    rec = c.dev.run(x)
    took = time.monotonic() - t0
    if rec.batch_size != n_ok:
        raise Fail(f"a batch of {n_ok} returned {rec.batch_size} samples")
    nums = {"max_batch": mb, "ran": n_ok, "seconds": took}
    if mb > 65536:
        return f"ran {n_ok} samples; max_batch {mb} too large to exceed cheaply", nums
    msg = expect_raises(lambda: c.dev.run(torch.zeros((mb + 1, 1), dtype=F64)),
                  f"a batch of max_batch + 1 = {mb + 1}", DeviceLimitError)
    rec = c.dev.run(x[:2])
    if rec.batch_size != 2:
        raise Fail("the device does not run normally after refusing a batch")
    nums["message"] = msg
    return f"{n_ok} samples run; {mb + 1} refused with DeviceLimitError", nums


def check_counts_consistent(c: SuiteContext):
    c.baseline()
    recs = list(c.records)
    nl = c.spec.neuron_layers()
    want_n = [c.spec.layers[i].n_neurons for i in nl]
    stage_of = {}
    s = 1
    for i, l in enumerate(c.spec.layers):
        if l.kind in ("dense", "conv2d", "maxpool2d"):
            stage_of[i] = s
            s += 1
    checked = 0
    for rec in recs:
        b = rec.batch_size
        if list(rec.neurons_per_layer) != want_n:
            raise Fail(f"neurons_per_layer {rec.neurons_per_layer}, expected {want_n}")
        if tuple(rec.spike_counts.shape) != (b, len(nl)) or rec.spike_counts.dtype != torch.int64:
            raise Fail(f"spike_counts shape {tuple(rec.spike_counts.shape)} dtype "
                       f"{rec.spike_counts.dtype}, expected ({b}, {len(nl)}) int64")
        if len(rec.v_tmax) != len(nl):
            raise Fail(f"{len(rec.v_tmax)} v_tmax tensors, expected {len(nl)}")
        for j, i in enumerate(nl):
            t = rec.spike_times[stage_of[i]].reshape(b, -1)
            fired = torch.isfinite(t)
            n_fin = fired.sum(1)
            if not torch.equal(n_fin, rec.spike_counts[:, j]):
                k = int((n_fin != rec.spike_counts[:, j]).sum())
                raise Fail(f"neuron layer {j}: spike_counts disagree with the finite spike times in "
                           f"{k} of {b} samples (counted {rec.spike_counts[:, j].sum().item()}, "
                           f"times {n_fin.sum().item()}): a lost or invented spike",
                           samples=k)
            v = rec.v_tmax[j].reshape(b, -1)
            if bool((v[fired] != 0).any()):
                raise Fail(f"neuron layer {j}: V(t_max) is not 0 where the neuron fired")
        checked += b
    return f"counts = finite spike times and V(t_max) = 0 where fired, in {len(recs)} records " \
           f"({checked} samples)", {"records": len(recs), "samples": checked}


def check_energy_consistent(c: SuiteContext):
    recs = c.baseline()
    if recs[0].energy_j is None:
        return "the backend reports no energy (hwloop.energy computes it from the record)", {}
    nl = len(c.spec.neuron_layers())
    for rec in recs:
        e = rec.energy_j
        if tuple(e.shape) != (rec.batch_size, nl):
            raise Fail(f"energy_j shape {tuple(e.shape)}, expected ({rec.batch_size}, {nl})")
        if not bool(torch.isfinite(e).all()) or bool((e < 0).any()):
            raise Fail("energy_j has negative or non-finite values")
        if bool(((rec.spike_counts > 0) & (e <= 0)).any()):
            raise Fail("a layer that spiked reports zero energy")
    per_spike = float(sum(r.energy_j.sum() for r in recs) / max(1, sum(int(r.spike_counts.sum()) for r in recs)))
    return f"energy per sample and layer finite, >= 0, > 0 where spikes, shape (B, {nl})", \
        {"joules_per_spike_avg": per_spike}


def _sweep_slopes(c: SuiteContext, reps: int = 16):
    """Median per-neuron slopes dt/dtheta and dt/dW on the single-synapse probe network."""
    spec = probe_spec(c.info)
    n = spec.layers[0].n_neurons
    c.dev.program(spec)
    lo, hi = code_range(c.info)
    w_max = 0.6
    scale = w_max / hi
    x = torch.zeros((reps, 1), dtype=F64)  # one input at t_max0 - 1: V(t_min) = W (t_min - 0)

    def mean_times():
        ts = []
        for _ in range(1 if c.mode == "exact" else 2):
            ts.append(c.dev.run(x).spike_times[1].to(F64))
        t = torch.cat(ts)
        return torch.where(torch.isfinite(t).all(0), t.mean(0), torch.full((n,), math.nan, dtype=F64))

    zero = torch.zeros((n, 1), dtype=torch.int64)
    c.dev.write_weights(0, zero, scale)
    thetas = [0.4 + 0.2 * k for k in range(7)]
    t_theta = []
    for th in thetas:
        c.dev.write_thresholds(0, torch.full((n,), th, dtype=F64))
        t_theta.append(mean_times())
    c.dev.write_thresholds(0, torch.full((n,), 1.0, dtype=F64))
    codes = sorted({int(round(v)) for v in torch.linspace(-hi, hi, 7, dtype=F64).tolist()})
    t_w = []
    for k in codes:
        c.dev.write_weights(0, torch.full((n, 1), k, dtype=torch.int64), scale)
        t_w.append(mean_times())
    return (torch.tensor(thetas, dtype=F64), torch.stack(t_theta, 1),
            torch.tensor(codes, dtype=F64) * scale, torch.stack(t_w, 1))


def _slope(x: torch.Tensor, y: torch.Tensor) -> float:
    ok = torch.isfinite(y)
    if int(ok.sum()) < 3:
        return math.nan
    x, y = x[ok], y[ok]
    xm = x - x.mean()
    return float((xm * (y - y.mean())).sum() / (xm * xm).sum())


def check_time_units(c: SuiteContext):
    th, t_th, w, t_w = _sweep_slopes(c)
    s_th = [_slope(th, t_th[i]) for i in range(t_th.shape[0])]
    s_w = [-_slope(w, t_w[i]) for i in range(t_w.shape[0])]
    med_th = float(torch.tensor(s_th).nanmedian())
    med_w = float(torch.tensor(s_w).nanmedian())
    nums = {"dt_dtheta_median": med_th, "minus_dt_dW_median": med_w, "accepted": SLOPE_RANGE}
    lo, hi = SLOPE_RANGE
    if not (lo <= med_th <= hi):
        raise Fail(f"spike time vs threshold: slope {med_th:.3g} tau_c per potential unit, B1 "
                   f"expects 1 (ramp slope 1) within [{lo:.2f}, {hi:.2f}]: a unit error in "
                   "thresholds or times?", **nums)
    if not (lo <= med_w <= hi):
        raise Fail(f"spike time vs weight: slope {-med_w:.3g} tau_c per weight unit (input 1 tau_c "
                   f"before t_min), B1 expects -1 within [{lo:.2f}, {hi:.2f}]: a unit error in "
                   "weights, scales or times?", **nums)
    return f"dt/dtheta = {med_th:.3f}, dt/dW = {-med_w:.3f} (B1: 1 and -1)", nums


def check_seed_noise(c: SuiteContext):
    c.setup()
    if c.mode == "exact":
        c.dev.seed_noise(1234)
        return "deterministic chip: seed_noise accepted", {}
    c.dev.seed_noise(1234)
    a = c.dev.run(c.x)
    c.dev.seed_noise(1234)
    b = c.dev.run(c.x)
    if record_diff(a, b) is None:
        return "seed_noise makes the jitter reproducible", {"seedable": True}
    raise Skip("jitter is not seedable (a physical chip's noise; allowed)", seedable=False)
