"""Hostile or mistaken inputs stay bounded, and small link mistakes read clearly (issue #12,
items 4 and 8)."""

from __future__ import annotations

import gzip
import socket
import struct
import time

import numpy as np
import pytest

from hwloop.data.idx import read_idx, read_idx_header
from hwloop.emulator.profile import load_profile
from hwloop.wire.serial_device import SerialDevice
from hwloop.chip.server import serve
from hwloop.errors import DataError, DeviceError, ProfileError

from fakes import FakeB1Device

BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"] +
                 [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]"
                  for p, c in zip("abcdefgh", "bcdefghi")]) + "\n"


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    p = tmp_path / "bomb.yaml"
    p.write_text(BOMB)
    assert len(BOMB) < 600
    t0 = time.monotonic()
    with pytest.raises(ProfileError, match="aliases expand") as ei:
        load_profile(p)
    assert time.monotonic() - t0 < 2.0 and len(str(ei.value)) < 500


def test_profile_errors_repeat_a_bounded_value(tmp_path):
    p = tmp_path / "long.yaml"
    p.write_text("description: x\njitter_sd: [" + ", ".join(["1.0"] * 3000) + "]\n"
                 "bogus_field: '" + "y" * 100000 + "'\n")
    with pytest.raises(ProfileError) as ei:
        load_profile(p)
    msg = str(ei.value)
    assert "bogus_field" in msg and "jitter_sd" in msg and len(msg) < 3000, len(msg)


def test_gzip_bomb_idx_is_bounded_by_its_header(tmp_path):
    import resource
    header = struct.pack(">HBB", 0, 0x08, 1) + struct.pack(">I", 16)
    p = tmp_path / "bomb-idx1-ubyte.gz"
    with gzip.open(p, "wb", compresslevel=9) as f:
        f.write(header + bytes(16))
        chunk = bytes(1 << 20)
        for _ in range(512):  # 512 MiB of zeros after the declared 16 bytes
            f.write(chunk)
    assert p.stat().st_size < 1 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert read_idx_header(p) == (np.dtype(">u1"), (16,))
    with pytest.raises(DataError, match="trailing bytes"):
        read_idx(p)
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 64 * 1024, grown_kb  # never near the 512 MiB it expands to


def test_ipv6_url_can_be_opened():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        chip = serve(FakeB1Device(), transport="tcp", host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        assert chip.url == f"socket://[::1]:{chip.port}"
        with SerialDevice(chip.url, timeout=1.0) as dev:
            assert dev.info().protocol_version == 3  # the link's version, for provenance
    finally:
        chip.stop()


def test_refused_visa_connection_says_so():
    pytest.importorskip("pyvisa")
    from hwloop.wire.visa_device import VisaDevice
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match="refused"):
        VisaDevice(f"TCPIP::127.0.0.1::{port}::SOCKET", timeout=5.0)
    assert time.monotonic() - t0 < 2.0


def test_loop_url_fails_fast_and_clearly():
    t0 = time.monotonic()
    with pytest.raises(DeviceError) as ei:
        SerialDevice("loop://", timeout=2.0)
    assert time.monotonic() - t0 < 1.0
    assert "our own request back" in str(ei.value) and "no chip" in str(ei.value)
