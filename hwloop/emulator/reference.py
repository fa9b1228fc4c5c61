"""A slow, time-stepped reference of the emulator's circuit (tests only).

It integrates Eq. (1) of the programmed chip step by step instead of using the closed form:

* input phase, per neuron layer, on a grid of steps h <= dt from t_min^(n-1) to t_min^(n): the
  charge of each step is the exact integral of the piecewise-constant synaptic currents
  g_ij W_ij over that step (input j's current is on from max(t_j, t_min^(n-1)) on), accumulated
  in Q; V = Q / c_i;
* window phase, steps h <= dt from t_min to t_max: the ramp adds B_i h = (r_i / c_i) h per step;
  the comparator (enabled only in the window) checks V against theta_i + o_i w at every step
  and the crossing time is interpolated linearly inside the step where it happens; a crossed
  neuron's capacitor is held at its threshold;
* emission (frozen delay, random jitter from the same standard normals as the emulator's run,
  time grid), pooling and the readout (its offset integrated as a constant current over the
  window) as in :mod:`hwloop.emulator.device`.

Loops over time steps; vectorised over samples and neurons. Takes an :class:`EmulatorDevice`
for its programmed state and frozen parameters.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from hwloop.devices.base import NEURON_KINDS, DeviceRecord
from hwloop.emulator.device import EmulatorDevice
from hwloop.energy import network_energy
from hwloop.quant import quantize_times

__all__ = ["reference_run"]

F64 = torch.float64


def _synapses(kind: str, layer, on: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if kind == "conv2d":
        return F.conv2d(on, w, None, layer.stride, layer.padding)
    return F.linear(on, w)


def _integrate_inputs(kind, layer, t, start, stop, w, dt):
    """Charge (potential units x c_i) delivered between ``start`` and ``stop`` by step currents
    switched on at max(t_j, start), one step of at most ``dt`` at a time."""
    n = max(1, int(math.ceil((stop - start) / dt - 1e-9)))
    h = (stop - start) / n
    t_on = t.clamp(min=start)
    q = None
    for k in range(n):
        b = start + (k + 1) * h
        on = (b - t_on).clamp(0.0, h)  # time the current of j flowed inside this step
        dq = _synapses(kind, layer, on, w)
        q = dq if q is None else q + dq
    return q


def _ramp_and_compare(v, theta_b, slope, t_min, width, dt):
    """The window phase, stepped: the ramp charges every neuron at ``slope`` until it crosses
    ``theta_b`` (then it is held there). Returns (crossed, t_cross interpolated in the step,
    V at t_max), potentials in units of Eq. (1), times in tau_c."""
    crossed = v >= theta_b
    t_cross = torch.where(crossed, torch.full_like(v, t_min), torch.full_like(v, math.inf))
    n = max(1, int(math.ceil(width / dt - 1e-9)))
    h = width / n
    for k in range(n):
        a = t_min + k * h
        v_new = v + slope * h
        hit = (~crossed) & (v_new >= theta_b)
        t_cross = torch.where(hit, a + (theta_b - v) / (v_new - v) * h, t_cross)
        crossed = crossed | hit
        v = torch.where(crossed, theta_b, v_new)
    return crossed, t_cross, v


def _neuron_layer(device, i, layer, t, gate, noise, js, K, dt):
    """One neuron layer stepped: (t_out, fired, V(t_max) of silent neurons, theta, c_i)."""
    fz = device.frozen[i]
    t_min, t_max = float(layer.t_min), float(layer.t_max)
    width = t_max - t_min
    c = fz["capacitance"]
    v = _integrate_inputs(layer.kind, layer, t, gate, t_min, device.effective_weights(i), dt) / c
    theta = device.read_thresholds(i) + fz["threshold_offset"] * width
    crossed, t_cross, v = _ramp_and_compare(v, theta.expand_as(v), fz["ramp"] / c, t_min, width,
                                            dt)
    t_e = t_cross + fz["comparator_delay"]
    if js and noise is not None:
        t_e = t_e + js * noise.to(F64)
    fired = crossed & (t_e < t_max)
    t_out = torch.where(fired, t_e, torch.full_like(t_e, math.inf))
    if K:
        t_out = quantize_times(t_out, t_min, t_max, K)
        fired = torch.isfinite(t_out)
    v_end = torch.where(fired, torch.zeros_like(v), v)
    return t_out, fired, v_end, theta, c


def _max_pool(t, layer):
    """Explicit max pooling: earliest spike of each pool (latest for sign -1), via unfold."""
    kh, kw = layer.kernel_size
    sh, sw = layer.stride
    patches = t.unfold(2, kh, sh).unfold(3, kw, sw).flatten(-2)
    earliest = patches.min(-1).values
    if layer.pool_sign is None:
        return earliest
    s = torch.tensor(layer.pool_sign).view(-1, 1, 1)
    return torch.where(s > 0, earliest, patches.max(-1).values)


def reference_run(device: EmulatorDevice, input_spike_times: torch.Tensor,
                  noise: Optional[list[Optional[torch.Tensor]]] = None,
                  dt: float = 1e-3) -> DeviceRecord:
    """Run the programmed network of ``device`` by time stepping (step size at most ``dt``).

    ``noise`` is the list of standard normals the emulator's :meth:`~EmulatorDevice.simulate`
    takes (``None``: no jitter). Returns a :class:`DeviceRecord` like the emulator's.
    """
    spec = device.spec
    if spec is None:
        raise ValueError("device has no network programmed")
    p = device.profile
    K = p.time_steps_per_layer
    js = float(p.jitter_sd)
    noise = noise or [None] * (1 + len(spec.neuron_layers()))
    t = torch.as_tensor(input_spike_times).to(F64)
    gate = spec.t_max0 - 1.0
    if js and noise[0] is not None:
        t = t + js * noise[0].to(F64)
    if K:
        t = quantize_times(t, gate, spec.t_max0, K)
    stages = [t]
    spiked, v_list, thetas, caps, vpus, counts = [], [], [], [], [], []
    readout = None
    k_noise = 1
    for i, layer in enumerate(spec.layers):
        if layer.kind in NEURON_KINDS:
            t, fired, v_end, theta, c = _neuron_layer(device, i, layer, t, gate, noise[k_noise],
                                                      js, K, dt)
            spiked.append(fired)
            v_list.append(v_end)
            thetas.append(theta)
            caps.append(p.capacitance_f * c)
            vpus.append(p.threshold_voltage_v / (float(layer.t_max) - float(layer.t_min)))
            counts.append(fired.flatten(1).sum(1))
            gate = float(layer.t_min)
            k_noise += 1
            stages.append(t)
        elif layer.kind == "maxpool2d":
            t = _max_pool(t, layer)
            stages.append(t)
        elif layer.kind == "flatten":
            t = t.flatten(1)
        elif layer.kind == "readout":
            q = _integrate_inputs("dense", layer, t, gate, float(layer.t_max),
                                  device.effective_weights(i), dt)
            q = q + device.read_thresholds(i)  # the constant offset current over the window
            readout = q / device.frozen[i]["capacitance"]
            break
    energy = network_energy(spiked, thetas, v_list, caps, p.transmission_energy_j, vpus)
    return DeviceRecord(spike_times=stages, readout=readout, v_tmax=v_list,
                        spike_counts=torch.stack(counts, 1).to(torch.int64),
                        neurons_per_layer=[spec.layers[i].n_neurons for i in spec.neuron_layers()],
                        energy_j=energy, meta={"reference_dt": dt})
