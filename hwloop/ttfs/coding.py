"""Time-to-first-spike input coding (paper, "Results": t_j = t_max^(0) - tau_c x_j).

Time is measured in units of tau_c throughout :mod:`hwloop.ttfs`.
"""

from __future__ import annotations

import math

import torch

from hwloop.errors import DataError

INF = math.inf


def check_pixels(x: torch.Tensor, name: str = "x") -> None:
    """Raise :class:`DataError` unless ``x`` is a finite floating tensor with values in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise DataError(f"{name} must be floating point with values in [0, 1], got dtype {x.dtype}")
    if x.numel() == 0:
        return
    if torch.isnan(x).any():
        raise DataError(f"{name} contains NaN; pixel values must lie in [0, 1]")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise DataError(f"{name} values must lie in [0, 1], got range [{lo:.6g}, {hi:.6g}]")


def encode(x: torch.Tensor, t_max0: float = 1.0, check: bool = True) -> torch.Tensor:
    """Encode intensities as input spike times.

    Args:
        x: ``(B, ...)`` intensities in [0, 1].
        t_max0: end of the input window t_max^(0), in tau_c; spikes lie in [t_max0 - 1, t_max0).
        check: validate the range (raises :class:`DataError` on NaN or values outside [0, 1]).

    Returns:
        Spike times, same shape and dtype as ``x``, in tau_c: ``t_max0 - x``, and ``+inf`` (no
        spike) where ``x == 0``.
    """
    if check:
        check_pixels(x)
    return torch.where(x > 0, t_max0 - x, torch.full_like(x, INF))


def decode(t: torch.Tensor, t_ref: float) -> torch.Tensor:
    """Inverse coding: activation ``t_ref - t`` for finite times, 0 for silent (``+inf``).

    This is the reverse mapping x_i = (t_max^(n) - t_i^(n)) / tau_c of Eq. (2) with
    ``t_ref = t_max^(n)``.
    """
    return torch.where(torch.isfinite(t), t_ref - t, torch.zeros_like(t))
