"""The chip's sessions on hostile input: hwloop.chip.frame_session.FrameSession (errors, the
reply cache, RESEND, NAK, PENDING, sparse writes) and hwloop.chip.scpi_session.ScpiSession (the
bounded parser, blocks, the error queue)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from hwloop.chip.core import ChipCore
from hwloop.chip.scpi_session import ScpiSession
from hwloop.wire.codec import (Err, FEATURE_SPARSE, LAYER, READ_RANGE, RUN_REQ, WEIGHTS_CRC_REPLY,
                               WRITE_WEIGHTS_HDR, WRITE_WEIGHTS_SPARSE_HDR, encode_sparse,
                               weights_crc)
from hwloop.wire.frame import (CHUNK_HEADER, Cmd, Flag, Frame, FrameFault, FrameReader, MAX_RESEND,
                               NakReason, RESEND_HDR, decode_frame, frame_raw, parse_error_payload,
                               resend_payload, stuff)
from hwloop.wire.scpi import SCPI_MAX_LINE

from fakes import FakeB1Device, small_spec
from wire_helpers import SPEC, frame_session, one_reply


# ------------------------------------------------------------------------------------------------
# FrameSession
# ------------------------------------------------------------------------------------------------


def test_session_errors_on_bad_input():
    s, fake = frame_session()
    f = one_reply(s, Frame(1, 0x55, 0, b""))
    assert f.cmd == Cmd.ERROR and parse_error_payload(f.payload)[0] == Err.UNKNOWN_COMMAND
    f = one_reply(s, Frame(2, Cmd.RUN_BATCH, 0, RUN_REQ.pack(1, 6) + b"\x00" * 24))
    assert parse_error_payload(f.payload)[0] == Err.NOT_PROGRAMMED
    f = one_reply(s, Frame(3, Cmd.PROGRAM, 0, b"{not json"))
    assert parse_error_payload(f.payload)[0] == Err.BAD_PAYLOAD
    f = one_reply(s, Frame(4, Cmd.STATUS, 0, b"", version=9))
    assert parse_error_payload(f.payload)[0] == Err.VERSION
    f = one_reply(s, Frame(5, Cmd.PROGRAM, Flag.CHUNKED, CHUNK_HEADER.pack(1, 2) + b"x"))
    assert parse_error_payload(f.payload)[0] == Err.CHUNK
    assert one_reply(s, Frame(6, Cmd.PROGRAM, 0, SPEC.model_dump_json().encode())).cmd == \
        Cmd.PROGRAM
    # a hostile count: payload does not hold it
    f = one_reply(s, Frame(7, Cmd.WRITE_WEIGHTS, Flag.COMMIT,
                                WRITE_WEIGHTS_HDR.pack(0, 0, 0xFFFFFFFF, 1.0)))
    assert parse_error_payload(f.payload)[0] == Err.BAD_PAYLOAD
    f = one_reply(s, Frame(8, Cmd.RUN_BATCH, 0, RUN_REQ.pack(0xFFFFFFFF, 0xFFFFFFFF)))
    assert parse_error_payload(f.payload)[0] == Err.BAD_PAYLOAD
    f = one_reply(s, Frame(9, Cmd.READ_WEIGHTS, 0, READ_RANGE.pack(0, 0, 0xFFFFFFFF)))
    assert parse_error_payload(f.payload)[0] == Err.RANGE
    f = one_reply(s, Frame(10, Cmd.WRITE_WEIGHTS, Flag.COMMIT,
                                WRITE_WEIGHTS_HDR.pack(0, 0, 1, 1.0) + struct.pack("<h", 500)))
    assert parse_error_payload(f.payload)[0] == Err.RANGE  # beyond weight_bits=8
    # a network that does not fit
    big = small_spec(n_in=2000)
    f = one_reply(s, Frame(11, Cmd.PROGRAM, 0, big.model_dump_json().encode()))
    code, msg = parse_error_payload(f.payload)
    assert code == Err.LIMIT and "max_fan_in" in msg


def test_session_replays_a_retried_write_instead_of_applying_it_twice():
    s, fake = frame_session()
    one_reply(s, Frame(1, Cmd.PROGRAM, 0, SPEC.model_dump_json().encode()))
    w = Frame(2, Cmd.WRITE_WEIGHTS, Flag.COMMIT,
              WRITE_WEIGHTS_HDR.pack(0, 0, 30, 1.0) + np.ones(30, "<i2").tobytes())
    first = s.handle(w)
    again = s.handle(w)
    assert first == again
    assert fake.calls.count("write_weights 0") == 1
    assert s.stats["replayed"] == 1
    # same seq but different bytes (a host that restarted) is a new request
    w2 = Frame(2, Cmd.WRITE_WEIGHTS, Flag.COMMIT,
               WRITE_WEIGHTS_HDR.pack(0, 0, 30, 2.0) + np.ones(30, "<i2").tobytes())
    s.handle(w2)
    assert fake.calls.count("write_weights 0") == 2


def test_session_resend_answers_from_the_cache_without_executing():
    s, fake = frame_session()
    s.reply_payload = 64  # small reply chunks
    one_reply(s, Frame(1, Cmd.PROGRAM, 0, SPEC.model_dump_json().encode()))
    st = Frame(2, Cmd.STATUS, 0, b"")
    frames = s.handle(st)
    assert len(frames) > 3
    runs_before = fake.calls[:]
    again = s.handle(Frame(2, Cmd.RESEND, 0, resend_payload([3, 1, 3])))
    assert again == [frames[3], frames[1]]  # in the order asked, duplicates once
    assert fake.calls == runs_before and s.stats["resends"] == 1
    # a single-frame reply is sent whole, whatever the indices
    assert s.handle(Frame(1, Cmd.RESEND, 0, resend_payload([5]))) == \
        s.handle(Frame(1, Cmd.PROGRAM, 0, SPEC.model_dump_json().encode()))
    # errors: index beyond the reply, unknown seq, bad counts (bounded before use)
    f = one_reply(s, Frame(2, Cmd.RESEND, 0, resend_payload([len(frames)])))
    assert f.seq == 2 and parse_error_payload(f.payload)[0] == Err.CHUNK
    f = one_reply(s, Frame(77, Cmd.RESEND, 0, resend_payload([0])))
    assert f.seq == 77 and parse_error_payload(f.payload)[0] == Err.NO_REPLY
    for bad in (b"", RESEND_HDR.pack(0), RESEND_HDR.pack(3) + b"\x00\x00",
                RESEND_HDR.pack(0xFFFF) + b"\x00" * (2 * 0xFFFF)):
        f = one_reply(s, Frame(2, Cmd.RESEND, 0, bad))
        assert parse_error_payload(f.payload)[0] == Err.BAD_PAYLOAD
    with pytest.raises(ValueError):
        resend_payload(range(MAX_RESEND + 1))
    # the cache forgets the oldest requests, and RESEND with them
    for seq in range(3, 3 + s.cache_size):
        s.handle(Frame(seq, Cmd.STATUS, 0, b""))
    f = one_reply(s, Frame(2, Cmd.RESEND, 0, resend_payload([0])))
    assert parse_error_payload(f.payload)[0] == Err.NO_REPLY


def test_session_naks_damaged_frames_and_signals_pending():
    s, fake = frame_session()
    reader = FrameReader()
    raw = bytearray(frame_raw(Frame(1, Cmd.STATUS, 0, b"")))
    raw[3] ^= 0x10
    wire = stuff(bytes(raw)) + b"\x00" + b"\xa6\x05\x00" + b"\x02" * 10 + b"\x00"
    faults = [e for e in reader.feed(wire) if isinstance(e, FrameFault)]
    naks = [decode_frame(s.nak(e)) for e in faults]
    assert [n.payload[0] for n in naks] == [NakReason.CRC, NakReason.ESCAPE,
                                            NakReason.LENGTH]
    assert all(n.seq == 0 and n.cmd == Cmd.NAK and n.flags == Flag.REPLY for n in naks)
    # a long command runs inside busy(); a quick one does not
    seen = []

    class Busy:
        def __init__(self, seq, cmd):
            seen.append((seq, Cmd(cmd).name))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    s.handle(Frame(2, Cmd.PROGRAM, 0, SPEC.model_dump_json().encode()), Busy)
    s.handle(Frame(3, Cmd.STATUS, 0, b""), Busy)
    s.handle(Frame(4, Cmd.RUN_BATCH, Flag.F64_TIMES,
                   RUN_REQ.pack(1, 6) + np.zeros(6, "<f8").tobytes()), Busy)
    s.handle(Frame(4, Cmd.RUN_BATCH, Flag.F64_TIMES,
                   RUN_REQ.pack(1, 6) + np.zeros(6, "<f8").tobytes()), Busy)  # cache hit
    assert seen == [(2, "PROGRAM"), (4, "RUN_BATCH")]


def test_session_sparse_write_applies_and_rejects_bad_payloads():
    s, fake = frame_session()
    one_reply(s, Frame(1, Cmd.PROGRAM, 0, SPEC.model_dump_json().encode()))
    dense = np.arange(30) % 7 - 3
    one_reply(s, Frame(2, Cmd.WRITE_WEIGHTS, Flag.COMMIT,
                       WRITE_WEIGHTS_HDR.pack(0, 0, 30, 1.0) + dense.astype("<i2").tobytes()))
    # staged over two frames, applied by the COMMIT
    f = one_reply(s, Frame(3, Cmd.WRITE_WEIGHTS_SPARSE, 0, encode_sparse(0, [1, 4], [9, -9], 0.5,
                                                                              False)))
    assert f.cmd == Cmd.WRITE_WEIGHTS_SPARSE and not f.payload
    f = one_reply(s, Frame(4, Cmd.WRITE_WEIGHTS_SPARSE, Flag.COMMIT | Flag.WIDE,
                           encode_sparse(0, [29], [5], 0.5, True)))
    assert f.cmd == Cmd.WRITE_WEIGHTS_SPARSE
    want = dense.copy()
    want[[1, 4, 29]] = [9, -9, 5]
    crc = WEIGHTS_CRC_REPLY.unpack(one_reply(s, Frame(5, Cmd.WEIGHTS_CRC, 0,
                                                        LAYER.pack(0))).payload)
    assert crc == (weights_crc(want, 0.5), 0.5, 30)
    bad = {  # payload -> error code
        b"\x00": Err.BAD_PAYLOAD,  # shorter than the header
        WRITE_WEIGHTS_SPARSE_HDR.pack(0, 0xFFFFFFFF, 1.0): Err.BAD_PAYLOAD,  # hostile count
        encode_sparse(0, [3, 3], [1, 1], 1.0, False): Err.BAD_PAYLOAD,  # not increasing
        encode_sparse(0, [4, 2], [1, 1], 1.0, False): Err.BAD_PAYLOAD,
        encode_sparse(0, [30], [1], 1.0, False): Err.RANGE,  # past the layer
        encode_sparse(0, [0], [500], 1.0, False): Err.RANGE,  # beyond weight_bits=8
        encode_sparse(7, [0], [1], 1.0, False): Err.RANGE,  # no such layer
    }
    for i, (payload, code) in enumerate(bad.items()):
        f = one_reply(s, Frame(10 + i, Cmd.WRITE_WEIGHTS_SPARSE, Flag.COMMIT, payload))
        assert parse_error_payload(f.payload)[0] == code, payload
    # a chip that does not offer the feature does not know the command
    s.core.features = []
    f = one_reply(s, Frame(30, Cmd.WRITE_WEIGHTS_SPARSE, Flag.COMMIT,
                           encode_sparse(0, [0], [1], 1.0, False)))
    assert parse_error_payload(f.payload)[0] == Err.UNKNOWN_COMMAND


# ------------------------------------------------------------------------------------------------
# ScpiSession
# ------------------------------------------------------------------------------------------------


def test_scpi_session_parser_blocks_and_error_queue():
    fake = FakeB1Device()
    s = ScpiSession(ChipCore(fake))
    out, n = s.feed(b"*IDN?\n")
    assert out == [b"hwloop,FakeB1Device,fake-b1-0001,fake-1\n"] and n == 1
    js = SPEC.model_dump_json().encode()
    blk = b"#" + str(len(str(len(js)))).encode() + str(len(js)).encode() + js
    data = b"HWL:PROG " + blk + b"\n"
    out = []
    for i in range(0, len(data), 7):  # split reads
        out += s.feed(data[i:i + 7])[0]
    assert out == [] and fake.spec == SPEC
    out, _ = s.feed(b"HWL:BOGUS 1\nSYST:ERR?\nSYST:ERR?\n")
    assert out[0].startswith(b"-113,") and out[1] == b'0,"No error"\n'
    # a failed block query answers an empty block and queues its error
    out, _ = s.feed(b"HWL:WEIG? 7\nSYST:ERR?\n")
    assert out[0] == b"#10\n" and out[1].startswith(b"18,")  # Err.RANGE
    # a hostile block length is refused and skipped without buffering it
    out, _ = s.feed(b"HWL:PROG #9999999999")
    assert s.skip > 0 and len(s.buf) == 0
    out, _ = s.feed(b"SYST:ERR?\n")  # still inside the skipped block: swallowed
    assert out == []
    s.skip = 0
    out, _ = s.feed(b"\nSYST:ERR?\n")
    assert out[0].startswith(b"-223,")
    # a line that never ends is bounded
    s.feed(b"A" * (SCPI_MAX_LINE + 10))
    assert len(s.buf) == 0
    out, _ = s.feed(b"\nSYST:ERR?\n")
    assert out[0].startswith(b"-102,")


def test_scpi_sparse_write():
    fake = FakeB1Device()
    s = ScpiSession(ChipCore(fake))
    assert FEATURE_SPARSE in json.loads(s.feed(b"HWL:INFO?\n")[0][0])["features"]
    js = SPEC.model_dump_json().encode()
    s.feed(b"HWL:PROG #" + str(len(str(len(js)))).encode() + str(len(js)).encode() + js + b"\n")
    blk = np.concatenate([np.array([2, 7], "<u4"), np.array([-4, 6], "<i4").view("<u4")])
    raw = blk.tobytes()
    out, _ = s.feed(b"HWL:WEIG:SPAR 0,0.5,1,#" + str(len(str(len(raw)))).encode()
                    + str(len(raw)).encode() + raw + b"\nSYST:ERR?\n")
    assert out == [b'0,"No error"\n']
    codes, scale = fake.read_weights(0)
    assert float(scale) == 0.5 and codes.reshape(-1)[2] == -4 and codes.reshape(-1)[7] == 6
    raw = np.array([7, 2, 1, 1], "<u4").tobytes()  # indices not increasing
    out, _ = s.feed(b"HWL:WEIG:SPAR 0,0.5,1,#216" + raw + b"\nSYST:ERR?\n")
    assert out[0].startswith(b"-") and b"increasing" in out[0]
