"""The estimators of the circuit model (:mod:`hwloop.calibrate.fit`), as plain tensor maths.

* time grid statistics: the expected variance of ceil-registered repeats
  (:func:`quantised_variance`), its inverse, and the jitter SD from repeats;
* the threshold-sweep fit (:func:`fit_sweep`): per neuron, least squares on (1, theta, w);
* least squares with an intercept, for the synapse probes.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from hwloop.calibrate.probes import F64

__all__ = ["fit_sweep", "invert_quantised_variance", "jitter_from_repeats", "quantised_variance"]


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
