"""Exact folding of the linear operations between two spiking stages into a weight layer.

Between a ReLU (a spiking stage) and the next weight layer a model may apply batch norm
(per-channel affine), average pooling, adaptive average pooling and flattening: all affine, so the
next layer sees ``W f(a) + b`` of the stage's activations ``a``. :func:`fold_into_dense` and
:func:`fold_into_conv` return the weight layer that computes this directly from ``a``:

* dense: any chain; ``W' = W J_f`` (the chain's Jacobian, by reverse-mode products, exact up to
  float64 rounding), ``b' = b + W f(0)``. The layer's fan-in becomes the pre-pool size.
* conv: per-channel scales multiply the input channels; an average pool of kernel k, stride s
  composes with the kernel (``K' = K (*) 1_k / div``, stride ``s * stride``, padding
  ``s * padding + pool padding``); a constant shift becomes a bias (no padding) or the layer's
  input shift (zero padding; the padded border must not see it). Every composition is checked
  numerically (float64, relative 1e-9): pools whose windows do not line up with the
  convolution's zero padding, ceil mode or padding-excluding averages are refused, never
  approximated.

:func:`fold_pool_into_conv` folds an average pool that follows a convolution *before* its ReLU
(``conv -> avgpool -> ReLU``) into the convolution itself. Shapes are per sample (no batch).
Free of I/O.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from hwloop.errors import ConversionError
from hwloop.ttfs.trace import Op, apply_op

_F64 = torch.float64
_TOL = 1e-9


def apply_steps(steps: list[Op], a: torch.Tensor) -> torch.Tensor:
    """The pending chain ``f`` applied to ``a`` ``(B, *a_shape)``."""
    for op in steps:
        a = apply_op(op, a)
    return a


def uniform_pool(op: Op) -> Optional[tuple[tuple, tuple, tuple, float]]:
    """(kernel, stride, padding, divisor) of an average pool with equal windows, or None
    (adaptive pooling whose output size does not divide the input)."""
    p = op.p
    if op.kind == "avgpool2d":
        k = p["kernel"]
        return k, p["stride"], p["padding"], float(p["divisor_override"] or k[0] * k[1])
    (c, h, w), (oh, ow) = op.in_shape, p["output_size"]
    if h % oh or w % ow:
        return None
    k = (h // oh, w // ow)
    return k, k, (0, 0), float(k[0] * k[1])


def _affine_only(steps: list[Op], n0: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, c) per input feature of a chain of affines and flattens: f(a) = s * a + c."""
    s, c = torch.ones(n0, dtype=_F64), torch.zeros(n0, dtype=_F64)
    for op in steps:
        if op.kind == "affine":
            s, c = s * op.p["scale"], c * op.p["scale"] + op.p["shift"]
        else:  # reshape = flatten of (C, H, W)
            n = int(math.prod(op.in_shape[1:]))
            s, c = s.repeat_interleave(n), c.repeat_interleave(n)
    return s, c


