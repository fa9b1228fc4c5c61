"""Spiking layers of a TTFS network with the closed-form spike time of Eq. (1).

Units: time in tau_c. Each neuron layer n owns its window [t_min^(n), t_max^(n)) as buffers; the
network keeps t_min^(n+1) = t_max^(n). Spike times are absolute on the network's time axis;
``+inf`` means no spike.

Closed form (A = 0 before t_min, slope B in the window; paper Eq. (1), (5)-(7)):

    V_i(t_min) = sum_j W_ij (t_min - t_j)              (inputs j that fired, t_j < t_min)
    t_i        = t_min + (theta_i - V_i(t_min)) / B_i   if that is < t_max, else no spike
    theta_i    = base_threshold_i - D_i

B1 model: B_i = 1 and base_threshold = t_max - t_min, so t_i = t_max - (W x + D)_i with
x_j = t_min - t_j: the ReLU pre-activation, exactly (Eq. (9)).
alpha1 model: A_i = alpha = 1 before t_min, B_i = alpha + sum_j W_ij. The constant drift
alpha (t_min^(n) - t_min^(n-1)) is absorbed into the base threshold so that Eq. (2) holds as
printed: w_ij = W_ij / B_i, b_i = -theta_i / B_i + (t_max - t_min).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hwloop.errors import ConversionError

INF = math.inf
MODELS = ("b1", "alpha1")


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class NeuronLayer(nn.Module):
    """Common part of :class:`SpikingDense` and :class:`SpikingConv2d`.

    Parameters: ``weight`` (W), ``D`` (threshold shift, one per output neuron or channel).
    Buffers: ``t_min``, ``t_max`` (0-dim, tau_c), ``base_threshold`` (one per output neuron or
    channel).
    """

    kind = "neuron"

    def __init__(self, n_out: int, model: str = "b1", alpha: float = 1.0):
        super().__init__()
        if model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {model!r}")
        self.model = model
        self.alpha = float(alpha)
        self.clamp_early = False
        self.n_out = int(n_out)
        self.register_buffer("t_min", torch.tensor(1.0))
        self.register_buffer("t_max", torch.tensor(2.0))
        self.register_buffer("base_threshold", torch.ones(n_out))

    # -- the parts that differ between dense and conv --------------------------------------
    def potential(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _chan(self, v: torch.Tensor, ndim: int) -> torch.Tensor:
        """Broadcast a per-output-channel vector against an output of ``ndim`` dims."""
        return v.view(-1, *([1] * (ndim - 2))) if ndim > 2 else v

    def slope(self) -> torch.Tensor:
        """B_i per output neuron/channel: 1 for B1, alpha + sum_j W_ij for alpha1."""
        if self.model == "b1":
            return torch.ones_like(self.base_threshold)
        return self.alpha + self.weight.flatten(1).sum(1)

    @property
    def width(self) -> float:
        """Window width (t_max - t_min) in tau_c."""
        return float(self.t_max - self.t_min)

    def set_window(self, t_min: float, t_max: float) -> None:
        """Move the window; the base threshold follows so the layer computes the same function.

        B1: base = t_max - t_min (then D is exactly the ReLU bias). alpha1: base shifts by
        B_i * (change of width), which keeps b_i = -theta_i/B_i + width fixed (Eq. (2)).
        """
        if not t_max > t_min:
            raise ValueError(f"window must satisfy t_max > t_min, got ({t_min}, {t_max})")
        with torch.no_grad():
            if self.model == "b1":
                self.base_threshold.fill_(t_max - t_min)
            else:
                self.base_threshold.add_(self.slope() * ((t_max - t_min) - self.width))
            self.t_min.fill_(t_min)
            self.t_max.fill_(t_max)

    def forward(self, t_in: torch.Tensor) -> torch.Tensor:
        """Spike times ``(B, *out_shape)`` from input spike times ``(B, *in_shape)``, tau_c."""
        # x_j = t_min - t_j for inputs that fired, 0 for silent ones (t_min - inf = -inf -> 0)
        x = (self.t_min - t_in).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        v = self.potential(x)
        if self.model == "b1":
            t = self._chan(self.t_min + self.base_threshold - self.D, v.ndim) - v
        else:
            theta = self._chan(self.base_threshold - self.D, v.ndim)
            t = self.t_min + (theta - v) / self._chan(self.slope(), v.ndim)
        if self.clamp_early:
            t = torch.clamp(t, min=float(self.t_min))
        return t.masked_fill(t >= self.t_max, INF)

    def relu_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w, b) of the equivalent ReLU layer, Eq. (2): w = W / B, b = -theta / B + width."""
        B = self.slope()
        w = self.weight / B.view(-1, *([1] * (self.weight.ndim - 1)))
        b = -(self.base_threshold - self.D) / B + (self.t_max - self.t_min)
        return w, b


