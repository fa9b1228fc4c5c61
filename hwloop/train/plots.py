"""The pictures each long job writes beside its report (matplotlib on Agg, no display needed).

* :func:`plot_learning_curve`: fine-tuning on the chip, per epoch: training loss, training
  accuracy with the test accuracy on the device before (epoch 0) and after, spikes per neuron,
  energy per inference;
* :func:`plot_train_curve`: software training (``hwloop train`` and the ReLU twin);
* :func:`spike_trace` + :func:`plot_spike_raster` + :func:`plot_spike_histograms`: the spike
  times of a few test images, per stage, against each layer's window [t_min, t_max];
* :func:`plot_calibration_fit`: the fitted per-neuron parameters of a calibration record.

Every ``plot_*`` function writes one PNG and returns its path. Epochs are numbered from 1
everywhere (the step log, the report, the plots); epoch 0 is the state before fine-tuning.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from hwloop.ttfs.layers import NeuronLayer

FIGSIZE = (10.0, 6.0)
DPI = 90


def _plt():
    # optional extra and lazy: matplotlib (the [plots] extra) costs ~0.14 s to import
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=DPI)
    _plt().close(fig)
    tmp.replace(path)
    return path


def _finite(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


# ------------------------------------------------------------------ learning curves
def plot_learning_curve(report: dict, path) -> Path:
    """Fine-tuning on the chip: loss, accuracy (train per epoch; device test before/after),
    spikes per neuron and energy per inference, against the epoch (0 = before fine-tuning)."""
    plt = _plt()
    hist = report.get("history") or []
    b, a = report["before"], report["after"]
    ep = [int(h["epoch"]) for h in hist]
    last = ep[-1] if ep else 0
    fig, axes = plt.subplots(2, 2, figsize=FIGSIZE)
    ax = axes[0][0]
    ax.plot(ep, [h["train_loss"] for h in hist], "o-", color="#1b63a5", label="training loss (chip)")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("loss")
    ax = axes[0][1]
    ax.plot(ep, [100 * h["train_accuracy"] for h in hist], "o-", color="#1b63a5",
            label="training batches (chip)")
    for name, res, x, mk in (("test, before", b["device"], 0, "s"), ("test, after", a["device"], last, "D")):
        spread = res.get("spread") or {}
        yerr = 100 * spread["sd"] if spread.get("repeats", 1) > 1 else None
        y = 100 * spread.get("mean", res["accuracy"])
        ax.errorbar([x], [y], yerr=None if yerr is None else [yerr], fmt=mk, capsize=4,
                    color="#d95f02" if "before" in name else "#1a9850", label=f"device {name}")
    ax.axhline(100 * b["ideal_snn"]["accuracy"], ls="--", color="grey", label="ideal SNN (software)")
    ax.set_ylabel("accuracy %")
    ax.set_title("accuracy")
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[1][0]
    ax.plot([0] + ep, [b["device"]["spikes_per_neuron"]] + [h["spikes_per_neuron"] for h in hist],
            "o-", color="#7570b3")
    ax.set_ylabel("spikes per neuron")
    ax.set_title("activity")
    ax = axes[1][1]
    en = [b["device"].get("energy_j_per_sample")] + [h.get("energy_j_per_sample") for h in hist]
    pts = [(x, 1e9 * e) for x, e in zip([0] + ep, en) if _finite(e)]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="#e7298a")
    else:
        ax.text(0.5, 0.5, "the device reports no energy", ha="center", transform=ax.transAxes)
    ax.set_ylabel("energy per inference (nJ)")
    ax.set_title("energy")
    from matplotlib.ticker import MaxNLocator  # optional extra: matplotlib (loaded by _plt)
    for ax in axes.flat:
        ax.set_xlabel("epoch (0 = before fine-tuning)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(f"hardware-in-the-loop fine-tuning: {report.get('arch')} on {report.get('dataset')}, "
                 f"{(report.get('provenance') or {}).get('device_id', '')}", fontsize=10)
    return _save(fig, path)


def plot_train_curve(history: Sequence[dict], path, title: str = "software training") -> Path:
    """Software training per epoch: loss (train, test) and accuracy (train, test)."""
    plt = _plt()
    ep = [int(h["epoch"]) for h in history]
    fig, axes = plt.subplots(1, 2 if not any("spikes_per_neuron" in h for h in history) else 3,
                             figsize=FIGSIZE)
    axes[0].plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    if any("test_loss" in h for h in history):
        axes[0].plot(ep, [h.get("test_loss") for h in history], "s-", label="test")
    axes[0].set_ylabel("loss")
    axes[1].plot(ep, [100 * h["train_accuracy"] for h in history], "o-", label="train")
    if any("test_accuracy" in h for h in history):
        axes[1].plot(ep, [100 * h["test_accuracy"] for h in history], "s-", label="test")
    axes[1].set_ylabel("accuracy %")
    if len(axes) == 3:
        spn = [h.get("spikes_per_neuron") for h in history]
        spn = [v.get("total") if isinstance(v, dict) else v for v in spn]
        axes[2].plot(ep, spn, "o-", color="#7570b3")
        axes[2].set_ylabel("spikes per neuron (test)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


# ------------------------------------------------------------------ spike traces
def stage_windows(net) -> list[tuple[float, float]]:
    """The window (t_min, t_max) of every spiking stage of ``net`` (input first; a max-pool
    stage has its input layer's window)."""
    out = [(0.0, float(net.t_max0))]
    last = out[0]
    for layer in net.layers:
        if isinstance(layer, NeuronLayer):
            last = (float(layer.t_min), float(layer.t_max))
            out.append(last)
        elif type(layer).__name__ == "SpikingMaxPool2d":
            out.append(last)
    return out


def spike_trace(net, x, labels=None, device=None, n: int = 6) -> dict[str, Any]:
    """Spike times of the first ``n`` images of ``x`` per stage: measured on ``device`` when
    given (its ``run``), else computed by ``net``. JSON-able (silent neurons are ``None``)."""
    xb = x[:n].to(torch.float64 if device is not None else net.layers[-1].weight.dtype)
    with torch.no_grad():
        if device is not None:
            rec = device.run(net.encode(xb))
            stages, logits = rec.spike_times, rec.readout
        else:
            stages, logits = net.run(net.encode(xb))
    win = stage_windows(net)
    out = {"source": "device" if device is not None else "software", "windows": win[:len(stages)],
           "stages": [], "predicted": [int(v) for v in logits.argmax(1)],
           "labels": [int(v) for v in labels[:n]] if labels is not None else None}
    for t in stages:
        flat = t.detach().to(torch.float64).reshape(t.shape[0], -1)
        out["stages"].append([[None if not math.isfinite(v) else round(v, 6) for v in row.tolist()]
                              for row in flat])
    return out


def _stage_name(k: int) -> str:
    return "input" if k == 0 else f"stage {k}"


def plot_spike_raster(trace: dict, path, max_neurons: int = 256) -> Path:
    """A raster per stage (rows of panels) for each traced image (colours): neuron index
    against spike time, the stage's window shaded."""
    plt = _plt()
    stages, windows = trace["stages"], trace["windows"]
    n_img = len(stages[0]) if stages else 0
    fig, axes = plt.subplots(len(stages), 1, figsize=(FIGSIZE[0], 1.6 * len(stages) + 1.2), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for k, (ax, st) in enumerate(zip(axes[:, 0], stages)):
        lo, hi = windows[k]
        ax.axvspan(lo, hi, color="#cccccc", alpha=0.4, lw=0)
        n_neu = len(st[0]) if st else 0
        step = max(1, n_neu // max_neurons)
        for i, row in enumerate(st):
            pts = [(t, j) for j, t in enumerate(row[::step]) if t is not None]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] * step for p in pts], s=3, color=cmap(i % 10),
                           label=f"image {i}" if k == 0 else None)
        ax.set_ylabel(f"{_stage_name(k)}\nneuron", fontsize=8)
        ax.set_xlim(min(w[0] for w in windows) - 0.1, max(w[1] for w in windows) + 0.1)
        ax.grid(alpha=0.2)
    axes[-1, 0].set_xlabel("spike time (tau_c); grey: the layer's window [t_min, t_max]")
    if n_img:
        axes[0, 0].legend(fontsize=7, ncol=min(n_img, 6), loc="upper right", markerscale=3)
    lab = ""
    if trace.get("labels") is not None:
        lab = "; label/predicted " + ", ".join(f"{a}/{b}" for a, b in zip(trace["labels"], trace["predicted"]))
    fig.suptitle(f"spike raster ({trace.get('source')}), {n_img} test images{lab}", fontsize=10)
    return _save(fig, path)


