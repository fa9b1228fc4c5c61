"""The dominant energy of TTFS inference (paper, Methods, "Estimation of the dominant factor of
energy consumption of neuromorphic hardware").

Each neuron is a capacitor C charged by its inputs and its ramp. Per data point, layer n costs

    E^(n) = sum_{i fired} (T_r + C_i (v_n theta_i)^2 / 2) + sum_{i silent} C_i (v_n V_i(t_max))^2 / 2

with T_r the transmission energy per spike (J), C_i the capacitance (F), theta_i the threshold
and V_i(t_max) the potential a silent neuron reached at the end of its window, both in the
potential units of Eq. (1) (tau_c = 1), and v_n the volts per potential unit of layer n. hwloop
fixes v_n so that a layer's base threshold (= its window width in the B1 model) is the chip's
threshold voltage: v_n = threshold_voltage_v / (t_max^(n) - t_min^(n)) (see docs/emulator.md).

This module is pure: no device, no profile object; every constant is an argument.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

__all__ = ["layer_energy", "network_energy", "neuron_energy_terms", "volts_per_unit"]

Number = Union[float, torch.Tensor]


def volts_per_unit(threshold_voltage_v: float, windows: Sequence[tuple[float, float]]) -> list[float]:
    """v_n = threshold_voltage_v / (t_max - t_min) for each window (V per potential unit)."""
    return [float(threshold_voltage_v) / (float(b) - float(a)) for a, b in windows]


def neuron_energy_terms(thresholds: torch.Tensor, capacitance_f: Number,
                        transmission_energy_j: float, volts_per_unit: float,
                        shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-neuron constants of :func:`layer_energy`, flattened over ``shape``.

    Returns ``(e_fire, half_cu2)``, float64 of ``prod(shape)`` each: ``e_fire`` = T_r +
    C_i (v theta_i)^2 / 2 joules (what a neuron that fires costs) and ``half_cu2`` = C_i v^2 / 2
    joules per squared potential unit (a silent neuron costs ``half_cu2 * V(t_max)^2``).
    ``thresholds`` and ``capacitance_f`` must broadcast to ``shape`` (potential units, farads).
    """
    u = float(volts_per_unit)
    theta = torch.as_tensor(thresholds, dtype=torch.float64)
    cap = torch.as_tensor(capacitance_f, dtype=torch.float64)
    half_cu2 = (0.5 * u * u) * cap.expand(shape).reshape(-1)
    e_fire = float(transmission_energy_j) + half_cu2 * theta.expand(shape).reshape(-1) ** 2
    return e_fire, half_cu2


def layer_energy(spiked: torch.Tensor, thresholds: torch.Tensor, v_tmax: torch.Tensor,
                 capacitance_f: Number, transmission_energy_j: float,
                 volts_per_unit: float = 1.0) -> torch.Tensor:
    """Energy per sample of one neuron layer, joules.

    Args:
        spiked: ``(B, *shape)`` bool, True where the neuron emitted a spike (or float 1.0 / 0.0).
        thresholds: theta_i, broadcastable to ``(B, *shape)`` (potential units).
        v_tmax: ``(B, *shape)`` V_i(t_max) of silent neurons (potential units); ignored where
            ``spiked``.
        capacitance_f: C in farads, a float or a tensor broadcastable to ``(B, *shape)`` (per
            neuron capacitances with mismatch).
        transmission_energy_j: T_r, joules per spike.
        volts_per_unit: volts per potential unit.

    Returns:
        ``(B,)`` float64 joules.
    """
    shape = tuple(spiked.shape[1:])
    u = float(volts_per_unit)
    theta = torch.as_tensor(thresholds, dtype=torch.float64)
    cap = torch.as_tensor(capacitance_f, dtype=torch.float64)
    v = torch.as_tensor(v_tmax, dtype=torch.float64)
    batch = spiked.shape[0]
    if theta.dim() <= len(shape) and cap.dim() <= len(shape):
        # per-neuron constants: E = s . (T_r + C theta^2 u^2 / 2) + (v^2 masked) . (C u^2 / 2)
        e_fire, half_cu2 = neuron_energy_terms(theta, cap, transmission_energy_j, u, shape)
        s = spiked.reshape(batch, -1).to(torch.float64)
        v_sil = v.expand(spiked.shape).reshape(batch, -1) * torch.rsub(s, 1.0)
        return s @ e_fire + (v_sil * v_sil) @ half_cu2
    spiked = spiked.to(torch.bool)
    charge = torch.where(spiked, theta * u, v * u)
    e = 0.5 * cap * charge * charge + spiked.to(torch.float64) * float(transmission_energy_j)
    return e.expand(spiked.shape).reshape(batch, -1).sum(1)


def network_energy(spiked: Sequence[torch.Tensor], thresholds: Sequence[torch.Tensor],
                   v_tmax: Sequence[torch.Tensor], capacitance_f: Union[Number, Sequence[Number]],
                   transmission_energy_j: float,
                   volts_per_unit: Union[float, Sequence[float]] = 1.0) -> torch.Tensor:
    """Energy per sample per neuron layer, ``(B, L)`` float64 joules.

    ``spiked``, ``thresholds`` and ``v_tmax`` hold one entry per neuron layer (see
    :func:`layer_energy`); ``capacitance_f`` and ``volts_per_unit`` are one value for all layers
    or one per layer. Sum over the last axis for joules per sample.
    """
    n = len(spiked)
    if not (len(thresholds) == len(v_tmax) == n):
        raise ValueError("spiked, thresholds and v_tmax need one entry per neuron layer")
    caps = list(capacitance_f) if isinstance(capacitance_f, (list, tuple)) else [capacitance_f] * n
    vpu = list(volts_per_unit) if isinstance(volts_per_unit, (list, tuple)) else [volts_per_unit] * n
    if len(caps) != n or len(vpu) != n:
        raise ValueError("capacitance_f and volts_per_unit need one value or one per layer")
    if n == 0:
        return torch.zeros(0, 0, dtype=torch.float64)
    cols = [layer_energy(s, th, v, c, transmission_energy_j, u)
            for s, th, v, c, u in zip(spiked, thresholds, v_tmax, caps, vpu)]
    return torch.stack(cols, dim=1)
