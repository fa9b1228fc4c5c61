"""Compensation: program a chip so that it computes the intended network, given its record.

For a dense neuron i at deployment window width w (model of :mod:`hwloop.calibrate.fit`):

    chip:     t_i - t_min = a_i(w) + s_i theta'_i - sum_j k_ij W'_ij x_j,  a_i(w) = d_i + s_i o_i w
    intended: t_i - t_min = theta_i - sum_j W_ij x_j

so the chip is written ``W'_ij = W_ij / k_ij`` and ``theta'_i = (theta_i - a_i(w)) / s_i``
(per synapse, or with the row mean k_i when per-synapse gains are not identified or not
resolved above their noise). Readout: ``W'_kj = W_kj / rho_kj``, ``offset'_k = offset_k / q_k``.
Conv layers: thresholds only, averaged per channel (see below).

**How it stays consistent with fine-tuning (the "device domain").** :func:`program_calibrated`
rewrites the given network *in place* into the device domain (weights W', and D' such that the
layer's thresholds are theta'), then programs it with :func:`hwloop.mapping.program_network`.
The returned :class:`CalibratedProgramState` is therefore exactly what was written, and
:class:`hwloop.train.hil.HILTrainer`, which re-quantises the shadow's weights with the state's
per-layer scales and rewrites the shadow's thresholds, keeps writing compensated values: the
optimiser trains W' and D' directly. Gradients are then evaluated at the device-domain weights
(off from the effective ones by the gains k, a few per cent: still a descent direction); the
hook :meth:`hwloop.mapping.ProgramState.effective_weight` gives the trainer's nominal network
the weights the chip effectively applies (docs/calibration.md, "Fine-tuning").

Consequences to keep in mind:

* weights saved from such a run (``final_weights.pt``) are chip-specific (device domain);
  :meth:`Compensation.to_intended` maps a device-domain network back to portable weights;
* the threshold compensation depends on the window width: after a window change (Eq. (8) on
  chip), call :func:`program_calibrated` again on the intended network;
* conv2d: weights are shared across positions, thresholds per channel in the network, so the
  in-place form compensates the per-channel mean of (theta - a) / s only.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from hwloop.calibrate.record import (FACTOR_RANGE, CalibrationRecord, check_record_matches,
                                     validate_record)
from hwloop.devices.base import TTFSDevice
from hwloop.errors import CalibrationError
from hwloop.mapping import ProgramState, network_to_spec, program_network
from hwloop.ttfs.layers import Readout, SpikingConv2d, SpikingDense
from hwloop.ttfs.network import TTFSNetwork

__all__ = ["CalibratedProgramState", "Compensation", "LayerCompensation", "program_calibrated"]

F64 = torch.float64
#: per-synapse gains outside this range (a dead or noisily measured synapse) are clamped, with a
#: note. Per-neuron slopes, gains and offset gains are never clamped: the record refuses them
#: outside the same range (:data:`hwloop.calibrate.record.FACTOR_RANGE`), so the intercept
#: a(w) = d + s o w and the threshold correction use one and the same slope.
SANE = FACTOR_RANGE


@dataclass
class LayerCompensation:
    index: int
    kind: str
    #: gain to divide weights by, weight_shape (per synapse or row mean broadcast); None = 1
    gain: Optional[torch.Tensor]
    #: neuron layers: slope s and intercept a(w) at the deployment width, out_shape
    slope: Optional[torch.Tensor] = None
    intercept: Optional[torch.Tensor] = None
    #: readout: q (offset gain)
    offset_gain: Optional[torch.Tensor] = None
    per_synapse: bool = False


@dataclass
class Compensation:
    """Per-layer factors for one network's windows, from a record."""

    layers: dict[int, LayerCompensation]
    record_hash: str
    device_id: str
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_record(cls, record: CalibrationRecord, spec, granularity: str = "auto") -> "Compensation":
        """Factors for the windows of ``spec`` (a NetworkSpec).

        ``granularity``: "synapse" (per-synapse gains where identified), "neuron" (row means),
        "auto" (per synapse where the spread of the per-synapse estimates exceeds twice their
        standard error, i.e. the estimates resolve real gain differences), "none" (thresholds
        and slopes only, weights as they are).

        Raises:
            CalibrationError: the record's values or shapes are not allowed (validated again:
                it may have been edited in memory), naming its file, the field and the range.
        """
        if granularity not in ("auto", "synapse", "neuron", "none"):
            raise ValueError(f"granularity must be auto/synapse/neuron/none, got {granularity!r}")
        validate_record(record)
        out: dict[int, LayerCompensation] = {}
        notes: list[str] = []
        for i, l in enumerate(spec.layers):
            if l.kind not in ("dense", "conv2d", "readout"):
                continue
            lc = record.layer(i)
            gain, per_syn = None, False
            if granularity != "none" and lc.gain is not None:
                row = torch.tensor(lc.gain, dtype=F64)
                gain = row.view(-1, *([1] * (len(l.weight_shape) - 1))).expand(l.weight_shape).clone()
                if lc.synapse_gain is not None and granularity in ("auto", "synapse"):
                    k = lc.synapse_gain.tensor()
                    spread = float((k - k.mean(1, keepdim=True)).std())
                    se = lc.synapse_gain_se if lc.synapse_gain_se is not None else math.inf
                    if granularity == "synapse" or (math.isfinite(se) and spread > 2.0 * se):
                        gain, per_syn = k, True
                bad = int(((gain < SANE[0]) | (gain > SANE[1])).sum())
                if bad:
                    notes.append(f"layer {i}: {bad} gains outside {SANE} clamped")
                    gain = gain.clamp(*SANE)
            if l.kind == "readout":
                q = lc.vec("offset_gain")
                out[i] = LayerCompensation(i, l.kind, gain, offset_gain=q, per_synapse=per_syn)
                continue
            w = float(l.t_max) - float(l.t_min)
            s = lc.vec("slope")  # validated: in FACTOR_RANGE, so nothing to clamp
            a = lc.vec("delay") + s * lc.vec("threshold_offset") * w
            out[i] = LayerCompensation(i, l.kind, gain if l.kind == "dense" else None, slope=s,
                                       intercept=a, per_synapse=per_syn)
        return cls(out, record.content_hash, record.device_id, notes)

    # ------------------------------------------------------------------ transforms
    @torch.no_grad()
    def apply_(self, net: TTFSNetwork) -> TTFSNetwork:
        """Rewrite ``net`` in place from the intended into the device domain."""
        for i, lcomp in self.layers.items():
            layer = net.layers[i]
            if isinstance(layer, Readout):
                if lcomp.gain is not None:
                    layer.weight.div_(lcomp.gain.to(layer.weight.dtype))
                if lcomp.offset_gain is not None:
                    layer.bias.div_(lcomp.offset_gain.to(layer.bias.dtype))
                continue
            theta = layer.neuron_thresholds(tuple(net.shapes[i])).to(F64)
            theta_dev = (theta - lcomp.intercept) / lcomp.slope
            if isinstance(layer, SpikingDense):
                if lcomp.gain is not None:
                    layer.weight.div_(lcomp.gain.to(layer.weight.dtype))
                layer.D.copy_((layer.base_threshold.to(F64) - theta_dev).to(layer.D.dtype))
            elif isinstance(layer, SpikingConv2d):
                shift = (theta - theta_dev).flatten(1).mean(1)
                layer.D.add_(shift.to(layer.D.dtype))
            else:  # pragma: no cover
                raise CalibrationError(f"layer {i}: cannot compensate {type(layer).__name__}")
        return net

    @torch.no_grad()
    def to_intended(self, net: TTFSNetwork) -> TTFSNetwork:
        """A copy of a device-domain ``net`` mapped back to the intended domain (portable
        weights: what the chip effectively computes). Exact inverse of :meth:`apply_` for
        dense layers and the readout; conv2d uses the same per-channel shift."""
        out = copy.deepcopy(net)
        for i, lcomp in self.layers.items():
            layer = out.layers[i]
            if isinstance(layer, Readout):
                if lcomp.gain is not None:
                    layer.weight.mul_(lcomp.gain.to(layer.weight.dtype))
                if lcomp.offset_gain is not None:
                    layer.bias.mul_(lcomp.offset_gain.to(layer.bias.dtype))
                continue
            theta_dev = layer.neuron_thresholds(tuple(out.shapes[i])).to(F64)
            theta = lcomp.intercept + lcomp.slope * theta_dev
            if isinstance(layer, SpikingDense):
                if lcomp.gain is not None:
                    layer.weight.mul_(lcomp.gain.to(layer.weight.dtype))
                layer.D.copy_((layer.base_threshold.to(F64) - theta).to(layer.D.dtype))
            elif isinstance(layer, SpikingConv2d):
                layer.D.sub_((theta - theta_dev).flatten(1).mean(1).to(layer.D.dtype))
        return out

    def effective_weight(self, layer: int, weight: torch.Tensor) -> torch.Tensor:
        """The weight the chip effectively applies (intended units) for device-domain
        ``weight`` of ``layer``: k * W'."""
        lcomp = self.layers.get(layer)
        if lcomp is None or lcomp.gain is None:
            return weight
        return weight * lcomp.gain.to(weight.dtype)


