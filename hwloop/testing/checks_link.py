"""Conformance checks of the link: a stalled chip times out, a hang-up is reported, a closed
device refuses every call. Each takes the :class:`~hwloop.testing.checks_common.SuiteContext`
and returns ``(detail, numbers)`` or raises :class:`~hwloop.testing.checks_common.Fail` /
:class:`~hwloop.testing.checks_common.Skip`."""

from __future__ import annotations

import time

from hwloop.errors import DeviceError, DeviceTimeout
from hwloop.testing.checks_common import Fail, Skip, SuiteContext, expect_error


def check_timeout(c: SuiteContext):
    if c.stall is None:
        raise Skip("needs a stall hook (check_device(..., stall=...)) that makes the chip stop "
                   "answering")
    c.setup()
    base = c.baseline()
    t0 = time.monotonic()
    with c.stall():
        err, what = expect_error(lambda: c.dev.run(c.x), DeviceTimeout)
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


def check_hangup(c: SuiteContext):
    if c.hangup is None:
        raise Skip("needs a hangup hook (check_device(..., hangup=...)) that closes the link from "
                   "the chip's side")
    c.setup()
    c.hangup()
    t0 = time.monotonic()
    err, what = expect_error(lambda: c.dev.run(c.x), DeviceError, not_type=DeviceTimeout)
    took = time.monotonic() - t0
    if err is None:
        raise Fail(f"a run on a link closed by the chip {what}, expected DeviceError (not "
                   "DeviceTimeout)", seconds=took)
    if took > 5.0:
        raise Fail(f"the hang-up took {took:.1f} s to be noticed (> 5 s)", seconds=took)
    return f"DeviceError after {took:.2f} s: {str(err)[:80]}", {"seconds": took}


def check_closed_link(c: SuiteContext):
    c.dev.close()
    c.dev.close()  # idempotent
    t0 = time.monotonic()
    for what, fn in (("run", lambda: c.dev.run(c.x)),
                     ("write_thresholds", lambda: c.dev.write_thresholds(0, c.thresholds[0])),
                     ("program", lambda: c.dev.program(c.spec))):
        err, how = expect_error(fn, DeviceError)
        if err is None:
            raise Fail(f"{what} on a closed device {how}, expected DeviceError")
    took = time.monotonic() - t0
    if took > 5.0:
        raise Fail(f"calls on a closed device took {took:.1f} s to fail", seconds=took)
    return "close() is idempotent; run, write_thresholds and program then raise DeviceError", \
        {"seconds": took}