def fold_into_dense(steps: list[Op], a_shape: tuple, w: torch.Tensor,
                    b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', b')`` with ``W' a.flatten() + b' == W f(a).flatten() + b`` (float64).

    Args:
        steps: the pending affine / average-pool / flatten operations ``f``.
        a_shape: per-sample shape of the stage ``a`` they start from.
        w: ``(out, n_y)`` weight, b: ``(out,)`` bias of the dense layer.

    Returns:
        ``W'`` ``(out, prod(a_shape))`` and ``b'`` ``(out,)``.
    """
    if not steps:
        return w, b
    if all(op.kind in ("affine", "reshape") for op in steps):
        s, c = _affine_only(steps, a_shape[0])
        return w * s[None, :], b + w @ c
    y0 = apply_steps(steps, torch.zeros(1, *a_shape, dtype=_F64)).reshape(-1)
    n_a = int(math.prod(a_shape))
    w2 = torch.empty(w.shape[0], n_a, dtype=_F64)
    with torch.enable_grad():
        for r in range(0, w.shape[0], 256):
            rows = w[r:r + 256]
            a = torch.zeros(rows.shape[0], *a_shape, dtype=_F64, requires_grad=True)
            y = apply_steps(steps, a).reshape(rows.shape[0], -1)
            (g,) = torch.autograd.grad(y, a, grad_outputs=rows)
            w2[r:r + rows.shape[0]] = g.reshape(rows.shape[0], n_a)
    return w2, b + w @ y0


def _compose_pool(k_w: torch.Tensor, pool: tuple) -> torch.Tensor:
    """Kernel of ``conv(avgpool(a))`` from the conv kernel ``(O, I, kh, kw)`` (stride of the
    composition = pool stride * conv stride)."""
    k, s, _, div = pool
    o, i, kh, kw = k_w.shape
    box = torch.full((1, 1, *k), 1.0 / div, dtype=k_w.dtype)
    out = F.conv_transpose2d(k_w.reshape(o * i, 1, kh, kw), box, stride=s)
    return out.reshape(o, i, *out.shape[2:])


def _verify(ref, cand, shape: tuple, where: str, why: str) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, *shape, generator=g, dtype=_F64)
    a[a < 0.3] = 0.0
    r, c = ref(a), cand(a)
    if r.shape != c.shape or float((r - c).abs().max()) > _TOL * (1.0 + float(r.abs().max())):
        raise ConversionError(f"{where}: {why}")


def _channel_const(t: torch.Tensor) -> Optional[torch.Tensor]:
    """The per-channel value of ``(C, H, W)`` if constant over positions, else None."""
    v = t[:, :1, :1]
    return v.reshape(-1) if bool(torch.allclose(t, v.expand_as(t), rtol=1e-12, atol=1e-12)) else None


def fold_into_conv(steps: list[Op], a_shape: tuple, w: torch.Tensor, b: torch.Tensor,
                   stride: tuple, padding: tuple, where: str):
    """The convolution on ``a`` equal to ``conv(f(a), w, b, stride, padding)``.

    Args:
        steps: pending affine / average-pool operations ``f`` (no flatten).
        a_shape: ``(C, H, W)`` of the stage ``a``.
        w, b: ``(O, C', kh, kw)`` kernel and ``(O,)`` bias; stride, padding: pairs.
        where: the convolution's node, for messages.

    Returns:
        ``(w', b', stride', padding', in_shift)``; ``in_shift`` ``(C,)`` or None.

    Raises:
        ConversionError: a pool that does not fold into one convolution, a shift that varies
            over positions, a zero scale with a shift in front of zero padding.
    """
    if not steps:
        return w, b, stride, padding, None
    if all(op.kind == "affine" for op in steps):
        s, c = _affine_only(steps, a_shape[0])
        if padding == (0, 0):
            return w * s.view(1, -1, 1, 1), b + (w * c.view(1, -1, 1, 1)).sum((1, 2, 3)), stride, padding, None
        if bool(((s == 0) & (c != 0)).any()):
            raise ConversionError(f"{where}: a batch norm with zero scale in front of a "
                                  "zero-padded convolution cannot be fused")
        shift = torch.where(s != 0, c / torch.where(s != 0, s, torch.ones_like(s)), torch.zeros_like(c))
        return w * s.view(1, -1, 1, 1), b, stride, padding, shift
    k_w, st, pd = w, stride, padding
    for op in reversed(steps):
        if op.kind == "affine":
            k_w = k_w * op.p["scale"].view(1, -1, 1, 1)
            continue
        pool = uniform_pool(op)
        if pool is None:
            raise ConversionError(f"{op.where}: adaptive average pooling of {op.in_shape[1:]} to "
                                  f"{op.p['output_size']} has unequal windows; it folds into a "
                                  "Linear layer, not into the convolution that follows it")
        k_w = _compose_pool(k_w, pool)
        st = (st[0] * pool[1][0], st[1] * pool[1][1])
        pd = (pd[0] * pool[1][0] + pool[2][0], pd[1] * pool[1][1] + pool[2][1])
    y0 = apply_steps(steps, torch.zeros(1, *a_shape, dtype=_F64))[0]
    b2, shift = b, None
    if bool((y0 != 0).any()):
        if padding == (0, 0):
            r = _channel_const(F.conv2d(y0[None], w, None, stride)[0])
            if r is None:
                raise ConversionError(f"{where}: the shift in front of it varies over positions")
            b2 = b + r
        else:
            g = apply_steps(steps, torch.ones(1, *a_shape, dtype=_F64))[0] - y0
            y0c, gc = _channel_const(y0), _channel_const(g)
            if y0c is None or gc is None or bool(((gc == 0) & (y0c != 0)).any()):
                raise ConversionError(f"{where}: the shift in front of this zero-padded convolution "
                                      "varies over positions and cannot be folded")
            shift = torch.where(gc != 0, y0c / torch.where(gc != 0, gc, torch.ones_like(gc)),
                                torch.zeros_like(y0c))

    def cand(a):
        if shift is not None:
            a = a + shift.view(1, -1, 1, 1)
        return F.conv2d(a, k_w, b2, st, pd)

    _verify(lambda a: F.conv2d(apply_steps(steps, a), w, b, stride, padding), cand, a_shape, where,
            "the average pooling in front of it does not fold into one convolution exactly (the "
            "pool windows and the convolution's zero padding do not line up at the borders, or "
            "the pool uses ceil_mode / excludes padding); use padding=0 or pool before the ReLU")
    return k_w, b2, st, pd, shift


def fold_pool_into_conv(w: torch.Tensor, b: torch.Tensor, stride: tuple, padding: tuple,
                        in_shift: Optional[torch.Tensor], in_shape: tuple, op: Op):
    """``avgpool(conv(x))`` (before the ReLU) as one convolution: ``(w', stride')``, same bias,
    padding and input shift. ``in_shape`` is the convolution's ``(C, H, W)`` input.

    Raises:
        ConversionError: a pool that is not one convolution (padding, ceil mode, unequal windows).
    """
    pool = uniform_pool(op)
    if pool is None:
        raise ConversionError(f"{op.where}: adaptive average pooling with unequal windows "
                              "cannot be folded into the convolution before it")
    k, s, _, div = pool
    o, i, kh, kw = w.shape
    box = torch.full((1, 1, *k), 1.0 / div, dtype=w.dtype)
    k_w = F.conv_transpose2d(box, w.reshape(1, o * i, kh, kw), stride=stride)
    k_w = k_w.reshape(o, i, *k_w.shape[2:])
    st = (stride[0] * s[0], stride[1] * s[1])

    def shifted(x):
        return x if in_shift is None else x + in_shift.view(1, -1, 1, 1)

    _verify(lambda x: apply_op(op, F.conv2d(shifted(x), w, b, stride, padding)),
            lambda x: F.conv2d(shifted(x), k_w, b, st, padding), in_shape, op.where,
            "average pooling before the ReLU folds into the convolution only without padding and "
            "ceil_mode")
    return k_w, st
