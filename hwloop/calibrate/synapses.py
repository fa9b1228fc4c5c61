"""Steps 2 and 3 of :func:`~hwloop.calibrate.fit.calibrate_device`: the synapse probes.

Per dense layer (or readout) behind an all-dense prefix: the earlier neuron layers are
programmed as relays of a sparse input pattern, the probed layer's synapses all to one code,
and its spike times (readout values) are fitted on the measured input activations with an
intercept, giving the per-synapse gains k_ij (rho_kj). Estimates a record would refuse are
failed fits and are filled from their row (or the layer's median row), with a note.
"""

from __future__ import annotations

import math

import torch

from hwloop.calibrate.estimators import _lstsq_with_intercept
from hwloop.calibrate.options import CalibrationOptions, _fitted, _ids, _say, _to_median
from hwloop.calibrate.probes import (F64, Prober, activations_in, k_hot_inputs, one_hot_inputs,
                                     relay_codes, silent_inputs, stage_of, with_widths)
from hwloop.calibrate.record import Array, LayerCalibration
from hwloop.calibrate.validate import FACTOR_RANGE, SE_MARGIN, SYNAPSE_RANGE
from hwloop.devices.base import NEURON_KINDS, LayerSpec, NetworkSpec
from hwloop.errors import CalibrationError

__all__ = ["probe_all_synapses"]


def probe_all_synapses(pr: Prober, spec: NetworkSpec, layers: dict[int, LayerCalibration],
                       opts: CalibrationOptions, gen: torch.Generator) -> None:
    """Synapse gains of every dense layer and readout that only dense layers precede; the others
    get a note saying why not."""
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


def _neuron_params(lc: LayerCalibration, w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_i(w), s_i) flat: intercept d + s o w and slope at window width w."""
    s = torch.tensor(lc.slope, dtype=F64)
    a = torch.tensor(lc.delay, dtype=F64) + s * torch.tensor(lc.threshold_offset, dtype=F64) * w
    return a, s


def _probe_inputs(pr: Prober, sp: NetworkSpec, layer: LayerSpec, prev: list[int],
                  layers: dict[int, LayerCalibration], opts: CalibrationOptions,
                  gen: torch.Generator, w: float) -> torch.Tensor:
    """The probe patterns, R silent ones last; with ``prev`` layers, programs them as relays."""
    R = int(opts.repeats)
    code = pr.code_max
    if not prev:
        return torch.cat([one_hot_inputs(sp, 1.0).repeat(R, *([1] * len(sp.input_shape))),
                          silent_inputs(R, sp)], 0)
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
    return torch.cat([k_hot_inputs(S, sp, k_in, gen), silent_inputs(R, sp)], 0)


def _measure(pr: Prober, sp: NetworkSpec, n: int, lc: LayerCalibration, t_in: torch.Tensor,
             w: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the probes on layer ``n``: (Xk, the inputs times the weight written; Y, the targets
    of the fit; valid, which (sample, neuron) entries are usable)."""
    layer = sp.layers[n]
    stage = stage_of(sp)
    code = pr.code_max
    feed = stage[n] - 1 if layer.kind == "dense" else stage[n]
    # the probed layer: base time 0.85 w (calibrated), all synapses one code
    if layer.kind == "dense":
        a, s = _neuron_params(lc, w)
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
    return X * W0, Y, valid


def _fit_gains(n: int, Xk: torch.Tensor, Y: torch.Tensor, valid: torch.Tensor,
               lc: LayerCalibration) -> tuple[torch.Tensor, float, float, torch.Tensor]:
    """Least squares of every neuron's row: (K (n_out, n_in), residual SD, pooled SE of one
    gain, per-input sum of squares of the centred inputs)."""
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
    return Kmat, sig, se, ss


def _repair_gains(n: int, layer: LayerSpec, Kmat: torch.Tensor, ss: torch.Tensor, se: float,
                  lc: LayerCalibration) -> torch.Tensor:
    """Fill inputs never active, synapses outside their range and rows outside the per-neuron
    range; each with a note on ``lc``."""
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
    return Kmat


def _probe_synapses(pr: Prober, spec: NetworkSpec, n: int, prev: list[int],
                    layers: dict[int, LayerCalibration], opts: CalibrationOptions,
                    gen: torch.Generator) -> None:
    """Per-synapse gains of dense layer (or readout) ``n``; ``prev``: the neuron layers before it
    (all dense), programmed as scramblers when there are any."""
    w = float(opts.synapse_width)
    sp = with_widths(spec, [w] * len(spec.neuron_layers()))
    layer = sp.layers[n]
    lc = layers[n]
    pr.program(sp)
    t_in = _probe_inputs(pr, sp, layer, prev, layers, opts, gen, w)
    Xk, Y, valid = _measure(pr, sp, n, lc, t_in, w)
    Kmat, sig, se, ss = _fit_gains(n, Xk, Y, valid, lc)
    Kmat = _repair_gains(n, layer, Kmat, ss, se, lc)
    with _fitted(pr.info.device_id, f"layer {n} ({layer.kind}), synapse probes",
                 prefix=("synapse_gain",)):
        lc.synapse_gain = Array.from_tensor(Kmat.reshape(layer.weight_shape))
    lc.synapse_gain_se = se if math.isfinite(se) else None  # None: not resolved
    lc.gain = Kmat.mean(1).tolist()
    lc.residual_rms["synapse"] = sig
