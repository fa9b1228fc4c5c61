"""The frame dialect, hwloop.wire.frame (byte stuffing, frame layout, the resynchronising
reader, chunking), and its host, hwloop.wire.serial_device.SerialDevice, byte for byte
(scripted exchanges of tests/bytes_exchange.py)."""

from __future__ import annotations

import json
import re
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from hwloop.errors import (DeviceError, DeviceLimitError, DeviceTimeout, ProtocolError,
                           WriteVerifyError)
from hwloop.wire.codec import (COUNT, Err, FEATURE_SPARSE, LAYER, PROTOCOL_VERSION, READ_RANGE,
                               READ_WEIGHTS_REPLY, RUN_REQ, SEED, WEIGHTS_CRC_REPLY, WINDOWS_HDR,
                               WRITE_THRESHOLDS_HDR, WRITE_WEIGHTS_HDR, WRITE_WEIGHTS_SPARSE_HDR,
                               dumps, times_to_ticks, weights_crc)
from hwloop.wire.frame import (BadCrc, CHUNK_HEADER, CRC, ChunkAssembler, Cmd, ESC, ESC_ESC,
                               ESC_ZERO, Flag, Frame, FrameFault, FrameReader, HEADER, HEADER_SIZE,
                               MAX_ENCODED, NakReason, ZERO_SUB, decode_frame, decode_raw,
                               encode_frame, error_payload, frame_raw, max_stuffed, split_chunks,
                               stuff, unstuff)
from hwloop.wire.serial_device import SerialDevice

from bytes_exchange import ScriptedPort, err, hello_exchange, nak, pending, rep, req, resend
from fakes import grid_inputs, small_spec
from wire_helpers import (INFO, SPEC, assert_same_record, damage, message_steps, open_serial, program_steps,
                          record_bytes, sparse_steps, weights_steps)


# ------------------------------------------------------------------------------------------------
# Stuffing, frames, the reader, chunks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 253, 254, 255, 256, 1000, 70000])
def test_stuffing_round_trip(n):
    rng = np.random.default_rng(n)
    for special_frac in (0.0, 0.01, 0.5, 1.0):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        hit = rng.random(n) < special_frac
        data[hit] = rng.choice(np.array([0x00, ZERO_SUB, ESC, ESC_ZERO, ESC_ESC],
                                        np.uint8), int(hit.sum()))
        enc = stuff(data.tobytes())
        assert 0 not in enc
        assert len(enc) <= max_stuffed(n)
        assert len(enc) == n + int(np.isin(data, [ZERO_SUB, ESC]).sum())
        assert unstuff(enc) == data.tobytes()


def test_stuffing_known_vectors():
    assert stuff(b"") == b""
    assert stuff(b"\x00") == b"\xa5"
    assert stuff(b"\x11\x22\x00\x33") == b"\x11\x22\xa5\x33"
    assert stuff(b"\xa5") == b"\xa6\x01"
    assert stuff(b"\xa6\x01") == b"\xa6\x02\x01"
    assert stuff(b"\x00\xa5\xa6\x00") == b"\xa5\xa6\x01\xa6\x02\xa5"
    for bad in (b"\xa6", b"\xa6\x03", b"\xa6\xa6\x01", b"\x11\x00\x22"):
        with pytest.raises(ProtocolError):
            unstuff(bad)  # a dangling / unknown escape, or a zero inside


def test_frame_round_trip_and_layout():
    f = Frame(seq=0xBEEF, cmd=Cmd.RUN_BATCH, flags=Flag.F64_TIMES, payload=b"\x00\x01xyz")
    raw = frame_raw(f)
    assert raw[:HEADER_SIZE] == bytes([PROTOCOL_VERSION, 0xEF, 0xBE, 0x30, 0x10, 5, 0, 0,
                                          0])
    assert raw[-4:] == struct.pack("<I", zlib.crc32(raw[:-4]))
    wire = encode_frame(f)
    assert wire.endswith(b"\x00") and 0 not in wire[:-1]
    assert decode_frame(wire) == f


def test_crc_error_detected():
    raw = bytearray(frame_raw(Frame(1, Cmd.STATUS, 0, b"hello")))
    raw[HEADER_SIZE + 1] ^= 0x04
    with pytest.raises(BadCrc):
        decode_raw(bytes(raw))
    reader = FrameReader()
    events = reader.feed(stuff(bytes(raw)) + b"\x00")
    assert len(events) == 1 and isinstance(events[0], FrameFault) and events[0].kind == "crc"
    assert reader.counts["crc"] == 1


