"""The B1 circuit in closed form: free functions over typed parameters (docs/emulator.md).

Units: times and window widths in tau_c; potentials (V, theta) in the units of Eq. (1) with
tau_c = 1 (weight units x tau_c); capacitances in farads; energies in joules. Every function is
batched over the first axis (B samples) and works in float64. The tick rule is
:func:`hwloop.quant.tick_index_` (ceil) and the energy constants are
:func:`hwloop.energy.neuron_energy_terms`, so the emulator, quantisation and energy estimate
cannot disagree. Functions ending in ``_`` may modify their tensor arguments in place (noted per
argument); the others do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from hwloop.devices.base import LayerSpec
from hwloop.energy import neuron_energy_terms, volts_per_unit
from hwloop.quant import fired_indicator, quantize_times, silence_where_, tick_index_

__all__ = ["NeuronConstants", "input_stage", "max_pool", "neuron_constants", "neuron_layer",
           "readout"]

F64 = torch.float64
Scalar = Union[float, torch.Tensor]


@dataclass(frozen=True)
class NeuronConstants:
    """Per-neuron constants of one neuron layer for its thresholds and window.

    Attributes:
        t_min, t_max, width: the window and t_max - t_min, tau_c.
        theta: effective thresholds theta_i + o_i w (potential units), ``out_shape``.
        inv_cap: 1 / c_i (relative capacitance), or None without capacitance mismatch.
        inv_slope: 1 / B_i = c_i / r_i (tau_c per potential unit), or None for B_i = 1.
        ramp_width: B_i w, the potential the ramp adds over the whole window.
        lead: t_min + d_i (the comparator's frozen delay, tau_c), or None without delay mismatch.
        half_cu2: C_i v^2 / 2 per neuron, flat (J per squared potential unit).
        fire_mat: ``(n, 2)``: the energy of a spike, T_r + C_i (v theta_i)^2 / 2 (J), and 1.0
            (so that one product gives energy and spike count).
    """

    t_min: float
    t_max: float
    width: float
    theta: torch.Tensor
    inv_cap: Optional[torch.Tensor]
    inv_slope: Optional[torch.Tensor]
    ramp_width: Scalar
    lead: Optional[torch.Tensor]
    half_cu2: torch.Tensor
    fire_mat: torch.Tensor


def neuron_constants(layer: LayerSpec, thresholds: torch.Tensor, frozen: dict, *,
                     capacitance_f: float, threshold_voltage_v: float,
                     transmission_energy_j: float, threshold_offset: bool, capacitance: bool,
                     ramp: bool, comparator_delay: bool) -> NeuronConstants:
    """The constants of a neuron layer.

    Args:
        layer: the layer (its window ``t_min``, ``t_max`` in tau_c and ``out_shape``).
        thresholds: theta_i as programmed (potential units), ``out_shape``.
        frozen: the layer's frozen parameters (``capacitance``, ``ramp`` factors,
            ``threshold_offset`` as a fraction of the window, ``comparator_delay`` in tau_c).
        capacitance_f: the nominal capacitance C, farads.
        threshold_voltage_v: volts of the base threshold (sets v = volts per potential unit).
        transmission_energy_j: T_r, joules per spike.
        threshold_offset, capacitance, ramp, comparator_delay: whether that mismatch is on
            (off: the factor is exactly 1 / the offset 0, and its arithmetic is skipped).
    """
    t_min, t_max = float(layer.t_min), float(layer.t_max)
    width = t_max - t_min
    theta = thresholds
    if threshold_offset:
        theta = theta + frozen["threshold_offset"] * width
    cap = frozen["capacitance"] if capacitance else None
    slope = frozen["ramp"] / frozen["capacitance"] if (ramp or capacitance) else None
    # emission time t_e = lead + gap / slope (+ jitter); lead = t_min + comparator delay
    lead = t_min + frozen["comparator_delay"] if comparator_delay else None
    cap_f = capacitance_f if cap is None else capacitance_f * cap
    vpu = volts_per_unit(threshold_voltage_v, [(t_min, t_max)])[0]
    e_fire, half_cu2 = neuron_energy_terms(theta, cap_f, transmission_energy_j, vpu,
                                           tuple(layer.out_shape))
    return NeuronConstants(
        t_min=t_min, t_max=t_max, width=width, theta=theta,
        inv_cap=None if cap is None else 1.0 / cap,
        inv_slope=None if slope is None else 1.0 / slope,
        ramp_width=width if slope is None else slope * width, lead=lead,
        half_cu2=half_cu2.contiguous(), fire_mat=torch.stack([e_fire, torch.ones_like(e_fire)], 1))


def input_stage(t_in: torch.Tensor, noise: Optional[torch.Tensor], jitter_sd: float,
                t_max0: float, steps: Optional[int]) -> torch.Tensor:
    """The input spikes as the chip registers them: ``t_in`` (tau_c, ``+inf`` silent) plus
    ``jitter_sd`` x ``noise`` (standard normals; None = no jitter), on the K-step grid of the
    input window [t_max0 - 1, t_max0] when ``steps`` is set. A new float64 tensor."""
    if jitter_sd and noise is not None:
        t = torch.add(t_in.to(F64), noise.to(F64), alpha=jitter_sd)
    else:
        t = t_in.to(F64, copy=True)
    if steps:
        t = quantize_times(t, t_max0 - 1.0, t_max0, steps, out=t)
    return t


def _synaptic_input(t: torch.Tensor, gate: float, until: float, layer: LayerSpec,
                    w_eff: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum_j g_ij W_ij clamp(until - t_j, 0, until - gate): the charge of the input phase
    (potential units x c_i), inputs ``t`` in tau_c."""
    x = torch.rsub(t, until).clamp_(0.0, until - gate)
    if layer.kind == "conv2d":
        return F.conv2d(x, w_eff, bias, layer.stride, layer.padding)
    return F.linear(x, w_eff, bias)


