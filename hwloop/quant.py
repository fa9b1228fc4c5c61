"""Weight and time quantisation (paper, Methods (ii)-(iv)).

Weights (Methods (iii)): outliers are removed by percentiles on both sides of the distribution
of the non-zero weights (1st/99th for >= 5 bits, 4th/96th for 4 bits; zeros are left out, so a
sparse layer keeps its range instead of collapsing to all-zero codes), the remaining range is
divided into uniform steps with zero exactly representable, and the steps are mapped to signed
integer codes on [-2^(q-1), 2^(q-1) - 1]. The device holds ``codes`` and one float ``scale`` per layer;
W = codes * scale.

Times (Methods (ii), (iv)): a layer window [t_min, t_max) is split into K steps of width
dt = (t_max - t_min) / K; the grid ticks are t_min + k dt, k = 0 .. K-1. Rounding rule: a spike
is registered at the **next** tick at or after it (ceil), as a digital chip registers a
comparator crossing at the next clock edge. Consequences:

* a spike earlier than t_min (an early spike of Methods (ii)/(iv)) is registered at t_min;
* a spike in (t_max - dt, t_max) rounds up to t_max, which is outside the window: silent
  (``+inf``);
* ``+inf`` (silent) stays silent.

Ceil shortens every activation x = t_max - t by between 0 and dt (mean dt/2); a neuron with an
activation below dt goes silent.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

__all__ = ["code_range", "default_clip_percentile", "dequantize", "fired_indicator",
           "quantize_times", "quantize_weights", "signal_loss", "silence_", "silence_where_",
           "tick_index_", "time_grid"]

#: Tolerance, in steps, below which a time counts as lying on a tick (float rounding).
TICK_TOL = 1e-9
_QUANTILE_MAX = 2 ** 24 - 1  # torch.quantile's input size limit


def default_clip_percentile(bits: Optional[int]) -> float:
    """Methods (iii): remove the 1st/99th percentiles (4th/96th for 4 bits or fewer)."""
    if bits is None:
        return 0.0
    return 4.0 if bits <= 4 else 1.0


def code_range(bits: int) -> tuple[int, int]:
    """(lowest, highest) signed code for ``bits``: (-2^(q-1), 2^(q-1) - 1)."""
    if not 2 <= int(bits) <= 62:
        raise ValueError(f"bits must lie in [2, 62], got {bits}")
    return -(2 ** (int(bits) - 1)), 2 ** (int(bits) - 1) - 1


def _quantiles(v: torch.Tensor, qs: list[float]) -> list[float]:
    v = v.detach().flatten().to(torch.float64)
    if v.numel() <= _QUANTILE_MAX:
        return [float(x) for x in torch.quantile(v, torch.tensor(qs, dtype=torch.float64))]
    s, _ = torch.sort(v)  # linear interpolation, like torch.quantile
    out = []
    for q in qs:
        pos = q * (s.numel() - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, s.numel() - 1)
        out.append(float(s[lo] + (s[hi] - s[lo]) * (pos - lo)))
    return out


#: A quantised layer also warns when clipping removes more than this fraction of its weight
#: mass (sum over clipped weights of |w| - range, over sum |w|): the "outliers" of the clip
#: percentile were the signal.
CLIP_LOSS_WARN = 0.5
#: A quantised layer warns when more than this fraction of its weight mass (sum of |w|) lies in
#: non-zero weights that round to code 0: it has lost most of its signal.
SIGNAL_LOSS_WARN = 0.5


def quantize_weights(w: torch.Tensor, bits: int, clip_percentile: Optional[float] = None,
                     layer: Optional[int] = None) -> tuple[torch.Tensor, float]:
    """Quantise a weight tensor to signed integer codes and one scale (Methods (iii)).

    Args:
        w: weights of one layer (any shape, finite).
        bits: q, the signed code width; codes lie in [-2^(q-1), 2^(q-1) - 1].
        clip_percentile: p in [0, 50): the p-th and (100 - p)-th percentiles of the **non-zero**
            weights of ``w`` bound the represented range (weights beyond are clipped). Zeros are
            left out because zero is exactly representable anyway: counted in, they pull both
            percentiles to 0 in a layer with fewer than about 2p % non-zero weights, which then
            quantised to all zeros. ``None``: 1 for q >= 5, 4 for q <= 4. 0: the full range
            (max |w|).
        layer: the layer's index, used only to name it in warnings.

    Returns:
        ``(codes, scale)``: int64 codes of ``w``'s shape and the float step ``scale`` (> 0,
        finite) such that ``codes * scale`` approximates ``w``. The scale is the smallest step
        for which the clipped range [lo, hi] fits the code range (lo / scale >= -2^(q-1),
        hi / scale <= 2^(q-1) - 1); zero is exactly representable. A layer with a non-zero
        weight never gets all-zero codes from the percentiles; an all-zero (or empty) layer
        gets codes 0 and scale 1.

    Warns:
        UserWarning naming ``layer`` when the layer loses most of its signal: more than
        :data:`SIGNAL_LOSS_WARN` of its weight mass (sum of |w|) is in non-zero weights that
        round to code 0 (e.g. a few huge outliers with ``clip_percentile=0``). Clipping at the
        percentiles is by design and does not warn.

    Raises:
        ValueError: ``bits`` outside [2, 62], ``clip_percentile`` outside [0, 50), or
            non-finite weights.
    """
    lo_code, hi_code = code_range(bits)
    p = default_clip_percentile(int(bits)) if clip_percentile is None else float(clip_percentile)
    if not 0.0 <= p < 50.0:
        raise ValueError(f"clip_percentile must lie in [0, 50), got {clip_percentile}")
    w64 = w.detach().to(torch.float64)
    if w64.numel() == 0:
        return torch.zeros(w.shape, dtype=torch.int64), 1.0
    if not bool(torch.isfinite(w64).all()):
        raise ValueError("weights must be finite to be quantised")
    nz = w64[w64 != 0]
    if nz.numel() == 0:
        return torch.zeros(w.shape, dtype=torch.int64), 1.0
    if p > 0:
        lo, hi = _quantiles(nz, [p / 100.0, 1.0 - p / 100.0])
    else:
        lo, hi = float(nz.min()), float(nz.max())
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(-lo / -lo_code, hi / hi_code)
    if not scale > 0:  # underflow (denormal weights): the full range, never a zero step
        scale = max(float(nz.abs().max()) / hi_code, math.ldexp(1.0, -1074))
    codes = torch.round(w64 / scale).clamp(lo_code, hi_code).to(torch.int64)
    _warn_signal_loss(w64, nz, codes, scale, bits, layer)
    return codes, float(scale)


def signal_loss(w: torch.Tensor, codes: torch.Tensor, scale: float) -> tuple[float, float, float]:
    """How much of layer ``w`` its quantisation ``(codes, scale)`` loses.

    Returns ``(zeroed, zeroed_mass, rel_err)``: the fraction of the non-zero weights of ``w``
    whose code is 0; the fraction of the weight mass sum |w| in those weights; and the
    relative L2 error ``||codes * scale - w|| / ||w||`` (which includes clipping). All 0.0 for
    an all-zero ``w``.
    """
    w64 = w.detach().to(torch.float64)
    mask = w64 != 0
    n = int(mask.sum())
    if n == 0:
        return 0.0, 0.0, 0.0
    lost = mask & (codes == 0)
    zeroed = int(lost.sum()) / n
    mass = float(w64.abs()[lost].sum() / w64.abs().sum())
    rel = float((codes.to(torch.float64) * float(scale) - w64).norm() / w64.norm())
    return zeroed, mass, rel


def _warn_signal_loss(w64, nz, codes, scale, bits, layer) -> None:
    zeroed, mass, rel = signal_loss(w64, codes, scale)
    if bits is not None and mass <= SIGNAL_LOSS_WARN:
        # the range itself may be wrong: what the clip percentile called outliers can carry the
        # signal. Clipping loses |w| - range of each clipped weight; most of the mass lost warns.
        lo, hi = code_range(bits)
        excess = torch.clamp(w64.abs() - hi * scale, min=0.0)
        clipped_mass = float(excess.sum() / w64.abs().sum())
        if clipped_mass > CLIP_LOSS_WARN:
            name = "a layer" if layer is None else f"layer {int(layer)}"
            warnings.warn(f"{name}: {bits}-bit quantisation loses most of its signal: "
                          f"{100 * clipped_mass:.1f} % of its weight mass is clipped away by the "
                          f"range +-{hi * scale:.4g} that the clip percentile set ({int((excess > 0).sum())} "
                          f"weights beyond it, max |w| {float(nz.abs().max()):.4g}; relative error "
                          f"{rel:.3f}): clip less (clip_percentile) or use more bits",
                          UserWarning, stacklevel=3)
            return
    if mass > SIGNAL_LOSS_WARN:
        name = "a layer" if layer is None else f"layer {int(layer)}"
        warnings.warn(f"{name}: {bits}-bit quantisation loses most of its signal: "
                      f"{100 * zeroed:.1f} % of its {nz.numel()} non-zero weights, "
                      f"{100 * mass:.1f} % of its weight mass, round to code 0 (relative error "
                      f"{rel:.3f}, scale {scale:.4g}, max |w| {float(nz.abs().max()):.4g}); "
                      "outliers set the range: clip them (clip_percentile) or use more bits",
                      UserWarning, stacklevel=3)


def dequantize(codes: torch.Tensor, scale: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """W = codes * scale, as ``dtype``."""
    return codes.to(torch.float64).mul(float(scale)).to(dtype)


def time_grid(t_min: float, t_max: float, steps: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The K ticks t_min + k (t_max - t_min) / K, k = 0 .. K-1 (tau_c)."""
    dt = (float(t_max) - float(t_min)) / int(steps)
    return float(t_min) + dt * torch.arange(int(steps), dtype=dtype)


