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
  phases, see :func:`~hwloop.calibrate.probes.sweep_levels`), and the jitter SD is found by
  inverting the expected variance of a ceil-quantised Gaussian (:func:`quantised_variance`).

Where the steps live: the estimators in :mod:`~hwloop.calibrate.estimators`, the threshold
sweep and its per-layer fits in :mod:`~hwloop.calibrate.sweeps`, the synapse probes in
:mod:`~hwloop.calibrate.synapses`, the options and fit guards in :mod:`~hwloop.calibrate.options`.
"""

from __future__ import annotations

import re
import time
from typing import Optional

import torch

from hwloop.calibrate.estimators import (fit_sweep, invert_quantised_variance,
                                         jitter_from_repeats, quantised_variance)
from hwloop.calibrate.options import CalibrationOptions, _fitted, _say
from hwloop.calibrate.probes import Prober, with_widths
from hwloop.calibrate.record import CalibrationRecord, LayerCalibration, mismatch_digest
from hwloop.calibrate.sweeps import (SweepData, fit_neuron_layer, fit_readout_offsets, pool_jitter,
                                     run_threshold_sweep)
from hwloop.calibrate.synapses import probe_all_synapses
from hwloop.devices.base import NetworkSpec, TTFSDevice, check_fits
from hwloop.errors import CalibrationError
from hwloop.mapping import network_to_spec
from hwloop.ttfs import convert
from hwloop.ttfs.architectures import build_relu

__all__ = ["CalibrationOptions", "calibrate_device", "fit_sweep", "jitter_from_repeats",
           "quantised_variance", "invert_quantised_variance", "METHOD", "METHOD_VERSION"]

METHOD = "threshold-sweep+synapse-probes"
METHOD_VERSION = "1"


# ---------------------------------------------------------------------- the procedure
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
    gen = torch.Generator().manual_seed(int(opts.seed))
    check_fits(with_widths(spec, [float(opts.widths[0])] * len(spec.neuron_layers())), pr.info)
    R, L = int(opts.repeats), int(opts.levels)
    if R < 2 or L < 3:
        raise CalibrationError(f"need repeats >= 2 and levels >= 3, got {R}, {L}")

    # ---------------------------------------------------------------- 1. threshold sweep
    data = run_threshold_sweep(pr, spec, opts, gen)
    _say(opts, f"threshold sweep: {len(data.widths_m)} settings x {R} repeats, {pr.count.runs} runs")
    jitter, jitter_se = pool_jitter(data, pr.info.time_steps_per_layer)
    layers = _fit_sweeps(spec, data, jitter, opts, pr.info.device_id)

    # ---------------------------------------------------------------- 2./3. synapse probes
    if opts.synapse_gains:
        probe_all_synapses(pr, spec, layers, opts, gen)
    return _record(device, pr, spec, opts, layers, (jitter, jitter_se), arch, chip_seed, t0)


def _fit_sweeps(spec: NetworkSpec, data: SweepData, jitter: float, opts: CalibrationOptions,
                device_id: str) -> dict[int, LayerCalibration]:
    """The per-layer fits of the sweep: neuron layers first, then readouts."""
    layers: dict[int, LayerCalibration] = {}
    for i in data.neuron_idx:
        layers[i] = fit_neuron_layer(spec, i, data, jitter, opts, device_id)
    for i in data.readout_idx:
        layers[i] = fit_readout_offsets(spec, i, data, device_id)
    return layers


def _record(device: TTFSDevice, pr: Prober, spec: NetworkSpec, opts: CalibrationOptions,
            layers: dict[int, LayerCalibration], jit: tuple[float, float], arch: Optional[str],
            chip_seed: Optional[int], t0: float) -> CalibrationRecord:
    """The record of a finished calibration (validated: a refused value names the field)."""
    from hwloop import __version__ as hv  # late: avoids an import cycle at package import
    info, K = pr.info, pr.info.time_steps_per_layer
    prof = getattr(device, "profile", None)
    with _fitted(info.device_id, "the record"):
        return CalibrationRecord(
            device_id=info.device_id, firmware_version=info.firmware_version,
            profile=getattr(prof, "name", None), method=METHOD, method_version=METHOD_VERSION,
            hwloop_version=str(hv), arch=arch, input_shape=tuple(spec.input_shape),
            t_max0=float(spec.t_max0), time_steps_per_layer=K, weight_bits=int(info.weight_bits),
            probe_widths=[float(w) for w in opts.widths], repeats=int(opts.repeats),
            levels=int(opts.levels), layers=[layers[i] for i in sorted(layers)],
            jitter_sd=jit[0], jitter_sd_se=jit[1],
            jitter_method=("repeat variance" if not K else
                           "repeat variance of ceil-registered times, inverted (uniform phase)"),
            device_runs=pr.count.runs, samples=pr.count.samples, programs=pr.count.programs,
            writes=pr.count.writes, wall_time_s=round(time.time() - t0, 3),
            chip_seed=chip_seed if chip_seed is not None else getattr(device, "chip_seed", None),
            mismatch_sha256=mismatch_digest(device))


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
