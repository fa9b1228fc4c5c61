"""`hwloop finetune`: the main job, end to end.

1. load the data set (IDX files, or a synthetic task for tests; :mod:`hwloop.train.twin`);
2. train the ReLU twin, or load it from the model cache (:func:`hwloop.train.twin.relu_twin`);
3. convert it to a float64 B1 network (exact twin) and map it onto the device
   (:func:`hwloop.train.deploy.map_network`): windows shrunk to the profile's percentile of
   training activations (Methods (ii), (iv)), weights quantised (Methods (iii)), thresholds and
   readout offsets written and verified;
4. evaluate before fine-tuning: ReLU (float), ideal SNN, the device
   (:func:`hwloop.train.evaluation.evaluate_repeated`);
5. fine-tune N epochs with :class:`~hwloop.train.hil.HILTrainer` (a JSONL line per step, an
   atomic checkpoint per epoch, ``resume`` from the last one);
6. evaluate again; write ``final_weights.pt`` and ``report.json`` with provenance, and the plots.

The options are :class:`hwloop.train.options.FinetuneOptions`; the closing table is
:func:`hwloop.train.tables.format_table`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from hwloop.calibrate.fit import spec_for_arch
from hwloop.calibrate.record import check_record_matches, content_hash, load_record
from hwloop.devices.open import open_named_device
from hwloop.errors import CheckpointError
from hwloop.mapping import ProgramState, reprogram
from hwloop.provenance import file_sha256, provenance
from hwloop.train import plots, twin
from hwloop.train.checkpoint import load_checkpoint, save_checkpoint, state_from_dict, state_to_dict
from hwloop.train.deploy import map_network
from hwloop.train.evaluation import EVAL_AFTER, EVAL_BEFORE, EVAL_TRACE, evaluate_repeated
from hwloop.train.hil import HILTrainer, epoch_order, evaluate_net
from hwloop.train.lock import FolderLock, remove_if_empty
from hwloop.train.options import FinetuneOptions, input_mismatches, option_mismatches
from hwloop.train.progress import bar as progress_bar
from hwloop.train.progress import epoch_line, health_delta
from hwloop.train.tables import format_eval
from hwloop.ttfs import TTFSNetwork, convert

__all__ = ["PLOTS", "run_finetune", "write_finetune_plots"]


class _Interrupt(Exception):
    """Raised by the test hook ``stop_after_steps`` to simulate a killed run."""


def _info_digest(info) -> str:
    """SHA-256 of a chip's self-description (:class:`DeviceInfo`: id, firmware, weight bits,
    time steps, limits, tau_c, clock) as the chip reports it; the protocol version is left out
    (the same chip in process and behind a link computes the same)."""
    return hashlib.sha256(info.model_dump_json(exclude={"protocol_version"}).encode()).hexdigest()


def _check_resume(ckpt: Path, what: str, mismatches: list[str]) -> None:
    if mismatches:
        raise CheckpointError(f"{ckpt} was written with other {what} (" + "; ".join(mismatches)
                              + "): resume with the same inputs, or start a new run with another --out")


def _rewrite_log(path: Path, epochs_done: int) -> None:
    """Keep only the step rows of the first ``epochs_done`` epochs (those the checkpoint holds;
    rows number epochs from 1); rows of an interrupted epoch, and a torn last line, are
    dropped. Atomic."""
    if not path.exists():
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line torn by the interruption
            if isinstance(row, dict) and 1 <= int(row.get("epoch", 0)) <= epochs_done:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, path)


def run_finetune(opts: FinetuneOptions, log: Callable[[str], None] = print,
                 stop_after_steps: Optional[int] = None) -> dict[str, Any]:
    """Run the whole job; returns the report (also written to ``<out>/report.json``).

    The output folder is locked for the run (:class:`~hwloop.train.lock.FolderLock`).
    ``resume`` continues from ``<out>/checkpoint.pt`` only when every input that changes the
    result is the same: the options of :data:`~hwloop.train.options.RESULT_OPTIONS`, the data's
    content hash, the ReLU twin's weights, the calibration record's content, the device id and
    its profile; a resumed run then equals an uninterrupted one bit for bit (weights, report,
    step log).

    ``stop_after_steps`` (tests): raise after that many fine-tuning steps in this call, as if
    the process had been killed mid-epoch.

    Raises:
        CheckpointError: ``resume`` without a checkpoint, a checkpoint without ``resume``, a
            checkpoint written with other inputs (every mismatch named), or the folder is in use.
    """
    existed = Path(opts.out).exists()
    try:
        with FolderLock(opts.out, "hwloop finetune"):
            return _run_finetune_locked(opts, log, stop_after_steps)
    except BaseException:
        if not existed:
            remove_if_empty(opts.out)
        raise


@dataclass
class _Job:
    """What the steps of one run share."""

    opts: FinetuneOptions
    log: Callable[[str], None]
    t_start: float
    out: Path
    ckpt: Path
    ck: Optional[dict] = None  # the checkpoint resumed from
    device: Any = None
    info: Any = None
    source: dict = field(default_factory=dict)
    data: tuple = ()
    digest: str = ""
    inputs: dict = field(default_factory=dict)
    relu: Any = None
    relu_info: dict = field(default_factory=dict)
    ideal: Optional[TTFSNetwork] = None
    shadow: Optional[TTFSNetwork] = None
    state: Optional[ProgramState] = None
    pct: float = 100.0
    cal_info: Optional[dict] = None
    steps_per_epoch: int = 0
    ft_before: float = 0.0  # fine-tuning seconds of earlier (interrupted) calls
    t_ft: float = 0.0


def _run_finetune_locked(opts: FinetuneOptions, log: Callable[[str], None],
                         stop_after_steps: Optional[int]) -> dict[str, Any]:
    job = _Job(opts=opts, log=log, t_start=time.time(), out=Path(opts.out),
               ckpt=Path(opts.out) / "checkpoint.pt")
    done = _open_checkpoint(job)
    if done is not None:
        return done
    # the device and the calibration record first: a wrong name fails before any training
    calibration = load_record(opts.calibration) if opts.calibration else None
    job.device = open_named_device(opts.device, opts.chip_seed, opts.profile_overrides)
    try:
        _prepare(job, calibration)
        trainer, start_epoch, history, before = _start(job)
        _rewrite_log(job.out / "log.jsonl", start_epoch)  # each step once, whatever was interrupted before
        job.t_ft = time.time()
        with open(job.out / "log.jsonl", "a", encoding="utf-8") as logf:
            steps_done = 0
            for epoch in range(start_epoch, opts.finetune.epochs):
                steps_done = _train_epoch(job, trainer, epoch, logf, history, steps_done,
                                          stop_after_steps)
                _save_epoch(job, trainer, epoch, history, before)
        ft_time = job.ft_before + time.time() - job.t_ft  # every epoch's, across resumes
        after, trace = _evaluate_after(job)
        report = _report(job, trainer, before, after, history, ft_time)
    finally:
        job.device.close()
    _write_results(job, trainer, report, trace)
    return report


def _open_checkpoint(job: _Job) -> Optional[dict]:
    """Check ``resume`` against the folder and load the checkpoint into ``job.ck``; returns the
    report of a run that is already complete (nothing to redo), else None."""
    opts, ckpt, ft = job.opts, job.ckpt, job.opts.finetune
    if opts.resume and not ckpt.exists():
        raise CheckpointError(f"--resume: no checkpoint at {ckpt} (nothing to resume; run without --resume)")
    if not opts.resume and ckpt.exists():
        raise CheckpointError(f"{ckpt} exists: pass --resume to continue that run, or choose another --out")
    if not opts.resume:
        return None
    # options first: a mismatch fails before any data is loaded or twin trained
    ck = job.ck = _load_for_resume(ckpt, job.log)
    _check_resume(ckpt, "options", option_mismatches(ck.get("options", {}), opts))
    report_path = job.out / "report.json"
    if int(ck.get("epoch", 0)) >= ft.epochs and report_path.exists():
        # written last, so the run is complete: nothing to redo, and its report stays as it was
        job.log(f"{job.out}: the run is complete (all {ft.epochs} epochs and the final evaluation); "
                f"its report is {report_path}")
        return json.loads(report_path.read_text())
    job.ft_before = float(ck.get("finetune_time_s", 0.0))
    return None


def _prepare(job: _Job, calibration) -> None:
    """Check the record against the chip, load the data, get the twin (inputs compared with
    the checkpoint's as they become known), convert and map it onto the chip."""
    opts, ck, device = job.opts, job.ck, job.device
    info = job.info = device.info()
    if calibration is not None:
        check_record_matches(calibration, info.device_id, spec_for_arch(opts.arch, opts.dataset),
                             device=device)
    job.source = twin.data_source(opts)
    job.data = twin.load_data(opts)
    xtr = job.data[0]
    job.digest = twin.data_digest(job.data)
    job.inputs = {"device_id": info.device_id, "device_info_sha256": _info_digest(info),
                  "model_sha256": getattr(device, "model_sha256", None),
                  "data_sha256": job.digest,
                  "calibration_sha256": file_sha256(opts.calibration) if opts.calibration else None}
    if ck is not None:
        _check_resume(job.ckpt, "inputs", input_mismatches(
            ck.get("inputs", {"device_id": ck.get("device_id")}), job.inputs))
    job.relu, job.relu_info = twin.relu_twin(opts, job.data, job.log, job.digest)
    job.inputs["twin_sha256"] = twin.weights_digest(job.relu)
    if ck is not None:
        _check_resume(job.ckpt, "inputs", input_mismatches(ck.get("inputs", {}),
                                                           {"twin_sha256": job.inputs["twin_sha256"]}))
    net = convert(job.relu, xtr[:2000].to(torch.float64), dtype=torch.float64)
    job.ideal = copy.deepcopy(net)
    job.shadow, job.state, job.pct = map_network(device, net, xtr, opts.window_percentile, calibration)
    if calibration is not None:
        job.cal_info = {"path": opts.calibration, "content_sha256": content_hash(calibration),
                        "device_id": calibration.device_id}
    job.log(f"device {info.device_id} (firmware {info.firmware_version}): weight bits "
            f"{job.state.weight_bits or 'float'}, time steps/layer {info.time_steps_per_layer or 'continuous'}, "
            f"windows at the {job.pct:g}th percentile, "
            + (f"calibrated with {opts.calibration} (sha256 {job.cal_info['content_sha256'][:16]}...)"
               if job.cal_info else "uncalibrated"))
    ft = opts.finetune
    job.steps_per_epoch = math.ceil(xtr.shape[0] / ft.batch_size)
    if ft.max_steps_per_epoch:
        job.steps_per_epoch = min(job.steps_per_epoch, ft.max_steps_per_epoch)


def _start(job: _Job) -> tuple[HILTrainer, int, list, Optional[dict]]:
    """The trainer, restored from the checkpoint when resuming (the chip reprogrammed with the
    saved state), and the evaluation before fine-tuning. Returns (trainer, first epoch,
    history, before)."""
    opts, ck, shadow, device = job.opts, job.ck, job.shadow, job.device
    trainer = HILTrainer(device, shadow, job.state, opts.finetune)
    start_epoch, history, before = 0, [], None
    if ck is not None:
        shadow.load_state_dict(ck["shadow"])
        trainer.opt.load_state_dict(ck["optimizer"])
        trainer.state = state_from_dict(ck["state"], job.state)
        # the windows adapted by Eq. (8) live in the shadow; the chip is programmed with them
        trainer.state.spec = trainer.state.spec.with_windows(shadow.windows())
        trainer.nominal.load_state_dict(ck["shadow"])
        trainer._refresh_nominal()
        reprogram(device, trainer.state)
        trainer.device_calls = int(ck["device_calls"])
        start_epoch, history, before = int(ck["epoch"]), list(ck["history"]), ck["before"]
        job.log(f"resumed from {job.ckpt} after epoch {start_epoch}")
    if before is None:
        _, _, xte, yte = job.data
        job.log("evaluating before fine-tuning (ReLU, ideal SNN, device"
                + (f" x {opts.eval_repeats}" if opts.eval_repeats > 1 else "") + ")")
        before = {"relu": evaluate_net(job.relu, xte, yte)["accuracy"],
                  "ideal_snn": evaluate_net(job.ideal, xte, yte),
                  "device": evaluate_repeated(device, shadow, xte, yte, opts, EVAL_BEFORE,
                                              "evaluating (before)")}
        job.log("device before fine-tuning: " + format_eval(before["device"]))
    return trainer, start_epoch, history, before


def _train_epoch(job: _Job, trainer: HILTrainer, epoch: int, logf, history: list,
                 steps_done: int, stop_after_steps: Optional[int]) -> int:
    """One epoch of steps, a log row per step; appends the epoch's row to ``history`` (with the
    scale checks). Returns the steps done in this call so far."""
    ft, device = job.opts.finetune, job.device
    xtr, ytr = job.data[0], job.data[1]
    steps, total_steps = job.steps_per_epoch, job.steps_per_epoch * ft.epochs
    device.seed_noise(ft.seed * 1_000_003 + epoch)
    order = epoch_order(xtr.shape[0], ft.seed, epoch)
    bar = progress_bar(job.opts.progress, steps, f"epoch {epoch + 1}/{ft.epochs}", unit="step")
    sums = {"loss": 0.0, "acc": 0.0, "spn": 0.0, "energy": 0.0, "n": 0}
    t_epoch, health0 = time.time(), _health(device)
    for s in range(steps):
        if stop_after_steps is not None and steps_done >= stop_after_steps:
            raise _Interrupt(f"stopped after {steps_done} steps (test hook)")
        g_step = epoch * steps + s
        trainer.set_lr(trainer.lr_at(g_step, total_steps))
        idx = order[s * ft.batch_size:(s + 1) * ft.batch_size]
        res, _ = trainer.step(xtr[idx], ytr[idx])
        steps_done += 1
        sums["loss"] += res.loss
        sums["acc"] += res.accuracy
        sums["spn"] += res.spikes_per_neuron
        sums["energy"] += res.energy_j
        sums["n"] += 1
        # epochs numbered from 1, as in the report's history and the progress lines
        logf.write(json.dumps({"epoch": epoch + 1, "step": g_step, "loss": res.loss,
                               "accuracy": res.accuracy,
                               "spikes_per_neuron": res.spikes_per_neuron,
                               "energy_j_per_sample": res.energy_j,
                               "writes": res.layers_written,
                               "lr": trainer.opt.param_groups[0]["lr"]}) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / sums['n']:.4f}",
                            acc=f"{sums['acc'] / sums['n']:.3f}",
                            spn=f"{sums['spn'] / sums['n']:.3f}")
    if bar is not None:
        bar.close()
    logf.flush()
    n = max(sums["n"], 1)
    history.append({"epoch": epoch + 1, "train_loss": sums["loss"] / n,
                    "train_accuracy": sums["acc"] / n, "spikes_per_neuron": sums["spn"] / n,
                    "energy_j_per_sample": sums["energy"] / n})
    job.log(epoch_line(epoch + 1, ft.epochs, {**history[-1], "wall_time_s": time.time() - t_epoch},
                       health_delta(_health(device), health0)))
    # stuck per-layer scales (Methods (iii) keeps them fixed): warn, or rescale with
    # FinetuneConfig.rescale="auto"; the new scale is in trainer.state, checkpointed
    history[-1]["scale_checks"] = trainer.check_scales(log=job.log)
    return steps_done


