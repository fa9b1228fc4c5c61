"""The frame codec, the stream reader, the chip's session logic, and SerialDevice byte-exact."""

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

from hwloop.devices import protocol as P
from hwloop.devices.framing import (BadCrc, ChunkAssembler, Frame, FrameFault, FrameReader,
                                    decode_frame, decode_raw,
                                    encode_frame, frame_raw, split_chunks, stuff,
                                    unstuff)
from hwloop.devices.serial_device import SerialDevice
from hwloop.devices.server import ChipCore, FrameSession, ScpiSession
from hwloop.errors import (DeviceError, DeviceLimitError, DeviceTimeout, ProtocolError,
                           WriteVerifyError)

from bytes_exchange import ScriptedPort, err, hello_exchange, nak, pending, rep, req, resend
from fakes import FakeB1Device, fake_info, grid_inputs, random_params, small_spec

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


# ------------------------------------------------------------------------------------------------
# Codec
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 253, 254, 255, 256, 1000, 70000])
def test_stuffing_round_trip(n):
    rng = np.random.default_rng(n)
    for special_frac in (0.0, 0.01, 0.5, 1.0):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        hit = rng.random(n) < special_frac
        data[hit] = rng.choice(np.array([0x00, P.ZERO_SUB, P.ESC, P.ESC_ZERO, P.ESC_ESC],
                                        np.uint8), int(hit.sum()))
        enc = stuff(data.tobytes())
        assert 0 not in enc
        assert len(enc) <= P.max_stuffed(n)
        assert len(enc) == n + int(np.isin(data, [P.ZERO_SUB, P.ESC]).sum())
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
    f = Frame(seq=0xBEEF, cmd=P.Cmd.RUN_BATCH, flags=P.Flag.F64_TIMES, payload=b"\x00\x01xyz")
    raw = frame_raw(f)
    assert raw[:P.HEADER_SIZE] == bytes([P.PROTOCOL_VERSION, 0xEF, 0xBE, 0x30, 0x10, 5, 0, 0,
                                          0])
    assert raw[-4:] == struct.pack("<I", zlib.crc32(raw[:-4]))
    wire = encode_frame(f)
    assert wire.endswith(b"\x00") and 0 not in wire[:-1]
    assert decode_frame(wire) == f


def test_crc_error_detected():
    raw = bytearray(frame_raw(Frame(1, P.Cmd.STATUS, 0, b"hello")))
    raw[P.HEADER_SIZE + 1] ^= 0x04
    with pytest.raises(BadCrc):
        decode_raw(bytes(raw))
    reader = FrameReader()
    events = reader.feed(stuff(bytes(raw)) + b"\x00")
    assert len(events) == 1 and isinstance(events[0], FrameFault) and events[0].kind == "crc"
    assert reader.counts["crc"] == 1


def test_reader_resyncs_after_garbage_and_split_reads():
    f1 = Frame(1, P.Cmd.STATUS, 0, b"a" * 300)
    f2 = Frame(2, P.Cmd.RESET, 0, b"")
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
    body = P.HEADER.pack(1, 1, P.Cmd.PROGRAM, 0, 0xFFFFFFFF) + b"xx"
    raw = body + P.CRC.pack(zlib.crc32(body))
    with pytest.raises(ProtocolError, match="exceeds MAX_PAYLOAD"):
        decode_raw(raw)
    # a length that disagrees with the frame
    body = P.HEADER.pack(1, 1, P.Cmd.PROGRAM, 0, 100) + b"xx"
    with pytest.raises(ProtocolError, match="disagrees"):
        decode_raw(body + P.CRC.pack(zlib.crc32(body)))
    # an endless frame without delimiter: dropped once it passes MAX_ENCODED; buffer stays bounded
    r = FrameReader()
    ev = []
    for _ in range(40):
        ev += r.feed(b"\x01" * 4096)
        assert r.buffered <= P.MAX_ENCODED
    assert [e.kind for e in ev] == ["overflow"]
    good = Frame(9, P.Cmd.STATUS, 0, b"")
    assert r.feed(b"\x00" + encode_frame(good)) == [good]
    # chunked messages are bounded too
    a = ChunkAssembler(max_message=1000)
    a.add(P.CHUNK_HEADER.pack(0, 3) + b"x" * 600)
    with pytest.raises(ProtocolError, match="MAX_MESSAGE"):
        a.add(P.CHUNK_HEADER.pack(1, 3) + b"x" * 600)
    with pytest.raises(ProtocolError):
        ChunkAssembler().add(P.CHUNK_HEADER.pack(5, 3) + b"x")


def test_split_chunks_and_reassemble():
    msg = bytes(range(256)) * 40
    parts = split_chunks(msg, 1000)
    a = ChunkAssembler()
    for p in reversed(parts):
        done = a.add(p)
    assert done and a.message() == msg


def test_ticks_conversion():
    ratio = P.ticks_per_tau_c(1e-6, 1e-6 / 256)
    assert ratio == 256.0
    t = np.array([0.0, 1 / 256, 2.5, np.inf, 1000.0])
    k = P.times_to_ticks(t, ratio)
    assert k.tolist() == [0, 1, 640, P.TICK_SILENT, 256000]
    assert np.array_equal(P.ticks_to_times(k, ratio), t)
    # off the grid: rounds to the nearest tick (loss <= half a tick)
    assert P.times_to_ticks(np.array([0.3]), 100.0).tolist() == [30]
    for bad in ([-1.0], [np.nan], [1e12]):
        with pytest.raises(ValueError):
            P.times_to_ticks(np.array(bad), ratio)