def test_reader_resyncs_after_garbage_and_split_reads():
    f1 = Frame(1, Cmd.STATUS, 0, b"a" * 300)
    f2 = Frame(2, Cmd.RESET, 0, b"")
    stream = (b"BANNER v1.0\r\n\x00" + encode_frame(f1) + b"\xff\xfe\x03" + b"\x00" +
              b"\x00\x00" + encode_frame(f2))
    # whole
    ev = FrameReader().feed(stream)
    frames = [e for e in ev if isinstance(e, Frame)]
    faults = [e for e in ev if isinstance(e, FrameFault)]
    assert frames == [f1, f2] and len(faults) == 2
    # byte by byte
    r = FrameReader()
    got = []
    for i in range(len(stream)):
        got += [e for e in r.feed(stream[i:i + 1]) if isinstance(e, Frame)]
    assert got == [f1, f2]


def test_hostile_length_is_bounded():
    # a length field claiming 4 GiB with a valid CRC: rejected, nothing allocated
    body = HEADER.pack(1, 1, Cmd.PROGRAM, 0, 0xFFFFFFFF) + b"xx"
    raw = body + CRC.pack(zlib.crc32(body))
    with pytest.raises(ProtocolError, match="exceeds MAX_PAYLOAD"):
        decode_raw(raw)
    # a length that disagrees with the frame
    body = HEADER.pack(1, 1, Cmd.PROGRAM, 0, 100) + b"xx"
    with pytest.raises(ProtocolError, match="disagrees"):
        decode_raw(body + CRC.pack(zlib.crc32(body)))
    # an endless frame without delimiter: dropped once it passes MAX_ENCODED; buffer stays bounded
    r = FrameReader()
    ev = []
    for _ in range(40):
        ev += r.feed(b"\x01" * 4096)
        assert r.buffered <= MAX_ENCODED
    assert [e.kind for e in ev] == ["overflow"]
    good = Frame(9, Cmd.STATUS, 0, b"")
    assert r.feed(b"\x00" + encode_frame(good)) == [good]
    # chunked messages are bounded too
    a = ChunkAssembler(max_message=1000)
    a.add(CHUNK_HEADER.pack(0, 3) + b"x" * 600)
    with pytest.raises(ProtocolError, match="MAX_MESSAGE"):
        a.add(CHUNK_HEADER.pack(1, 3) + b"x" * 600)
    with pytest.raises(ProtocolError):
        ChunkAssembler().add(CHUNK_HEADER.pack(5, 3) + b"x")


def test_split_chunks_and_reassemble():
    msg = bytes(range(256)) * 40
    parts = split_chunks(msg, 1000)
    a = ChunkAssembler()
    for p in reversed(parts):
        done = a.add(p)
    assert done and a.message() == msg


# ------------------------------------------------------------------------------------------------
# The worked examples in docs/protocol.md are what the code produces
# ------------------------------------------------------------------------------------------------


DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def _doc_hex(name: str) -> bytes:
    text = DOC.read_text()
    m = re.search(rf"<!-- example:{name} -->\s*```text\s*(.*?)```", text, re.S)
    assert m, f"example {name} missing from {DOC}"
    return bytes.fromhex(" ".join(m.group(1).split()))


def test_worked_examples_match_docs():
    request = encode_frame(Frame(7, Cmd.WEIGHTS_CRC, 0, LAYER.pack(2)))
    assert _doc_hex("weights-crc-request") == request
    codes = np.array([[1, -2], [3, 0]])
    reply = encode_frame(Frame(7, Cmd.WEIGHTS_CRC, Flag.REPLY, WEIGHTS_CRC_REPLY.pack(
        weights_crc(codes, 0.25), 0.25, 4)))
    assert _doc_hex("weights-crc-reply") == reply
    assert _doc_hex("error-reply") == encode_frame(Frame(
        8, Cmd.ERROR, Flag.REPLY, error_payload(Err.NOT_PROGRAMMED, "no network")))
    assert _doc_hex("nak") == nak(NakReason.CRC)
    assert _doc_hex("resend") == resend(9, [3, 17])
    assert _doc_hex("pending") == pending(9, Cmd.RUN_BATCH)
    assert f"version {PROTOCOL_VERSION}" in DOC.read_text().splitlines()[0]


