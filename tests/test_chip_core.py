"""hwloop.chip.core.ChipCore: the state a chip keeps between wire commands (staged partial
writes, ranges and limits), whatever the dialect."""

from __future__ import annotations

import numpy as np
import pytest

from hwloop.chip.core import ChipCore, ChipError, Peer
from hwloop.errors import DeviceError
from hwloop.wire.codec import (Err, FEATURE_LOCK, FEATURE_SPARSE, PROTOCOL_VERSION, TIME_F64,
                               TIME_TICKS, WRITE_WEIGHTS_HDR, weights_crc)
from hwloop.wire.frame import Cmd, Flag, Frame

from fakes import FakeB1Device, small_spec
from wire_helpers import SPEC, frame_session, one_reply


def test_session_staged_partial_writes_commit_once():
    s, fake = frame_session()
    one_reply(s, Frame(1, Cmd.PROGRAM, 0, SPEC.model_dump_json().encode()))
    one_reply(s, Frame(2, Cmd.WRITE_WEIGHTS, 0,
                       WRITE_WEIGHTS_HDR.pack(0, 0, 10, 0.5) + np.full(10, 3, "<i2").tobytes()))
    assert fake.calls.count("write_weights 0") == 0
    one_reply(s, Frame(3, Cmd.WRITE_WEIGHTS, Flag.COMMIT,
                       WRITE_WEIGHTS_HDR.pack(0, 25, 5, 0.5) + np.full(5, -4, "<i2").tobytes()))
    codes, scale = fake.read_weights(0)
    assert scale == 0.5 and fake.calls.count("write_weights 0") == 1
    assert codes.reshape(-1).tolist() == [3] * 10 + [0] * 15 + [-4] * 5


# ------------------------------------------------------------------------------------------------
# ChipCore directly: staging, ranges, errors of the device, ownership
# ------------------------------------------------------------------------------------------------


def _core():
    fake = FakeB1Device()
    core = ChipCore(fake)
    core.program(SPEC.model_dump_json().encode())
    return core, fake


def test_staged_weights_and_thresholds_apply_on_commit_and_show_in_status():
    core, fake = _core()
    core.write_weights(0, 0, np.full(10, 3), 0.5, commit=False)
    core.write_weights(0, 0, np.array([5, 7]), 0.25, commit=False, indices=np.array([12, 29]))
    core.write_thresholds(0, 1, np.array([0.5, 0.75]), commit=False)
    st = core.status()
    assert st["staged_weights"] == [0] and st["staged_thresholds"] == [0]
    assert fake.calls.count("write_weights 0") == 0
    core.write_weights(0, 20, np.array([-4]), 0.25, commit=True)
    core.write_thresholds(0, 4, np.array([1.5]), commit=True)
    codes, scale = fake.read_weights(0)
    want = [3] * 10 + [0, 0, 5] + [0] * 7 + [-4] + [0] * 8 + [7]
    assert codes.reshape(-1).tolist() == want and scale == 0.25  # the last scale staged wins
    assert core.weights_crc(0) == (weights_crc(np.array(want), 0.25), 0.25, 30)
    assert core.read_thresholds(0, 1, 4).tolist()[0::3] == [0.5, 1.5]
    assert core.status()["staged_weights"] == core.status()["staged_thresholds"] == []


def test_program_and_reset_drop_staged_writes():
    core, fake = _core()
    core.write_weights(0, 0, np.full(30, 1), 1.0, commit=False)
    core.program(SPEC.model_dump_json().encode())
    core.write_weights(0, 29, np.array([2]), 1.0, commit=True)
    assert fake.read_weights(0)[0].reshape(-1).tolist() == [0] * 29 + [2]
    core.write_thresholds(0, 0, np.ones(5), commit=False)
    core.reset()
    assert core.spec is None and core.status()["staged_thresholds"] == []