def quantize_times(t: torch.Tensor, t_min: float, t_max: float, steps: int,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Register spike times on the K-step grid of the window [t_min, t_max) (ceil rule).

    Args:
        t: spike times (tau_c), ``+inf`` = silent.
        t_min, t_max: the window, tau_c, t_max > t_min.
        steps: K >= 1 ticks per window.
        out: optional float tensor of ``t``'s shape to write the result into (may be ``t``
            itself: in place).

    Returns:
        Same shape and dtype: ``t_min + k dt`` with k = ceil((t - t_min) / dt) clamped at 0
        below (early spikes count as at t_min); ``+inf`` where k >= K (rounds to t_max or
        later) and where ``t`` was ``+inf``. A time within 1e-9 steps above a tick stays on
        that tick (float rounding).
    """
    t_min, t_max, steps = float(t_min), float(t_max), int(steps)
    if not t_max > t_min:
        raise ValueError(f"window must satisfy t_max > t_min, got ({t_min}, {t_max})")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    dt = (t_max - t_min) / steps
    k = tick_index_(t, t_min, dt, out=out)
    # steps - k is an integer (>= 1 on the grid, <= 0 at t_max or later, -inf for +inf), so
    # clamping it to [0, 1] is already the fired indicator (never -0.0: x - x is +0.0)
    fired = torch.rsub(k, float(steps)).clamp_(0.0, 1.0)
    return silence_where_(k.mul_(dt).add_(t_min), fired)


def tick_index_(t: torch.Tensor, t_min: float, dt: float,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The ceil rule: the index k = max(ceil((t - t_min) / dt), 0) of the tick at or after each
    time ``t`` (tau_c) on the grid t_min + k dt (a time within ``TICK_TOL`` steps above a tick
    stays on it). Float tensor, ``+inf`` for ``+inf``; written into ``out`` (may be ``t``: in
    place). ``t_max`` is tick K: a caller silences k >= K (:func:`quantize_times`)."""
    return torch.sub(t, t_min + TICK_TOL * dt, out=out).mul_(1.0 / dt).ceil_().clamp_(min=0.0)


def fired_indicator(room: torch.Tensor) -> torch.Tensor:
    """1.0 where ``room`` > 0, else +0.0 (float; ``room`` must not hold NaN). Modifies ``room``.

    (Adding 0.0 turns a -0.0 into +0.0, which :func:`silence_where_` relies on.)
    """
    return torch.sign(room.clamp_(min=0.0)).add_(0.0)


def silence_(t: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
    """Set ``t`` to ``+inf`` in place where ``room`` <= 0 (``t`` finite or ``+inf``).

    Float arithmetic only (bool masks, ``where`` and ``masked_fill`` are ~10x slower on CPU):
    1 / fired - 1 is +inf where ``fired`` is +0.0 and exactly 0 where it is 1.0, and adding 0
    leaves a time unchanged exactly.
    """
    return silence_where_(t, fired_indicator(room))


def silence_where_(t: torch.Tensor, fired: torch.Tensor) -> torch.Tensor:
    """Set ``t`` to ``+inf`` in place where the float indicator ``fired`` is +0.0 (1.0: kept)."""
    return t.add_(torch.reciprocal(fired).sub_(1.0))