# ------------------------------------------------------------------------------------------------
# The worked examples in docs/protocol.md are what the code produces
# ------------------------------------------------------------------------------------------------


def _doc_hex(name: str) -> bytes:
    text = DOC.read_text()
    m = re.search(rf"<!-- example:{name} -->\s*```text\s*(.*?)```", text, re.S)
    assert m, f"example {name} missing from {DOC}"
    return bytes.fromhex(" ".join(m.group(1).split()))


def test_worked_examples_match_docs():
    request = encode_frame(Frame(7, P.Cmd.WEIGHTS_CRC, 0, P.LAYER.pack(2)))
    assert _doc_hex("weights-crc-request") == request
    codes = np.array([[1, -2], [3, 0]])
    reply = encode_frame(Frame(7, P.Cmd.WEIGHTS_CRC, P.Flag.REPLY, P.WEIGHTS_CRC_REPLY.pack(
        P.weights_crc(codes, 0.25), 0.25, 4)))
    assert _doc_hex("weights-crc-reply") == reply
    assert _doc_hex("error-reply") == encode_frame(Frame(
        8, P.Cmd.ERROR, P.Flag.REPLY, P.error_payload(P.Err.NOT_PROGRAMMED, "no network")))
    assert _doc_hex("nak") == nak(P.NakReason.CRC)
    assert _doc_hex("resend") == resend(9, [3, 17])
    assert _doc_hex("pending") == pending(9, P.Cmd.RUN_BATCH)
    assert f"version {P.PROTOCOL_VERSION}" in DOC.read_text().splitlines()[0]


def test_docs_list_every_command_and_error():
    text = DOC.read_text()
    for c in P.Cmd:
        assert f"`{c.name}`" in text and f"0x{c.value:02X}" in text, c
    for e in P.Err:
        assert f"`{e.name}`" in text and f"0x{e.value:04X}" in text, e
    for head in P.SCPI_COMMANDS:
        assert f"`{head}" in text, head
    assert f"MAX_FRAME = {P.MAX_FRAME}" in text


# ------------------------------------------------------------------------------------------------
# SerialDevice, byte for byte
# ------------------------------------------------------------------------------------------------

INFO = fake_info()
SPEC = small_spec(n_in=6, hidden=5, n_out=3)


def _open(script, **kw) -> tuple[SerialDevice, ScriptedPort]:
    port = ScriptedPort([hello_exchange(INFO, chunk_bytes=kw.get("chunk_bytes", 4096),
                                        time_formats=kw.pop("formats", ("ticks", "f64")))]
                        + list(script), pending=kw.pop("pending", b""))
    kw.setdefault("timeout", 0.05)
    dev = SerialDevice("scripted://", port=port, **kw)
    return dev, port


def _message_steps(seq: int, cmd: int, payload: bytes, chunk_bytes: int, reply: bytes,
                   flags: int = 0):
    """Request steps for one message, chunked as the host chunks it; returns (steps, next seq)."""
    if len(payload) <= chunk_bytes:
        return [(req(seq, cmd, payload, flags), reply)], seq + 1
    parts = split_chunks(payload, chunk_bytes - P.CHUNK_HEADER.size)
    steps = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        steps.append((req(seq, cmd, part, flags | P.Flag.CHUNKED),
                      reply if last else rep(seq, cmd)))
        seq += 1
    return steps, seq


def _program_steps(seq: int):
    return [(req(seq, P.Cmd.PROGRAM, SPEC.model_dump_json().encode()), rep(seq, P.Cmd.PROGRAM))]


def test_hello_flushes_banner_and_reads_info():
    dev, port = _open([], pending=b"BOOT v3 ready\r\n")
    assert dev.info() == INFO and dev.f64
    port.assert_done()
    dev.close()
    assert port.closed


def test_program_status_reset_set_windows():
    wins = [(1.0, 2.5), (2.5, 4.0)]
    status = {"programmed": True, "spec": json.loads(SPEC.model_dump_json())}
    steps = _program_steps(2) + [
        (req(3, P.Cmd.SET_WINDOWS, P.WINDOWS_HDR.pack(2) + np.array(wins, "<f8").tobytes()),
         rep(3, P.Cmd.SET_WINDOWS)),
        (req(4, P.Cmd.STATUS), rep(4, P.Cmd.STATUS, P.dumps(status))),
        (req(5, P.Cmd.RESET), rep(5, P.Cmd.RESET)),
    ]
    dev, port = _open(steps)
    dev.program(SPEC)
    dev.set_windows(wins)
    assert dev._spec.windows() == wins
    assert dev.status()["programmed"]
    dev.reset()
    port.assert_done()


def _weights_steps(seq: int, layer: int, codes: np.ndarray, scale: float, chunk: int,
                   starts=None, crc=None):
    flat = codes.reshape(-1)
    starts = list(range(0, flat.size, chunk)) if starts is None else starts
    steps = []
    for i, s in enumerate(starts):
        part = flat[s:s + chunk]
        flags = P.Flag.COMMIT if i == len(starts) - 1 else 0
        steps.append((req(seq, P.Cmd.WRITE_WEIGHTS, P.WRITE_WEIGHTS_HDR.pack(layer, s, part.size,
                                                                             scale)
                          + part.astype("<i2").tobytes(), flags),
                      rep(seq, P.Cmd.WRITE_WEIGHTS)))
        seq += 1
    c = P.weights_crc(flat, scale) if crc is None else crc
    steps.append((req(seq, P.Cmd.WEIGHTS_CRC, P.LAYER.pack(layer)),
                  rep(seq, P.Cmd.WEIGHTS_CRC, P.WEIGHTS_CRC_REPLY.pack(c, scale, flat.size))))
    return steps, seq + 1