def _save_epoch(job: _Job, trainer: HILTrainer, epoch: int, history: list, before: dict) -> None:
    save_checkpoint(job.ckpt, {"epoch": epoch + 1, "shadow": job.shadow.state_dict(),
                               "optimizer": trainer.opt.state_dict(),
                               "state": state_to_dict(trainer.state),
                               "history": history, "before": before,
                               "device_calls": trainer.device_calls,
                               "finetune_time_s": job.ft_before + time.time() - job.t_ft,
                               "device_id": job.info.device_id, "inputs": job.inputs,
                               "options": job.opts.model_dump(mode="json")})


def _evaluate_after(job: _Job) -> tuple[dict, Optional[dict]]:
    """The evaluation after fine-tuning, and (with plots) a spike trace of a few test images."""
    opts, device, shadow = job.opts, job.device, job.shadow
    _, _, xte, yte = job.data
    job.log("evaluating after fine-tuning")
    after = {"device": evaluate_repeated(device, shadow, xte, yte, opts, EVAL_AFTER,
                                         "evaluating (after)")}
    job.log("device after fine-tuning: " + format_eval(after["device"]))
    trace = None
    if opts.plots:  # a few test images through the chip for the raster (not in the results)
        try:
            device.seed_noise(opts.finetune.seed * 1_000_003 + EVAL_TRACE)
            trace = plots.spike_trace(shadow, xte, yte, device=device)
        except Exception as exc:  # a picture never fails a finished run
            job.log(f"warning: no spike trace for the plots ({type(exc).__name__}: {exc})")
    return after, trace


