"""Bring-up diagnostics of a TTFS chip: transfer curves, timing resolution and linearity,
jitter by repetition, dead and stuck neurons (``hwloop check-device --characterise``).

Everything is measured on the single-synapse probe network of :func:`hwloop.testing.nets.probe_spec`
(one input, ``neurons`` neurons with one synapse each, window [1, 3) tau_c), each point
repeated ``repetitions`` times (a batch of identical samples):

* **transfer vs weight**: the input spikes at t_max0 - 1 = 0, the threshold is half the window,
  and the weight code sweeps the whole code range. B1: t = t_min + (theta - W (t_min - t_in)) / B,
  clamped at t_min, silent when it would reach t_max;
* **transfer vs input time**: a fixed weight, the input time sweeps the input window;
* **resolution**: the smallest step between distinct measured spike times (a chip with K time
  steps per window shows (t_max - t_min) / K);
* **linearity**: a straight-line fit of the mean spike time against the weight over the points
  where every repetition fired and none sat on t_min: slope, R^2 and the largest residual
  (integral nonlinearity) in tau_c and in resolution steps;
* **jitter**: the standard deviation over repetitions, per neuron and sweep point;
* **dead** neurons never fire over the weight sweep; **stuck** ones fire at one and the same time
  whatever the weight.

The report is a JSON file; the plots are PNGs (matplotlib, Agg backend).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from hwloop.devices.base import TTFSDevice
from hwloop.testing.nets import code_range, probe_spec

__all__ = ["characterise"]

F64 = torch.float64


def _measure(dev: TTFSDevice, x: torch.Tensor) -> torch.Tensor:
    """Spike times of the probe layer, (repetitions, neurons)."""
    return dev.run(x).spike_times[1].to(F64)


def _stats(t: torch.Tensor) -> dict:
    """Per-neuron mean, std over repetitions (fired ones only) and fired fraction."""
    fired = torch.isfinite(t)
    n_f = fired.sum(0)
    tz = torch.where(fired, t, torch.zeros_like(t))
    mean = tz.sum(0) / n_f.clamp(min=1)
    var = (torch.where(fired, (t - mean) ** 2, torch.zeros_like(t))).sum(0) / (n_f - 1).clamp(min=1)
    nan = torch.full_like(mean, math.nan)
    return {"mean": torch.where(n_f > 0, mean, nan), "std": torch.where(n_f > 1, var.sqrt(), nan),
            "fired": n_f.to(F64) / t.shape[0]}


@dataclass
class _Probe:
    """The programmed probe network and the weight codes the sweeps use."""

    info: Any
    spec: Any
    n: int
    t_min: float
    t_max: float
    theta: float
    hi: int
    scale: float
    codes: list[int]

    @property
    def width(self) -> float:
        return self.t_max - self.t_min


def _program_probe(device: TTFSDevice, neurons: int) -> _Probe:
    """Program the single-synapse probe network, thresholds at half the window."""
    info = device.info()
    spec = probe_spec(info, neurons=neurons)
    n = spec.layers[0].n_neurons
    layer = spec.layers[0]
    t_min, t_max = float(layer.t_min), float(layer.t_max)
    width = t_max - t_min
    theta = width / 2
    lo, hi = code_range(info)
    device.program(spec)
    device.write_thresholds(0, torch.full((n,), theta, dtype=F64))
    # the weight spans [-(width - theta), theta] so that the sweep covers silent ... t_min
    scale = max(width - theta, theta) / hi
    codes = list(range(lo, hi + 1)) if hi - lo <= 64 else \
        sorted({int(round(v)) for v in torch.linspace(lo, hi, 65, dtype=F64).tolist()})
    return _Probe(info=info, spec=spec, n=n, t_min=t_min, t_max=t_max, theta=theta, hi=hi, scale=scale,
                  codes=codes)


def _weight_sweep(device: TTFSDevice, probe: _Probe, repetitions: int):
    """Transfer vs weight: (weights, mean, std, fired fraction, raw times); (n, points) each."""
    n = probe.n
    x0 = torch.zeros((repetitions, 1), dtype=F64)  # the input at t_max0 - 1 = 0
    w_mean, w_std, w_fired, w_raw = [], [], [], []
    for k in probe.codes:
        device.write_weights(0, torch.full((n, 1), k, dtype=torch.int64), probe.scale)
        t = _measure(device, x0)
        s = _stats(t)
        w_mean.append(s["mean"]), w_std.append(s["std"]), w_fired.append(s["fired"])
        w_raw.append(t)
    w_mean, w_std, w_fired = (torch.stack(v, 1) for v in (w_mean, w_std, w_fired))  # (n, points)
    weights = torch.tensor(probe.codes, dtype=F64) * probe.scale
    return weights, w_mean, w_std, w_fired, w_raw


def _input_sweep(device: TTFSDevice, probe: _Probe, repetitions: int):
    """Transfer vs input time at a fixed weight (V(t_min) = W (t_min - t_in)):
    (code, input times, mean, std)."""
    n, spec = probe.n, probe.spec
    k_in = max(1, int(round(0.5 * probe.hi)))
    device.write_weights(0, torch.full((n, 1), k_in, dtype=torch.int64), probe.scale)
    t_ins = torch.linspace(spec.t_max0 - 1.0, spec.t_max0, 17, dtype=F64)[:-1]
    i_mean, i_std = [], []
    for ti in t_ins.tolist():
        t = _measure(device, torch.full((repetitions, 1), ti, dtype=F64))
        s = _stats(t)
        i_mean.append(s["mean"]), i_std.append(s["std"])
    return k_in, t_ins, torch.stack(i_mean, 1), torch.stack(i_std, 1)


def _resolution(w_raw: list[torch.Tensor]) -> float:
    """The smallest step between distinct measured times."""
    alltimes = torch.cat([t[torch.isfinite(t)] for t in w_raw])
    uniq = torch.unique(alltimes)
    steps = torch.diff(uniq)
    steps = steps[steps > 1e-12]
    return float(steps.min()) if steps.numel() else math.nan


def _linearity(weights: torch.Tensor, w_mean: torch.Tensor, w_fired: torch.Tensor, t_min: float,
               resolution: float) -> list[dict]:
    """Line fit per neuron over the points where all repetitions fired, above t_min."""
    lin = []
    for i in range(w_mean.shape[0]):
        ok = (w_fired[i] == 1.0) & (w_mean[i] > t_min + 1e-9)
        if int(ok.sum()) < 3:
            lin.append({"neuron": i, "points": int(ok.sum())})
            continue
        x, y = weights[ok], w_mean[i][ok]
        xm = x - x.mean()
        slope = float((xm * (y - y.mean())).sum() / (xm * xm).sum())
        icpt = float(y.mean() - slope * x.mean())
        res = y - (icpt + slope * x)
        ss = float(((y - y.mean()) ** 2).sum())
        r2 = 1.0 - float((res ** 2).sum()) / ss if ss > 0 else math.nan
        inl = float(res.abs().max())
        lin.append({"neuron": i, "points": int(ok.sum()), "slope": slope, "intercept": icpt,
                    "r2": r2, "inl_tau_c": inl,
                    "inl_steps": inl / resolution if resolution == resolution and resolution > 0 else None})
    return lin


def _jitter(w_std: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Jitter by repetition: its summary and the finite stds it is taken over."""
    js = w_std[torch.isfinite(w_std)]
    jitter = {"median": float(js.median()) if js.numel() else 0.0,
              "mean": float(js.mean()) if js.numel() else 0.0,
              "max": float(js.max()) if js.numel() else 0.0,
              "per_neuron_median": [float(v[torch.isfinite(v)].median()) if bool(torch.isfinite(v).any())
                                    else None for v in w_std]}
    return jitter, js


