"""Deliberately broken backends: each wraps a correct, deterministic emulator and breaks one
promise of the TTFSDevice contract. ``tests/test_conformance.py`` asserts that the conformance
suite fails the check that names each fault (:data:`BROKEN`)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from hwloop.devices.base import TTFSDevice, check_codes
from hwloop.errors import DeviceError
from hwloop.quant import code_range

ROOT = Path(__file__).resolve().parents[1]


def base_device(**update):
    """The correct chip underneath: the analog profile, no jitter, adaptive windows."""
    from hwloop.emulator.device import EmulatorDevice
    from hwloop.emulator.profile import load_profile
    prof = load_profile(ROOT / "devices" / "emulator-analog.yaml").model_copy(
        update={"jitter_sd": 0.0, "adaptive_windows": True, **update})
    return EmulatorDevice.from_profile(prof, chip_seed=3, jitter_seed=0)


class Wrapper(TTFSDevice):
    """Passes everything through to ``inner``."""

    def __init__(self, inner=None):
        self.inner = inner if inner is not None else base_device()

    def info(self):
        return self.inner.info()

    def program(self, spec):
        self.inner.program(spec)

    def write_weights(self, layer, codes, scale):
        self.inner.write_weights(layer, codes, scale)

    def read_weights(self, layer):
        return self.inner.read_weights(layer)

    def write_thresholds(self, layer, values):
        self.inner.write_thresholds(layer, values)

    def read_thresholds(self, layer):
        return self.inner.read_thresholds(layer)

    def set_windows(self, windows):
        self.inner.set_windows(windows)

    def run(self, x):
        return self.inner.run(x)

    def seed_noise(self, seed):
        self.inner.seed_noise(seed)

    def reset(self):
        self.inner.reset()

    def close(self):
        self.inner.close()


class NoResetBetweenRuns(Wrapper):
    """The capacitors are not discharged between runs: each run leaves charge behind, which
    acts as a threshold lowered by 0.05 per run (read_thresholds still shows the nominal)."""

    def program(self, spec):
        super().program(spec)
        self.nominal, self.leak = {}, 0.0

    def write_thresholds(self, layer, values):
        values = torch.as_tensor(values, dtype=torch.float64).clone()
        self.inner.write_thresholds(layer, values - self._leak_of(layer))
        self.nominal[layer] = values

    def read_thresholds(self, layer):
        return self.nominal[layer].clone() if layer in self.nominal else self.inner.read_thresholds(layer)

    def _leak_of(self, layer):
        if self.inner.spec is None:
            return 0.0
        return self.leak if self.inner.spec.layers[layer].kind != "readout" else 0.0

    def run(self, x):
        rec = self.inner.run(x)
        self.leak += 0.05
        for i, v in self.nominal.items():
            self.inner.write_thresholds(i, v - self._leak_of(i))
        return rec


class SilentClipWrite(Wrapper):
    """Clips out-of-range weight codes into range instead of refusing the write."""

    def write_weights(self, layer, codes, scale):
        self.inner.write_weights(layer, torch.as_tensor(codes).clamp(*code_range(self.info().weight_bits)),
                                 scale)


class PartialWrite(Wrapper):
    """Writes rows one by one and stops at the first bad one: a refused write is half applied."""

    def write_weights(self, layer, codes, scale):
        codes = torch.as_tensor(codes)
        cur, _ = self.inner.read_weights(layer)
        cur = cur.clone()
        for r in range(codes.shape[0]):
            try:
                check_codes(codes[r], self.info().weight_bits, layer)
            except DeviceError:
                self.inner.write_weights(layer, cur, scale)
                raise
            cur[r] = codes[r]
        self.inner.write_weights(layer, cur, scale)


class WindowIgnored(Wrapper):
    """Accepts set_windows and does nothing."""

    def set_windows(self, windows):
        try:  # validates, so bad windows are still refused
            self.inner.spec.with_windows(windows)
        except ValueError as e:
            raise DeviceError(str(e)) from None


class StaleReply(Wrapper):
    """Returns the reply to the previous run (a reply read one request late)."""

    last = None

    def run(self, x):
        prev, self.last = self.last, self.inner.run(x)
        return prev if prev is not None else self.last


class WrongUnit(Wrapper):
    """Sends thresholds in volts (theta x threshold_voltage_v / window width) while the chip
    takes potential units; read-back converts back, so round trips look fine."""

    def _vpu(self, layer):
        if self.inner.spec is None or not 0 <= layer < len(self.inner.spec.layers):
            return 1.0
        l = self.inner.spec.layers[layer]
        return self.inner.profile.threshold_voltage_v / (l.t_max - l.t_min)

    def write_thresholds(self, layer, values):
        if self._vpu(layer) == 1.0 or self.inner.spec.layers[layer].kind == "readout":
            return self.inner.write_thresholds(layer, values)
        self.inner.write_thresholds(layer, torch.as_tensor(values, dtype=torch.float64) * self._vpu(layer))

    def read_thresholds(self, layer):
        t = self.inner.read_thresholds(layer)
        if self._vpu(layer) == 1.0 or self.inner.spec.layers[layer].kind == "readout":
            return t
        return t / self._vpu(layer)


class LostSpike(Wrapper):
    """The AER decoder drops the last event of every sample in the first layer; the chip's spike
    counters still count it."""

    def run(self, x):
        rec = self.inner.run(x)
        t = rec.spike_times[1].reshape(rec.batch_size, -1)
        for b in range(t.shape[0]):
            idx = torch.nonzero(torch.isfinite(t[b])).reshape(-1)
            if idx.numel():
                t[b, idx[-1]] = math.inf
        return rec


class BatchTruncated(Wrapper):
    """Runs only the first max_batch samples of a larger batch instead of refusing it."""

    def run(self, x):
        rec = self.inner.run(x[: self.info().max_batch])
        return rec


class SilentAtTmax(Wrapper):
    """Reports a silent neuron at t_max of its window instead of +inf."""

    def run(self, x):
        rec = self.inner.run(x)
        spec = self.inner.spec
        wins = [l.t_max for l in spec.layers if l.kind in ("dense", "conv2d")]
        for s, tmax in enumerate(wins, 1):
            t = rec.spike_times[s]
            t[~torch.isfinite(t)] = tmax
        return rec


#: broken driver -> the check that must fail
BROKEN = {
    NoResetBetweenRuns: "run_repeatable",
    SilentClipWrite: "codes_out_of_range_refused",
    PartialWrite: "codes_out_of_range_refused",
    WindowIgnored: "set_windows_applied",
    StaleReply: "reply_matches_request",
    WrongUnit: "time_units",
    LostSpike: "counts_consistent",
    BatchTruncated: "batch_limit",
    SilentAtTmax: "spike_times_in_windows",
}