def test_write_weights_chunks_verifies_and_sends_only_changes():
    chunk_bytes = 256
    per = (chunk_bytes - P.WRITE_WEIGHTS_HDR.size) // 2  # codes per chunk
    spec = small_spec(n_in=100, hidden=3, n_out=2)  # layer 0: 300 codes -> 3 chunks
    codes = torch.arange(300).reshape(3, 100) % 200 - 100
    js = spec.model_dump_json().encode()
    steps, seq = _message_steps(2, P.Cmd.PROGRAM, js, chunk_bytes, None)
    steps[-1] = (steps[-1][0], rep(seq - 1, P.Cmd.PROGRAM))
    assert len(steps) > 1  # the spec JSON itself travels in chunks
    s1, seq = _weights_steps(seq, 0, codes.numpy(), 0.5, per)
    codes2 = codes.clone()
    codes2[2, 99] = 7  # only the last chunk changes
    s2, seq = _weights_steps(seq, 0, codes2.numpy(), 0.5, per, starts=[2 * per])
    s3, seq = _weights_steps(seq, 0, codes2.numpy(), 0.25, per, starts=[0])  # scale only
    s4, seq = _weights_steps(seq, 0, codes2.numpy(), 0.25, per, starts=[])  # nothing: verify
    port = ScriptedPort([hello_exchange(INFO, chunk_bytes=chunk_bytes)] + steps + s1 + s2 + s3
                        + s4)
    dev = SerialDevice("scripted://", port=port, timeout=0.05, chunk_bytes=chunk_bytes)
    dev.program(spec)
    dev.write_weights(0, codes, 0.5)
    dev.write_weights(0, codes2, 0.5)
    dev.write_weights(0, codes2, 0.25)
    dev.write_weights(0, codes2, 0.25)
    port.assert_done()


def _sparse_steps(seq, layer, idx, codes, scale, per, n):
    steps = []
    pieces = list(range(0, len(idx), per))
    for i, s in enumerate(pieces):
        flags = P.Flag.COMMIT if i == len(pieces) - 1 else 0
        steps.append((req(seq, P.Cmd.WRITE_WEIGHTS_SPARSE,
                          P.encode_sparse(layer, idx[s:s + per], codes[s:s + per], scale, False),
                          flags), rep(seq, P.Cmd.WRITE_WEIGHTS_SPARSE)))
        seq += 1
    return steps, seq


def test_write_weights_sparse_when_smaller_and_offered():
    chunk_bytes = 256
    per_dense = (chunk_bytes - P.WRITE_WEIGHTS_HDR.size) // 2
    per_sparse = (chunk_bytes - P.WRITE_WEIGHTS_SPARSE_HDR.size) // 6
    spec = small_spec(n_in=100, hidden=3, n_out=2)  # layer 0: 300 codes
    js = spec.model_dump_json().encode()
    steps, seq = _message_steps(2, P.Cmd.PROGRAM, js, chunk_bytes, None)
    steps[-1] = (steps[-1][0], rep(seq - 1, P.Cmd.PROGRAM))
    codes = (torch.arange(300).reshape(3, 100) % 200 - 100).numpy()
    s1, seq = _weights_steps(seq, 0, codes, 0.5, per_dense)  # no shadow yet: dense
    # two scattered changes: two (index, code) pairs instead of two dense chunks
    codes2 = codes.copy()
    codes2.flat[[5, 250]] = [7, -9]
    s2, seq = _sparse_steps(seq, 0, [5, 250], [7, -9], 0.5, per_sparse, 300)
    s2.append((req(seq, P.Cmd.WEIGHTS_CRC, P.LAYER.pack(0)), rep(seq, P.Cmd.WEIGHTS_CRC,
               P.WEIGHTS_CRC_REPLY.pack(P.weights_crc(codes2, 0.5), 0.5, 300))))
    seq += 1
    # 100 changes inside the first chunk: 600 sparse bytes > 238 dense bytes, so dense
    codes3 = codes2.copy()
    codes3.flat[0:100] += 1
    s3, seq = _weights_steps(seq, 0, codes3, 0.5, per_dense, starts=[0])
    # many scattered changes, more than one sparse frame holds, new scale
    codes4 = codes3.copy()
    idx4 = np.arange(0, 300, 7)
    codes4.flat[idx4] = 3
    s4, seq = _sparse_steps(seq, 0, idx4[codes3.flat[idx4] != 3].tolist(),
                            [3] * int((codes3.flat[idx4] != 3).sum()), 0.25, per_sparse, 300)
    assert len(s4) > 1
    s4.append((req(seq, P.Cmd.WEIGHTS_CRC, P.LAYER.pack(0)), rep(seq, P.Cmd.WEIGHTS_CRC,
               P.WEIGHTS_CRC_REPLY.pack(P.weights_crc(codes4, 0.25), 0.25, 300))))
    port = ScriptedPort([hello_exchange(INFO, chunk_bytes=chunk_bytes,
                                        features=[P.FEATURE_SPARSE])] + steps + s1 + s2 + s3 + s4)
    dev = SerialDevice("scripted://", port=port, timeout=0.05, chunk_bytes=chunk_bytes)
    dev.program(spec)
    for c, sc in ((codes, 0.5), (codes2, 0.5), (codes3, 0.5), (codes4, 0.25)):
        dev.write_weights(0, torch.from_numpy(c), sc)
    port.assert_done()


