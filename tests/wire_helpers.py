"""Helpers of the wire and chip tests (tests/test_wire_*.py, tests/test_chip_*.py): the fake
chip's info and a small network, the frame host opened on a scripted port, the request steps the
host sends for a message, a program, a weight write (dense or sparse), a run reply as the chip
encodes it, and a FrameSession over a fake device."""

from __future__ import annotations

import numpy as np
import torch

from hwloop.chip.core import ChipCore
from hwloop.chip.frame_session import FrameSession
from hwloop.wire.codec import (LAYER, WEIGHTS_CRC_REPLY, WRITE_WEIGHTS_HDR, encode_run_reply,
                               encode_sparse, weights_crc)
from hwloop.wire.frame import (CHUNK_HEADER, Cmd, Flag, Frame, decode_frame, split_chunks, stuff,
                               unstuff)
from hwloop.wire.serial_device import SerialDevice

from bytes_exchange import ScriptedPort, hello_exchange, rep, req
from fakes import FakeB1Device, fake_info, random_params, small_spec


INFO = fake_info()
SPEC = small_spec(n_in=6, hidden=5, n_out=3)


def assert_same_record(rec, ref) -> None:
    """Two DeviceRecords equal bit for bit: spike times, readout, counts, V(t_max)."""
    for a, b in zip(rec.spike_times, ref.spike_times):
        assert torch.equal(a, b)
    assert torch.equal(rec.readout, ref.readout)
    assert torch.equal(rec.spike_counts, ref.spike_counts)
    for a, b in zip(rec.v_tmax, ref.v_tmax):
        assert torch.equal(a, b)


def open_serial(script, **kw) -> tuple[SerialDevice, ScriptedPort]:
    port = ScriptedPort([hello_exchange(INFO, chunk_bytes=kw.get("chunk_bytes", 4096),
                                        time_formats=kw.pop("formats", ("ticks", "f64")))]
                        + list(script), pending=kw.pop("pending", b""))
    kw.setdefault("timeout", 0.05)
    dev = SerialDevice("scripted://", port=port, **kw)
    return dev, port


def message_steps(seq: int, cmd: int, payload: bytes, chunk_bytes: int, reply: bytes,
                  flags: int = 0):
    """Request steps for one message, chunked as the host chunks it; returns (steps, next seq)."""
    if len(payload) <= chunk_bytes:
        return [(req(seq, cmd, payload, flags), reply)], seq + 1
    parts = split_chunks(payload, chunk_bytes - CHUNK_HEADER.size)
    steps = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        steps.append((req(seq, cmd, part, flags | Flag.CHUNKED),
                      reply if last else rep(seq, cmd)))
        seq += 1
    return steps, seq


def program_steps(seq: int):
    return [(req(seq, Cmd.PROGRAM, SPEC.model_dump_json().encode()), rep(seq, Cmd.PROGRAM))]


def weights_steps(seq: int, layer: int, codes: np.ndarray, scale: float, chunk: int,
                  starts=None, crc=None):
    flat = codes.reshape(-1)
    starts = list(range(0, flat.size, chunk)) if starts is None else starts
    steps = []
    for i, s in enumerate(starts):
        part = flat[s:s + chunk]
        flags = Flag.COMMIT if i == len(starts) - 1 else 0
        steps.append((req(seq, Cmd.WRITE_WEIGHTS, WRITE_WEIGHTS_HDR.pack(layer, s, part.size,
                                                                             scale)
                          + part.astype("<i2").tobytes(), flags),
                      rep(seq, Cmd.WRITE_WEIGHTS)))
        seq += 1
    c = weights_crc(flat, scale) if crc is None else crc
    steps.append((req(seq, Cmd.WEIGHTS_CRC, LAYER.pack(layer)),
                  rep(seq, Cmd.WEIGHTS_CRC, WEIGHTS_CRC_REPLY.pack(c, scale, flat.size))))
    return steps, seq + 1


def sparse_steps(seq, layer, idx, codes, scale, per, n):
    steps = []
    pieces = list(range(0, len(idx), per))
    for i, s in enumerate(pieces):
        flags = Flag.COMMIT if i == len(pieces) - 1 else 0
        steps.append((req(seq, Cmd.WRITE_WEIGHTS_SPARSE,
                          encode_sparse(layer, idx[s:s + per], codes[s:s + per], scale, False),
                          flags), rep(seq, Cmd.WRITE_WEIGHTS_SPARSE)))
        seq += 1
    return steps, seq


def record_bytes(x, f64, ratio):
    fake = FakeB1Device(time_step=1 / 64)
    fake.program(SPEC)
    w, th = random_params(SPEC)
    for i, (c, s) in w.items():
        fake.write_weights(i, c, s)
    for i, t in th.items():
        fake.write_thresholds(i, t)
    r = fake.run(x)
    body = encode_run_reply([t.numpy() for t in r.spike_times], r.readout.numpy(),
                              [v.numpy() for v in r.v_tmax], r.spike_counts.numpy(), None, f64,
                              ratio)
    return r, body


def damage(frame: bytes) -> bytes:
    raw = bytearray(unstuff(frame[:-1]))
    raw[-6] ^= 0x01
    return stuff(bytes(raw)) + b"\x00"


def frame_session():
    fake = FakeB1Device()
    return FrameSession(ChipCore(fake)), fake


def one_reply(session, frame) -> Frame:
    out = session.handle(frame)
    assert len(out) == 1
    return decode_frame(out[0])
