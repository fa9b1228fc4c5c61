"""Deploying a converted network on a device: windows shrunk to the profile's percentile of
training activations (Methods (ii), (iv)), then programmed and verified, compensated with a
calibration record when one is given. Used by ``hwloop finetune`` and ``hwloop evaluate``."""

from __future__ import annotations

from typing import Optional

import torch

from hwloop.calibrate.compensate import program_calibrated
from hwloop.mapping import (ProgramState, apply_windows, latency_windows, mapping_hints,
                            program_network)
from hwloop.ttfs import TTFSNetwork

__all__ = ["map_network"]


def map_network(device, net: TTFSNetwork, x_train: torch.Tensor, window_percentile: Optional[float],
                calibration=None) -> tuple[TTFSNetwork, ProgramState, float]:
    """Shrink windows (Methods (ii)/(iv)), program, verify. Returns (shadow net, state, pct)."""
    info = device.info()
    hints = mapping_hints(device)
    pct = window_percentile
    if pct is None:
        pct = hints.window_percentile
    if pct is None:
        pct = 99.0 if info.time_steps_per_layer else 100.0
    shadow = net
    if float(pct) < 100.0 or info.time_steps_per_layer:
        widths = latency_windows(net, x_train[:5000], float(pct))
        shadow = apply_windows(net, widths, clamp_early=True)
    clip = hints.weight_clip_percentile
    if calibration is not None:
        state = program_calibrated(device, shadow, calibration, clip_percentile=clip)
    else:
        state = program_network(device, shadow, clip_percentile=clip)
    return shadow, state, float(pct)
