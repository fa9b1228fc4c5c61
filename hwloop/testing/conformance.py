"""The conformance suite: checks that any :class:`~hwloop.devices.base.TTFSDevice` backend
keeps the contract of ``hwloop/devices/base.py`` (see ``docs/drivers.md``).

``check_device(device)`` runs every check in :data:`CHECKS` order and returns a
:class:`ConformanceReport` with pass / fail / skip per check, a one-line reason and the measured
numbers. Each check programs its own small network, so one failure does not hide the next. The
device is closed at the end (the last checks test the closed link).

Deterministic chips are compared bit for bit. A chip whose repeated runs differ (random jitter)
is tested statistically: every comparison uses ``repetitions`` runs per condition and the
statistic ``ratio = sum_e (mean_A,e - mean_B,e)^2 / sum_e (var_A,e / R_A + var_B,e / R_B)`` over
all elements e (spike times of every neuron stage, a silent neuron counted at its t_max; and
separately the readout), whose expectation is 1 when A and B come from the same distribution;
the check passes when ``ratio <= STAT_TOL`` (2.5). Times are compared with a tolerance of half a
clock tick (``0.5 * clock_period_s / tau_c_s`` tau_c), the resolution of the tick transport.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, ContextManager, Optional

import torch

from hwloop.devices.base import NEURON_KINDS, DeviceRecord, LayerSpec, NetworkSpec, TTFSDevice
from hwloop.errors import DeviceError, DeviceLimitError, DeviceTimeout
from hwloop.testing.nets import (cat_records, code_range, grid_inputs, probe_spec, program,
                                 record_diff, stage_windows, suite_params, suite_spec, tiny_spec)

__all__ = ["CHECKS", "STAT_TOL", "CheckResult", "ConformanceReport", "check_device"]

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


@dataclass
class CheckResult:
    name: str
    status: str  # "pass", "fail" or "skip"
    detail: str
    numbers: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class ConformanceReport:
    device_id: str
    mode: str  # "exact" or "statistical"
    results: list[CheckResult]
    tolerances: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failed()

    def failed(self) -> list[str]:
        """Names of the failed checks."""
        return [r.name for r in self.results if r.status == "fail"]

    def __getitem__(self, name: str) -> CheckResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"device_id": self.device_id, "mode": self.mode, "passed": self.passed,
                "failed": self.failed(), "tolerances": self.tolerances,
                "results": [asdict(r) for r in self.results]}

    def format_table(self) -> str:
        w = max(len(r.name) for r in self.results)
        lines = [f"conformance of {self.device_id} ({self.mode} comparisons)"]
        for r in self.results:
            lines.append(f"  {r.status.upper():4s}  {r.name.ljust(w)}  {r.detail}  [{r.seconds:.2f} s]")
        n = {s: sum(r.status == s for r in self.results) for s in ("pass", "fail", "skip")}
        lines.append(f"{n['pass']} passed, {n['fail']} failed, {n['skip']} skipped")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
class _Ctx:
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


def _expect_error(fn, exc_type=DeviceError, not_type=None):
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


def _raises(fn, what: str, exc_type=DeviceError) -> str:
    """Call ``fn``; raise :class:`Fail` unless it raises ``exc_type``. Returns the message."""
    try:
        fn()
    except exc_type as e:
        return str(e)
    except Exception as e:  # the wrong type
        raise Fail(f"{what}: raised {type(e).__name__} ({e}), expected {exc_type.__name__}") from None
    raise Fail(f"{what}: accepted, expected {exc_type.__name__}")


def _values_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:
        return False
    return bool(torch.equal(a.to(F64), b.to(F64)))


# ---------------------------------------------------------------------------------------------
# the checks: each takes the context and returns (detail, numbers) or raises Fail / Skip
def check_info_consistent(c: _Ctx):
    info, again = c.info, c.dev.info()
    if info != again:
        raise Fail("info() changed between two calls")
    problems = []
    if not info.device_id.strip():
        problems.append("empty device_id")
    if info.clock_period_s > info.tau_c_s:
        problems.append(f"clock_period_s={info.clock_period_s} > tau_c_s={info.tau_c_s} "
                        "(less than one tick per tau_c)")
    known = {"dense", "conv2d", "maxpool2d", "flatten", "readout"}
    if not set(info.layer_kinds) <= known:
        problems.append(f"unknown layer_kinds {sorted(set(info.layer_kinds) - known)}")
    for need in ("dense", "readout"):
        if need not in info.layer_kinds:
            problems.append(f"layer_kinds lacks {need!r} (every hwloop network needs it)")
    if info.time_steps_per_layer is not None and info.time_steps_per_layer < 1:
        problems.append("time_steps_per_layer < 1")
    lo, hi = code_range(info)
    nums = {"ticks_per_tau_c": info.tau_c_s / info.clock_period_s, "weight_codes": [lo, hi],
            "max_batch": info.max_batch, "time_steps_per_layer": info.time_steps_per_layer,
            "adaptive_windows": info.adaptive_windows}
    if problems:
        raise Fail("; ".join(problems), **nums)
    return (f"{info.device_id}: codes [{lo}, {hi}], {nums['ticks_per_tau_c']:g} ticks/tau_c, "
            f"max_batch {info.max_batch}"), nums


def check_limits_enforced(c: _Ctx):
    info = c.info
    tested, msgs = [], {}

    def dense(n_in, n_out, kind="dense"):
        return LayerSpec(kind=kind, in_shape=(n_in,), out_shape=(n_out,), weight_shape=(n_out, n_in),
                         t_min=1.0, t_max=3.0)

    cases = []
    if info.max_neurons_per_layer < MAX_TESTED_LIMIT:
        n = info.max_neurons_per_layer + 1
        cases.append(("max_neurons_per_layer", NetworkSpec(input_shape=(1,), layers=(
            dense(1, n), dense(n, 1, "readout")))))
    if info.max_fan_in < MAX_TESTED_LIMIT:
        n = info.max_fan_in + 1
        cases.append(("max_fan_in", NetworkSpec(input_shape=(n,), layers=(
            dense(n, 1), dense(1, 1, "readout")))))
    if info.max_layers < 256:
        k = info.max_layers + 1
        cases.append(("max_layers", NetworkSpec(input_shape=(1,), layers=tuple(
            [dense(1, 1)] * (k - 1) + [dense(1, 1, "readout")]))))
    for limit, spec in cases:
        msg = _raises(lambda: c.dev.program(spec), f"a network one past {limit}", DeviceLimitError)
        value = str(getattr(info, limit))
        if limit not in msg and value not in msg:
            raise Fail(f"the refusal of a network past {limit} does not name the limit: {msg!r}")
        tested.append(limit)
        msgs[limit] = msg
    if not tested:
        raise Skip("every limit is beyond what can be tested cheaply")
    c.setup()  # still usable after the refusals
    return f"DeviceLimitError naming the limit for {', '.join(tested)}", {"messages": msgs}


def _weights_with_extremes(c: _Ctx) -> dict:
    lo, hi = code_range(c.info)
    out = {}
    for i, (codes, scale) in c.weights.items():
        codes = codes.clone()
        flat = codes.view(-1)
        flat[0] = lo
        if flat.numel() > 1:
            flat[1] = hi
        out[i] = (codes, scale)
    return out


def check_weights_roundtrip(c: _Ctx):
    c.dev.program(c.spec)
    weights = _weights_with_extremes(c)
    for i, (codes, scale) in weights.items():
        c.dev.write_weights(i, codes, scale)
    n = 0
    for i, (codes, scale) in weights.items():
        got, got_scale = c.dev.read_weights(i)
        if not _values_equal(got, codes):
            bad = int((torch.as_tensor(got).to(F64) != codes.to(F64)).sum()) \
                if tuple(torch.as_tensor(got).shape) == tuple(codes.shape) else -1
            raise Fail(f"layer {i}: {bad} codes read back differ from those written", layer=i)
        if float(got_scale) != float(scale):
            raise Fail(f"layer {i}: scale read back {got_scale!r} != written {scale!r}", layer=i)
        if torch.as_tensor(got).is_floating_point() and c.info.weight_bits < 32:
            raise Fail(f"layer {i}: codes read back as {torch.as_tensor(got).dtype}, expected int64")
        n += codes.numel()
    lo, hi = code_range(c.info)
    return f"{n} codes incl. {lo} and {hi} and their scales read back exactly", {"codes": n}


def check_thresholds_roundtrip(c: _Ctx):
    c.setup()
    n = 0
    for i, t in c.thresholds.items():
        t = t.clone()
        t.view(-1)[0] = 1.0 / 3.0  # not a short decimal: float64 must survive bit for bit
        c.dev.write_thresholds(i, t)
        got = torch.as_tensor(c.dev.read_thresholds(i))
        if got.dtype != F64 or tuple(got.shape) != tuple(t.shape) or not torch.equal(got, t):
            raise Fail(f"layer {i}: thresholds read back differ from those written (dtype "
                       f"{got.dtype}, shape {tuple(got.shape)})", layer=i)
        n += t.numel()
    return f"{n} float64 thresholds/offsets read back bit for bit", {"values": n}


def check_codes_out_of_range_refused(c: _Ctx):
    c.setup()
    lo, hi = code_range(c.info)
    tried = []
    for i, (codes, scale) in c.weights.items():
        for bad_value in (hi + 1, lo - 1):
            bad = codes.clone()
            bad.view(-1)[:] = torch.roll(bad.view(-1), 1)  # differ from what is stored ...
            bad.view(-1)[-1] = bad_value                    # ... and one code out of range
            _raises(lambda: c.dev.write_weights(i, bad, scale * 2), f"layer {i}: code {bad_value}")
            got, got_scale = c.dev.read_weights(i)
            if not _values_equal(got, codes) or float(got_scale) != float(scale):
                raise Fail(f"layer {i}: a refused write (code {bad_value}) changed the chip "
                           "(weights or scale read back differ from before)", layer=i)
            tried.append(bad_value)
        wrong_shape = torch.zeros(tuple(codes.shape[:-1]) + (codes.shape[-1] + 1,), dtype=torch.int64)
        _raises(lambda: c.dev.write_weights(i, wrong_shape, scale), f"layer {i}: wrong shape")
        if not _values_equal(c.dev.read_weights(i)[0], codes):
            raise Fail(f"layer {i}: a refused write (wrong shape) changed the chip", layer=i)
    return (f"codes {hi + 1} and {lo - 1} and a wrong shape refused, chip unchanged "
            f"({len(tried)} writes)"), {"refused_writes": len(tried)}


def check_thresholds_out_of_range_refused(c: _Ctx):
    c.setup()
    n = 0
    for i, t in c.thresholds.items():
        for bad_value in (math.nan, math.inf, -math.inf):
            bad = (t + 0.125).clone()
            bad.view(-1)[-1] = bad_value
            _raises(lambda: c.dev.write_thresholds(i, bad), f"layer {i}: threshold {bad_value}")
            n += 1
        _raises(lambda: c.dev.write_thresholds(i, torch.zeros(t.numel() + 1, dtype=F64)),
                f"layer {i}: wrong shape")
        got = torch.as_tensor(c.dev.read_thresholds(i))
        if not torch.equal(got.to(F64), t):
            raise Fail(f"layer {i}: a refused threshold write changed the chip", layer=i)
    return f"NaN, +-inf and a wrong shape refused on every layer, chip unchanged", {"refused": n}


def check_windows_out_of_range_refused(c: _Ctx):
    base = c.baseline()
    c.setup()
    good = c.spec.windows()
    if not c.info.adaptive_windows:
        msg = _raises(lambda: c.dev.set_windows(good), "set_windows on a chip without adaptive_windows")
        err = c.compare([c.run(c.x) for _ in range(c.n)], base)
        if err:
            raise Fail(f"a refused set_windows changed the chip: {err}")
        return "adaptive_windows=false: set_windows refused with DeviceError, chip unchanged", \
            {"message": msg}
    (a0, b0) = good[0]
    bad_sets = {"t_max == t_min": [(a0, a0)] + good[1:], "t_max < t_min": [(b0, a0)] + good[1:],
                "infinite": [(a0, INF)] + good[1:], "wrong count": good + [(7.0, 9.0)]}
    for what, wins in bad_sets.items():
        _raises(lambda: c.dev.set_windows(wins), f"windows {what}")
    err = c.compare([c.run(c.x) for _ in range(c.n)], base)
    if err:
        raise Fail(f"a refused set_windows changed the chip: {err}")
    return f"{len(bad_sets)} invalid window sets refused, runs unchanged", {"refused": list(bad_sets)}


def check_set_windows_applied(c: _Ctx):
    if not c.info.adaptive_windows:
        raise Skip("adaptive_windows=false: windows are fixed at program()")
    base = c.baseline()
    c.setup()
    new = [(a + 0.5, b + 0.75) for a, b in c.spec.windows()]
    c.dev.set_windows(new)
    got = [c.run(c.x) for _ in range(c.n)]
    spec2 = c.spec.with_windows(new)
    outside = _outside_windows(got, spec2, c.tick)
    if outside:
        raise Fail(f"after set_windows({new}): {outside}")
    c.setup(spec2)  # the same network programmed with the new windows from the start
    ref = [c.run(c.x) for _ in range(c.n)]
    err = c.compare(got, ref, spec2)
    if err:
        raise Fail(f"set_windows({new}) does not run like a network programmed with those windows: {err}")
    c.setup()
    c.dev.set_windows(new)
    c.dev.set_windows(c.spec.windows())
    err = c.compare([c.run(c.x) for _ in range(c.n)], base)
    if err:
        raise Fail(f"setting the original windows back does not restore the runs: {err}")
    return "new windows act as if programmed, and setting the old ones back restores the runs", \
        {"windows": new}


def check_run_repeatable(c: _Ctx):
    base = c.baseline()
    c.setup()
    n, x, k = c.n, c.x, 7
    conds = {}
    conds["same input again"] = [c.run(x) for _ in range(n)]
    conds["batch split 7 + 9"] = [cat_records([c.run(x[:k]), c.run(x[k:])]) for _ in range(n)]
    after = []
    for _ in range(n):
        c.run(c.y)
        after.append(c.run(x))
    conds["after an unrelated batch"] = after
    c.setup()
    conds["after reprogramming"] = [c.run(x) for _ in range(n)]
    bad = {}
    for name, recs in conds.items():
        err = c.compare(recs, base)
        if err:
            bad[name] = err
    nums = {"conditions": list(conds), "runs_per_condition": n}
    if c.mode == "statistical":
        nums["ratios"] = {name: stat_ratio(recs, base, c.spec) for name, recs in conds.items()}
    if bad:
        raise Fail("; ".join(f"{k}: {v}" for k, v in bad.items()), **nums)
    how = "bit for bit" if c.mode == "exact" else f"within ratio <= {STAT_TOL} ({n} runs each)"
    return f"{len(conds)} conditions agree with the first run {how}", nums


def check_reply_matches_request(c: _Ctx):
    c.setup()
    info = c.info
    dt_in = 1.0 / info.time_steps_per_layer if info.time_steps_per_layer else 0.0
    sigma = _input_jitter(c)
    tol = dt_in + 4 * sigma + c.tick + 1e-9
    worst = 0.0
    for j, b in enumerate((3, 5, 2, 4)):
        x = grid_inputs(c.spec, b, seed=c.seed + 20 + j, silent_frac=0.3)
        rec = c.run(x)
        if rec.batch_size != b or rec.spike_times[0].shape[0] != b:
            raise Fail(f"a batch of {b} got a record of {rec.batch_size} samples "
                       "(a reply to another request?)")
        seen = rec.spike_times[0].reshape(b, -1).to(F64)
        sent = x.reshape(b, -1)
        if bool((torch.isfinite(seen) & ~torch.isfinite(sent)).any()):
            raise Fail(f"run {j}: the record's input stage has spikes where the request had none "
                       "(a reply to another request?)")
        both = torch.isfinite(seen) & torch.isfinite(sent)
        if bool(both.any()):
            d = float((seen - sent)[both].abs().max())
            worst = max(worst, d)
            if d > tol:
                raise Fail(f"run {j}: input stage differs from the request by {d:.3g} tau_c > "
                           f"{tol:.3g} (quantisation + 4 sigma jitter + half a tick)",
                           max_input_diff=d, tolerance=tol)
    return f"4 runs of distinct sizes: each record matches its request (max input shift {worst:.3g} " \
           f"<= {tol:.3g} tau_c)", {"max_input_diff": worst, "tolerance": tol}


def _input_jitter(c: _Ctx) -> float:
    """Standard deviation of the input stage over repeated runs of ``x`` (0 when exact)."""
    if c.mode == "exact":
        return 0.0
    t = torch.stack([r.spike_times[0].to(F64) for r in c.baseline()])
    fin = torch.isfinite(t).all(0)
    if not bool(fin.any()):
        return 0.0
    return float(t[:, fin].std(0).max())


def _outside_windows(recs, spec: NetworkSpec, tol: float) -> Optional[str]:
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


def check_spike_times_in_windows(c: _Ctx):
    recs = c.baseline()
    bad = _outside_windows(recs, c.spec, c.tick)
    if bad:
        raise Fail(bad)
    fired = sum(int(torch.isfinite(t).sum()) for r in recs for t in r.spike_times[1:])
    if fired == 0:
        raise Fail("no neuron fired on the suite network (expected a good share)")
    return f"{fired} spikes, all inside [t_min, t_max) of their layer (tolerance {c.tick:.3g} tau_c)", \
        {"spikes": fired, "tolerance": c.tick}


def check_silent_is_silent(c: _Ctx):
    spec = c.spec
    c.dev.program(spec)
    for i, l in enumerate(spec.layers):
        if l.weight_shape:
            c.dev.write_weights(i, torch.zeros(l.weight_shape, dtype=torch.int64), 0.5 / code_range(c.info)[1])
        if l.kind in NEURON_KINDS:  # unreachable: above the ramp's whole rise over the window
            c.dev.write_thresholds(i, torch.full(l.out_shape, 4.0 * (l.t_max - l.t_min), dtype=F64))
        elif l.kind == "readout":
            c.dev.write_thresholds(i, torch.zeros(l.out_shape, dtype=F64))
    for rep in range(c.n):
        rec = c.dev.run(c.x)
        for s, t in enumerate(rec.spike_times[1:], 1):
            if bool(torch.isfinite(t).any()):
                raise Fail(f"stage {s}: {int(torch.isfinite(t).sum())} spikes from neurons that "
                           "cannot reach their threshold (zero weights, threshold 4x the window)")
        if int(rec.spike_counts.sum()) != 0:
            raise Fail(f"spike counts {rec.spike_counts.sum().item()} on a silent network")
        if float(rec.readout.abs().max()) > 1e-9:
            raise Fail(f"readout {float(rec.readout.abs().max()):.3g} with zero weights and offsets")
        for li, v in enumerate(rec.v_tmax):
            if not bool((v > 0).all()):
                raise Fail(f"neuron layer {li}: V(t_max) of silent neurons must be the ramp's end "
                           f"(> 0); got min {float(v.min()):.3g}")
    c.setup()
    rec = c.dev.run(torch.full((4,) + tuple(spec.input_shape), INF, dtype=F64))
    if bool(torch.isfinite(rec.spike_times[0]).any()):
        raise Fail("silent inputs (+inf) came back as spikes in the input stage")
    return "unreachable thresholds give no spikes, zero counts and readout, V(t_max) > 0; silent " \
           "inputs stay silent", {}


def check_batch_limit(c: _Ctx):
    spec = tiny_spec()
    c.dev.program(spec)
    c.dev.write_weights(0, torch.ones((1, 1), dtype=torch.int64), 0.5)
    c.dev.write_thresholds(0, torch.full((1,), 1.0, dtype=F64))
    mb = c.info.max_batch
    n_ok = min(mb, 4096)
    x = torch.zeros((n_ok, 1), dtype=F64)
    t0 = time.monotonic()
    rec = c.dev.run(x)
    took = time.monotonic() - t0
    if rec.batch_size != n_ok:
        raise Fail(f"a batch of {n_ok} returned {rec.batch_size} samples")
    nums = {"max_batch": mb, "ran": n_ok, "seconds": took}
    if mb > 65536:
        return f"ran {n_ok} samples; max_batch {mb} too large to exceed cheaply", nums
    msg = _raises(lambda: c.dev.run(torch.zeros((mb + 1, 1), dtype=F64)),
                  f"a batch of max_batch + 1 = {mb + 1}", DeviceLimitError)
    rec = c.dev.run(x[:2])
    if rec.batch_size != 2:
        raise Fail("the device does not run normally after refusing a batch")
    nums["message"] = msg
    return f"{n_ok} samples run; {mb + 1} refused with DeviceLimitError", nums


def check_counts_consistent(c: _Ctx):
    c.baseline()
    recs = list(c.records)
    nl = c.spec.neuron_layers()
    want_n = [c.spec.layers[i].n_neurons for i in nl]
    stage_of = {}
    s = 1
    for i, l in enumerate(c.spec.layers):
        if l.kind in ("dense", "conv2d", "maxpool2d"):
            stage_of[i] = s
            s += 1
    checked = 0
    for rec in recs:
        b = rec.batch_size
        if list(rec.neurons_per_layer) != want_n:
            raise Fail(f"neurons_per_layer {rec.neurons_per_layer}, expected {want_n}")
        if tuple(rec.spike_counts.shape) != (b, len(nl)) or rec.spike_counts.dtype != torch.int64:
            raise Fail(f"spike_counts shape {tuple(rec.spike_counts.shape)} dtype "
                       f"{rec.spike_counts.dtype}, expected ({b}, {len(nl)}) int64")
        if len(rec.v_tmax) != len(nl):
            raise Fail(f"{len(rec.v_tmax)} v_tmax tensors, expected {len(nl)}")
        for j, i in enumerate(nl):
            t = rec.spike_times[stage_of[i]].reshape(b, -1)
            fired = torch.isfinite(t)
            n_fin = fired.sum(1)
            if not torch.equal(n_fin, rec.spike_counts[:, j]):
                k = int((n_fin != rec.spike_counts[:, j]).sum())
                raise Fail(f"neuron layer {j}: spike_counts disagree with the finite spike times in "
                           f"{k} of {b} samples (counted {rec.spike_counts[:, j].sum().item()}, "
                           f"times {n_fin.sum().item()}): a lost or invented spike",
                           samples=k)
            v = rec.v_tmax[j].reshape(b, -1)
            if bool((v[fired] != 0).any()):
                raise Fail(f"neuron layer {j}: V(t_max) is not 0 where the neuron fired")
        checked += b
    return f"counts = finite spike times and V(t_max) = 0 where fired, in {len(recs)} records " \
           f"({checked} samples)", {"records": len(recs), "samples": checked}


def check_energy_consistent(c: _Ctx):
    recs = c.baseline()
    if recs[0].energy_j is None:
        return "the backend reports no energy (hwloop.energy computes it from the record)", {}
    nl = len(c.spec.neuron_layers())
    for rec in recs:
        e = rec.energy_j
        if tuple(e.shape) != (rec.batch_size, nl):
            raise Fail(f"energy_j shape {tuple(e.shape)}, expected ({rec.batch_size}, {nl})")
        if not bool(torch.isfinite(e).all()) or bool((e < 0).any()):
            raise Fail("energy_j has negative or non-finite values")
        if bool(((rec.spike_counts > 0) & (e <= 0)).any()):
            raise Fail("a layer that spiked reports zero energy")
    per_spike = float(sum(r.energy_j.sum() for r in recs) / max(1, sum(int(r.spike_counts.sum()) for r in recs)))
    return f"energy per sample and layer finite, >= 0, > 0 where spikes, shape (B, {nl})", \
        {"joules_per_spike_avg": per_spike}


def _sweep_slopes(c: _Ctx, reps: int = 16):
    """Median per-neuron slopes dt/dtheta and dt/dW on the single-synapse probe network."""
    spec = probe_spec(c.info)
    n = spec.layers[0].n_neurons
    c.dev.program(spec)
    lo, hi = code_range(c.info)
    w_max = 0.6
    scale = w_max / hi
    x = torch.zeros((reps, 1), dtype=F64)  # one input at t_max0 - 1: V(t_min) = W (t_min - 0)

    def mean_times():
        ts = []
        for _ in range(1 if c.mode == "exact" else 2):
            ts.append(c.dev.run(x).spike_times[1].to(F64))
        t = torch.cat(ts)
        return torch.where(torch.isfinite(t).all(0), t.mean(0), torch.full((n,), math.nan, dtype=F64))

    zero = torch.zeros((n, 1), dtype=torch.int64)
    c.dev.write_weights(0, zero, scale)
    thetas = [0.4 + 0.2 * k for k in range(7)]
    t_theta = []
    for th in thetas:
        c.dev.write_thresholds(0, torch.full((n,), th, dtype=F64))
        t_theta.append(mean_times())
    c.dev.write_thresholds(0, torch.full((n,), 1.0, dtype=F64))
    codes = sorted({int(round(v)) for v in torch.linspace(-hi, hi, 7, dtype=F64).tolist()})
    t_w = []
    for k in codes:
        c.dev.write_weights(0, torch.full((n, 1), k, dtype=torch.int64), scale)
        t_w.append(mean_times())
    return (torch.tensor(thetas, dtype=F64), torch.stack(t_theta, 1),
            torch.tensor(codes, dtype=F64) * scale, torch.stack(t_w, 1))


def _slope(x: torch.Tensor, y: torch.Tensor) -> float:
    ok = torch.isfinite(y)
    if int(ok.sum()) < 3:
        return math.nan
    x, y = x[ok], y[ok]
    xm = x - x.mean()
    return float((xm * (y - y.mean())).sum() / (xm * xm).sum())


def check_time_units(c: _Ctx):
    th, t_th, w, t_w = _sweep_slopes(c)
    s_th = [_slope(th, t_th[i]) for i in range(t_th.shape[0])]
    s_w = [-_slope(w, t_w[i]) for i in range(t_w.shape[0])]
    med_th = float(torch.tensor(s_th).nanmedian())
    med_w = float(torch.tensor(s_w).nanmedian())
    nums = {"dt_dtheta_median": med_th, "minus_dt_dW_median": med_w, "accepted": SLOPE_RANGE}
    lo, hi = SLOPE_RANGE
    if not (lo <= med_th <= hi):
        raise Fail(f"spike time vs threshold: slope {med_th:.3g} tau_c per potential unit, B1 "
                   f"expects 1 (ramp slope 1) within [{lo:.2f}, {hi:.2f}]: a unit error in "
                   "thresholds or times?", **nums)
    if not (lo <= med_w <= hi):
        raise Fail(f"spike time vs weight: slope {-med_w:.3g} tau_c per weight unit (input 1 tau_c "
                   f"before t_min), B1 expects -1 within [{lo:.2f}, {hi:.2f}]: a unit error in "
                   "weights, scales or times?", **nums)
    return f"dt/dtheta = {med_th:.3f}, dt/dW = {-med_w:.3f} (B1: 1 and -1)", nums


def check_seed_noise(c: _Ctx):
    c.setup()
    if c.mode == "exact":
        c.dev.seed_noise(1234)
        return "deterministic chip: seed_noise accepted", {}
    c.dev.seed_noise(1234)
    a = c.dev.run(c.x)
    c.dev.seed_noise(1234)
    b = c.dev.run(c.x)
    if record_diff(a, b) is None:
        return "seed_noise makes the jitter reproducible", {"seedable": True}
    raise Skip("jitter is not seedable (a physical chip's noise; allowed)", seedable=False)


def check_timeout(c: _Ctx):
    if c.stall is None:
        raise Skip("needs a stall hook (check_device(..., stall=...)) that makes the chip stop "
                   "answering")
    c.setup()
    base = c.baseline()
    t0 = time.monotonic()
    with c.stall():
        err, what = _expect_error(lambda: c.dev.run(c.x), DeviceTimeout)
        took = time.monotonic() - t0
    if err is None:
        raise Fail(f"a run on a chip that stopped answering {what} after {took:.2f} s, expected "
                   "DeviceTimeout", seconds=took)
    c.setup()
    back = [c.dev.run(c.x) for _ in range(c.n)]
    bad = c.compare(back, base)
    if bad:
        raise Fail(f"after the stall the runs differ: {bad}", seconds=took)
    return f"DeviceTimeout after {took:.2f} s; the device works again after the stall", {"seconds": took}


def check_hangup(c: _Ctx):
    if c.hangup is None:
        raise Skip("needs a hangup hook (check_device(..., hangup=...)) that closes the link from "
                   "the chip's side")
    c.setup()
    c.hangup()
    t0 = time.monotonic()
    err, what = _expect_error(lambda: c.dev.run(c.x), DeviceError, not_type=DeviceTimeout)
    took = time.monotonic() - t0
    if err is None:
        raise Fail(f"a run on a link closed by the chip {what}, expected DeviceError (not "
                   "DeviceTimeout)", seconds=took)
    if took > 5.0:
        raise Fail(f"the hang-up took {took:.1f} s to be noticed (> 5 s)", seconds=took)
    return f"DeviceError after {took:.2f} s: {str(err)[:80]}", {"seconds": took}


def check_closed_link(c: _Ctx):
    c.dev.close()
    c.dev.close()  # idempotent
    t0 = time.monotonic()
    for what, fn in (("run", lambda: c.dev.run(c.x)),
                     ("write_thresholds", lambda: c.dev.write_thresholds(0, c.thresholds[0])),
                     ("program", lambda: c.dev.program(c.spec))):
        err, how = _expect_error(fn, DeviceError)
        if err is None:
            raise Fail(f"{what} on a closed device {how}, expected DeviceError")
    took = time.monotonic() - t0
    if took > 5.0:
        raise Fail(f"calls on a closed device took {took:.1f} s to fail", seconds=took)
    return "close() is idempotent; run, write_thresholds and program then raise DeviceError", \
        {"seconds": took}


#: (name, function) of every check, in the order they run.
CHECKS: tuple[tuple[str, Callable], ...] = (
    ("info_consistent", check_info_consistent),
    ("limits_enforced", check_limits_enforced),
    ("weights_roundtrip", check_weights_roundtrip),
    ("thresholds_roundtrip", check_thresholds_roundtrip),
    ("codes_out_of_range_refused", check_codes_out_of_range_refused),
    ("thresholds_out_of_range_refused", check_thresholds_out_of_range_refused),
    ("windows_out_of_range_refused", check_windows_out_of_range_refused),
    ("set_windows_applied", check_set_windows_applied),
    ("run_repeatable", check_run_repeatable),
    ("reply_matches_request", check_reply_matches_request),
    ("spike_times_in_windows", check_spike_times_in_windows),
    ("silent_is_silent", check_silent_is_silent),
    ("batch_limit", check_batch_limit),
    ("counts_consistent", check_counts_consistent),
    ("energy_consistent", check_energy_consistent),
    ("time_units", check_time_units),
    ("seed_noise", check_seed_noise),
    ("timeout", check_timeout),
    ("hangup", check_hangup),
    ("closed_link", check_closed_link),
)


def check_device(device: TTFSDevice, *, seed: int = 0, repetitions: int = 8,
                 stall: Optional[Callable[[], ContextManager]] = None,
                 hangup: Optional[Callable[[], None]] = None,
                 only: Optional[list[str]] = None,
                 log: Optional[Callable[[str], None]] = None) -> ConformanceReport:
    """Run the conformance suite on an open device; the device is closed at the end.

    Args:
        device: any :class:`TTFSDevice`.
        seed: of the random networks and inputs.
        repetitions: runs per condition on a chip with random jitter.
        stall: a context manager factory; inside ``with stall():`` the chip stops answering
            (for the ``timeout`` check; skipped without one).
        hangup: closes the link from the chip's side (for the ``hangup`` check).
        only: run just these checks (``closed_link`` still closes the device at the end).
        log: called with one line per finished check.
    """
    names = [n for n, _ in CHECKS]
    if only is not None:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"unknown checks {unknown}; known: {names}")
    c = _Ctx(device, seed, repetitions, stall, hangup)
    results = []
    for name, fn in CHECKS:
        if only is not None and name not in only:
            continue
        t0 = time.monotonic()
        try:
            detail, numbers = fn(c)
            status = "pass"
        except Fail as e:
            status, detail, numbers = "fail", str(e), e.numbers
        except Skip as e:
            status, detail, numbers = "skip", str(e), e.numbers
        except Exception as e:  # an unexpected error is that check's failure
            status, detail, numbers = "fail", f"raised {type(e).__name__}: {e}", {}
        res = CheckResult(name, status, detail, _jsonable(numbers), time.monotonic() - t0)
        results.append(res)
        if log:
            log(f"{res.status.upper():4s} {name}: {res.detail}")
    with contextlib.suppress(Exception):
        device.close()
    mode = c._mode or "exact"
    return ConformanceReport(device_id=c.info.device_id, mode=mode, results=results,
                             tolerances={"stat_ratio_max": STAT_TOL, "time_tolerance_tau_c": c.tick,
                                         "slope_range": list(SLOPE_RANGE),
                                         "repetitions": c.reps if mode == "statistical" else 1})


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x
