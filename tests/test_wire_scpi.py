"""The SCPI dialect, hwloop.wire.scpi (definite-length blocks, status bits, unit splitting), and
its host, hwloop.wire.visa_device.VisaDevice, byte for byte: a scripted loopback TCP instrument
(tests/bytes_exchange.py, reached through pyvisa-py as ``TCPIP::127.0.0.1::PORT::SOCKET``) checks
every command line and IEEE 488.2 block the host writes and answers with scripted replies, the
way tests/test_wire_frame.py scripts the frame host's exchanges."""

from __future__ import annotations

import json
import secrets
import time

import numpy as np
import pytest
import torch

from hwloop.errors import (DeviceError, DeviceLimitError, DeviceTimeout, ProtocolError,
                           WriteVerifyError)
from hwloop.wire.codec import (Err, FEATURE_SPARSE, PROTOCOL_ERRORS, PROTOCOL_VERSION,
                               times_to_ticks, weights_crc)
from hwloop.wire.scpi import (ESR_CME, ESR_DDE, ESR_EXE, ESR_QYE, SCPI_DATA_OUT_OF_RANGE,
                              SCPI_SYNTAX_ERROR, SCPI_UNDEFINED_HEADER, definite_block,
                              esr_bit_for, scpi_split_units)
from hwloop.wire.visa_device import VisaDevice

from bytes_exchange import (NO_ERROR, ScriptedInstrument, block_line, ieee_block, line,
                            scpi_error, visa_hello)
from wire_helpers import INFO, SPEC, assert_same_record, record_bytes

TOKEN = "0123456789abcdef"
ECHO = f"HWL:ECHO? hwl-sync-{TOKEN}"


@pytest.fixture
def visa():
    """``visa(script, **VisaDevice kwargs) -> (device, instrument)``: the hello steps (see
    ``visa_hello``; ``formats=``/``features=``/``hello=`` change them) then ``script``; every
    device and instrument is closed afterwards and a request that differed fails the test."""
    opened = []

    def make(script, *, formats=("ticks", "f64"), features=(), hello=None, **kw):
        steps = (visa_hello(INFO, formats, features) if hello is None else hello) + list(script)
        inst = ScriptedInstrument(steps)
        opened.append([inst, None])
        kw.setdefault("timeout", 0.5)
        dev = VisaDevice(inst.resource, **kw)
        opened[-1][1] = dev
        return dev, inst

    yield make
    for inst, dev in opened:
        if dev is not None:
            dev.close()
        inst.close()
        assert inst.failure is None, inst.failure


@pytest.fixture
def fixed_token(monkeypatch):
    """The resync marker's random token, fixed so that its echo can be scripted byte for byte."""
    monkeypatch.setattr(secrets, "token_hex", lambda n=None: TOKEN)


def err_check(reply: bytes = NO_ERROR) -> list[tuple[bytes, bytes]]:
    """A ``SYST:ERR?`` step (and, for an error, the one that finds the queue empty)."""
    steps = [(line("SYST:ERR?"), reply)]
    if reply != NO_ERROR:
        steps.append((line("SYST:ERR?"), NO_ERROR))
    return steps


def program_steps(spec=SPEC) -> list[tuple[bytes, bytes]]:
    return [(block_line("HWL:PROG ", spec.model_dump_json().encode()), b"")] + err_check()


def crc_step(codes: np.ndarray, scale: float, crc=None) -> tuple[bytes, bytes]:
    c = weights_crc(codes.reshape(-1), scale) if crc is None else crc
    return line("HWL:WEIG:CRC? 0"), f"{c},{scale!r},{codes.size}\n".encode()


def dense_steps(codes: np.ndarray, scale: float, starts, step: int, crc=None):
    """One ``HWL:WEIG <layer>,<scale>,<offset>,<commit>,#<block int32>`` per chunk, the last one
    committing, then ``SYST:ERR?`` and ``HWL:WEIG:CRC?``."""
    flat = codes.reshape(-1)
    steps = [(block_line(f"HWL:WEIG 0,{scale!r},{s},{int(i == len(starts) - 1)},",
                         flat[s:s + step].astype("<i4").tobytes()), b"")
             for i, s in enumerate(starts)]
    return steps + err_check() + [crc_step(codes, scale, crc)]


