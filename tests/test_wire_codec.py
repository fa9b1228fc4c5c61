"""hwloop.wire.codec: units on the wire (ticks), payload sizes and batch bounds, and the
error and command tables that docs/protocol.md lists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hwloop.errors import DeviceLimitError
from hwloop.wire.codec import (Err, MAX_MESSAGE, TICK_SILENT, dumps, max_batch_for_message,
                               run_reply_size, ticks_per_tau_c, ticks_to_times, times_to_ticks)
from hwloop.wire.frame import Cmd, MAX_FRAME
from hwloop.wire.scpi import SCPI_COMMANDS

from bytes_exchange import rep, req
from fakes import grid_inputs, small_spec
from wire_helpers import SPEC, open_serial, record_bytes


DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def test_ticks_conversion():
    ratio = ticks_per_tau_c(1e-6, 1e-6 / 256)
    assert ratio == 256.0
    t = np.array([0.0, 1 / 256, 2.5, np.inf, 1000.0])
    k = times_to_ticks(t, ratio)
    assert k.tolist() == [0, 1, 640, TICK_SILENT, 256000]
    assert np.array_equal(ticks_to_times(k, ratio), t)
    # off the grid: rounds to the nearest tick (loss <= half a tick)
    assert times_to_ticks(np.array([0.3]), 100.0).tolist() == [30]
    for bad in ([-1.0], [np.nan], [1e12]):
        with pytest.raises(ValueError):
            times_to_ticks(np.array(bad), ratio)


def test_run_reply_size_matches_encoder_and_bounds_batches():
    x = grid_inputs(SPEC, 5)
    for f64 in (True, False):
        _, body = record_bytes(x, f64, 256.0)
        size = run_reply_size(5, [6, 5, 5], [5, 5], 3, f64, has_energy=False)
        assert size == len(body)
    big = small_spec(n_in=1000, hidden=1000, n_out=10)
    most = max_batch_for_message([1000, 1000, 1000], [1000, 1000], 10, True)
    assert run_reply_size(most, [1000, 1000, 1000], [1000, 1000], 10, True) <= MAX_MESSAGE
    assert run_reply_size(most + 1, [1000, 1000, 1000], [1000, 1000], 10, True) > MAX_MESSAGE
    status = {"programmed": True, "spec": json.loads(big.model_dump_json())}
    dev, port = open_serial([(req(2, Cmd.STATUS), rep(2, Cmd.STATUS, dumps(status)))])
    with pytest.raises(DeviceLimitError, match=f"at most {most} samples"):
        dev.run(torch.zeros(most + 1, 1000, dtype=torch.float64))
    port.assert_done()


# ------------------------------------------------------------------------------------------------
# docs/protocol.md lists every command and error
# ------------------------------------------------------------------------------------------------


def test_docs_list_every_command_and_error():
    text = DOC.read_text()
    for c in Cmd:
        assert f"`{c.name}`" in text and f"0x{c.value:02X}" in text, c
    for e in Err:
        assert f"`{e.name}`" in text and f"0x{e.value:04X}" in text, e
    for head in SCPI_COMMANDS:
        assert f"`{head}" in text, head
    assert f"MAX_FRAME = {MAX_FRAME}" in text