def test_session_sparse_write_applies_and_rejects_bad_payloads():
    s, fake = _session()
    _one(s, Frame(1, P.Cmd.PROGRAM, 0, SPEC.model_dump_json().encode()))
    dense = np.arange(30) % 7 - 3
    _one(s, Frame(2, P.Cmd.WRITE_WEIGHTS, P.Flag.COMMIT,
                  P.WRITE_WEIGHTS_HDR.pack(0, 0, 30, 1.0) + dense.astype("<i2").tobytes()))
    # staged over two frames, applied by the COMMIT
    f = _one(s, Frame(3, P.Cmd.WRITE_WEIGHTS_SPARSE, 0, P.encode_sparse(0, [1, 4], [9, -9], 0.5,
                                                                         False)))
    assert f.cmd == P.Cmd.WRITE_WEIGHTS_SPARSE and not f.payload
    f = _one(s, Frame(4, P.Cmd.WRITE_WEIGHTS_SPARSE, P.Flag.COMMIT | P.Flag.WIDE,
                      P.encode_sparse(0, [29], [5], 0.5, True)))
    assert f.cmd == P.Cmd.WRITE_WEIGHTS_SPARSE
    want = dense.copy()
    want[[1, 4, 29]] = [9, -9, 5]
    crc = P.WEIGHTS_CRC_REPLY.unpack(_one(s, Frame(5, P.Cmd.WEIGHTS_CRC, 0,
                                                   P.LAYER.pack(0))).payload)
    assert crc == (P.weights_crc(want, 0.5), 0.5, 30)
    bad = {  # payload -> error code
        b"\x00": P.Err.BAD_PAYLOAD,  # shorter than the header
        P.WRITE_WEIGHTS_SPARSE_HDR.pack(0, 0xFFFFFFFF, 1.0): P.Err.BAD_PAYLOAD,  # hostile count
        P.encode_sparse(0, [3, 3], [1, 1], 1.0, False): P.Err.BAD_PAYLOAD,  # not increasing
        P.encode_sparse(0, [4, 2], [1, 1], 1.0, False): P.Err.BAD_PAYLOAD,
        P.encode_sparse(0, [30], [1], 1.0, False): P.Err.RANGE,  # past the layer
        P.encode_sparse(0, [0], [500], 1.0, False): P.Err.RANGE,  # beyond weight_bits=8
        P.encode_sparse(7, [0], [1], 1.0, False): P.Err.RANGE,  # no such layer
    }
    for i, (payload, code) in enumerate(bad.items()):
        f = _one(s, Frame(10 + i, P.Cmd.WRITE_WEIGHTS_SPARSE, P.Flag.COMMIT, payload))
        assert P.parse_error_payload(f.payload)[0] == code, payload
    # a chip that does not offer the feature does not know the command
    s.core.features = []
    f = _one(s, Frame(30, P.Cmd.WRITE_WEIGHTS_SPARSE, P.Flag.COMMIT,
                      P.encode_sparse(0, [0], [1], 1.0, False)))
    assert P.parse_error_payload(f.payload)[0] == P.Err.UNKNOWN_COMMAND


def test_scpi_sparse_write():
    fake = FakeB1Device()
    s = ScpiSession(ChipCore(fake))
    assert P.FEATURE_SPARSE in json.loads(s.feed(b"HWL:INFO?\n")[0][0])["features"]
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


def test_write_verify_error_names_layer():
    codes = np.ones((5, 6), dtype=np.int64)
    steps = _program_steps(2)
    seq = 3
    for _ in range(2):  # first write + one full rewrite, both read back a wrong CRC
        s, seq = _weights_steps(seq, 0, codes, 1.0, 10_000, crc=0xDEADBEEF)
        steps += s
    dev, port = _open(steps, write_retries=1)
    dev.program(SPEC)
    with pytest.raises(WriteVerifyError) as ei:
        dev.write_weights(0, torch.from_numpy(codes), 1.0)
    assert ei.value.layers == [0] and "layer 0" in str(ei.value)
    assert dev.health["verify_failures"] == 2
    port.assert_done()


def test_read_weights_and_thresholds():
    codes = (np.arange(30) - 15).astype(np.int64)
    thr = np.linspace(0.5, 1.5, 5)
    steps = _program_steps(2) + [
        (req(3, P.Cmd.READ_WEIGHTS, P.READ_RANGE.pack(0, 0, 30)),
         rep(3, P.Cmd.READ_WEIGHTS, P.READ_WEIGHTS_REPLY.pack(0.125, 30) +
             codes.astype("<i2").tobytes())),
        (req(4, P.Cmd.WRITE_THRESHOLDS, P.WRITE_THRESHOLDS_HDR.pack(0, 0, 5) +
             thr.astype("<f8").tobytes(), P.Flag.COMMIT), rep(4, P.Cmd.WRITE_THRESHOLDS)),
        (req(5, P.Cmd.READ_THRESHOLDS, P.READ_RANGE.pack(0, 0, 5)),
         rep(5, P.Cmd.READ_THRESHOLDS, P.COUNT.pack(5) + thr.astype("<f8").tobytes())),
        (req(6, P.Cmd.READ_THRESHOLDS, P.READ_RANGE.pack(0, 0, 5)),
         rep(6, P.Cmd.READ_THRESHOLDS, P.COUNT.pack(5) + thr.astype("<f8").tobytes())),
    ]
    dev, port = _open(steps)
    dev.program(SPEC)
    c, s = dev.read_weights(0)
    assert s == 0.125 and c.shape == (5, 6) and c.reshape(-1).tolist() == codes.tolist()
    dev.write_thresholds(0, torch.from_numpy(thr))
    assert torch.equal(dev.read_thresholds(0), torch.from_numpy(thr))
    port.assert_done()