def sparse_steps(codes: np.ndarray, scale: float, idx, per: int):
    """``HWL:WEIG:SPAR <layer>,<scale>,<commit>,#<block: indices u32, codes int32>`` per piece of
    ``per`` pairs, then ``SYST:ERR?`` and ``HWL:WEIG:CRC?``."""
    flat = codes.reshape(-1)
    pieces = list(range(0, len(idx), per))
    steps = []
    for i, s in enumerate(pieces):
        part = np.asarray(idx[s:s + per])
        data = part.astype("<u4").tobytes() + flat[part].astype("<i4").tobytes()
        steps.append((block_line(f"HWL:WEIG:SPAR 0,{scale!r},{int(i == len(pieces) - 1)},", data),
                      b""))
    return steps + err_check() + [crc_step(codes, scale)]


# ------------------------------------------------------------------------------------------------
# hwloop.wire.scpi
# ------------------------------------------------------------------------------------------------


def test_definite_blocks_status_bits_and_units():
    assert definite_block(b"") == b"#10\n"
    assert definite_block(b"abc") == b"#13abc\n" == ieee_block(b"abc") + b"\n"
    assert definite_block(b"x" * 12) == b"#212" + b"x" * 12 + b"\n"
    assert definite_block(b"\n" * 1000) == b"#41000" + b"\n" * 1000 + b"\n"
    assert esr_bit_for(0) == 0
    assert esr_bit_for(SCPI_SYNTAX_ERROR) == esr_bit_for(SCPI_UNDEFINED_HEADER) == ESR_CME
    assert esr_bit_for(SCPI_DATA_OUT_OF_RANGE) == ESR_EXE
    assert esr_bit_for(-410) == ESR_QYE
    assert esr_bit_for(-350) == esr_bit_for(int(Err.RANGE)) == ESR_DDE
    assert scpi_split_units('*CLS;HWL:ECHO? a;SYST:ERR?') == ["*CLS", "HWL:ECHO? a", "SYST:ERR?"]
    assert scpi_split_units('X "a;b";Y \'c;d\'') == ['X "a;b"', "Y 'c;d'"]


# ------------------------------------------------------------------------------------------------
# VisaDevice, byte for byte
# ------------------------------------------------------------------------------------------------


def test_the_scripted_instrument_catches_one_differing_byte(visa):
    dev, inst = visa([(line("HWL:STAT? "), b"{}\n")])  # the host sends no space
    with pytest.raises(DeviceError):
        dev.status()
    with pytest.raises(AssertionError, match="step 5: request differs"):
        inst.assert_done()
    assert inst.leftover == b"HWL:STAT?\n"
    inst.failure = None  # seen; the fixture would fail the test on it


@pytest.mark.parametrize("formats,time_format,tfor", [
    (("ticks", "f64"), "auto", "F64"), (("ticks",), "auto", "TICK"),
    (("ticks", "f64"), "ticks", "TICK")])
def test_hello_reads_idn_info_and_sets_the_time_format(visa, formats, time_format, tfor):
    dev, inst = visa([], hello=visa_hello(INFO, formats, tfor=tfor), time_format=time_format)
    assert [r for r in inst.requests] == [b"*CLS\n", b"*IDN?\n", b"HWL:INFO?\n",
                                          f"HWL:TFOR {tfor}\n".encode(), b"SYST:ERR?\n"]
    assert dev.info() == INFO and dev.f64 == (tfor == "F64")
    assert dev.idn == "hwloop,FakeB1Device,fake-b1-0001,fake-1"
    assert dev.ratio == 256.0 and dev.verifies_writes
    inst.assert_done()


def test_hello_refuses_another_protocol_version_and_a_bad_info_reply(visa):
    doc = json.dumps({"protocol_version": PROTOCOL_VERSION + 1,
                      "info": INFO.model_dump(mode="json")}).encode() + b"\n"
    hello = visa_hello(INFO)[:2] + [(line("HWL:INFO?"), doc)]
    with pytest.raises(ProtocolError, match=f"protocol {PROTOCOL_VERSION + 1}"):
        visa([], hello=hello)
    with pytest.raises(ProtocolError, match="bad HWL:INFO. reply"):
        visa([], hello=visa_hello(INFO)[:2] + [(line("HWL:INFO?"), b"not json\n")])