def _dead_and_stuck(w_mean: torch.Tensor, w_fired: torch.Tensor, n_codes: int) -> tuple[list[int], list[int]]:
    """Neurons that never fire over the weight sweep, and those that fire at one fixed time."""
    n = w_mean.shape[0]
    dead = [i for i in range(n) if float(w_fired[i].max()) == 0.0]
    stuck = []
    for i in range(n):
        m = w_mean[i][torch.isfinite(w_mean[i])]
        if i not in dead and m.numel() >= 2 and float(m.max() - m.min()) == 0.0 and n_codes > 2:
            stuck.append(i)
    return dead, stuck


def characterise(device: TTFSDevice, out_dir, *, neurons: int = 8, repetitions: int = 32,
                 plots: bool = True) -> dict:
    """Measure the bring-up diagnostics; write ``characterisation.json`` (and PNG plots) into
    ``out_dir``. Returns the report (a dict). The device is left programmed with the probe
    network (not closed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    probe = _program_probe(device, neurons)
    info, t_min, t_max = probe.info, probe.t_min, probe.t_max
    weights, w_mean, w_std, w_fired, w_raw = _weight_sweep(device, probe, repetitions)
    k_in, t_ins, i_mean, i_std = _input_sweep(device, probe, repetitions)
    resolution = _resolution(w_raw)
    expected_res = probe.width / info.time_steps_per_layer if info.time_steps_per_layer else None
    lin = _linearity(weights, w_mean, w_fired, t_min, resolution)
    jitter, js = _jitter(w_std)
    dead, stuck = _dead_and_stuck(w_mean, w_fired, len(probe.codes))

    report = {
        "device_id": info.device_id, "neurons": probe.n, "repetitions": repetitions,
        "window": [t_min, t_max], "threshold": probe.theta, "weight_scale": probe.scale, "codes": probe.codes,
        "transfer_weight": {"weights": weights.tolist(), "mean": _nan_list(w_mean),
                            "std": _nan_list(w_std), "fired_fraction": w_fired.tolist()},
        "transfer_input": {"code": k_in, "input_times": t_ins.tolist(), "mean": _nan_list(i_mean),
                           "std": _nan_list(i_std)},
        "resolution_tau_c": resolution, "expected_resolution_tau_c": expected_res,
        "linearity": lin, "jitter_tau_c": jitter, "dead_neurons": dead, "stuck_neurons": stuck,
        "files": {"report": "characterisation.json"},
    }
    if plots:
        report["files"].update(_plots(out, report, weights, w_mean, w_std, t_ins, i_mean, js))
    report = _clean(report)
    (out / "characterisation.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    return report


def _clean(x):
    """JSON-safe: non-finite floats become None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _nan_list(t: torch.Tensor):
    return [[None if not math.isfinite(v) else v for v in row] for row in t.tolist()]