def _record_bytes(x, f64, ratio):
    fake = FakeB1Device(time_step=1 / 64)
    fake.program(SPEC)
    w, th = random_params(SPEC)
    for i, (c, s) in w.items():
        fake.write_weights(i, c, s)
    for i, t in th.items():
        fake.write_thresholds(i, t)
    r = fake.run(x)
    body = P.encode_run_reply([t.numpy() for t in r.spike_times], r.readout.numpy(),
                              [v.numpy() for v in r.v_tmax], r.spike_counts.numpy(), None, f64,
                              ratio)
    return r, body


@pytest.mark.parametrize("f64", [True, False])
def test_run_batch_chunked_reply(f64):
    x = grid_inputs(SPEC, 6)
    ratio = 256.0
    ref, body = _record_bytes(x, f64, ratio)
    flat = x.reshape(6, -1).numpy()
    payload = P.RUN_REQ.pack(6, 6) + (flat.astype("<f8").tobytes() if f64
                                      else P.times_to_ticks(flat, ratio).tobytes())
    chunk_bytes = 256
    parts = split_chunks(body, chunk_bytes - P.CHUNK_HEADER.size)
    assert len(parts) > 1
    flags = P.Flag.F64_TIMES if f64 else 0
    status = {"programmed": True, "spec": json.loads(SPEC.model_dump_json())}
    steps = [(req(2, P.Cmd.STATUS), rep(2, P.Cmd.STATUS, P.dumps(status)))]
    run_steps, _ = _message_steps(3, P.Cmd.RUN_BATCH, payload, chunk_bytes, None, flags)
    last_seq = 3 + len(run_steps) - 1
    run_steps[-1] = (run_steps[-1][0],
                     b"".join(rep(last_seq, P.Cmd.RUN_BATCH, q, P.Flag.CHUNKED) for q in parts))
    steps += run_steps
    dev, port = _open(steps, chunk_bytes=chunk_bytes, formats=("ticks", "f64") if f64
                      else ("ticks",))
    rec = dev.run(x)  # no program() here: the spec comes from STATUS
    port.assert_done()
    for a, b in zip(rec.spike_times, ref.spike_times):
        assert torch.equal(a, b)
    assert torch.equal(rec.readout, ref.readout)
    assert torch.equal(rec.spike_counts, ref.spike_counts)
    for a, b in zip(rec.v_tmax, ref.v_tmax):
        assert torch.equal(a, b)


ERROR_CLASSES = {P.Err.LIMIT: DeviceLimitError, P.Err.UNKNOWN_COMMAND: ProtocolError,
                 P.Err.BAD_PAYLOAD: ProtocolError, P.Err.VERSION: ProtocolError,
                 P.Err.CHUNK: ProtocolError, P.Err.TOO_LARGE: ProtocolError,
                 P.Err.NO_REPLY: ProtocolError}


@pytest.mark.parametrize("code", list(P.Err))
def test_every_error_reply(code):
    dev, port = _open([(req(2, P.Cmd.PROGRAM, SPEC.model_dump_json().encode()),
                        err(2, code, f"boom {code.name}"))])
    with pytest.raises(DeviceError) as ei:
        dev.program(SPEC)
    assert type(ei.value) is ERROR_CLASSES.get(code, DeviceError)
    assert code.name in str(ei.value) and f"boom {code.name}" in str(ei.value)
    assert "PROGRAM" in str(ei.value)
    port.assert_done()


def test_retry_resends_identical_bytes_after_lost_reply():
    r = req(2, P.Cmd.STATUS)
    dev, port = _open([(r, b""), (r, rep(2, P.Cmd.STATUS, b'{"programmed":false}'))])
    assert dev.status() == {"programmed": False}
    assert dev.health["retries"] == 1 and dev.health["timeouts"] == 1
    port.assert_done()


def test_corrupted_reply_triggers_fast_retry_and_stale_frames_are_ignored():
    good = rep(2, P.Cmd.STATUS, b'{"programmed":false}')
    raw = bytearray(unstuff(good[:-1]))
    raw[-6] ^= 0x01
    bad = stuff(bytes(raw)) + b"\x00"
    stale = rep(1, P.Cmd.HELLO, b"old")
    r = req(2, P.Cmd.STATUS)
    dev, port = _open([(r, b"noise\x00" + stale + bad), (r, good)])
    assert dev.status() == {"programmed": False}
    assert dev.health["crc_errors"] == 1 and dev.health["retries"] == 1
    assert dev.health["stale_frames"] == 1 and dev.health["resyncs"] == 1
    assert dev.health["timeouts"] == 0
    port.assert_done()


def test_nak_triggers_an_immediate_identical_resend():
    # the chip NAKs a damaged copy of the request: the host sends the same bytes again at once,
    # long before its (here 5 s) timeout or its ack_timeout
    r = req(2, P.Cmd.STATUS)
    dev, port = _open([(r, nak(P.NakReason.ESCAPE)),
                       (r, rep(2, P.Cmd.STATUS, b'{"programmed":false}'))], timeout=5.0)
    t0 = time.monotonic()
    assert dev.status() == {"programmed": False}
    assert time.monotonic() - t0 < 0.1
    assert dev.health["naks"] == 1 and dev.health["retries"] == 1
    assert dev.health["timeouts"] == 0
    port.assert_done()


def test_nak_after_the_reply_started_is_ignored():
    # a NAK that arrives after a frame of this transaction concerns an older frame
    r = req(2, P.Cmd.PROGRAM, SPEC.model_dump_json().encode())
    dev, port = _open([(r, pending(2, P.Cmd.PROGRAM) + nak() + rep(2, P.Cmd.PROGRAM))],
                      timeout=5.0)
    dev.program(SPEC)
    assert dev.health["naks"] == 1 and dev.health["retries"] == 0
    port.assert_done()


