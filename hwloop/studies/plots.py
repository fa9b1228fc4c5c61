"""Plots of constraint studies in the style of the paper's Fig. 5: test accuracy against a
hardware knob, without and with hardware-in-the-loop fine-tuning, the mean over seeds with its
spread (min-max band), and the ideal SNN's accuracy as a dashed line; a heat map for a two-knob
grid; a bar chart for a study without a knob (one setting, e.g. all constraints combined).

matplotlib runs on the Agg backend (no display needed); every function writes a PNG and returns
its path.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from hwloop.studies.knobs import knob_for

__all__ = ["plot_sweep", "plot_knob", "plot_heatmap", "plot_bars"]

BEFORE = dict(color="#d95f02", marker="o", label="without fine-tuning")
AFTER = dict(color="#1b63a5", marker="s", label="with HIL fine-tuning")


def _plt():
    # optional extra and lazy: matplotlib (the [plots] extra) costs ~0.14 s to import
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _group(rows: Sequence[dict], knobs: Sequence[str]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(_hashable(r["knobs"].get(k)) for k in knobs), []).append(r)
    return groups


def _hashable(v: Any) -> Any:
    return v if not isinstance(v, (list, dict)) else repr(v)


def _vals(rs: Sequence[dict], field: str) -> list[float]:
    return [100.0 * r[field] for r in rs if r.get(field) is not None
            and not (isinstance(r[field], float) and math.isnan(r[field]))]


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _epochs_label(rows: Sequence[dict]) -> str:
    eps = sorted({r.get("epochs") for r in rows if r.get("epochs") is not None})
    steps = sorted({r.get("steps_per_epoch") for r in rows if r.get("steps_per_epoch")})
    e = "/".join(str(x) for x in eps) or "?"
    s = f"with HIL fine-tuning ({e} epoch{'s' if eps != [1] else ''}"
    if steps:
        s += f" of {'/'.join(str(x) for x in steps)} steps"
    return s + ")"


def plot_knob(rows: Sequence[dict], knob: str, path: str | Path, *, label: Optional[str] = None,
              axis: str = "linear", title: Optional[str] = None, show_latency: bool = False) -> Path:
    """Accuracy (%) against one knob: before and after fine-tuning (mean over seeds, min-max
    band), ideal SNN accuracy dashed. ``axis``: ``linear``, ``log2``, ``reversed`` or
    ``categorical`` (evenly spaced, in the order of the rows). A null value (e.g. float weights)
    or any non-numeric value makes the axis categorical. ``show_latency``: a second tick line
    with the mean latency (tau_c, input window to read-out) of each setting."""
    plt = _plt()
    groups = _group(rows, [knob])
    keys = list(groups)
    numeric = axis != "categorical" and all(isinstance(k[0], (int, float)) and not isinstance(k[0], bool)
                                            for k in keys)
    if numeric:
        keys.sort(key=lambda k: k[0])
        xs = [float(k[0]) for k in keys]
    else:
        xs = list(range(len(keys)))
    fig, ax = plt.subplots(figsize=(5.2, 3.8), dpi=130)
    for field, style in (("accuracy_before", BEFORE), ("accuracy_after", AFTER)):
        vals = [_vals(groups[k], field) for k in keys]
        mean = [_mean(v) for v in vals]
        lo = [min(v) if v else float("nan") for v in vals]
        hi = [max(v) if v else float("nan") for v in vals]
        lab = style["label"] if field == "accuracy_before" else _epochs_label(rows)
        ax.plot(xs, mean, marker=style["marker"], color=style["color"], label=lab, lw=1.6, ms=5)
        if any(h > l for h, l in zip(hi, lo)):
            ax.fill_between(xs, lo, hi, color=style["color"], alpha=0.18, lw=0)
    ideal = _vals(rows, "ideal_snn_accuracy")
    if ideal:
        ax.axhline(_mean(ideal), color="k", ls="--", lw=1.0, label=f"ideal SNN ({_mean(ideal):.2f} %)")
    if numeric and axis == "log2" and all(x > 0 for x in xs):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs])
        ax.minorticks_off()
    else:
        ax.set_xticks(xs)
        ticks = [_tick(k[0]) for k in keys]
        if show_latency:
            lat = [_mean([r["latency_tau_c"] for r in groups[k] if r.get("latency_tau_c") is not None])
                   for k in keys]
            ticks = [f"{t}\n{v:.3g}" for t, v in zip(ticks, lat)]
        ax.set_xticklabels(ticks)
    if axis == "reversed":
        ax.invert_xaxis()
    ax.set_xlabel((label or knob) + ("\nlatency, input to read-out (tau_c)" if show_latency and not numeric else ""))
    ax.set_ylabel("test accuracy (%)")
    lows = [v for k in keys for f in ("accuracy_before", "accuracy_after") for v in _vals(groups[k], f)]
    if lows and ideal:
        top = max(max(lows), _mean(ideal))
        ax.set_ylim(max(0.0, min(lows) - 0.08 * (top - min(lows) + 1.0)), top + 0.12 * (top - min(lows) + 1.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="best")
    return _save(fig, ax, path, title)


def plot_heatmap(rows: Sequence[dict], knobs: Sequence[str], path: str | Path, *,
                 labels: Optional[Sequence[str]] = None, title: Optional[str] = None) -> Path:
    """Two panels (without / with fine-tuning): mean accuracy (%) over seeds on the grid of two
    knobs, each cell annotated."""
    plt = _plt()
    k1, k2 = knobs
    groups = _group(rows, knobs)
    v1 = sorted({k[0] for k in groups}, key=_sort_key)
    v2 = sorted({k[1] for k in groups}, key=_sort_key)
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.9), dpi=130, sharey=True)
    mats = {}
    for field in ("accuracy_before", "accuracy_after"):
        m = np.full((len(v1), len(v2)), np.nan)
        for (a, b), rs in groups.items():
            m[v1.index(a), v2.index(b)] = _mean(_vals(rs, field))
        mats[field] = m
    finite = np.concatenate([m[np.isfinite(m)] for m in mats.values()])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 100.0)
    im = None
    for ax, field, name in zip(axes, mats, ("without fine-tuning", _epochs_label(rows))):
        m = mats[field]
        im = ax.imshow(m, origin="lower", aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
        for i in range(len(v1)):
            for j in range(len(v2)):
                if np.isfinite(m[i, j]):
                    dark = (m[i, j] - vmin) < 0.5 * (vmax - vmin + 1e-12)
                    ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center", fontsize=7,
                            color="w" if dark else "k")
        ax.set_xticks(range(len(v2)))
        ax.set_xticklabels([_tick(v) for v in v2])
        ax.set_xlabel(labels[1] if labels else k2)
        ax.set_title(name, fontsize=9)
    axes[0].set_yticks(range(len(v1)))
    axes[0].set_yticklabels([_tick(v) for v in v1])
    axes[0].set_ylabel(labels[0] if labels else k1)
    cb = fig.colorbar(im, ax=list(axes), shrink=0.9)
    cb.set_label("test accuracy (%)")
    ideal = _vals(rows, "ideal_snn_accuracy")
    sup = title or ""
    if ideal:
        sup = (sup + "  " if sup else "") + f"(ideal SNN {_mean(ideal):.2f} %)"
    if sup:
        fig.suptitle(sup, fontsize=9)
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_bars(groups: Sequence[tuple[str, Sequence[dict]]], path: str | Path, *,
              title: Optional[str] = None) -> Path:
    """Grouped bars, one group per ``(label, rows)``: accuracy without and with fine-tuning
    (mean over the rows, min-max whiskers), the ideal SNN's accuracy dashed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.6, 1.3 + 1.3 * len(groups)), 4.0), dpi=130)
    width = 0.36
    all_rows = [r for _, rs in groups for r in rs]
    lows = []
    for gi, (_, rs) in enumerate(groups):
        for off, field, style in ((-width / 2, "accuracy_before", BEFORE), (width / 2, "accuracy_after", AFTER)):
            v = _vals(rs, field)
            if not v:
                continue
            m = _mean(v)
            lows.append(min(v))
            lab = (style["label"] if field == "accuracy_before" else _epochs_label(all_rows)) if gi == 0 else None
            ax.bar(gi + off, m, width, color=style["color"], alpha=0.85, label=lab,
                   yerr=[[m - min(v)], [max(v) - m]] if max(v) > min(v) else None, capsize=3)
            ax.text(gi + off, max(v), f"{m:.2f}", ha="center", va="bottom", fontsize=7)
    ideal = _vals(all_rows, "ideal_snn_accuracy")
    if ideal:
        ax.axhline(_mean(ideal), color="k", ls="--", lw=1.0, label=f"ideal SNN ({_mean(ideal):.2f} %)")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([g[0] for g in groups], fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    if lows and ideal:
        top = max(_mean(ideal), max(lows))
        span = top - min(lows) + 1.0
        ax.set_ylim(max(0.0, min(lows) - 0.3 * span), top + 0.6 * span)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", ncol=1)
    return _save(fig, ax, path, title)


def _save(fig, ax, path, title: Optional[str]) -> Path:
    """Title, tight layout, write the PNG, free the figure; returns the path."""
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    _plt().close(fig)
    return path


def _sort_key(v: Any):
    if v is None:
        return (1, 0.0, "")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v), "")
    return (2, 0.0, str(v))