def plot_spike_histograms(trace: dict, path) -> Path:
    """Per stage: a histogram of the spike times of the traced images, with the window's edges
    and the fraction of silent neurons."""
    plt = _plt()
    stages, windows = trace["stages"], trace["windows"]
    cols = min(len(stages), 3) or 1
    rows = math.ceil(len(stages) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(FIGSIZE[0], 2.8 * rows + 0.8), squeeze=False)
    for k, st in enumerate(stages):
        ax = axes[k // cols][k % cols]
        ts = [t for row in st for t in row if t is not None]
        total = sum(len(row) for row in st)
        lo, hi = windows[k]
        if ts:
            ax.hist(ts, bins=40, color="#1b63a5", alpha=0.8)
        ax.axvline(lo, color="#d95f02", ls="--", label="t_min")
        ax.axvline(hi, color="#1a9850", ls="--", label="t_max")
        silent = 1 - len(ts) / total if total else 0
        ax.set_title(f"{_stage_name(k)}: {100 * silent:.0f} % silent", fontsize=9)
        ax.set_xlabel("spike time (tau_c)")
        if k == 0:
            ax.legend(fontsize=7)
    for k in range(len(stages), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle(f"spike times per layer against the windows ({trace.get('source')})", fontsize=10)
    return _save(fig, path)


# ------------------------------------------------------------------ calibration
def plot_calibration_fit(rec, path) -> Path:
    """Histograms of the fitted per-neuron slope, delay and threshold offset of each layer of a
    :class:`~hwloop.calibrate.record.CalibrationRecord` (and its synapse gains), with the fit
    residuals and the random jitter in the titles."""
    plt = _plt()
    fields = ("slope", "delay", "threshold_offset", "gain")
    layers = [lc for lc in rec.layers if any(getattr(lc, f) for f in fields + ("offset_gain",))]
    fig, axes = plt.subplots(max(len(layers), 1), len(fields),
                             figsize=(FIGSIZE[0], 2.2 * max(len(layers), 1) + 0.8), squeeze=False)
    for r, lc in enumerate(layers):
        for c, f in enumerate(fields):
            ax = axes[r][c]
            vals = getattr(lc, f) or (lc.offset_gain if f == "gain" and lc.kind == "readout" else None)
            if vals:
                ax.hist([float(v) for v in vals], bins=30, color="#7570b3")
            else:
                ax.text(0.5, 0.5, "not identified", ha="center", va="center", transform=ax.transAxes,
                        fontsize=8)
            res = ", ".join(f"{k} {v:.3g}" for k, v in lc.residual_rms.items())
            ax.set_title(f"layer {lc.index} {lc.kind}: {f}" + (f"\nresidual RMS {res}" if c == 0 and res else ""),
                         fontsize=8)
    fig.suptitle(f"calibration fit of {rec.device_id}: random jitter SD {rec.jitter_sd:.3g} tau_c, "
                 f"{rec.device_runs} device runs", fontsize=10)
    return _save(fig, path)


def plot_layer_activity(res: dict, path, title: str = "") -> Path:
    """Spikes per neuron and energy per inference of each neuron layer over the test set (a
    :func:`~hwloop.train.hil.evaluate_device` result), with the accuracy in the title."""
    plt = _plt()
    spn = res.get("spikes_per_neuron_layers") or []
    en = res.get("energy_j_per_sample_layers") or []
    fig, axes = plt.subplots(1, 2, figsize=FIGSIZE)
    xs = list(range(1, len(spn) + 1))
    axes[0].bar(xs, spn, color="#7570b3")
    axes[0].set_ylabel("spikes per neuron")
    if en:
        axes[1].bar(xs, [1e9 * e for e in en], color="#e7298a")
    else:
        axes[1].text(0.5, 0.5, "the device reports no energy", ha="center", transform=axes[1].transAxes)
    axes[1].set_ylabel("energy per inference (nJ)")
    for ax in axes:
        ax.set_xlabel("neuron layer")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3, axis="y")
    sp = res.get("spread") or {}
    acc = f"accuracy {100 * res['accuracy']:.2f} %"
    if sp.get("repeats", 1) > 1:
        acc = f"accuracy {100 * sp['mean']:.2f} +- {100 * sp['sd']:.2f} % ({sp['repeats']} repeats)"
    fig.suptitle(f"{title}: {acc}" if title else acc, fontsize=10)
    return _save(fig, path)
