"""Evaluating a network on a device: repeated evaluations with reproducible jitter
(:func:`evaluate_repeated`, used by ``hwloop finetune`` before and after fine-tuning) and the
library behind ``hwloop evaluate`` (:func:`evaluate_on_device`), optionally compensated with a
calibration record (docs/calibration.md).

The network is either the converted ReLU twin (trained, or loaded from the model cache, as by
``hwloop finetune``; its windows shrunk to the profile's percentile) or the weights a
fine-tuning run saved (``final_weights.pt``).

Saved weights: a file written by ``hwloop finetune`` holds, beside the shadow weights, the state
fine-tuning left on the chip (codes, per-layer scales, thresholds, the spec with its windows),
the device id it was programmed on and the calibration record it used. That state is programmed
exactly as saved (:func:`hwloop.mapping.reprogram`, verified), so the chip runs what
fine-tuning left; quantising the shadow afresh would pick new scales and change codes. On a
device with another id (or, for an emulator, another frozen mismatch) the file is refused
unless ``requantize`` asks to quantise the shadow afresh for this chip. Weights from a run that
used a calibration record (the file's ``calibration`` field; for older files, the
``report.json`` beside them) are in that chip's device domain: a calibration is never applied
to them a second time. Older files without a saved state are re-quantised, with a note.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from hwloop.calibrate.compensate import program_calibrated
from hwloop.calibrate.fit import spec_for_arch
from hwloop.calibrate.record import check_record_matches, content_hash, load_record, mismatch_digest
from hwloop.devices.base import NetworkSpec, TTFSDevice
from hwloop.devices.open import open_named_device
from hwloop.errors import CheckpointError
from hwloop.mapping import (ProgramState, mapping_hints, network_to_spec, program_network,
                            reprogram)
from hwloop.train import plots, twin
from hwloop.train.checkpoint import state_from_dict
from hwloop.train.deploy import map_network
from hwloop.train.hil import FinetuneConfig, evaluate_device, evaluate_net
from hwloop.train.lock import FolderLock, remove_if_empty
from hwloop.train.options import FinetuneOptions
from hwloop.train.progress import bar as make_bar
from hwloop.ttfs import convert

__all__ = ["EVAL_AFTER", "EVAL_BEFORE", "EVAL_TRACE", "PLOTS", "codes_digest", "evaluate_on_device",
           "evaluate_repeated", "evaluate_to_folder", "load_weights_file", "state_digest",
           "weights_are_device_domain", "weights_calibration", "write_plots"]

#: noise seeds of the evaluations, offsets to ``seed * 1_000_003`` (the epochs use 0, 1, ...):
#: every seed is non-negative and none is shared with an epoch
EVAL_BEFORE, EVAL_AFTER, EVAL_TRACE = 500_000, 700_000, 900_000


def evaluate_repeated(device, net, x, y, opts: FinetuneOptions, offset: int, desc: str) -> dict:
    """:func:`~hwloop.train.hil.evaluate_device` ``opts.eval_repeats`` times, each with its own
    reproducible jitter seed. The first repeat's figures are returned as they are, with
    ``spread``: ``repeats`` and the accuracy's ``values``, ``mean``, ``sd``, ``min``, ``max``
    (on a chip without jitter every repeat is the same)."""
    r = opts.eval_repeats
    bar = make_bar(opts.progress, r * int(x.shape[0]), desc, unit="img")
    accs, first = [], None
    try:
        for k in range(r):
            device.seed_noise(opts.finetune.seed * 1_000_003 + offset + k)
            res = evaluate_device(device, net, x, y, opts.eval_batch_size,
                                  progress=bar.update if bar is not None else None)
            first = first or res
            accs.append(res["accuracy"])
            if k:
                first["device_calls"] += res["device_calls"]
    finally:
        if bar is not None:
            bar.close()
    mean = sum(accs) / r
    sd = math.sqrt(sum((a - mean) ** 2 for a in accs) / (r - 1)) if r > 1 else 0.0
    first["spread"] = {"repeats": r, "values": accs, "mean": mean, "sd": sd,
                       "min": min(accs), "max": max(accs)}
    return first


# ---------------------------------------------------------------------------- weights files
def weights_are_device_domain(weights: str) -> Optional[str]:
    """The calibration path recorded by the run that saved ``weights`` (its report.json beside
    it), or None when that run used none (or no report is found)."""
    rep = Path(weights).with_name("report.json")
    try:
        data = json.loads(rep.read_text())
    except (OSError, ValueError):
        return None
    cal = (data.get("provenance") or {}).get("calibration")
    return cal.get("path") if isinstance(cal, dict) else (cal or None)


def weights_calibration(weights: str, sd: dict) -> Optional[str]:
    """The calibration record the run that saved ``weights`` used: the file's own
    ``calibration`` field when it has one (files written since the saved state), else the
    ``report.json`` beside it (:func:`weights_are_device_domain`); None: no calibration."""
    if isinstance(sd, dict) and "calibration" in sd:
        cal = sd["calibration"]
        return str(cal) if cal else None
    return weights_are_device_domain(weights)


def _digest(weights, thresholds) -> str:
    """sha256 over ``{layer: (codes, scale)}`` and ``{layer: values}`` in layer order."""
    h = hashlib.sha256()
    for i in sorted(weights):
        codes, scale = weights[i]
        h.update(f"w{i}:{float(scale)!r}:{tuple(codes.shape)}".encode())
        h.update(codes.detach().cpu().to(torch.float64).contiguous().numpy().tobytes())
    for i in sorted(thresholds):
        v = thresholds[i]
        h.update(f"t{i}:{tuple(v.shape)}".encode())
        h.update(v.detach().cpu().to(torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


def codes_digest(dev: TTFSDevice, state: ProgramState) -> str:
    """sha256 of the codes, scales and thresholds read back from ``dev`` for the layers of
    ``state`` (what is on the chip now), for the report."""
    return _digest({i: dev.read_weights(i) for i in sorted(state.weights)},
                   {i: dev.read_thresholds(i) for i in sorted(state.thresholds)})


def state_digest(state: ProgramState) -> str:
    """The digest :func:`codes_digest` gives for a chip programmed with ``state``."""
    return _digest(state.weights, state.thresholds)


def load_weights_file(path: str) -> dict:
    """The state dict of a ``final_weights.pt`` written by ``hwloop finetune``.

    Raises:
        CheckpointError: the file is missing or is not such a weights file.
    """
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"--weights {path}: no such file") from None
    except Exception as exc:  # torch raises many types for a file of another kind
        raise CheckpointError(f"--weights {path} is not a weights file written by hwloop finetune "
                              f"(final_weights.pt): {type(exc).__name__}") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"--weights {path} is not a weights file written by hwloop finetune")
    return sd


def _saved_state(weights: str, saved: dict, net) -> ProgramState:
    """The :class:`~hwloop.mapping.ProgramState` saved in a weights file, checked against the
    network the shadow weights were loaded into (same layers, same shapes)."""
    try:
        state = state_from_dict(saved, ProgramState(spec=NetworkSpec.model_validate_json(saved["spec"])))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"--weights {weights}: the saved chip state is unreadable "
                              f"({type(exc).__name__}: {str(exc)[:200]}); pass --requantize to "
                              "quantise the weights afresh") from None
    want = network_to_spec(net)
    got = [(l.kind, tuple(l.in_shape), tuple(l.out_shape), tuple(l.weight_shape or ()))
           for l in state.spec.layers]
    have = [(l.kind, tuple(l.in_shape), tuple(l.out_shape), tuple(l.weight_shape or ()))
            for l in want.layers]
    if got != have:
        raise CheckpointError(f"--weights {weights}: the saved chip state has another topology than "
                              "its shadow weights; the file is damaged (pass --requantize to use the "
                              "shadow weights alone)")
    return state


# ---------------------------------------------------------------------------- hwloop evaluate
class _Saved:
    """A weights file and what is decided from it (``None`` fields without ``--weights``)."""

    def __init__(self, weights: Optional[str], requantize: bool):
        if requantize and not weights:
            raise CheckpointError("--requantize applies to --weights (saved fine-tuned weights) only")
        self.path, self.requantize = weights, requantize
        self.sd = load_weights_file(weights) if weights else None
        self.state = self.sd.get("state") if isinstance(self.sd, dict) else None
        self.calibration = weights_calibration(weights, self.sd) if weights else None
        self.device_id = self.sd.get("device_id") if isinstance(self.sd, dict) else None


def _note(msg: str, log: Callable[[str], None], notes: list[str]) -> None:
    log(msg)
    notes.append(msg)


def _check_saved_chip(saved: _Saved, dev: TTFSDevice, log, notes: list[str]) -> None:
    """Refuse a saved state on another chip (unless ``requantize``); note what happens."""
    if not saved.path:
        return
    if saved.state is None:
        if not saved.requantize:
            _note(f"note: {saved.path} holds no saved chip state (written by an older hwloop "
                  "finetune): its weights are quantised afresh, so the codes may differ from what "
                  "fine-tuning programmed", log, notes)
        return
    info = dev.info()
    saved_id, run_cal = saved.device_id, saved.calibration
    saved_mm, now_mm = saved.sd.get("mismatch_sha256"), mismatch_digest(dev)
    other = (saved_id is not None and saved_id != info.device_id) or (
        saved_mm is not None and now_mm is not None and saved_mm != now_mm)
    if other and not saved.requantize:
        what = (f"device {saved_id!r}, but the device is {info.device_id!r}"
                if saved_id != info.device_id else
                f"device {saved_id!r} with frozen mismatch {saved_mm[:16]}..., but this chip's "
                f"is now {now_mm[:16]}... (same id, another profile or chip seed)")
        raise CheckpointError(
            f"--weights {saved.path}: the state was programmed on {what}: its codes, scales and "
            "thresholds belong to that chip" + (f" (compensated with calibration {run_cal})"
                                                if run_cal else "")
            + "; evaluate on that chip, or pass --requantize to quantise the weights afresh "
              "for this one")
    if other:
        msg = (f"note: {saved.path} was fine-tuned on {saved_id!r}; --requantize: its weights "
               f"are quantised afresh for {info.device_id!r}")
        if run_cal:
            msg += (f". WARNING: they were fine-tuned with calibration {run_cal}: their "
                    f"device-domain weights are compensated for {saved_id!r}'s mismatch, "
                    f"not for {info.device_id!r}'s (map them back with "
                    "Compensation.to_intended, or fine-tune on this chip)")
        _note(msg, log, notes)


def _program_saved(dev: TTFSDevice, net, saved: _Saved, rec, calibration: Optional[str],
                   arch: str, dataset: str, log, notes: list[str]):
    """Load the saved shadow weights into ``net`` and put them on the chip: the saved state as
    it is, or quantised afresh (compensated with ``rec`` unless fine-tuned with a record).
    Returns ``(state, programmed, mode, rec)``; ``rec`` is None when it was not applied."""
    sd = saved.sd
    try:
        net.load_state_dict(sd.get("shadow", sd) if isinstance(sd, dict) else sd)
    except (RuntimeError, TypeError) as exc:
        raise CheckpointError(f"--weights {saved.path} does not fit --arch {arch} on {dataset}: "
                              f"{' '.join(str(exc).split())[:300]}") from None
    mode = "calibrated" if rec is not None else "uncalibrated"
    clip = mapping_hints(dev).weight_clip_percentile
    run_cal = saved.calibration
    if run_cal and rec is not None:
        _note(f"note: {saved.path} was fine-tuned with calibration {run_cal}: its weights are "
              f"already compensated; --calibration {calibration} is not applied again", log, notes)
    if run_cal:
        mode = f"fine-tuned with calibration {run_cal} (device-domain weights)"
        rec = None  # never compensated twice
    if saved.state is not None and not saved.requantize and rec is not None:
        _note(f"note: --calibration {calibration} compensates the fine-tuned weights, so "
              "they are quantised afresh (the saved state was programmed uncalibrated)", log, notes)
    if saved.state is not None and not saved.requantize and rec is None:
        state = _saved_state(saved.path, saved.state, net)
        reprogram(dev, state)
        return state, "saved state", mode, rec
    if rec is not None:
        return (program_calibrated(dev, net, rec, clip_percentile=clip),
                "quantised afresh, calibrated", mode, rec)
    return program_network(dev, net, clip_percentile=clip), "quantised afresh", mode, rec


def evaluate_on_device(device: str, chip_seed: Optional[int] = None, calibration: Optional[str] = None,
                       weights: Optional[str] = None, dataset: str = "fashion-mnist",
                       data_dir: Optional[str] = None, arch: str = "fc2", seed: int = 0,
                       pretrain_epochs: Optional[int] = None, train_subset: Optional[int] = None,
                       test_subset: Optional[int] = None, window_percentile: Optional[float] = None,
                       batch_size: int = 1000, log: Callable[[str], None] = print, *,
                       repeats: int = 1, progress: bool = False, trace: bool = False,
                       cache_dir: Optional[str] = None, requantize: bool = False) -> dict[str, Any]:
    """Evaluate on a device; returns a dict with ``device`` (see
    :func:`hwloop.train.hil.evaluate_device`; with ``spread`` over ``repeats`` evaluations with
    fresh jitter), ``ideal_snn`` accuracy, and what was programmed; ``trace``: also the spike
    times of a few test images (``trace`` key, for the plots).

    The device is opened, and a calibration record and saved weights checked against it, before
    anything else (the twin may take minutes to train): a wrong device fails at once.

    ``weights`` with a saved state (module docstring): programmed as saved, refused (naming both
    device ids) on another device unless ``requantize``; ``requantize``: the shadow weights are
    quantised afresh (and compensated with ``calibration`` unless they were fine-tuned with one).

    Raises:
        CheckpointError: the weights file is unreadable, does not fit ``arch``, or was
            programmed on another device (without ``requantize``).
        CalibrationError: the record does not match the device or the network."""
    opts = FinetuneOptions(device=device, chip_seed=chip_seed, dataset=dataset, data_dir=data_dir,
                           arch=arch, pretrain_epochs=pretrain_epochs, train_subset=train_subset,
                           test_subset=test_subset, window_percentile=window_percentile,
                           finetune=FinetuneConfig(seed=seed), progress=progress,
                           eval_repeats=repeats, eval_batch_size=batch_size, cache_dir=cache_dir)
    # everything the user named is checked before the (possibly long) twin training
    rec = load_record(calibration) if calibration else None
    saved = _Saved(weights, requantize)
    notes: list[str] = []
    with open_named_device(device, chip_seed) as dev:
        info = dev.info()
        _check_saved_chip(saved, dev, log, notes)
        if rec is not None:
            check_record_matches(rec, info.device_id, spec_for_arch(arch, opts.dataset), device=dev)
        source = twin.data_source(opts)
        data = twin.load_data(opts)
        xtr, ytr, xte, yte = data
        digest = twin.data_digest(data)
        relu, _ = twin.relu_twin(opts, data, log, digest)
        net = convert(relu, xtr[:2000].to(torch.float64), dtype=torch.float64)
        if weights:
            state, programmed, mode, rec = _program_saved(dev, net, saved, rec, calibration, arch,
                                                          dataset, log, notes)
            ideal = shadow = net
        else:
            mode, programmed = ("calibrated" if rec is not None else "uncalibrated"), "mapped"
            ideal = copy.deepcopy(net)
            shadow, state, _ = map_network(dev, net, xtr, window_percentile, rec)
        codes_sha = codes_digest(dev, state)
        res = evaluate_repeated(dev, shadow, xte, yte, opts, EVAL_BEFORE, "evaluating")
        tr = None
        if trace:
            dev.seed_noise(seed * 1_000_003 + EVAL_TRACE)
            tr = plots.spike_trace(shadow, xte, yte, device=dev)
    ideal_res = evaluate_net(ideal, xte, yte) if not weights else None
    cal = None
    if rec is not None or calibration:
        cal = {"path": calibration,
               "content_sha256": content_hash(rec if rec is not None else load_record(calibration))}
    out = {"kind": "evaluate", "device_id": info.device_id, "device_name": device, "mode": mode,
           "dataset": opts.dataset, "arch": arch, "n_test": int(xte.shape[0]),
           "data": {**source, "sha256": digest}, "device": res, "ideal_snn": ideal_res,
           "calibration": calibration, "calibration_record": cal, "weights": weights,
           "programmed": {"from": programmed, "codes_sha256": codes_sha,
                          "weights_calibration": saved.calibration if weights else None,
                          "weights_device_id": saved.device_id},
           "notes": notes}
    if trace:
        out["trace"] = tr
    return out


# ---------------------------------------------------------------------------- the run folder
PLOTS = ("spike_raster.png", "spike_times.png", "spikes_per_layer.png")


def write_plots(out: dict, trace: dict, out_dir: Path) -> list[str]:
    """The spike raster and per-layer spike-time histograms of a few test images on the
    device, and the spikes per neuron of each layer over the test set."""
    (out_dir / "spike_trace.json").write_text(json.dumps(trace))
    paths = [plots.plot_spike_raster(trace, out_dir / PLOTS[0]),
             plots.plot_spike_histograms(trace, out_dir / PLOTS[1]),
             plots.plot_layer_activity(out["device"], out_dir / PLOTS[2],
                                       title=f"{out['arch']} on {out['device_id']} ({out['mode']})")]
    return [str(p) for p in paths]


def evaluate_to_folder(out_dir: str | os.PathLike, plots_too: bool = True, **kw) -> dict[str, Any]:
    """:func:`evaluate_on_device` (keywords ``kw``, ``trace`` set by ``plots_too``) into a
    locked folder: ``report.json`` and, with ``plots_too``, the plots (:data:`PLOTS`). A
    folder this call created is removed again when it fails. Returns the result (no trace)."""
    out_dir = Path(out_dir)
    existed = out_dir.exists()
    try:
        with FolderLock(out_dir, "hwloop evaluate"):
            out = evaluate_on_device(trace=plots_too, **kw)
            trace = out.pop("trace", None)
            tmp = out_dir / "report.json.tmp"
            tmp.write_text(json.dumps(out, indent=2, default=float))
            os.replace(tmp, out_dir / "report.json")
            if trace is not None:
                write_plots(out, trace, out_dir)
    except BaseException:
        if not existed:
            remove_if_empty(out_dir)
        raise
    return out