# ------------------------------------------------------------------------------------------------
# SerialDevice, byte for byte
# ------------------------------------------------------------------------------------------------


def test_hello_flushes_banner_and_reads_info():
    dev, port = open_serial([], pending=b"BOOT v3 ready\r\n")
    assert dev.info() == INFO and dev.f64
    port.assert_done()
    dev.close()
    assert port.closed


def test_program_status_reset_set_windows():
    wins = [(1.0, 2.5), (2.5, 4.0)]
    status = {"programmed": True, "spec": json.loads(SPEC.model_dump_json())}
    steps = program_steps(2) + [
        (req(3, Cmd.SET_WINDOWS, WINDOWS_HDR.pack(2) + np.array(wins, "<f8").tobytes()),
         rep(3, Cmd.SET_WINDOWS)),
        (req(4, Cmd.STATUS), rep(4, Cmd.STATUS, dumps(status))),
        (req(5, Cmd.RESET), rep(5, Cmd.RESET)),
    ]
    dev, port = open_serial(steps)
    dev.program(SPEC)
    dev.set_windows(wins)
    assert dev._spec.windows() == wins
    assert dev.status()["programmed"]
    dev.reset()
    port.assert_done()


def test_write_weights_chunks_verifies_and_sends_only_changes():
    chunk_bytes = 256
    per = (chunk_bytes - WRITE_WEIGHTS_HDR.size) // 2  # codes per chunk
    spec = small_spec(n_in=100, hidden=3, n_out=2)  # layer 0: 300 codes -> 3 chunks
    codes = torch.arange(300).reshape(3, 100) % 200 - 100
    js = spec.model_dump_json().encode()
    steps, seq = message_steps(2, Cmd.PROGRAM, js, chunk_bytes, None)
    steps[-1] = (steps[-1][0], rep(seq - 1, Cmd.PROGRAM))
    assert len(steps) > 1  # the spec JSON itself travels in chunks
    s1, seq = weights_steps(seq, 0, codes.numpy(), 0.5, per)
    codes2 = codes.clone()
    codes2[2, 99] = 7  # only the last chunk changes
    s2, seq = weights_steps(seq, 0, codes2.numpy(), 0.5, per, starts=[2 * per])
    s3, seq = weights_steps(seq, 0, codes2.numpy(), 0.25, per, starts=[0])  # scale only
    s4, seq = weights_steps(seq, 0, codes2.numpy(), 0.25, per, starts=[])  # nothing: verify
    port = ScriptedPort([hello_exchange(INFO, chunk_bytes=chunk_bytes)] + steps + s1 + s2 + s3
                        + s4)
    dev = SerialDevice("scripted://", port=port, timeout=0.05, chunk_bytes=chunk_bytes)
    dev.program(spec)
    dev.write_weights(0, codes, 0.5)
    dev.write_weights(0, codes2, 0.5)
    dev.write_weights(0, codes2, 0.25)
    dev.write_weights(0, codes2, 0.25)
    port.assert_done()


