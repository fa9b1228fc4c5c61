"""What the conformance checks share (:mod:`hwloop.testing.conformance`): the tolerances, the
:class:`Fail` / :class:`Skip` outcomes, the :class:`SuiteContext` (device, suite network,
baseline runs, exact or statistical comparison) and the helpers the checks call."""

from __future__ import annotations

import math
from typing import Optional

import torch

from hwloop.devices.base import DeviceRecord, NetworkSpec, TTFSDevice
from hwloop.errors import DeviceError
from hwloop.testing.nets import grid_inputs, program, record_diff, stage_windows, suite_params, suite_spec

__all__ = ["F64", "INF", "MAX_TESTED_LIMIT", "SLOPE_RANGE", "STAT_TOL", "Fail", "Skip", "SuiteContext",
           "expect_error", "expect_raises", "outside_windows", "stat_ratio", "values_equal"]

F64 = torch.float64
INF = math.inf
#: Pass threshold of the statistical comparison ratio (expectation 1 under equal distributions).
STAT_TOL = 2.5
#: Accepted range of the measured slopes dt/dtheta and -dt/dW (ideal B1: 1, ramp slope 1).
SLOPE_RANGE = (1 / 1.5, 1.5)
#: Largest limit the limit checks try to exceed (a network one past it is programmed).
MAX_TESTED_LIMIT = 1 << 20


class Fail(Exception):
    def __init__(self, detail: str, **numbers):
        super().__init__(detail)
        self.numbers = numbers


class Skip(Exception):
    def __init__(self, detail: str, **numbers):
        super().__init__(detail)
        self.numbers = numbers


class SuiteContext:
    """State shared by the checks: the device, its limits, the suite network and the baseline."""

    def __init__(self, dev: TTFSDevice, seed: int, repetitions: int, stall, hangup):
        self.dev = dev
        self.info = dev.info()
        self.seed = seed
        self.reps = max(3, int(repetitions))
        self.stall = stall
        self.hangup = hangup
        self.spec = suite_spec(self.info)
        self.weights, self.thresholds = suite_params(self.spec, self.info, seed)
        self.x = grid_inputs(self.spec, 16, seed=seed + 1)
        self.y = grid_inputs(self.spec, 9, seed=seed + 2)
        self.tick = 0.5 * self.info.clock_period_s / self.info.tau_c_s  # half a tick, tau_c
        self._mode: Optional[str] = None
        self._base: Optional[list[DeviceRecord]] = None
        self.records: list[DeviceRecord] = []  # every suite-network record seen (for counts)

    def setup(self, spec: Optional[NetworkSpec] = None) -> None:
        program(self.dev, spec or self.spec, self.weights, self.thresholds)

    def run(self, x) -> DeviceRecord:
        rec = self.dev.run(x)
        self.records.append(rec)
        return rec

    @property
    def mode(self) -> str:
        if self._mode is None:
            self.setup()
            a, b = self.run(self.x), self.run(self.x)
            self._mode = "exact" if record_diff(a, b) is None else "statistical"
            self._base = [a, b]
        return self._mode

    @property
    def n(self) -> int:
        """Runs per condition: 1 for a deterministic chip."""
        return 1 if self.mode == "exact" else self.reps

    def baseline(self) -> list[DeviceRecord]:
        """Runs of ``x`` on the suite network (as programmed by :meth:`setup`)."""
        mode = self.mode
        if mode == "statistical" and len(self._base) < self.reps:
            self.setup()
            self._base = self._base + [self.run(self.x) for _ in range(self.reps - len(self._base))]
        return self._base[:self.n]

    def compare(self, got: list[DeviceRecord], ref: list[DeviceRecord], spec=None) -> Optional[str]:
        """None when ``got`` agrees with ``ref`` (exactly, or within the statistical
        tolerance), else why not."""
        if self.mode == "exact":
            return record_diff(got[0], ref[0])
        r_t, r_o = stat_ratio(got, ref, spec or self.spec)
        if not (r_t <= STAT_TOL and r_o <= STAT_TOL):
            return (f"distributions differ: ratio {r_t:.2f} (spike times), {r_o:.2f} (readout) > "
                    f"{STAT_TOL} over {len(got)} vs {len(ref)} runs")
        return None