def test_lost_request_is_resent_after_ack_timeout_not_the_full_timeout():
    r = req(2, P.Cmd.STATUS)
    dev, port = _open([(r, b""), (r, rep(2, P.Cmd.STATUS, b'{"programmed":false}'))],
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
    ref, body = _record_bytes(x, True, 256.0)
    payload = P.RUN_REQ.pack(2, 6) + x.reshape(2, -1).numpy().astype("<f8").tobytes()
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
                    self.rx += pending(3, P.Cmd.RUN_BATCH)
                    self.t_beat = now
            return super().read(size)

        def write(self, data):
            n = super().write(data)
            if self.step == len(self.script):
                self.t_done = self.t_beat = time.monotonic()
            return n

    final = rep(3, P.Cmd.RUN_BATCH, body, P.Flag.F64_TIMES)
    port = SlowPort([hello_exchange(INFO),
                     (req(2, P.Cmd.STATUS), rep(2, P.Cmd.STATUS, P.dumps(status))),
                     (req(3, P.Cmd.RUN_BATCH, payload, P.Flag.F64_TIMES),
                      pending(3, P.Cmd.RUN_BATCH))])
    port.t_done = None
    dev = SerialDevice("scripted://", port=port, timeout=2.0, ack_timeout=0.05)
    rec = dev.run(x)
    assert torch.equal(rec.readout, ref.readout)
    assert dev.health["retries"] == dev.health["resends"] == dev.health["nudges"] == 0
    port.assert_done()


def _damage(frame: bytes) -> bytes:
    raw = bytearray(unstuff(frame[:-1]))
    raw[-6] ^= 0x01
    return stuff(bytes(raw)) + b"\x00"


def test_missing_and_damaged_chunks_are_asked_for_by_index():
    # a 6-chunk reply: chunk 1 damaged, chunk 3 dropped. When the last chunk arrives the host
    # asks for exactly 1 and 3 (RESEND, same seq), and the chip sends only those
    x = grid_inputs(SPEC, 6)
    ref, body = _record_bytes(x, True, 256.0)
    payload = P.RUN_REQ.pack(6, 6) + x.reshape(6, -1).numpy().astype("<f8").tobytes()
    parts = split_chunks(body, 256 - P.CHUNK_HEADER.size)
    assert len(parts) >= 6
    frames = [rep(3, P.Cmd.RUN_BATCH, q, P.Flag.CHUNKED | P.Flag.F64_TIMES) for q in parts]
    first = [pending(3, P.Cmd.RUN_BATCH)] + [
        _damage(f) if i == 1 else b"" if i == 3 else f for i, f in enumerate(frames)]
    status = {"programmed": True, "spec": json.loads(SPEC.model_dump_json())}
    big = 1 << 16  # requests in one frame, replies in 256-byte chunks
    port = ScriptedPort([hello_exchange(INFO, chunk_bytes=big, reply_chunk_bytes=256),
                         (req(2, P.Cmd.STATUS), rep(2, P.Cmd.STATUS, P.dumps(status))),
                         (req(3, P.Cmd.RUN_BATCH, payload, P.Flag.F64_TIMES), b"".join(first)),
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
    body = P.dumps({"programmed": False, "pad": "x" * 700})
    parts = split_chunks(body, 256 - P.CHUNK_HEADER.size)
    frames = [rep(2, P.Cmd.STATUS, q, P.Flag.CHUNKED) for q in parts]
    n = len(frames)
    assert n >= 3
    dev, port = _open([(req(2, P.Cmd.STATUS), b"".join(frames[:-1])),
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
    r = req(2, P.Cmd.PROGRAM, SPEC.model_dump_json().encode())
    good = rep(2, P.Cmd.PROGRAM)
    dev, port = _open([(r, pending(2, P.Cmd.PROGRAM) + _damage(good)), (resend(2, [0]), good)],
                      timeout=5.0)
    dev.program(SPEC)
    assert dev.health["resends"] == 1 and dev.health["retries"] == 0
    port.assert_done()


def test_resend_answered_with_no_reply_is_a_protocol_error():
    r = req(2, P.Cmd.PROGRAM, SPEC.model_dump_json().encode())
    dev, port = _open([(r, pending(2, P.Cmd.PROGRAM) + _damage(rep(2, P.Cmd.PROGRAM))),
                       (resend(2, [0]), err(2, P.Err.NO_REPLY, "no cached reply for seq 2"))],
                      timeout=5.0)
    with pytest.raises(ProtocolError, match="NO_REPLY"):
        dev.program(SPEC)
    port.assert_done()


def test_timeout_after_retries():
    r = req(2, P.Cmd.STATUS)
    dev, port = _open([(r, b"")] * 3, retries=2, timeout=0.02)
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

    port = DeadPort([hello_exchange(INFO), (req(2, P.Cmd.STATUS), b"")])
    dev = SerialDevice("socket://x:1", port=port, timeout=0.5)
    with pytest.raises(DeviceError, match="hung up.*socket disconnected") as ei:
        dev.status()
    assert not isinstance(ei.value, DeviceTimeout)


# ------------------------------------------------------------------------------------------------
# The chip side: session logic on hostile input
# ------------------------------------------------------------------------------------------------


def _session():
    fake = FakeB1Device()
    return FrameSession(ChipCore(fake)), fake


def _one(session, frame) -> Frame:
    out = session.handle(frame)
    assert len(out) == 1
    return decode_frame(out[0])


def test_session_errors_on_bad_input():
    s, fake = _session()
    f = _one(s, Frame(1, 0x55, 0, b""))
    assert f.cmd == P.Cmd.ERROR and P.parse_error_payload(f.payload)[0] == P.Err.UNKNOWN_COMMAND
    f = _one(s, Frame(2, P.Cmd.RUN_BATCH, 0, P.RUN_REQ.pack(1, 6) + b"\x00" * 24))
    assert P.parse_error_payload(f.payload)[0] == P.Err.NOT_PROGRAMMED
    f = _one(s, Frame(3, P.Cmd.PROGRAM, 0, b"{not json"))
    assert P.parse_error_payload(f.payload)[0] == P.Err.BAD_PAYLOAD
    f = _one(s, Frame(4, P.Cmd.STATUS, 0, b"", version=9))
    assert P.parse_error_payload(f.payload)[0] == P.Err.VERSION
    f = _one(s, Frame(5, P.Cmd.PROGRAM, P.Flag.CHUNKED, P.CHUNK_HEADER.pack(1, 2) + b"x"))
    assert P.parse_error_payload(f.payload)[0] == P.Err.CHUNK
    assert _one(s, Frame(6, P.Cmd.PROGRAM, 0, SPEC.model_dump_json().encode())).cmd == \
        P.Cmd.PROGRAM
    # a hostile count: payload does not hold it
    f = _one(s, Frame(7, P.Cmd.WRITE_WEIGHTS, P.Flag.COMMIT,
                      P.WRITE_WEIGHTS_HDR.pack(0, 0, 0xFFFFFFFF, 1.0)))
    assert P.parse_error_payload(f.payload)[0] == P.Err.BAD_PAYLOAD
    f = _one(s, Frame(8, P.Cmd.RUN_BATCH, 0, P.RUN_REQ.pack(0xFFFFFFFF, 0xFFFFFFFF)))
    assert P.parse_error_payload(f.payload)[0] == P.Err.BAD_PAYLOAD
    f = _one(s, Frame(9, P.Cmd.READ_WEIGHTS, 0, P.READ_RANGE.pack(0, 0, 0xFFFFFFFF)))
    assert P.parse_error_payload(f.payload)[0] == P.Err.RANGE
    f = _one(s, Frame(10, P.Cmd.WRITE_WEIGHTS, P.Flag.COMMIT,
                      P.WRITE_WEIGHTS_HDR.pack(0, 0, 1, 1.0) + struct.pack("<h", 500)))
    assert P.parse_error_payload(f.payload)[0] == P.Err.RANGE  # beyond weight_bits=8
    # a network that does not fit
    big = small_spec(n_in=2000)
    f = _one(s, Frame(11, P.Cmd.PROGRAM, 0, big.model_dump_json().encode()))
    code, msg = P.parse_error_payload(f.payload)
    assert code == P.Err.LIMIT and "max_fan_in" in msg


def test_session_replays_a_retried_write_instead_of_applying_it_twice():
    s, fake = _session()
    _one(s, Frame(1, P.Cmd.PROGRAM, 0, SPEC.model_dump_json().encode()))
    w = Frame(2, P.Cmd.WRITE_WEIGHTS, P.Flag.COMMIT,
              P.WRITE_WEIGHTS_HDR.pack(0, 0, 30, 1.0) + np.ones(30, "<i2").tobytes())
    first = s.handle(w)
    again = s.handle(w)
    assert first == again
    assert fake.calls.count("write_weights 0") == 1
    assert s.stats["replayed"] == 1
    # same seq but different bytes (a host that restarted) is a new request
    w2 = Frame(2, P.Cmd.WRITE_WEIGHTS, P.Flag.COMMIT,
               P.WRITE_WEIGHTS_HDR.pack(0, 0, 30, 2.0) + np.ones(30, "<i2").tobytes())
    s.handle(w2)
    assert fake.calls.count("write_weights 0") == 2


def test_session_resend_answers_from_the_cache_without_executing():
    s, fake = _session()
    s.reply_payload = 64  # small reply chunks
    _one(s, Frame(1, P.Cmd.PROGRAM, 0, SPEC.model_dump_json().encode()))
    st = Frame(2, P.Cmd.STATUS, 0, b"")
    frames = s.handle(st)
    assert len(frames) > 3
    runs_before = fake.calls[:]
    again = s.handle(Frame(2, P.Cmd.RESEND, 0, P.resend_payload([3, 1, 3])))
    assert again == [frames[3], frames[1]]  # in the order asked, duplicates once
    assert fake.calls == runs_before and s.stats["resends"] == 1
    # a single-frame reply is sent whole, whatever the indices
    assert s.handle(Frame(1, P.Cmd.RESEND, 0, P.resend_payload([5]))) == \
        s.handle(Frame(1, P.Cmd.PROGRAM, 0, SPEC.model_dump_json().encode()))
    # errors: index beyond the reply, unknown seq, bad counts (bounded before use)
    f = _one(s, Frame(2, P.Cmd.RESEND, 0, P.resend_payload([len(frames)])))
    assert f.seq == 2 and P.parse_error_payload(f.payload)[0] == P.Err.CHUNK
    f = _one(s, Frame(77, P.Cmd.RESEND, 0, P.resend_payload([0])))
    assert f.seq == 77 and P.parse_error_payload(f.payload)[0] == P.Err.NO_REPLY
    for bad in (b"", P.RESEND_HDR.pack(0), P.RESEND_HDR.pack(3) + b"\x00\x00",
                P.RESEND_HDR.pack(0xFFFF) + b"\x00" * (2 * 0xFFFF)):
        f = _one(s, Frame(2, P.Cmd.RESEND, 0, bad))
        assert P.parse_error_payload(f.payload)[0] == P.Err.BAD_PAYLOAD
    with pytest.raises(ValueError):
        P.resend_payload(range(P.MAX_RESEND + 1))
    # the cache forgets the oldest requests, and RESEND with them
    for seq in range(3, 3 + s.cache_size):
        s.handle(Frame(seq, P.Cmd.STATUS, 0, b""))
    f = _one(s, Frame(2, P.Cmd.RESEND, 0, P.resend_payload([0])))
    assert P.parse_error_payload(f.payload)[0] == P.Err.NO_REPLY


def test_session_naks_damaged_frames_and_signals_pending():
    s, fake = _session()
    reader = FrameReader()
    raw = bytearray(frame_raw(Frame(1, P.Cmd.STATUS, 0, b"")))
    raw[3] ^= 0x10
    wire = stuff(bytes(raw)) + b"\x00" + b"\xa6\x05\x00" + b"\x02" * 10 + b"\x00"
    faults = [e for e in reader.feed(wire) if isinstance(e, FrameFault)]
    naks = [decode_frame(s.nak(e)) for e in faults]
    assert [n.payload[0] for n in naks] == [P.NakReason.CRC, P.NakReason.ESCAPE,
                                            P.NakReason.LENGTH]
    assert all(n.seq == 0 and n.cmd == P.Cmd.NAK and n.flags == P.Flag.REPLY for n in naks)
    # a long command runs inside busy(); a quick one does not
    seen = []

    class Busy:
        def __init__(self, seq, cmd):
            seen.append((seq, P.Cmd(cmd).name))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    s.handle(Frame(2, P.Cmd.PROGRAM, 0, SPEC.model_dump_json().encode()), Busy)
    s.handle(Frame(3, P.Cmd.STATUS, 0, b""), Busy)
    s.handle(Frame(4, P.Cmd.RUN_BATCH, P.Flag.F64_TIMES,
                   P.RUN_REQ.pack(1, 6) + np.zeros(6, "<f8").tobytes()), Busy)
    s.handle(Frame(4, P.Cmd.RUN_BATCH, P.Flag.F64_TIMES,
                   P.RUN_REQ.pack(1, 6) + np.zeros(6, "<f8").tobytes()), Busy)  # cache hit
    assert seen == [(2, "PROGRAM"), (4, "RUN_BATCH")]


def test_session_staged_partial_writes_commit_once():
    s, fake = _session()
    _one(s, Frame(1, P.Cmd.PROGRAM, 0, SPEC.model_dump_json().encode()))
    _one(s, Frame(2, P.Cmd.WRITE_WEIGHTS, 0,
                  P.WRITE_WEIGHTS_HDR.pack(0, 0, 10, 0.5) + np.full(10, 3, "<i2").tobytes()))
    assert fake.calls.count("write_weights 0") == 0
    _one(s, Frame(3, P.Cmd.WRITE_WEIGHTS, P.Flag.COMMIT,
                  P.WRITE_WEIGHTS_HDR.pack(0, 25, 5, 0.5) + np.full(5, -4, "<i2").tobytes()))
    codes, scale = fake.read_weights(0)
    assert scale == 0.5 and fake.calls.count("write_weights 0") == 1
    assert codes.reshape(-1).tolist() == [3] * 10 + [0] * 15 + [-4] * 5


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
    s.feed(b"A" * (P.SCPI_MAX_LINE + 10))
    assert len(s.buf) == 0
    out, _ = s.feed(b"\nSYST:ERR?\n")
    assert out[0].startswith(b"-102,")


def test_run_reply_size_matches_encoder_and_bounds_batches():
    x = grid_inputs(SPEC, 5)
    for f64 in (True, False):
        _, body = _record_bytes(x, f64, 256.0)
        size = P.run_reply_size(5, [6, 5, 5], [5, 5], 3, f64, has_energy=False)
        assert size == len(body)
    big = small_spec(n_in=1000, hidden=1000, n_out=10)
    most = P.max_batch_for_message([1000, 1000, 1000], [1000, 1000], 10, True)
    assert P.run_reply_size(most, [1000, 1000, 1000], [1000, 1000], 10, True) <= P.MAX_MESSAGE
    assert P.run_reply_size(most + 1, [1000, 1000, 1000], [1000, 1000], 10, True) > P.MAX_MESSAGE
    status = {"programmed": True, "spec": json.loads(big.model_dump_json())}
    dev, port = _open([(req(2, P.Cmd.STATUS), rep(2, P.Cmd.STATUS, P.dumps(status)))])
    with pytest.raises(DeviceLimitError, match=f"at most {most} samples"):
        dev.run(torch.zeros(most + 1, 1000, dtype=torch.float64))
    port.assert_done()


def test_seed_noise_bytes_and_unsupported_is_ignored():
    dev, port = _open([
        (req(2, P.Cmd.SEED_NOISE, P.SEED.pack(2 ** 40 + 5)), rep(2, P.Cmd.SEED_NOISE)),
        (req(3, P.Cmd.SEED_NOISE, P.SEED.pack(7)), err(3, P.Err.UNSUPPORTED, "no noise")),
        (req(4, P.Cmd.SEED_NOISE, P.SEED.pack(8)), err(4, P.Err.UNKNOWN_COMMAND, "old fw")),
        (req(5, P.Cmd.SEED_NOISE, P.SEED.pack(9)), err(5, P.Err.DEVICE, "broken")),
    ])
    dev.seed_noise(2 ** 40 + 5)
    dev.seed_noise(7)
    dev.seed_noise(8)
    with pytest.raises(DeviceError, match="broken"):
        dev.seed_noise(9)
    port.assert_done()