def test_write_weights_sparse_when_smaller_and_offered():
    chunk_bytes = 256
    per_dense = (chunk_bytes - WRITE_WEIGHTS_HDR.size) // 2
    per_sparse = (chunk_bytes - WRITE_WEIGHTS_SPARSE_HDR.size) // 6
    spec = small_spec(n_in=100, hidden=3, n_out=2)  # layer 0: 300 codes
    js = spec.model_dump_json().encode()
    steps, seq = message_steps(2, Cmd.PROGRAM, js, chunk_bytes, None)
    steps[-1] = (steps[-1][0], rep(seq - 1, Cmd.PROGRAM))
    codes = (torch.arange(300).reshape(3, 100) % 200 - 100).numpy()
    s1, seq = weights_steps(seq, 0, codes, 0.5, per_dense)  # no shadow yet: dense
    # two scattered changes: two (index, code) pairs instead of two dense chunks
    codes2 = codes.copy()
    codes2.flat[[5, 250]] = [7, -9]
    s2, seq = sparse_steps(seq, 0, [5, 250], [7, -9], 0.5, per_sparse, 300)
    s2.append((req(seq, Cmd.WEIGHTS_CRC, LAYER.pack(0)), rep(seq, Cmd.WEIGHTS_CRC,
               WEIGHTS_CRC_REPLY.pack(weights_crc(codes2, 0.5), 0.5, 300))))
    seq += 1
    # 100 changes inside the first chunk: 600 sparse bytes > 238 dense bytes, so dense
    codes3 = codes2.copy()
    codes3.flat[0:100] += 1
    s3, seq = weights_steps(seq, 0, codes3, 0.5, per_dense, starts=[0])
    # many scattered changes, more than one sparse frame holds, new scale
    codes4 = codes3.copy()
    idx4 = np.arange(0, 300, 7)
    codes4.flat[idx4] = 3
    s4, seq = sparse_steps(seq, 0, idx4[codes3.flat[idx4] != 3].tolist(),
                           [3] * int((codes3.flat[idx4] != 3).sum()), 0.25, per_sparse, 300)
    assert len(s4) > 1
    s4.append((req(seq, Cmd.WEIGHTS_CRC, LAYER.pack(0)), rep(seq, Cmd.WEIGHTS_CRC,
               WEIGHTS_CRC_REPLY.pack(weights_crc(codes4, 0.25), 0.25, 300))))
    port = ScriptedPort([hello_exchange(INFO, chunk_bytes=chunk_bytes,
                                        features=[FEATURE_SPARSE])] + steps + s1 + s2 + s3 + s4)
    dev = SerialDevice("scripted://", port=port, timeout=0.05, chunk_bytes=chunk_bytes)
    dev.program(spec)
    for c, sc in ((codes, 0.5), (codes2, 0.5), (codes3, 0.5), (codes4, 0.25)):
        dev.write_weights(0, torch.from_numpy(c), sc)
    port.assert_done()


def test_write_verify_error_names_layer():
    codes = np.ones((5, 6), dtype=np.int64)
    steps = program_steps(2)
    seq = 3
    for _ in range(2):  # first write + one full rewrite, both read back a wrong CRC
        s, seq = weights_steps(seq, 0, codes, 1.0, 10_000, crc=0xDEADBEEF)
        steps += s
    dev, port = open_serial(steps, write_retries=1)
    dev.program(SPEC)
    with pytest.raises(WriteVerifyError) as ei:
        dev.write_weights(0, torch.from_numpy(codes), 1.0)
    assert ei.value.layers == [0] and "layer 0" in str(ei.value)
    assert dev.health["verify_failures"] == 2
    port.assert_done()


def test_read_weights_and_thresholds():
    codes = (np.arange(30) - 15).astype(np.int64)
    thr = np.linspace(0.5, 1.5, 5)
    steps = program_steps(2) + [
        (req(3, Cmd.READ_WEIGHTS, READ_RANGE.pack(0, 0, 30)),
         rep(3, Cmd.READ_WEIGHTS, READ_WEIGHTS_REPLY.pack(0.125, 30) +
            codes.astype("<i2").tobytes())),
        (req(4, Cmd.WRITE_THRESHOLDS, WRITE_THRESHOLDS_HDR.pack(0, 0, 5) +
            thr.astype("<f8").tobytes(), Flag.COMMIT), rep(4, Cmd.WRITE_THRESHOLDS)),
        (req(5, Cmd.READ_THRESHOLDS, READ_RANGE.pack(0, 0, 5)),
         rep(5, Cmd.READ_THRESHOLDS, COUNT.pack(5) + thr.astype("<f8").tobytes())),
        (req(6, Cmd.READ_THRESHOLDS, READ_RANGE.pack(0, 0, 5)),
         rep(6, Cmd.READ_THRESHOLDS, COUNT.pack(5) + thr.astype("<f8").tobytes())),
    ]
    dev, port = open_serial(steps)
    dev.program(SPEC)
    c, s = dev.read_weights(0)
    assert s == 0.125 and c.shape == (5, 6) and c.reshape(-1).tolist() == codes.tolist()
    dev.write_thresholds(0, torch.from_numpy(thr))
    assert torch.equal(dev.read_thresholds(0), torch.from_numpy(thr))
    port.assert_done()