def _report(job: _Job, trainer: HILTrainer, before: dict, after: dict, history: list,
            ft_time: float) -> dict:
    opts, shadow, ft = job.opts, job.shadow, job.opts.finetune
    xtr, _, xte, _ = job.data
    return {
        "dataset": opts.dataset, "arch": opts.arch, "n_train": int(xtr.shape[0]), "n_test": int(xte.shape[0]),
        "data": {**job.source, "sha256": job.digest},
        "window_percentile": job.pct, "weight_bits": job.state.weight_bits,
        "windows_tau_c": shadow.windows(), "latency_tau_c": shadow.t_read() - shadow.t_max0 + 1.0,
        "relu_twin": {**job.relu_info, "sha256": job.inputs["twin_sha256"]},
        "before": before, "after": after, "history": history,
        "finetune": ft.model_dump(), "steps_per_epoch": job.steps_per_epoch,
        "finetune_wall_time_s": round(ft_time, 2), "wall_time_s": round(time.time() - job.t_start, 2),
        "device_calls": trainer.device_calls + before["device"]["device_calls"]
                        + after["device"]["device_calls"],
        "final_weights_sha256": twin.weights_digest(shadow),
        "calibration": job.cal_info,
        "provenance": provenance(job.device, opts.device,
                                 seeds={"seed": ft.seed, "chip_seed": opts.chip_seed},
                                 calibration=opts.calibration),
    }