@dataclass
class CalibratedProgramState(ProgramState):
    """A :class:`ProgramState` (exactly what was written: device-domain codes and thresholds)
    whose declared calibration fields (``compensation``: the :class:`Compensation` used,
    ``record_hash``) are set; :meth:`ProgramState.effective_weight` then gives the trainer's
    nominal network k * codes * scale."""


def program_calibrated(device: TTFSDevice, net: TTFSNetwork, record: CalibrationRecord,
                       clip_percentile: Optional[float] = None, weight_bits: Optional[int] = None,
                       granularity: str = "auto", verify: bool = True) -> CalibratedProgramState:
    """Program ``net`` on ``device`` compensated with ``record``.

    ``net`` is rewritten **in place** into the device domain (see the module docstring); its
    windows are the deployment windows (shrink them before calling). Quantisation: each layer's
    compensated weights get their own scale (Methods (iii) percentiles), so the per-row
    gain corrections are re-quantised with the layer.

    Raises:
        CalibrationError: the record is for another device or topology, or (an emulator) for
            a chip whose frozen mismatch has changed under the same id (its ``mismatch_sha256``),
            or holds values or shapes that are not allowed (named by file, field and range).
        DeviceLimitError, WriteVerifyError: as :func:`hwloop.mapping.program_network`.
    """
    if not isinstance(record, CalibrationRecord):
        raise CalibrationError(f"expected a CalibrationRecord, got {type(record).__name__}")
    spec = network_to_spec(net)
    check_record_matches(record, device.info().device_id, spec, device=device)
    comp = Compensation.from_record(record, spec, granularity)
    comp.apply_(net)
    state = program_network(device, net, weight_bits=weight_bits, clip_percentile=clip_percentile,
                            verify=verify)
    return CalibratedProgramState(spec=state.spec, weights=state.weights, thresholds=state.thresholds,
                                  weight_bits=state.weight_bits, clip_percentile=state.clip_percentile,
                                  compensation=comp, record_hash=record.content_hash)
