"""The TTFS network: a stack of spiking stages and a non-spiking readout.

Stages (what :meth:`TTFSNetwork.spike_times` returns, one tensor each): the encoded input, then
every :class:`SpikingDense`, :class:`SpikingConv2d` and :class:`SpikingMaxPool2d` in order.
:class:`Flatten` only reshapes. Times are in tau_c; ``+inf`` is a silent neuron.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from hwloop.errors import DataError
from hwloop.ttfs.coding import check_pixels, decode, encode
from hwloop.ttfs.layers import (ChannelShift, Flatten, NeuronLayer, Readout, SignedMaxPool2d,
                                SpikingConv2d, SpikingDense, SpikingMaxPool2d)

#: gamma of the adaptive window rule, Eq. (8).
GAMMA = 10.0


class TTFSNetwork(nn.Module):
    """A B1 (or alpha1) TTFS network.

    Args:
        layers: spiking layers in order, ending with a :class:`Readout`.
        input_shape: per-sample input shape, e.g. ``(784,)`` or ``(1, 28, 28)``.
        t_max0: end of the input window t_max^(0), tau_c.

    Calling the network on intensities ``x`` of shape ``(B, *input_shape)`` in [0, 1] returns
    the logits ``(B, n_classes)`` (the readout potentials at t_max^(N)).
    """

    def __init__(self, layers: Iterable[nn.Module], input_shape: tuple[int, ...], t_max0: float = 1.0):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.t_max0 = float(t_max0)
        if not self.layers or not isinstance(self.layers[-1], Readout):
            raise ValueError("a TTFSNetwork must end with a Readout layer")
        # shape check and cached stage shapes
        shape = self.input_shape
        self.shapes: list[tuple[int, ...]] = [shape]  # input shape of every layer, then output
        for layer in self.layers:
            shape = layer.out_shape(shape)
            self.shapes.append(shape)

    # ---------------------------------------------------------------- structure
    @property
    def model(self) -> str:
        ms = {l.model for l in self.neuron_layers()}
        return ms.pop() if len(ms) == 1 else "mixed"

    def neuron_layers(self) -> list[NeuronLayer]:
        return [l for l in self.layers if isinstance(l, NeuronLayer)]

    def stage_shapes(self) -> list[tuple[int, ...]]:
        """Per-sample shape of every spiking stage (input first)."""
        out = [self.input_shape]
        for i, layer in enumerate(self.layers):
            if isinstance(layer, (NeuronLayer, SpikingMaxPool2d)):
                out.append(self.shapes[i + 1])
        return out

    def windows(self) -> list[tuple[float, float]]:
        """(t_min, t_max) of every neuron layer, tau_c."""
        return [(float(l.t_min), float(l.t_max)) for l in self.neuron_layers()]

    def set_widths(self, widths: list[float]) -> None:
        """Lay the windows end to end from t_max^(0): t_min^(n+1) = t_max^(n)."""
        layers = self.neuron_layers()
        if len(widths) != len(layers):
            raise ValueError(f"need {len(layers)} window widths, got {len(widths)}")
        t = self.t_max0
        for layer, w in zip(layers, widths):
            if not (w > 0 and math.isfinite(w)):
                raise ValueError(f"window width must be finite and > 0, got {w}")
            layer.set_window(t, t + float(w))
            t += float(w)

    def t_read(self) -> float:
        """Read-out time t_max^(N) of the last neuron layer (t_max^(0) if none)."""
        layers = self.neuron_layers()
        return float(layers[-1].t_max) if layers else self.t_max0

    def set_clamp_early(self, on: bool) -> None:
        """Treat a spike before its layer's t_min as if at t_min (Methods (ii) and (iv))."""
        for l in self.neuron_layers():
            l.clamp_early = bool(on)

    # ---------------------------------------------------------------- forward
    def encode(self, x: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Input spike times ``(B, *input_shape)`` from intensities in [0, 1]."""
        if check:
            if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
                raise DataError(f"input must have shape (B, {', '.join(map(str, self.input_shape))}), "
                                f"got {tuple(x.shape)}")
            check_pixels(x)
        dtype = self.layers[-1].weight.dtype
        return encode(x.to(dtype), self.t_max0, check=False)

    def run(self, t_in: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Propagate input spike times; returns (stage times, logits)."""
        stages = [t_in]
        t = t_in
        t_ref = torch.tensor(self.t_max0, dtype=t_in.dtype)
        for layer in self.layers:
            if isinstance(layer, Readout):
                return stages, layer(t, t_ref)
            t = layer(t)
            if isinstance(layer, NeuronLayer):
                t_ref = layer.t_max
                stages.append(t)
            elif isinstance(layer, SpikingMaxPool2d):
                stages.append(t)
        raise AssertionError("unreachable: network ends with a Readout")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_classes)`` for intensities ``x`` ``(B, *input_shape)`` in [0, 1]."""
        return self.run(self.encode(x))[1]

    def forward_times(self, t_in: torch.Tensor) -> torch.Tensor:
        """Logits from input spike times (tau_c, ``+inf`` = no spike)."""
        return self.run(t_in)[1]

    def spike_times(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Spike times of every stage (input first), ``(B, *stage_shape)`` each, tau_c."""
        return self.run(self.encode(x))[0]

    def stage_refs(self) -> list[float]:
        """Reference time of each stage: x = t_ref - t is its activation (Eq. (2))."""
        refs = [self.t_max0]
        ref = self.t_max0
        for layer in self.layers:
            if isinstance(layer, NeuronLayer):
                ref = float(layer.t_max)
                refs.append(ref)
            elif isinstance(layer, SpikingMaxPool2d):
                refs.append(ref)
        return refs

    def activations(self, stage_times: list[torch.Tensor]) -> list[torch.Tensor]:
        """Decode stage times to ReLU activations (t_ref - t, 0 for silent)."""
        return [decode(t, r) for t, r in zip(stage_times, self.stage_refs())]

    # ---------------------------------------------------------------- windows
    @torch.no_grad()
    def init_windows(self, x: torch.Tensor, gamma: float = GAMMA, margin: float = 1.0) -> list[float]:
        """Windows from a batch of data so that every active unit fires inside its window.

        Each width is ``gamma * margin *`` the largest activation of that layer on ``x`` (at
        least 1 tau_c), computed layer by layer. Returns the widths.
        """
        widths = []
        layers = self.neuron_layers()
        # start from very wide windows: the activations do not depend on the windows (B1),
        # and for alpha1 the base threshold follows the window.
        self.set_widths([1e6] * len(layers))
        stages, _ = self.run(self.encode(x))
        acts = self.activations(stages)
        k = 0
        for i, layer in enumerate(self.layers):
            if isinstance(layer, NeuronLayer):
                a = acts[self._stage_index(i)]
                amax = float(a.max()) if a.numel() else 0.0
                widths.append(max(gamma * margin * amax, 1.0))
                k += 1
        self.set_widths(widths)
        return widths

    def _stage_index(self, layer_index: int) -> int:
        s = 0
        for i, layer in enumerate(self.layers):
            if isinstance(layer, (NeuronLayer, SpikingMaxPool2d)):
                s += 1
            if i == layer_index:
                return s
        raise IndexError(layer_index)

    @torch.no_grad()
    def adapt_windows(self, stage_times: list[torch.Tensor], gamma: float = GAMMA) -> bool:
        """The adaptive t_max rule, Eq. (8), applied layer by layer from recorded times.

        For every neuron layer: if t_max - t_min < gamma (t_max - min_{i,mu} t_i), grow t_max so
        the width equals gamma (t_max - min t_i); later windows shift with it (t_min^(n+1) =
        t_max^(n)) and base thresholds follow. Works on activations t_max - t, so the times may
        have been recorded with the windows before this call. Returns True if any window grew.
        """
        refs = self.stage_refs()
        widths, grew = [], False
        for i, layer in enumerate(self.layers):
            if isinstance(layer, NeuronLayer):
                k = self._stage_index(i)
                t = stage_times[k]
                # the largest activation max(t_ref - t) = t_ref - min t (silent: +inf -> none)
                t_first = float(t.min()) if t.numel() else math.inf
                need = gamma * max(refs[k] - t_first, 0.0) if math.isfinite(t_first) else 0.0
                w = layer.width
                if w < need * (1 - 1e-12):
                    w, grew = need, True
                widths.append(w)
        if grew:
            self.set_widths(widths)
        return grew

    # ---------------------------------------------------------------- statistics
    @torch.no_grad()
    def spikes_per_neuron(self, stage_times: list[torch.Tensor]) -> dict:
        """Average spikes per neuron per sample: ``{"layers": [...], "total": float}`` over the
        neuron layers (input and pooling stages excluded)."""
        per, n_sp, n_neu = [], 0.0, 0
        for i, layer in enumerate(self.layers):
            if isinstance(layer, NeuronLayer):
                t = stage_times[self._stage_index(i)]
                fired = torch.isfinite(t).flatten(1)
                per.append(float(fired.float().mean()))
                n_sp += float(fired.sum()) / t.shape[0]
                n_neu += fired.shape[1]
        return {"layers": per, "total": n_sp / max(n_neu, 1)}

    # ---------------------------------------------------------------- reverse mapping
    def to_relu(self) -> nn.Sequential:
        """The equivalent ReLU network, Eq. (2) / (9): w = W/B, b = -theta/B + width.

        A conv input shift becomes a :class:`ChannelShift` in front of the convolution; a pool
        with negative signs becomes a :class:`SignedMaxPool2d`.
        """
        mods: list[nn.Module] = []
        with torch.no_grad():
            for layer in self.layers:
                if isinstance(layer, SpikingDense):
                    w, b = layer.relu_params()
                    lin = nn.Linear(layer.in_features, layer.out_features, dtype=w.dtype)
                    lin.weight.copy_(w)
                    lin.bias.copy_(b)
                    mods += [lin, nn.ReLU()]
                elif isinstance(layer, SpikingConv2d):
                    w, b = layer.relu_params()
                    if layer.in_shift is not None:
                        mods.append(ChannelShift(layer.in_shift))
                    conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                     layer.stride, layer.padding, dtype=w.dtype)
                    conv.weight.copy_(w)
                    conv.bias.copy_(b)
                    mods += [conv, nn.ReLU()]
                elif isinstance(layer, SpikingMaxPool2d):
                    if hasattr(layer, "relu_module"):  # padded / dilated pools know their twin
                        mods.append(layer.relu_module())
                    elif layer.sign is None or bool((layer.sign > 0).all()):
                        mods.append(nn.MaxPool2d(layer.kernel_size, layer.stride))
                    else:
                        mods.append(SignedMaxPool2d(layer.kernel_size, layer.stride, layer.sign))
                elif isinstance(layer, Flatten):
                    mods.append(nn.Flatten())
                elif isinstance(layer, Readout):
                    lin = nn.Linear(layer.in_features, layer.out_features, dtype=layer.weight.dtype)
                    lin.weight.copy_(layer.weight)
                    lin.bias.copy_(layer.bias)
                    mods.append(lin)
        return nn.Sequential(*mods)