@pytest.mark.parametrize("f64", [True, False])
def test_run_batch_chunked_reply(f64):
    x = grid_inputs(SPEC, 6)
    ratio = 256.0
    ref, body = record_bytes(x, f64, ratio)
    flat = x.reshape(6, -1).numpy()
    payload = RUN_REQ.pack(6, 6) + (flat.astype("<f8").tobytes() if f64
                                      else times_to_ticks(flat, ratio).tobytes())
    chunk_bytes = 256
    parts = split_chunks(body, chunk_bytes - CHUNK_HEADER.size)
    assert len(parts) > 1
    flags = Flag.F64_TIMES if f64 else 0
    status = {"programmed": True, "spec": json.loads(SPEC.model_dump_json())}
    steps = [(req(2, Cmd.STATUS), rep(2, Cmd.STATUS, dumps(status)))]
    run_steps, _ = message_steps(3, Cmd.RUN_BATCH, payload, chunk_bytes, None, flags)
    last_seq = 3 + len(run_steps) - 1
    run_steps[-1] = (run_steps[-1][0],
                     b"".join(rep(last_seq, Cmd.RUN_BATCH, q, Flag.CHUNKED) for q in parts))
    steps += run_steps
    dev, port = open_serial(steps, chunk_bytes=chunk_bytes, formats=("ticks", "f64") if f64
                            else ("ticks",))
    rec = dev.run(x)  # no program() here: the spec comes from STATUS
    port.assert_done()
    assert_same_record(rec, ref)


ERROR_CLASSES = {Err.LIMIT: DeviceLimitError, Err.UNKNOWN_COMMAND: ProtocolError,
                 Err.BAD_PAYLOAD: ProtocolError, Err.VERSION: ProtocolError,
                 Err.CHUNK: ProtocolError, Err.TOO_LARGE: ProtocolError,
                 Err.NO_REPLY: ProtocolError}


@pytest.mark.parametrize("code", list(Err))
def test_every_error_reply(code):
    dev, port = open_serial([(req(2, Cmd.PROGRAM, SPEC.model_dump_json().encode()),
                              err(2, code, f"boom {code.name}"))])
    with pytest.raises(DeviceError) as ei:
        dev.program(SPEC)
    assert type(ei.value) is ERROR_CLASSES.get(code, DeviceError)
    assert code.name in str(ei.value) and f"boom {code.name}" in str(ei.value)
    assert "PROGRAM" in str(ei.value)
    port.assert_done()


def test_seed_noise_bytes_and_unsupported_is_ignored():
    dev, port = open_serial([
        (req(2, Cmd.SEED_NOISE, SEED.pack(2 ** 40 + 5)), rep(2, Cmd.SEED_NOISE)),
        (req(3, Cmd.SEED_NOISE, SEED.pack(7)), err(3, Err.UNSUPPORTED, "no noise")),
        (req(4, Cmd.SEED_NOISE, SEED.pack(8)), err(4, Err.UNKNOWN_COMMAND, "old fw")),
        (req(5, Cmd.SEED_NOISE, SEED.pack(9)), err(5, Err.DEVICE, "broken")),
    ])
    dev.seed_noise(2 ** 40 + 5)
    dev.seed_noise(7)
    dev.seed_noise(8)
    with pytest.raises(DeviceError, match="broken"):
        dev.seed_noise(9)
    port.assert_done()


# ------------------------------------------------------------------------------------------------
# SerialDevice: retries, NAKs, PENDING, RESEND, timeouts
# ------------------------------------------------------------------------------------------------


def test_retry_resends_identical_bytes_after_lost_reply():
    r = req(2, Cmd.STATUS)
    dev, port = open_serial([(r, b""), (r, rep(2, Cmd.STATUS, b'{"programmed":false}'))])
    assert dev.status() == {"programmed": False}
    assert dev.health["retries"] == 1 and dev.health["timeouts"] == 1
    port.assert_done()


def test_corrupted_reply_triggers_fast_retry_and_stale_frames_are_ignored():
    good = rep(2, Cmd.STATUS, b'{"programmed":false}')
    raw = bytearray(unstuff(good[:-1]))
    raw[-6] ^= 0x01
    bad = stuff(bytes(raw)) + b"\x00"
    stale = rep(1, Cmd.HELLO, b"old")
    r = req(2, Cmd.STATUS)
    dev, port = open_serial([(r, b"noise\x00" + stale + bad), (r, good)])
    assert dev.status() == {"programmed": False}
    assert dev.health["crc_errors"] == 1 and dev.health["retries"] == 1
    assert dev.health["stale_frames"] == 1 and dev.health["resyncs"] == 1
    assert dev.health["timeouts"] == 0
    port.assert_done()