def _write_results(job: _Job, trainer: HILTrainer, report: dict, trace: Optional[dict]) -> None:
    """The weights first, the report last: a report on disk means the run is complete (a sweep
    records a point by its report and then deletes its checkpoint); then the plots."""
    out = job.out
    tmp = out / "final_weights.pt.tmp"
    torch.save({"shadow": job.shadow.state_dict(),
                # what was programmed (codes, scales, thresholds): `hwloop evaluate --weights`
                # puts exactly this back on the chip instead of quantising afresh
                "state": state_to_dict(trainer.state), "device_id": job.info.device_id,
                "calibration": job.opts.calibration}, tmp)
    os.replace(tmp, out / "final_weights.pt")
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=float))
    os.replace(tmp, out / "report.json")
    if job.opts.plots:
        write_finetune_plots(report, out, trace, job.log)


def _health(device) -> Optional[dict]:
    h = getattr(device, "health", None)
    return dict(h) if h else None


PLOTS = ("learning_curve.png", "spike_raster.png", "spike_times.png")


def write_finetune_plots(report: dict, out: Path, trace: Optional[dict],
                         log: Callable[[str], None] = print) -> list[str]:
    """The learning curve on the chip and, with a ``trace``, the spike raster and the per-layer
    spike-time histograms against the windows, beside ``report.json``. Returns the paths."""
    paths = []
    try:
        paths.append(plots.plot_learning_curve(report, out / PLOTS[0]))
        if trace is not None:
            (out / "spike_trace.json").write_text(json.dumps(trace))
            paths.append(plots.plot_spike_raster(trace, out / PLOTS[1]))
            paths.append(plots.plot_spike_histograms(trace, out / PLOTS[2]))
    except Exception as exc:  # e.g. matplotlib missing: the run itself is done
        log(f"warning: plots not written ({type(exc).__name__}: {exc})")
    return [str(p) for p in paths]


def _load_for_resume(ckpt: Path, log: Callable[[str], None]) -> dict:
    """The checkpoint to resume from; says so when the previous one had to stand in."""
    try:
        return load_checkpoint(ckpt)
    except CheckpointError as exc:
        state = load_checkpoint(ckpt, fallback=True)  # raises, naming both, if .prev fails too
        log(f"warning: {exc}; resuming from the previous checkpoint {ckpt}.prev "
            f"(after epoch {state.get('epoch')})")
        return state