def test_program_set_windows_status_reset(visa):
    js = SPEC.model_dump_json().encode()
    wins = [(1.0, 2.5), (2.5, 4.0)]
    status = {"programmed": True, "spec": json.loads(js)}
    dev, inst = visa(
        [(b"HWL:PROG #" + str(len(str(len(js)))).encode() + str(len(js)).encode() + js + b"\n",
          b""), (b"SYST:ERR?\n", NO_ERROR)]
        + [(block_line("HWL:WIND ", np.array(wins, "<f8").tobytes()), b"")] + err_check()
        + [(line("HWL:STAT?"), json.dumps(status).encode() + b"\n")]
        + [(line("*RST"), b"")] + err_check() + [(line("HWL:TFOR F64"), b"")] + err_check())
    dev.program(SPEC)
    dev.set_windows(wins)
    assert dev._spec.windows() == wins
    assert dev.status() == status
    dev.reset()
    assert dev._spec is None
    inst.assert_done()


def test_write_weights_dense_chunks_verifies_and_sends_only_changes(visa):
    step = 12  # layer 0 holds 5 x 6 = 30 codes: chunks at 0, 12, 24
    codes = (np.arange(30) % 17 - 8).reshape(5, 6)
    codes2 = codes.copy()
    codes2.flat[29] = 7  # only the last chunk changes
    third = 1 / 3  # the scale travels as its repr, exactly
    dev, inst = visa(program_steps()
                     + dense_steps(codes, 0.5, [0, 12, 24], step)
                     + dense_steps(codes2, 0.5, [24], step)
                     + dense_steps(codes2, third, [0], step)  # the scale alone: one chunk
                     + dense_steps(codes2, third, [], step),  # nothing changed: verify only
                     chunk_codes=step)
    dev.program(SPEC)
    for c, s in ((codes, 0.5), (codes2, 0.5), (codes2, third), (codes2, third)):
        dev.write_weights(0, torch.from_numpy(c), s)
    assert b"HWL:WEIG 0,0.3333333333333333,0,1,#248" in b"".join(inst.requests)
    assert dev.health["verify_failures"] == 0
    inst.assert_done()


def test_write_weights_sparse_when_smaller_and_offered(visa):
    step = 12
    per = step // 2  # (index, code) pairs per command
    codes = (np.arange(30) % 17 - 8).reshape(5, 6)
    codes2 = codes.copy()
    codes2.flat[[5, 25]] = [7, -9]  # 2 pairs (16 bytes) instead of 2 chunks (72 bytes)
    codes3 = codes2.copy()
    idx3 = [1, 3, 8, 13, 17, 20, 22, 28]  # 8 pairs (64 bytes) < 3 chunks (120 bytes): 2 commands
    codes3.flat[idx3] = -100
    codes4 = codes3 + 1  # every code changes: dense is smaller
    dev, inst = visa(program_steps()
                     + dense_steps(codes, 0.5, [0, 12, 24], step)  # no shadow yet: dense
                     + sparse_steps(codes2, 0.5, [5, 25], per)
                     + sparse_steps(codes3, 0.25, idx3, per)
                     + dense_steps(codes4, 0.25, [0, 12, 24], step),
                     features=[FEATURE_SPARSE], chunk_codes=step)
    dev.program(SPEC)
    for c, s in ((codes, 0.5), (codes2, 0.5), (codes3, 0.25), (codes4, 0.25)):
        dev.write_weights(0, torch.from_numpy(c), s)
    # a negative code travels as its int32 two's complement, after the u32 indices
    assert (b"HWL:WEIG:SPAR 0,0.5,1,#216" + np.array([5, 25], "<u4").tobytes()
            + np.array([7, -9], "<i4").tobytes() + b"\n") in inst.requests
    inst.assert_done()


def test_sparse_writes_stay_off_unless_offered_and_allowed(visa):
    codes = (np.arange(30) % 17 - 8).reshape(5, 6)
    codes2 = codes.copy()
    codes2.flat[5] = 7
    dev, inst = visa(program_steps() + dense_steps(codes, 0.5, [0, 12, 24], 12)
                     + dense_steps(codes2, 0.5, [0], 12), features=[FEATURE_SPARSE],
                     chunk_codes=12, sparse=False)
    dev.program(SPEC)
    dev.write_weights(0, torch.from_numpy(codes), 0.5)
    dev.write_weights(0, torch.from_numpy(codes2), 0.5)
    inst.assert_done()