def _plots(out: Path, rep: dict, weights, w_mean, w_std, t_ins, i_mean, js) -> dict:
    import matplotlib  # optional extra (plots), and an import-time cost the report alone does not pay
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    t_min, t_max = rep["window"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i in range(w_mean.shape[0]):
        ax.errorbar(weights.numpy(), w_mean[i].numpy(), yerr=torch.nan_to_num(w_std[i]).numpy(),
                    marker=".", lw=0.8, capsize=1.5, label=f"n{i}" if i < 8 else None)
    ideal = (t_min + (rep["threshold"] - weights * (t_min - 0.0))).clamp(min=t_min)
    ideal = torch.where(ideal < t_max, ideal, torch.full_like(ideal, math.nan))
    ax.plot(weights.numpy(), ideal.numpy(), "k--", lw=1, label="ideal B1")
    ax.set_xlabel("weight W = code x scale")
    ax.set_ylabel("spike time (tau_c)")
    ax.set_title(f"{rep['device_id']}: transfer vs weight")
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(out / "transfer_weight.png", dpi=110)
    plt.close(fig)
    files["transfer_weight"] = "transfer_weight.png"

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i in range(i_mean.shape[0]):
        ax.plot(t_ins.numpy(), i_mean[i].numpy(), marker=".", lw=0.8)
    ax.set_xlabel("input spike time (tau_c)")
    ax.set_ylabel("spike time (tau_c)")
    ax.set_title(f"transfer vs input time (code {rep['transfer_input']['code']})")
    fig.tight_layout()
    fig.savefig(out / "transfer_input.png", dpi=110)
    plt.close(fig)
    files["transfer_input"] = "transfer_input.png"

    fig, axs = plt.subplots(1, 2, figsize=(8, 3.2))
    if js.numel():
        axs[0].hist(js.numpy(), bins=20)
    axs[0].set_xlabel("jitter: std over repetitions (tau_c)")
    axs[0].set_ylabel("neuron x weight points")
    inl = [l.get("inl_tau_c", math.nan) for l in rep["linearity"]]
    axs[1].bar(range(len(inl)), [v if v == v else 0 for v in inl])
    axs[1].set_xlabel("neuron")
    axs[1].set_ylabel("INL (tau_c)")
    res = rep["resolution_tau_c"]
    axs[1].axhline(res if res is not None and res == res else 0, color="k", ls="--", lw=1, label="resolution")
    axs[1].legend(fontsize=7)
    fig.suptitle(f"dead {rep['dead_neurons']}  stuck {rep['stuck_neurons']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "jitter_linearity.png", dpi=110)
    plt.close(fig)
    files["jitter_linearity"] = "jitter_linearity.png"
    return files


def load_report(path) -> Optional[dict]:  # pragma: no cover - convenience
    return json.loads(Path(path).read_text())