def test_nak_triggers_an_immediate_identical_resend():
    # the chip NAKs a damaged copy of the request: the host sends the same bytes again at once,
    # long before its (here 5 s) timeout or its ack_timeout
    r = req(2, Cmd.STATUS)
    dev, port = open_serial([(r, nak(NakReason.ESCAPE)),
                             (r, rep(2, Cmd.STATUS, b'{"programmed":false}'))], timeout=5.0)
    t0 = time.monotonic()
    assert dev.status() == {"programmed": False}
    assert time.monotonic() - t0 < 0.1
    assert dev.health["naks"] == 1 and dev.health["retries"] == 1
    assert dev.health["timeouts"] == 0
    port.assert_done()


def test_nak_after_the_reply_started_is_ignored():
    # a NAK that arrives after a frame of this transaction concerns an older frame
    r = req(2, Cmd.PROGRAM, SPEC.model_dump_json().encode())
    dev, port = open_serial([(r, pending(2, Cmd.PROGRAM) + nak() + rep(2, Cmd.PROGRAM))],
                            timeout=5.0)
    dev.program(SPEC)
    assert dev.health["naks"] == 1 and dev.health["retries"] == 0
    port.assert_done()


def test_lost_request_is_resent_after_ack_timeout_not_the_full_timeout():
    r = req(2, Cmd.STATUS)
    dev, port = open_serial([(r, b""), (r, rep(2, Cmd.STATUS, b'{"programmed":false}'))],
                            timeout=5.0, ack_timeout=0.05)
    t0 = time.monotonic()
    assert dev.status() == {"programmed": False}
    assert time.monotonic() - t0 < 1.0
    assert dev.health["nudges"] == 1 and dev.health["retries"] == 1
    assert dev.health["timeouts"] == 0
    port.assert_done()


def test_pending_heartbeats_hold_off_resends_during_a_long_command():
    # PENDING frames keep coming (here all at once, then a quiet stretch shorter than the
    # transaction timeout): no resend, no RESEND, just the reply
    x = grid_inputs(SPEC, 2)
    ref, body = record_bytes(x, True, 256.0)
    payload = RUN_REQ.pack(2, 6) + x.reshape(2, -1).numpy().astype("<f8").tobytes()
    status = {"programmed": True, "spec": json.loads(SPEC.model_dump_json())}

    class SlowPort(ScriptedPort):
        """After the RUN_BATCH request: a PENDING every 20 ms for 0.3 s, then the reply."""

        def read(self, size=1):
            if self.step == len(self.script) and not self.rx and self.t_done is not None:
                now = time.monotonic()
                if now - self.t_done >= 0.3:
                    self.rx += final
                    self.t_done = None
                elif now - self.t_beat >= 0.02:
                    self.rx += pending(3, Cmd.RUN_BATCH)
                    self.t_beat = now
            return super().read(size)

        def write(self, data):
            n = super().write(data)
            if self.step == len(self.script):
                self.t_done = self.t_beat = time.monotonic()
            return n

    final = rep(3, Cmd.RUN_BATCH, body, Flag.F64_TIMES)
    port = SlowPort([hello_exchange(INFO),
                     (req(2, Cmd.STATUS), rep(2, Cmd.STATUS, dumps(status))),
                     (req(3, Cmd.RUN_BATCH, payload, Flag.F64_TIMES),
                      pending(3, Cmd.RUN_BATCH))])
    port.t_done = None
    dev = SerialDevice("scripted://", port=port, timeout=2.0, ack_timeout=0.05)
    rec = dev.run(x)
    assert torch.equal(rec.readout, ref.readout)
    assert dev.health["retries"] == dev.health["resends"] == dev.health["nudges"] == 0
    port.assert_done()