def test_write_verify_error_rewrites_everything_then_names_the_layer(visa):
    codes = np.ones((5, 6), dtype=np.int64)
    codes2 = codes.copy()
    codes2.flat[29] = 2
    dev, inst = visa(program_steps()
                     + dense_steps(codes, 1.0, [0, 12, 24], 12)
                     # a changed last chunk reads back a wrong CRC: all chunks again, twice
                     + dense_steps(codes2, 1.0, [24], 12, crc=0xDEADBEEF)
                     + dense_steps(codes2, 1.0, [0, 12, 24], 12, crc=0xDEADBEEF)
                     + dense_steps(codes2, 1.0, [0, 12, 24], 12, crc=0xDEADBEEF),
                     chunk_codes=12, write_retries=2)
    dev.program(SPEC)
    dev.write_weights(0, torch.from_numpy(codes), 1.0)
    with pytest.raises(WriteVerifyError, match="layer 0 weights do not verify after 3 writes") \
            as ei:
        dev.write_weights(0, torch.from_numpy(codes2), 1.0)
    assert ei.value.layers == [0] and "0xdeadbeef" in str(ei.value)
    assert dev.health["verify_failures"] == 3
    inst.assert_done()


def test_write_thresholds_chunks_read_back_and_rewrite_on_mismatch(visa):
    thr = np.linspace(0.5, 1.5, 5)
    thr2 = thr.copy()
    thr2[4] = 0.1
    wrong = thr2.copy()
    wrong[1] = 9.0

    def writes(values, starts):
        return [(block_line(f"HWL:THR 0,{s},{int(i == len(starts) - 1)},",
                            values[s:s + 3].astype("<f8").tobytes()), b"")
                for i, s in enumerate(starts)] + err_check()

    def read_back(values):
        return [(line("HWL:THR? 0"), ieee_block(values.astype("<f8").tobytes()) + b"\n")]

    dev, inst = visa(program_steps()
                     + writes(thr, [0, 3]) + read_back(thr)
                     + writes(thr2, [3]) + read_back(wrong)  # only the changed chunk, then
                     + writes(thr2, [0, 3]) + read_back(thr2)  # all of them after a mismatch
                     + read_back(thr2), chunk_codes=3)
    dev.program(SPEC)
    dev.write_thresholds(0, torch.from_numpy(thr))
    dev.write_thresholds(0, torch.from_numpy(thr2))
    assert dev.health["verify_failures"] == 1
    assert torch.equal(dev.read_thresholds(0), torch.from_numpy(thr2))
    inst.assert_done()


def test_read_weights_decodes_the_int32_block_and_the_scale(visa):
    codes = (np.arange(30) - 15).astype(np.int64)
    dev, inst = visa(program_steps()
                     + [(line("HWL:WEIG? 0"), ieee_block(codes.astype("<i4").tobytes()) + b"\n"),
                        (line("HWL:WEIG:SCAL? 0"), b"0.125\n")])
    dev.program(SPEC)
    c, s = dev.read_weights(0)
    assert s == 0.125 and c.shape == (5, 6) and c.dtype == torch.int64
    assert c.reshape(-1).tolist() == codes.tolist()
    inst.assert_done()


def test_an_empty_block_reply_is_answered_by_the_error_queue(visa):
    dev, inst = visa(program_steps()
                     + [(line("HWL:WEIG? 0"), b"#10\n")]
                     + err_check(scpi_error(int(Err.RANGE), "layer 0 out of range")))
    dev.program(SPEC)
    with pytest.raises(DeviceError,
                       match=r"HWL:WEIG\?: chip error RANGE \(0x0012\): layer 0 out of range"):
        dev.read_weights(0)
    inst.assert_done()


