"""Conformance checks of the programming contract: device info, limits, weight and threshold
round trips, refusal of out-of-range codes, thresholds and windows, ``set_windows``. Each takes
the :class:`~hwloop.testing.checks_common.SuiteContext` and returns ``(detail, numbers)`` or
raises :class:`~hwloop.testing.checks_common.Fail` / :class:`~hwloop.testing.checks_common.Skip`."""

from __future__ import annotations

import math

import torch

from hwloop.devices.base import LayerSpec, NetworkSpec
from hwloop.errors import DeviceLimitError
from hwloop.testing.checks_common import (F64, INF, MAX_TESTED_LIMIT, Fail, Skip, SuiteContext, expect_raises,
                                          outside_windows, values_equal)
from hwloop.testing.nets import code_range


def check_info_consistent(c: SuiteContext):
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


def check_limits_enforced(c: SuiteContext):
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
        msg = expect_raises(lambda: c.dev.program(spec), f"a network one past {limit}", DeviceLimitError)
        value = str(getattr(info, limit))
        if limit not in msg and value not in msg:
            raise Fail(f"the refusal of a network past {limit} does not name the limit: {msg!r}")
        tested.append(limit)
        msgs[limit] = msg
    if not tested:
        raise Skip("every limit is beyond what can be tested cheaply")
    c.setup()  # still usable after the refusals
    return f"DeviceLimitError naming the limit for {', '.join(tested)}", {"messages": msgs}


def _weights_with_extremes(c: SuiteContext) -> dict:
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


def check_weights_roundtrip(c: SuiteContext):
    c.dev.program(c.spec)
    weights = _weights_with_extremes(c)
    for i, (codes, scale) in weights.items():
        c.dev.write_weights(i, codes, scale)
    n = 0
    for i, (codes, scale) in weights.items():
        got, got_scale = c.dev.read_weights(i)
        if not values_equal(got, codes):
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


def check_thresholds_roundtrip(c: SuiteContext):
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


def check_codes_out_of_range_refused(c: SuiteContext):
    c.setup()
    lo, hi = code_range(c.info)
    tried = []
    for i, (codes, scale) in c.weights.items():
        for bad_value in (hi + 1, lo - 1):
            bad = codes.clone()
            bad.view(-1)[:] = torch.roll(bad.view(-1), 1)  # differ from what is stored ...
            bad.view(-1)[-1] = bad_value                    # ... and one code out of range
            expect_raises(lambda: c.dev.write_weights(i, bad, scale * 2), f"layer {i}: code {bad_value}")
            got, got_scale = c.dev.read_weights(i)
            if not values_equal(got, codes) or float(got_scale) != float(scale):
                raise Fail(f"layer {i}: a refused write (code {bad_value}) changed the chip "
                           "(weights or scale read back differ from before)", layer=i)
            tried.append(bad_value)
        wrong_shape = torch.zeros(tuple(codes.shape[:-1]) + (codes.shape[-1] + 1,), dtype=torch.int64)
        expect_raises(lambda: c.dev.write_weights(i, wrong_shape, scale), f"layer {i}: wrong shape")
        if not values_equal(c.dev.read_weights(i)[0], codes):
            raise Fail(f"layer {i}: a refused write (wrong shape) changed the chip", layer=i)
    return (f"codes {hi + 1} and {lo - 1} and a wrong shape refused, chip unchanged "
            f"({len(tried)} writes)"), {"refused_writes": len(tried)}


def check_thresholds_out_of_range_refused(c: SuiteContext):
    c.setup()
    n = 0
    for i, t in c.thresholds.items():
        for bad_value in (math.nan, math.inf, -math.inf):
            bad = (t + 0.125).clone()
            bad.view(-1)[-1] = bad_value
            expect_raises(lambda: c.dev.write_thresholds(i, bad), f"layer {i}: threshold {bad_value}")
            n += 1
        expect_raises(lambda: c.dev.write_thresholds(i, torch.zeros(t.numel() + 1, dtype=F64)),
                f"layer {i}: wrong shape")
        got = torch.as_tensor(c.dev.read_thresholds(i))
        if not torch.equal(got.to(F64), t):
            raise Fail(f"layer {i}: a refused threshold write changed the chip", layer=i)
    return f"NaN, +-inf and a wrong shape refused on every layer, chip unchanged", {"refused": n}


def check_windows_out_of_range_refused(c: SuiteContext):
    base = c.baseline()
    c.setup()
    good = c.spec.windows()
    if not c.info.adaptive_windows:
        msg = expect_raises(lambda: c.dev.set_windows(good), "set_windows on a chip without adaptive_windows")
        err = c.compare([c.run(c.x) for _ in range(c.n)], base)
        if err:
            raise Fail(f"a refused set_windows changed the chip: {err}")
        return "adaptive_windows=false: set_windows refused with DeviceError, chip unchanged", \
            {"message": msg}
    (a0, b0) = good[0]
    bad_sets = {"t_max == t_min": [(a0, a0)] + good[1:], "t_max < t_min": [(b0, a0)] + good[1:],
                "infinite": [(a0, INF)] + good[1:], "wrong count": good + [(7.0, 9.0)]}
    for what, wins in bad_sets.items():
        expect_raises(lambda: c.dev.set_windows(wins), f"windows {what}")
    err = c.compare([c.run(c.x) for _ in range(c.n)], base)
    if err:
        raise Fail(f"a refused set_windows changed the chip: {err}")
    return f"{len(bad_sets)} invalid window sets refused, runs unchanged", {"refused": list(bad_sets)}


def check_set_windows_applied(c: SuiteContext):
    if not c.info.adaptive_windows:
        raise Skip("adaptive_windows=false: windows are fixed at program()")
    base = c.baseline()
    c.setup()
    new = [(a + 0.5, b + 0.75) for a, b in c.spec.windows()]
    c.dev.set_windows(new)
    got = [c.run(c.x) for _ in range(c.n)]
    spec2 = c.spec.with_windows(new)
    outside = outside_windows(got, spec2, c.tick)
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