def _censored(rec: DeviceRecord, spec: NetworkSpec) -> list[torch.Tensor]:
    """Neuron-stage spike times with a silent neuron counted at its layer's t_max."""
    out = []
    wins = stage_windows(spec)
    for s, (t, w) in enumerate(zip(rec.spike_times, wins)):
        if s == 0 or w is None:
            continue
        t = t.to(F64)
        out.append(torch.where(torch.isfinite(t), t, torch.full_like(t, w[1])))
    return out


def _ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    ma, mb = a.mean(0), b.mean(0)
    va = a.var(0, unbiased=True) if a.shape[0] > 1 else torch.zeros_like(ma)
    vb = b.var(0, unbiased=True) if b.shape[0] > 1 else torch.zeros_like(mb)
    num = float(((ma - mb) ** 2).sum())
    den = float((va / a.shape[0] + vb / b.shape[0]).sum())
    if num == 0.0:
        return 0.0
    return num / den if den > 0 else INF


def stat_ratio(got: list[DeviceRecord], ref: list[DeviceRecord], spec: NetworkSpec) -> tuple[float, float]:
    """The statistical comparison ratios (spike times, readout) of two sets of runs."""
    ta = torch.stack([torch.cat([t.reshape(t.shape[0], -1) for t in _censored(r, spec)], 1) for r in got])
    tb = torch.stack([torch.cat([t.reshape(t.shape[0], -1) for t in _censored(r, spec)], 1) for r in ref])
    if ta.shape[1:] != tb.shape[1:]:
        return INF, INF
    oa = torch.stack([r.readout.to(F64) for r in got])
    ob = torch.stack([r.readout.to(F64) for r in ref])
    if oa.shape[1:] != ob.shape[1:]:
        return INF, INF
    return _ratio(ta, tb), _ratio(oa, ob)


def expect_error(fn, exc_type=DeviceError, not_type=None):
    """Call ``fn``; return ``(exception, what happened)``: the exception if it is an
    ``exc_type`` (and not a ``not_type``), else None and a description."""
    try:
        fn()
    except exc_type as e:  # noqa: PERF203
        if not_type is not None and isinstance(e, not_type):
            return None, f"raised {type(e).__name__}: {e}"
        return e, ""
    except Exception as e:
        return None, f"raised {type(e).__name__}: {e}"
    return None, "returned normally"


def expect_raises(fn, what: str, exc_type=DeviceError) -> str:
    """Call ``fn``; raise :class:`Fail` unless it raises ``exc_type``. Returns the message."""
    try:
        fn()
    except exc_type as e:
        return str(e)
    except Exception as e:  # the wrong type
        raise Fail(f"{what}: raised {type(e).__name__} ({e}), expected {exc_type.__name__}") from None
    raise Fail(f"{what}: accepted, expected {exc_type.__name__}")


def values_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:
        return False
    return bool(torch.equal(a.to(F64), b.to(F64)))


def outside_windows(recs, spec: NetworkSpec, tol: float) -> Optional[str]:
    wins = stage_windows(spec)
    stages = [i for i, l in enumerate(spec.layers) if l.kind in ("dense", "conv2d", "maxpool2d")]
    for rec in recs:
        if len(rec.spike_times) != len(wins):
            return f"{len(rec.spike_times)} stages, expected {len(wins)}"
        for s, (t, w) in enumerate(zip(rec.spike_times, wins)):
            want = (rec.batch_size,) + tuple(spec.input_shape if s == 0 else spec.layers[stages[s - 1]].out_shape)
            if tuple(t.shape) != want:
                return f"stage {s}: shape {tuple(t.shape)}, expected {want}"
            if t.dtype != F64:
                return f"stage {s}: dtype {t.dtype}, expected float64"
            if bool(torch.isnan(t).any()) or bool((t == -INF).any()):
                return f"stage {s}: NaN or -inf spike times (silent must be +inf)"
            if w is None:
                continue
            fin = t[torch.isfinite(t)]
            # t_min - half a tick (a tick transport may round down); t_max is exclusive: a
            # spike registered at t_max is no spike
            if fin.numel() and (float(fin.min()) < w[0] - tol or float(fin.max()) >= w[1]):
                return (f"stage {s}: spike times in [{float(fin.min()):.6g}, {float(fin.max()):.6g}] "
                        f"outside the window [{w[0]}, {w[1]}) (tolerance {tol:.3g} below t_min)")
    return None