def _tick(v: Any) -> str:
    if v is None:
        return "float"
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _set_label(fixed: dict) -> str:
    return ", ".join(f"{k}={_tick(v)}" for k, v in fixed.items())


def plot_sweep(rows: Sequence[dict], spec, out: str | Path) -> Optional[Path]:
    """The plot that fits a sweep: a curve for one knob, a heat map for two, bars for none.
    Written to ``out`` as ``accuracy_<knob>.png``, ``heatmap_<k1>_<k2>.png`` or
    ``accuracy_point.png``."""
    if not rows:
        return None
    out = Path(out)
    knobs = list(spec.knobs)
    fixed = _set_label(spec.fixed)
    ds = f"{spec.arch.upper()} on {spec.dataset}"
    if len(knobs) == 1:
        k = knob_for(knobs[0])
        title = ds + (f"; {fixed}" if fixed else "")
        return plot_knob(rows, k.name, out / f"accuracy_{_safe(k.name)}.png", label=k.label, axis=k.axis,
                         title=title, show_latency=(k.name == "latency"))
    if len(knobs) == 2:
        ks = [knob_for(n) for n in knobs]
        return plot_heatmap(rows, knobs, out / f"heatmap_{_safe(knobs[0])}_{_safe(knobs[1])}.png",
                            labels=[k.label for k in ks], title=ds)
    return plot_bars([("all --set constraints" if fixed else "base profile", rows)], out / "accuracy_point.png",
                     title=ds + ("\n" + _wrap(fixed) if fixed else ""))


def _wrap(text: str, width: int = 70) -> str:
    return "\n".join(textwrap.wrap(text, width))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