def _emission_(v: torch.Tensor, c: NeuronConstants, noise: Optional[torch.Tensor],
               jitter_sd: float, steps: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Spike times (tau_c, ``+inf`` silent) and the fired indicator (float 1.0 / +0.0) of
    neurons at potential ``v`` = V(t_min); ``v`` is left unchanged."""
    gap = torch.sub(c.theta, v).clamp_(min=0.0)  # potential still to climb at t_min
    if c.inv_slope is not None:
        gap.mul_(c.inv_slope)                    # -> time to climb it
    room = torch.rsub(gap, c.width)              # > 0 iff t_cross < t_max
    t_e = gap.add_(c.lead if c.lead is not None else c.t_min)
    if jitter_sd and noise is not None:
        t_e.add_(noise.to(F64), alpha=jitter_sd)
    if steps:  # register at the next tick; a tick at t_max is silent
        # (k < K implies t_e < t_max, so that test is not needed here)
        dt = c.width / steps
        tick_index_(t_e, c.t_min, dt, out=t_e)
        torch.minimum(room, torch.rsub(t_e, float(steps)), out=room)
        t_e.mul_(dt).add_(c.t_min)
    elif c.lead is not None or jitter_sd:
        torch.minimum(room, torch.rsub(t_e, c.t_max), out=room)  # and t_e < t_max
    fired = fired_indicator(room)
    return silence_where_(t_e, fired), fired


def neuron_layer(t: torch.Tensor, gate: float, layer: LayerSpec, w_eff: torch.Tensor,
                 c: NeuronConstants, noise: Optional[torch.Tensor], jitter_sd: float,
                 steps: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor]:
    """One dense or conv2d layer of the B1 circuit.

    Args:
        t: ``(B, *in_shape)`` input spike times, tau_c (``+inf`` silent).
        gate: t_min of the previous stage's window (tau_c): a spike earlier than it acts from
            there on.
        layer: the layer; w_eff: its true weights g_ij W_ij.
        c: its constants (:func:`neuron_constants`).
        noise: standard normals ``(B, *out_shape)`` for the jitter, or None.
        jitter_sd: sd of the jitter, tau_c. steps: K ticks per window, or None (continuous).

    Returns:
        ``(t_out, v_end, energy, count)``: spike times (tau_c), V(t_max) of silent neurons (0.0
        where fired), energy per sample (``(B,)`` J) and spikes per sample (``(B,)`` float).
    """
    v = _synaptic_input(t, gate, c.t_min, layer, w_eff)
    if c.inv_cap is not None:
        v.mul_(c.inv_cap)
    t_out, fired = _emission_(v, c, noise, jitter_sd, steps)
    # V(t_max) of silent neurons: the ramp's end, held at threshold if it crossed
    v_end = v.add_(c.ramp_width)
    v_end = torch.minimum(v_end, c.theta, out=v_end).mul_(torch.rsub(fired, 1.0))
    # energy (hwloop.energy.layer_energy) and spike count in one product (v_end is already 0
    # where fired)
    f2 = fired.view(fired.shape[0], -1)
    v2 = v_end.reshape(f2.shape)
    ec = f2.mm(c.fire_mat)
    energy = torch.addmv(ec[:, 0], v2 * v2, c.half_cu2)
    return t_out, v_end, energy, ec[:, 1]  # the count is float, exact up to 2^53


def max_pool(t: torch.Tensor, layer: LayerSpec) -> torch.Tensor:
    """Max pooling of spike times: the earliest spike of each pool (the latest for channels
    with ``pool_sign`` -1)."""
    earliest = -F.max_pool2d(-t, layer.kernel_size, layer.stride)
    if layer.pool_sign is not None and any(s < 0 for s in layer.pool_sign):
        latest = F.max_pool2d(t, layer.kernel_size, layer.stride)
        sign = torch.tensor(layer.pool_sign).view(-1, 1, 1)
        return torch.where(sign > 0, earliest, latest)
    return earliest


def readout(t: torch.Tensor, gate: float, layer: LayerSpec, w_eff: torch.Tensor,
            offsets: torch.Tensor, capacitance: Optional[torch.Tensor]) -> torch.Tensor:
    """Readout potentials at t_max^(N) (the logits, potential units): the synapses integrated
    until the read-out time ``layer.t_max`` (tau_c), plus ``offsets``, over the relative
    capacitance c_k (None: 1)."""
    out = _synaptic_input(t, gate, float(layer.t_max), layer, w_eff, offsets)
    if capacitance is not None:
        out.div_(capacitance)
    return out
