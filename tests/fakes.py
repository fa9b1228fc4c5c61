"""A small, exact, deterministic TTFSDevice for transport tests (dense B1 layers + readout).

Layer n (dense), inputs t_j from the previous stage, window [t_min, t_max):
    x_j = t_min - t_j for a spike (t_j finite), 0 for silence
    t_i = max(t_min, t_max - relu(W x + (t_max - t_min - theta_i)))   (= t_min + theta_i - W x)
    silent (+inf) when that is >= t_max; then v_tmax = W x + (t_max - t_min), else 0.
Readout: logits_i = sum_j W_ij (t_max^N - t_j) + offset_i over spiking j.

``time_step`` (tau_c, a power of two such as 1/64) rounds every output spike time up onto a
grid, so that tick conversion at a power-of-two ticks/tau_c is exact.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from hwloop.devices.base import (DeviceInfo, DeviceRecord, NetworkSpec, TTFSDevice, check_codes,
                                 check_fits)
from hwloop.errors import DeviceError
from hwloop.quant import code_range


def fake_info(**kw) -> DeviceInfo:
    base = dict(device_id="fake-b1-0001", firmware_version="fake-1", max_layers=8,
                max_neurons_per_layer=1024, max_fan_in=1024, weight_bits=8,
                clock_period_s=1e-6 / 256, tau_c_s=1e-6, max_batch=4096)
    base.update(kw)
    return DeviceInfo(**base)


class FakeB1Device(TTFSDevice):
    def __init__(self, info: Optional[DeviceInfo] = None, time_step: Optional[float] = None):
        self._info = info or fake_info()
        self.time_step = time_step
        self.spec: Optional[NetworkSpec] = None
        self.codes: dict[int, np.ndarray] = {}
        self.scales: dict[int, float] = {}
        self.thr: dict[int, np.ndarray] = {}
        self.windows: list[tuple[float, float]] = []
        #: layer -> flat indices whose written code is silently replaced by 0 (a stuck cell).
        self.stuck: dict[int, list[int]] = {}
        self.calls: list[str] = []

    def info(self) -> DeviceInfo:
        return self._info

    def program(self, spec: NetworkSpec) -> None:
        check_fits(spec, self._info)
        self.calls.append("program")
        self.spec = spec
        self.codes = {i: np.zeros(l.weight_shape, dtype=np.int64) for i, l in enumerate(spec.layers)
                      if l.weight_shape}
        self.scales = {i: 0.0 for i in self.codes}
        self.thr = {i: np.zeros(l.out_shape, dtype=np.float64) for i, l in enumerate(spec.layers)
                    if l.kind in ("dense", "conv2d", "readout")}
        self.windows = spec.windows()

    def _layer(self, layer: int):
        if self.spec is None:
            raise DeviceError("no network programmed")
        if not 0 <= layer < len(self.spec.layers):
            raise DeviceError(f"layer {layer} out of range")
        return self.spec.layers[layer]

    def write_weights(self, layer: int, codes: torch.Tensor, scale: float) -> None:
        spec = self._layer(layer)
        if tuple(codes.shape) != tuple(spec.weight_shape):
            raise DeviceError(f"layer {layer}: codes shape {tuple(codes.shape)} != "
                              f"{spec.weight_shape}")
        check_codes(codes, self._info.weight_bits, layer)
        c = codes.detach().cpu().numpy().astype(np.int64).copy()
        for idx in self.stuck.get(layer, []):
            c.reshape(-1)[idx] = 0
        self.codes[layer] = c
        self.scales[layer] = float(scale)
        self.calls.append(f"write_weights {layer}")

    def read_weights(self, layer: int) -> tuple[torch.Tensor, float]:
        self._layer(layer)
        if layer not in self.codes:
            raise DeviceError(f"layer {layer} has no weights")
        return torch.from_numpy(self.codes[layer].copy()), self.scales[layer]

    def write_thresholds(self, layer: int, values: torch.Tensor) -> None:
        spec = self._layer(layer)
        if layer not in self.thr or tuple(values.shape) != tuple(spec.out_shape):
            raise DeviceError(f"layer {layer}: thresholds of shape {tuple(values.shape)} do not "
                              "fit")
        self.thr[layer] = values.detach().cpu().double().numpy().copy()

    def read_thresholds(self, layer: int) -> torch.Tensor:
        self._layer(layer)
        if layer not in self.thr:
            raise DeviceError(f"layer {layer} has no thresholds")
        return torch.from_numpy(self.thr[layer].copy())

    def set_windows(self, windows: list[tuple[float, float]]) -> None:
        if self.spec is None:
            raise DeviceError("no network programmed")
        if len(windows) != len(self.windows):
            raise DeviceError(f"expected {len(self.windows)} windows, got {len(windows)}")
        self.windows = [(float(a), float(b)) for a, b in windows]

    def reset(self) -> None:
        self.spec = None
        self.codes, self.scales, self.thr, self.windows = {}, {}, {}, []

    def run(self, input_spike_times: torch.Tensor) -> DeviceRecord:
        if self.spec is None:
            raise DeviceError("no network programmed")
        spec = self.spec
        t_in = input_spike_times.detach().cpu().double().numpy()
        b = t_in.shape[0]
        if tuple(t_in.shape[1:]) != tuple(spec.input_shape):
            raise DeviceError(f"input shape {tuple(t_in.shape[1:])} != {spec.input_shape}")
        t = t_in.reshape(b, -1)
        stages = [torch.from_numpy(t_in.copy())]
        v_list, counts, readout = [], [], np.zeros((b, 0))
        wi = 0
        last_tmax = spec.t_max0
        for i, layer in enumerate(spec.layers):
            w = self.codes.get(i, np.zeros(0)) * self.scales.get(i, 0.0)
            if layer.kind == "dense":
                t_min, t_max = self.windows[wi]
                wi += 1
                x = np.where(np.isfinite(t), t_min - t, 0.0)
                v = x @ w.T
                drive = v + (t_max - t_min) - self.thr[i].reshape(1, -1)
                t_out = np.maximum(t_max - np.maximum(drive, 0.0), t_min)
                if self.time_step:
                    s = self.time_step
                    t_out = np.ceil(t_out / s) * s
                fired = t_out < t_max
                t = np.where(fired, t_out, np.inf)
                v_list.append(torch.from_numpy(np.where(fired, 0.0, v + (t_max - t_min))))
                counts.append(fired.sum(axis=1))
                stages.append(torch.from_numpy(t.reshape(b, *layer.out_shape).copy()))
                last_tmax = t_max
            elif layer.kind == "flatten":
                pass
            elif layer.kind == "readout":
                x = np.where(np.isfinite(t), last_tmax - t, 0.0)
                readout = x @ w.T + self.thr[i].reshape(1, -1)
            else:
                raise DeviceError(f"fake device does not support {layer.kind}")
        n_per = [spec.layers[i].n_neurons for i in spec.neuron_layers()]
        return DeviceRecord(
            spike_times=stages, readout=torch.from_numpy(np.ascontiguousarray(readout)),
            v_tmax=v_list,
            spike_counts=torch.from_numpy(np.stack(counts, axis=1).astype(np.int64)
                                          if counts else np.zeros((b, 0), np.int64)),
            neurons_per_layer=n_per, energy_j=None, meta={"device": self._info.device_id})


def small_spec(n_in: int = 12, hidden: int = 10, n_out: int = 4) -> NetworkSpec:
    from hwloop.devices.base import LayerSpec
    return NetworkSpec(input_shape=(n_in,), t_max0=1.0, layers=(
        LayerSpec(kind="dense", in_shape=(n_in,), out_shape=(hidden,),
                  weight_shape=(hidden, n_in), t_min=1.0, t_max=3.0),
        LayerSpec(kind="dense", in_shape=(hidden,), out_shape=(hidden,),
                  weight_shape=(hidden, hidden), t_min=3.0, t_max=5.0),
        LayerSpec(kind="readout", in_shape=(hidden,), out_shape=(n_out,),
                  weight_shape=(n_out, hidden), t_min=3.0, t_max=5.0),
    ))


def random_params(spec: NetworkSpec, seed: int = 0, bits: int = 8):
    """Weight codes/scales and thresholds that make a good share of neurons fire."""
    g = torch.Generator().manual_seed(seed)
    hi = code_range(bits)[1]
    weights, thresholds = {}, {}
    for i, l in enumerate(spec.layers):
        if l.weight_shape:
            codes = torch.randint(-hi, hi + 1, l.weight_shape, generator=g, dtype=torch.int64)
            weights[i] = (codes, 0.5 / hi)
            width = (l.t_max - l.t_min) if l.t_max is not None else 0.0
            thresholds[i] = width - 0.4 + torch.rand(l.out_shape, generator=g, dtype=torch.float64) * 0.6
    return weights, thresholds


def grid_inputs(spec: NetworkSpec, batch: int, seed: int = 0, step: float = 1.0 / 64,
                silent_frac: float = 0.2) -> torch.Tensor:
    """Input spike times on a grid of ``step`` tau_c in [t_max0 - 1, t_max0], some silent."""
    g = torch.Generator().manual_seed(seed)
    n = int(math.prod(spec.input_shape))
    k = torch.randint(0, int(round(1 / step)) + 1, (batch, n), generator=g)
    t = spec.t_max0 - 1.0 + k.double() * step
    silent = torch.rand(batch, n, generator=g) < silent_frac
    t[silent] = math.inf
    return t.reshape(batch, *spec.input_shape)
