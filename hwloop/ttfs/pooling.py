"""Max pooling with any kernel, stride, padding, dilation and ceil mode, and the ReLU twin that
keeps them.

:class:`SpikingMaxPool2d` (in :mod:`hwloop.ttfs.layers`) has no padding. A padded position of a
max pool is a neuron that never fires (spike time ``+inf``): the earliest spike of a pool ignores
it, exactly as PyTorch's max pool ignores its ``-inf`` padding. :class:`PaddedMaxPool2d` is that
pool; it is a :class:`SpikingMaxPool2d`, so :class:`~hwloop.ttfs.network.TTFSNetwork` treats it as
a pooling stage. A channel with ``sign = -1`` (a negative batch-norm scale in front of the pool)
takes the latest spike of the *real* positions: padding is ignored there too.

:func:`relu_twin` is :meth:`TTFSNetwork.to_relu` with the padding kept (``to_relu`` itself
builds ``nn.MaxPool2d(kernel, stride)``). Units: spike times in tau_c, ``+inf`` = no spike.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hwloop.errors import ConversionError
from hwloop.ttfs.layers import SignedMaxPool2d, SpikingMaxPool2d, _pair


def pool_out_size(n: int, kernel: int, stride: int, padding: int = 0, dilation: int = 1,
                  ceil_mode: bool = False) -> int:
    """Output length of a max/avg pool along one axis (PyTorch's rule, ``ceil_mode`` included:
    a last window that would start in the right padding is dropped)."""
    span = n + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= n + padding:
        out -= 1
    return out


def check_pool_geometry(kernel, stride, padding, dilation) -> None:
    """PyTorch's constraint: padding at most half the effective kernel. Raises ConversionError."""
    for k, s, p, d in zip(kernel, stride, padding, dilation):
        if k < 1 or s < 1 or d < 1 or p < 0:
            raise ConversionError(f"pooling needs kernel, stride, dilation >= 1 and padding >= 0, "
                                  f"got kernel={kernel}, stride={stride}, padding={padding}, "
                                  f"dilation={dilation}")
        if 2 * p > d * (k - 1) + 1:
            raise ConversionError(f"pooling padding {padding} exceeds half the kernel {kernel}")


class PaddedMaxPool2d(SpikingMaxPool2d):
    """Earliest-spike pooling (latest for ``sign = -1`` channels) with padding, dilation and
    ceil mode. Input and output ``(B, C, H, W)`` spike times in tau_c.

    Raises:
        ConversionError: an invalid geometry or sign.
    """

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
                 sign: Optional[torch.Tensor] = None):
        super().__init__(kernel_size, stride, sign)
        self.padding, self.dilation, self.ceil_mode = _pair(padding), _pair(dilation), bool(ceil_mode)
        check_pool_geometry(self.kernel_size, self.stride, self.padding, self.dilation)

    def _pool(self, t: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(t, self.kernel_size, self.stride, self.padding, self.dilation,
                            self.ceil_mode)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        earliest = -self._pool(-t)
        if self.sign is None or bool((self.sign > 0).all()):
            return earliest
        return torch.where(self.sign.view(-1, 1, 1) > 0, earliest, self._pool(t))

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        c, h, w = in_shape
        return (c,) + tuple(pool_out_size(n, *g, self.ceil_mode) for n, g in
                            zip((h, w), zip(self.kernel_size, self.stride, self.padding, self.dilation)))

    def relu_module(self) -> nn.Module:
        """The ReLU-side twin: ``nn.MaxPool2d`` or, with negative signs, :class:`PaddedSignedMaxPool2d`."""
        if self.sign is None or bool((self.sign > 0).all()):
            return nn.MaxPool2d(self.kernel_size, self.stride, self.padding, self.dilation,
                                ceil_mode=self.ceil_mode)
        return PaddedSignedMaxPool2d(self.kernel_size, self.stride, self.sign, self.padding,
                                     self.dilation, self.ceil_mode)

    def extra_repr(self) -> str:
        return (f"kernel={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")


class PaddedSignedMaxPool2d(SignedMaxPool2d):
    """ReLU-side twin of a signed :class:`PaddedMaxPool2d`: max pool for +1 channels, min pool
    (over the real positions) for -1 channels. Input/output ``(B, C, H, W)``."""

    def __init__(self, kernel_size, stride, sign: torch.Tensor, padding=0, dilation=1,
                 ceil_mode: bool = False):
        super().__init__(kernel_size, stride, sign)
        self.padding, self.dilation, self.ceil_mode = _pair(padding), _pair(dilation), bool(ceil_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = (self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
        mx = F.max_pool2d(x, *args)
        mn = -F.max_pool2d(-x, *args)
        return torch.where(self.sign.view(-1, 1, 1) > 0, mx, mn)


def relu_twin(net) -> nn.Sequential:
    """The ReLU network equivalent to ``net`` (a :class:`TTFSNetwork`), padded pools included.

    Same as ``net.to_relu()`` (Eq. (2) / (9)), with every :class:`PaddedMaxPool2d` replaced by its
    :meth:`~PaddedMaxPool2d.relu_module`. Input ``(B, *net.input_shape)``, output logits.
    """
    twin = net.to_relu()
    pools = [l for l in net.layers if isinstance(l, SpikingMaxPool2d)]
    if not any(isinstance(p, PaddedMaxPool2d) for p in pools):
        return twin
    mods = list(twin)
    slots = [i for i, m in enumerate(mods) if isinstance(m, (nn.MaxPool2d, SignedMaxPool2d))]
    if len(slots) != len(pools):  # pragma: no cover - to_relu emits one module per pool
        raise AssertionError("to_relu emitted a different number of pools")
    for i, p in zip(slots, pools):
        if isinstance(p, PaddedMaxPool2d):
            mods[i] = p.relu_module()
    return nn.Sequential(*mods)