def test_missing_and_damaged_chunks_are_asked_for_by_index():
    # a 6-chunk reply: chunk 1 damaged, chunk 3 dropped. When the last chunk arrives the host
    # asks for exactly 1 and 3 (RESEND, same seq), and the chip sends only those
    x = grid_inputs(SPEC, 6)
    ref, body = record_bytes(x, True, 256.0)
    payload = RUN_REQ.pack(6, 6) + x.reshape(6, -1).numpy().astype("<f8").tobytes()
    parts = split_chunks(body, 256 - CHUNK_HEADER.size)
    assert len(parts) >= 6
    frames = [rep(3, Cmd.RUN_BATCH, q, Flag.CHUNKED | Flag.F64_TIMES) for q in parts]
    first = [pending(3, Cmd.RUN_BATCH)] + [
        damage(f) if i == 1 else b"" if i == 3 else f for i, f in enumerate(frames)]
    status = {"programmed": True, "spec": json.loads(SPEC.model_dump_json())}
    big = 1 << 16  # requests in one frame, replies in 256-byte chunks
    port = ScriptedPort([hello_exchange(INFO, chunk_bytes=big, reply_chunk_bytes=256),
                         (req(2, Cmd.STATUS), rep(2, Cmd.STATUS, dumps(status))),
                         (req(3, Cmd.RUN_BATCH, payload, Flag.F64_TIMES), b"".join(first)),
                         (resend(3, [1, 3]), frames[1] + frames[3])])
    dev = SerialDevice("scripted://", port=port, timeout=5.0, chunk_bytes=big,
                       reply_chunk_bytes=256)
    t0 = time.monotonic()
    rec = dev.run(x)
    assert time.monotonic() - t0 < 0.5
    assert torch.equal(rec.readout, ref.readout)
    for a, b in zip(rec.spike_times, ref.spike_times):
        assert torch.equal(a, b)
    assert dev.health["resends"] == 1 and dev.health["retries"] == 0
    assert dev.health["crc_errors"] == 1
    port.assert_done()


def test_lost_tail_is_asked_for_after_a_quiet_spell_and_a_lost_resend_is_repeated():
    # the last chunk never comes: after RESEND_IDLE_S of quiet the host asks for it; that RESEND
    # arrives damaged (NAK) and is sent again at once
    body = dumps({"programmed": False, "pad": "x" * 700})
    parts = split_chunks(body, 256 - CHUNK_HEADER.size)
    frames = [rep(2, Cmd.STATUS, q, Flag.CHUNKED) for q in parts]
    n = len(frames)
    assert n >= 3
    dev, port = open_serial([(req(2, Cmd.STATUS), b"".join(frames[:-1])),
                             (resend(2, [n - 1]), nak()),
                             (resend(2, [n - 1]), frames[-1])], timeout=5.0, chunk_bytes=256)
    t0 = time.monotonic()
    assert dev.status()["pad"] == "x" * 700
    assert time.monotonic() - t0 < 0.5
    assert dev.health["resends"] == 2 and dev.health["naks"] == 1
    assert dev.health["retries"] == 0 and dev.health["timeouts"] == 0
    port.assert_done()


def test_damaged_single_frame_reply_after_pending_is_asked_for_with_resend():
    # PENDING says the chip holds the request: a damaged reply is fetched with RESEND [0] from
    # the cache, not by sending (and possibly executing) the request again
    r = req(2, Cmd.PROGRAM, SPEC.model_dump_json().encode())
    good = rep(2, Cmd.PROGRAM)
    dev, port = open_serial([(r, pending(2, Cmd.PROGRAM) + damage(good)), (resend(2, [0]), good)],
                            timeout=5.0)
    dev.program(SPEC)
    assert dev.health["resends"] == 1 and dev.health["retries"] == 0
    port.assert_done()


def test_resend_answered_with_no_reply_is_a_protocol_error():
    r = req(2, Cmd.PROGRAM, SPEC.model_dump_json().encode())
    dev, port = open_serial([(r, pending(2, Cmd.PROGRAM) + damage(rep(2, Cmd.PROGRAM))),
                             (resend(2, [0]), err(2, Err.NO_REPLY, "no cached reply for seq 2"))],
                            timeout=5.0)
    with pytest.raises(ProtocolError, match="NO_REPLY"):
        dev.program(SPEC)
    port.assert_done()


def test_timeout_after_retries():
    r = req(2, Cmd.STATUS)
    dev, port = open_serial([(r, b"")] * 3, retries=2, timeout=0.02)
    with pytest.raises(DeviceTimeout, match="STATUS.*3 attempts"):
        dev.status()
    port.assert_done()


def test_peer_hangup_is_a_device_error():
    import serial

    class DeadPort(ScriptedPort):
        def read(self, size=1):
            if not self.rx and self.step == len(self.script):
                raise serial.SerialException("socket disconnected")
            return super().read(size)

    port = DeadPort([hello_exchange(INFO), (req(2, Cmd.STATUS), b"")])
    dev = SerialDevice("socket://x:1", port=port, timeout=0.5)
    with pytest.raises(DeviceError, match="hung up.*socket disconnected") as ei:
        dev.status()
    assert not isinstance(ei.value, DeviceTimeout)
