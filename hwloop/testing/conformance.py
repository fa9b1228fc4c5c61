"""The conformance suite: checks that any :class:`~hwloop.devices.base.TTFSDevice` backend
keeps the contract of ``hwloop/devices/base.py`` (see ``docs/drivers.md``).

``check_device(device)`` runs every check in :data:`CHECKS` order and returns a
:class:`ConformanceReport` with pass / fail / skip per check, a one-line reason and the measured
numbers. Each check programs its own small network, so one failure does not hide the next. The
device is closed at the end (the last checks test the closed link). The checks live in
:mod:`hwloop.testing.checks_io` (programming), :mod:`hwloop.testing.checks_run` (running) and
:mod:`hwloop.testing.checks_link` (the link); what they share in :mod:`hwloop.testing.checks_common`.

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

from hwloop.devices.base import TTFSDevice
from hwloop.testing.checks_common import (SLOPE_RANGE, STAT_TOL, Fail, Skip, SuiteContext,  # noqa: F401 - re-exported
                                          stat_ratio)
from hwloop.testing.checks_io import (check_codes_out_of_range_refused, check_info_consistent,
                                      check_limits_enforced, check_set_windows_applied,
                                      check_thresholds_out_of_range_refused, check_thresholds_roundtrip,
                                      check_weights_roundtrip, check_windows_out_of_range_refused)
from hwloop.testing.checks_link import check_closed_link, check_hangup, check_timeout
from hwloop.testing.checks_run import (check_batch_limit, check_counts_consistent, check_energy_consistent,
                                       check_reply_matches_request, check_run_repeatable, check_seed_noise,
                                       check_silent_is_silent, check_spike_times_in_windows, check_time_units)

__all__ = ["CHECKS", "STAT_TOL", "CheckResult", "ConformanceReport", "check_device"]

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
    c = SuiteContext(device, seed, repetitions, stall, hangup)
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