@pytest.mark.parametrize("f64", [True, False])
def test_run_sends_the_batch_as_a_block_and_decodes_the_reply(visa, f64):
    x = torch.tensor([[0.0, 0.25, float("inf"), 1.0, 0.5, 0.015625],
                      [1.0, float("inf"), 0.75, 0.0, 0.125, 0.5]], dtype=torch.float64)
    ref, body = record_bytes(x, f64, 256.0)
    flat = x.numpy()
    values = (flat.astype("<f8").tobytes() if f64
              else times_to_ticks(flat, 256.0).astype("<u4").tobytes())
    if not f64:  # ticks: 4 bytes per time, a silent input is 0xFFFFFFFF
        assert values[8:12] == b"\xff\xff\xff\xff" and values[4:8] == (64).to_bytes(4, "little")
    formats = ("ticks", "f64") if f64 else ("ticks",)
    dev, inst = visa(program_steps()
                     + [(block_line("HWL:RUN? 2,", values), ieee_block(body) + b"\n")],
                     formats=formats)
    dev.program(SPEC)
    rec = dev.run(x)
    assert_same_record(rec, ref)
    assert rec.meta["time_format"] == ("f64" if f64 else "ticks")
    assert rec.meta["transport"] == inst.resource
    inst.assert_done()


def test_a_run_reply_that_does_not_fit_is_a_protocol_error(visa, fixed_token):
    x = torch.zeros(2, 6, dtype=torch.float64)
    _, body = record_bytes(x, True, 256.0)
    values = x.numpy().astype("<f8").tobytes()
    dev, inst = visa(program_steps()
                     + [(block_line("HWL:RUN? 2,", values), ieee_block(body[:-8]) + b"\n")]
                     # the reply did not fit its command: resynchronise before the next one
                     + [(line("*CLS"), b""), (line("HWL:TFOR F64"), b""),
                        (line(ECHO), line(f"hwl-sync-{TOKEN}")),
                        (line("HWL:STAT?"), b'{"programmed":true}\n')])
    dev.program(SPEC)
    with pytest.raises(ProtocolError, match="HWL:RUN?"):
        dev.run(x)
    assert dev.status() == {"programmed": True}
    assert dev.health["resyncs"] == 1
    inst.assert_done()


def _expected_class(code: int):
    if code == Err.LIMIT:
        return DeviceLimitError
    if code < 0 or code in PROTOCOL_ERRORS:
        return ProtocolError
    return DeviceError


@pytest.mark.parametrize("code", list(Err) + [SCPI_UNDEFINED_HEADER, SCPI_SYNTAX_ERROR,
                                             SCPI_DATA_OUT_OF_RANGE, -350])
def test_every_error_reply_of_syst_err(visa, code):
    name = Err(code).name if code > 0 else str(code)
    dev, inst = visa([(block_line("HWL:PROG ", SPEC.model_dump_json().encode()), b"")]
                     + err_check(scpi_error(code, f"boom {name}")))
    with pytest.raises(DeviceError) as ei:
        dev.program(SPEC)
    assert type(ei.value) is _expected_class(code)
    assert ei.value.code == code
    assert f"boom {name}" in str(ei.value) and name in str(ei.value)
    assert "HWL:PROG" in str(ei.value) and inst.resource in str(ei.value)
    assert dev.health["errors"] == 1
    inst.assert_done()


def test_the_error_queue_is_drained_and_the_first_error_raised(visa):
    dev, inst = visa([(block_line("HWL:PROG ", SPEC.model_dump_json().encode()), b""),
                      (line("SYST:ERR?"), scpi_error(int(Err.LIMIT), "max_fan_in 4 < 6")),
                      (line("SYST:ERR?"), scpi_error(SCPI_SYNTAX_ERROR, "later")),
                      (line("SYST:ERR?"), NO_ERROR)])
    with pytest.raises(DeviceLimitError, match=r"max_fan_in 4 < 6 \(\+1 more\)"):
        dev.program(SPEC)
    assert dev.health["errors"] == 2
    inst.assert_done()


def test_a_bad_syst_err_reply_is_a_protocol_error_and_resynchronises(visa, fixed_token):
    dev, inst = visa([(line("*RST"), b""), (line("SYST:ERR?"), b"garbage\n"),
                      (line("*CLS"), b""), (line("HWL:TFOR F64"), b""),
                      (line(ECHO), line(f"hwl-sync-{TOKEN}")),
                      (line("HWL:STAT?"), b'{"programmed":false}\n')])
    with pytest.raises(ProtocolError, match="bad SYST:ERR. reply 'garbage'"):
        dev.reset()
    assert dev.status() == {"programmed": False}
    inst.assert_done()