class SpikingDense(NeuronLayer):
    """Fully connected spiking layer: ``weight`` is ``(out_features, in_features)``."""

    kind = "dense"

    def __init__(self, in_features: int, out_features: int, model: str = "b1", alpha: float = 1.0):
        super().__init__(out_features, model, alpha)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.D = nn.Parameter(torch.zeros(out_features))

    def potential(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        if tuple(in_shape) != (self.in_features,):
            raise ValueError(f"SpikingDense expects input shape ({self.in_features},), got {in_shape}")
        return (self.out_features,)

    def neuron_thresholds(self, in_shape: tuple[int, ...]) -> torch.Tensor:
        """theta_i per neuron ``(out_features,)`` as programmed on a device."""
        return (self.base_threshold - self.D).detach().clone()

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, model={self.model}"


class SpikingConv2d(NeuronLayer):
    """2-D convolutional spiking layer: ``weight`` is ``(out_ch, in_ch, kh, kw)``.

    ``in_shift`` (optional, ``(in_ch,)``) is a constant added to every real (non-padded) input
    position before the zero padding: it carries a batch norm that stood after the previous
    ReLU, whose shift is not a plain bias at the borders of a zero-padded convolution.
    """

    kind = "conv2d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 model: str = "b1", alpha: float = 1.0, in_shift: bool = False):
        super().__init__(out_channels, model, alpha)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.padding = _pair(kernel_size), _pair(stride), _pair(padding)
        self.in_shift = nn.Parameter(torch.zeros(in_channels)) if in_shift else None
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, *self.kernel_size))
        self.D = nn.Parameter(torch.zeros(out_channels))

    def potential(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_shift is not None:
            x = x + self.in_shift.view(-1, 1, 1)
        return F.conv2d(x, self.weight, None, self.stride, self.padding)

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(in_shape) != 3 or in_shape[0] != self.in_channels:
            raise ValueError(f"SpikingConv2d expects input shape ({self.in_channels}, H, W), got {in_shape}")
        h = (in_shape[1] + 2 * self.padding[0] - self.kernel_size[0]) // self.stride[0] + 1
        w = (in_shape[2] + 2 * self.padding[1] - self.kernel_size[1]) // self.stride[1] + 1
        if h <= 0 or w <= 0:
            raise ValueError(f"SpikingConv2d: input {in_shape} is smaller than the kernel")
        return (self.out_channels, h, w)

    def neuron_thresholds(self, in_shape: tuple[int, ...]) -> torch.Tensor:
        """theta per neuron ``(out_ch, H_out, W_out)`` as programmed on a device (the input
        shift's contribution, position dependent at the borders, moved into the threshold)."""
        with torch.no_grad():
            theta = (self.base_threshold - self.D).view(-1, 1, 1)
            theta = theta.expand(self.out_shape(in_shape)).clone()
            if self.in_shift is not None:
                ones = torch.ones((1, *in_shape), dtype=self.weight.dtype) * self.in_shift.view(-1, 1, 1)
                theta -= F.conv2d(ones, self.weight, None, self.stride, self.padding)[0]
        return theta

    def extra_repr(self) -> str:
        return (f"{self.in_channels} -> {self.out_channels}, kernel={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, model={self.model}")


class SpikingMaxPool2d(nn.Module):
    """Max pooling of activations = the earliest spike in each pool (paper, "Methods").

    ``sign`` (optional ``(channels,)`` of +1/-1): a channel with -1 takes the latest spike (a
    silent input wins), which realises a max pool that followed a batch norm with negative scale.
    """

    kind = "maxpool2d"

    def __init__(self, kernel_size, stride=None, sign: Optional[torch.Tensor] = None):
        super().__init__()
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride if stride is not None else kernel_size)
        if sign is not None:
            sign = torch.as_tensor(sign).to(torch.int8)
            if not bool(((sign == 1) | (sign == -1)).all()):
                raise ConversionError("SpikingMaxPool2d sign must be +1 or -1 per channel")
        self.register_buffer("sign", sign)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        earliest = -F.max_pool2d(-t, self.kernel_size, self.stride)
        if self.sign is None or bool((self.sign > 0).all()):
            return earliest
        latest = F.max_pool2d(t, self.kernel_size, self.stride)
        return torch.where(self.sign.view(-1, 1, 1) > 0, earliest, latest)

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        c, h, w = in_shape
        return (c, (h - self.kernel_size[0]) // self.stride[0] + 1,
                (w - self.kernel_size[1]) // self.stride[1] + 1)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel_size}, stride={self.stride}"


class Flatten(nn.Module):
    """Flatten ``(B, C, H, W)`` spike times to ``(B, C*H*W)`` (no stage of its own)."""

    kind = "flatten"

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1)

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (int(math.prod(in_shape)),)


class Readout(nn.Module):
    """Non-spiking readout layer N+1 (paper, Methods "Output layer").

    It integrates layer N's spikes until t_read = t_max^(N):
    ``logits_k = sum_j W_kj (t_max^(N) - t_j) + b_k`` with ``b_k = (t_max^(N) - t_min^(N)) A_k``.
    The bias is parameterised by b directly so that its gradient equals the ReLU twin's.
    """

    kind = "readout"

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, t: torch.Tensor, t_read: torch.Tensor) -> torch.Tensor:
        x = (t_read - t).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        return F.linear(x, self.weight, self.bias)

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        if tuple(in_shape) != (self.in_features,):
            raise ValueError(f"Readout expects input shape ({self.in_features},), got {in_shape}")
        return (self.out_features,)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}"


class ChannelShift(nn.Module):
    """Adds a constant per channel (dim 1). Used by :meth:`TTFSNetwork.to_relu` in front of a
    zero-padded convolution to carry a batch-norm shift exactly (padding stays zero)."""

    def __init__(self, shift: torch.Tensor):
        super().__init__()
        self.shift = nn.Parameter(shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift.view(-1, *([1] * (x.ndim - 2)))


class SignedMaxPool2d(nn.Module):
    """ReLU-side twin of :class:`SpikingMaxPool2d` with signs: max pool for +1 channels, min
    pool for -1 channels."""

    def __init__(self, kernel_size, stride, sign: torch.Tensor):
        super().__init__()
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.register_buffer("sign", torch.as_tensor(sign).to(torch.int8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mx = F.max_pool2d(x, self.kernel_size, self.stride)
        mn = -F.max_pool2d(-x, self.kernel_size, self.stride)
        return torch.where(self.sign.view(-1, 1, 1) > 0, mx, mn)