@pytest.mark.parametrize("call,code,text", [
    (lambda c: c.write_weights(0, 25, np.zeros(6), 1.0, True), Err.RANGE, "offset 25 + count 6"),
    (lambda c: c.write_weights(0, 0, np.array([1]), 1.0, True, np.array([30])), Err.RANGE,
     "index 30 exceeds 29"),
    (lambda c: c.write_weights(0, 0, np.array([128]), 1.0, True), Err.RANGE, "[-128, 127]"),
    (lambda c: c.write_weights(0, 0, np.array([1]), float("nan"), True), Err.RANGE,
     "not finite"),
    (lambda c: c.write_weights(3, 0, np.array([1]), 1.0, True), Err.RANGE, "out of range"),
    (lambda c: c.read_weights(0, 0, 31), Err.RANGE, "exceeds 30"),
    (lambda c: c.read_thresholds(0, 5, 1), Err.RANGE, "exceeds 5"),
    (lambda c: c.write_thresholds(0, 4, np.zeros(2), True), Err.RANGE, "exceeds 5"),
    (lambda c: c.run(np.zeros((1, 7)), True), Err.BAD_PAYLOAD, "7 inputs per sample"),
    (lambda c: c.run(np.zeros((0, 6)), True), Err.LIMIT, "outside 1..max_batch"),
    (lambda c: c.program(b"{not json"), Err.BAD_PAYLOAD, "invalid NetworkSpec"),
    (lambda c: c.program(small_spec(n_in=2000).model_dump_json().encode()), Err.LIMIT,
     "max_fan_in"),
])
def test_bad_requests_are_chip_errors_with_their_code(call, code, text):
    core, _ = _core()
    with pytest.raises(ChipError) as ei:
        call(core)
    assert ei.value.code == code and text in str(ei.value)


def test_nothing_programmed_is_not_programmed():
    core = ChipCore(FakeB1Device())
    for call in (lambda: core.run(np.zeros((1, 6)), True), lambda: core.weights_crc(0),
                 lambda: core.set_windows(np.array([1.0, 2.0]))):
        with pytest.raises(ChipError) as ei:
            call()
        assert ei.value.code == Err.NOT_PROGRAMMED


def test_device_failures_map_to_device_and_internal_errors():
    core, fake = _core()

    def boom_device(*a):
        raise DeviceError("the analog core is on fire")

    def boom_bug(*a):
        raise KeyError("bug")

    fake.seed_noise = boom_device
    with pytest.raises(ChipError) as ei:
        core.seed_noise(1)
    assert ei.value.code == Err.DEVICE and "on fire" in str(ei.value)
    fake.run = boom_bug
    with pytest.raises(ChipError) as ei:
        core.run(np.zeros((1, 6)), True)
    assert ei.value.code == Err.INTERNAL and "KeyError" in str(ei.value)


def test_hello_lists_formats_features_and_the_model_digest():
    core, fake = _core()
    doc = core.hello()
    assert doc["protocol_version"] == PROTOCOL_VERSION
    assert doc["info"]["protocol_version"] == PROTOCOL_VERSION
    assert doc["time_formats"] == [TIME_TICKS, TIME_F64]
    assert doc["features"] == [FEATURE_SPARSE, FEATURE_LOCK] and "model_sha256" not in doc
    fake.model_sha256 = "ab" * 32
    assert core.hello()["model_sha256"] == "ab" * 32


def test_one_controlling_link_and_its_staged_writes():
    core, fake = _core()
    a, b = Peer("127.0.0.1:1"), Peer("127.0.0.1:2")
    core.claim(a)
    core.claim(a)  # again: nothing changes
    assert core.lock_state(a) == {"owner": "127.0.0.1:1", "you": True}
    assert core.lock_state(b) == {"owner": "127.0.0.1:1", "you": False}
    with pytest.raises(ChipError) as ei:
        core.claim(b)
    assert ei.value.code == Err.BUSY and "127.0.0.1:1" in str(ei.value)
    assert not core.release(b)
    # a take-over never commits the previous owner's staged partial writes
    core.write_weights(0, 0, np.full(30, 9), 1.0, commit=False)
    core.take_over(b)
    assert core.owner is b and core.status()["staged_weights"] == []
    assert core.release(b) and core.owner is None
    # an owner whose link is gone does not hold the chip
    dead = Peer("127.0.0.1:3", alive=lambda: False)
    core.claim(dead)
    core.claim(a)
    assert core.owner is a