def test_seed_noise_bytes_and_unsupported_is_ignored(visa):
    dev, inst = visa([(line(f"HWL:SEED {2 ** 40 + 5}"), b"")] + err_check()
                     + [(line("HWL:SEED 18446744073709551615"), b"")]  # -1, as a u64
                     + err_check(scpi_error(int(Err.UNSUPPORTED), "no noise"))
                     + [(line("HWL:SEED 8"), b"")]
                     + err_check(scpi_error(SCPI_UNDEFINED_HEADER, "Undefined header"))
                     + [(line("HWL:SEED 9"), b"")]
                     + err_check(scpi_error(int(Err.DEVICE), "broken")))
    dev.seed_noise(2 ** 40 + 5)
    dev.seed_noise(-1)
    dev.seed_noise(8)
    with pytest.raises(DeviceError, match="broken"):
        dev.seed_noise(9)
    inst.assert_done()


def test_lock_owner(visa):
    dev, inst = visa([(line("SYST:LOCK:OWN?"), b'"NONE"\n'),
                      (line("SYST:LOCK:OWN?"), b'"127.0.0.1:40001"\n')])
    assert dev.lock_owner() is None
    assert dev.lock_owner() == "127.0.0.1:40001"
    inst.assert_done()


# ------------------------------------------------------------------------------------------------
# VisaDevice: timeouts, the resynchronisation (HWL:ECHO?), hang-ups
# ------------------------------------------------------------------------------------------------


def test_resync_after_a_timeout_discards_the_late_reply(visa, fixed_token):
    late = b'{"programmed":true,"late":1}\n'
    dev, inst = visa([(line("HWL:STAT?"), b""),  # no reply in time
                      # the next command first resynchronises: the late reply arrives meanwhile
                      # and everything before the marker's echo is discarded
                      (line("*CLS"), late), (line("HWL:TFOR F64"), b""),
                      (line(ECHO), line(f"hwl-sync-{TOKEN}")),
                      (line("HWL:STAT?"), b'{"programmed":false}\n'),
                      # a command that completed costs nothing extra
                      (line("HWL:STAT?"), b'{"programmed":false}\n')], timeout=0.2)
    t0 = time.monotonic()
    with pytest.raises(DeviceTimeout, match="no reply to HWL:STAT?"):
        dev.status()
    assert time.monotonic() - t0 < 2.0
    assert dev.status() == {"programmed": False}
    assert dev.status() == {"programmed": False}
    assert dev.health["timeouts"] == 1 and dev.health["resyncs"] == 1
    assert dev.health["discarded_bytes"] == len(late)
    inst.assert_done()


def test_resync_ticks_format_and_a_split_echo(visa, fixed_token):
    # a chip offering ticks only is put back into TICK; the echo may come in pieces, after junk
    dev, inst = visa([(line("HWL:STAT?"), b""),
                      (line("*CLS"), b"junk\n"), (line("HWL:TFOR TICK"), b"hwl-sy"),
                      (line(ECHO), f"nc-{TOKEN}\n".encode()),
                      (line("HWL:STAT?"), b'{"programmed":false}\n')],
                     formats=("ticks",), timeout=0.2)
    with pytest.raises(DeviceTimeout):
        dev.status()
    assert dev.status() == {"programmed": False}
    assert dev.health["discarded_bytes"] == len(b"junk\n")
    inst.assert_done()


def test_no_echo_fails_the_device_for_good(visa, fixed_token):
    dev, inst = visa([(line("HWL:STAT?"), b""),
                      (line("*CLS"), b""), (line("HWL:TFOR F64"), b""), (line(ECHO), b"")],
                     timeout=0.2, resync_timeout=0.3)
    with pytest.raises(DeviceTimeout):
        dev.status()
    with pytest.raises(DeviceError, match="resynchronising failed") as ei:
        dev.status()
    assert not isinstance(ei.value, DeviceTimeout)
    # every later call says why, without a byte on the wire (the script has ended)
    with pytest.raises(DeviceError, match="failed earlier"):
        dev.read_weights(0)
    inst.assert_done()


def test_peer_hangup_is_a_prompt_device_error(visa):
    dev, inst = visa([(line("HWL:STAT?"), None)], timeout=5.0)
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match="hung up") as ei:
        dev.status()
    assert not isinstance(ei.value, DeviceTimeout)
    assert time.monotonic() - t0 < 2.0
    inst.assert_done()
