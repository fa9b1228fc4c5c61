"""`hwloop finetune`: the main job, end to end.

1. load the data set (IDX files, or a synthetic task for tests);
2. train the ReLU twin, or load it from the model cache;
3. convert it to a float64 B1 network (exact twin) and map it onto the device: windows shrunk to
   the profile's percentile of training activations (Methods (ii), (iv)), weights quantised
   (Methods (iii)), thresholds and readout offsets written and verified;
4. evaluate before fine-tuning: ReLU (float), ideal SNN, the device;
5. fine-tune N epochs with :class:`~hwloop.train.hil.HILTrainer` (a JSONL line per step, an
   atomic checkpoint per epoch, ``resume`` from the last one);
6. evaluate again; print a table; write ``report.json`` with provenance.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from hwloop.devices.base import NetworkSpec
from hwloop.errors import CheckpointError
from hwloop.mapping import ProgramState, apply_windows, latency_windows, program_network
from hwloop.provenance import file_sha256, provenance
from hwloop.train.checkpoint import load_checkpoint, save_checkpoint
from hwloop.train.hil import FinetuneConfig, HILTrainer, epoch_order, evaluate_device, evaluate_net
from hwloop.ttfs import TTFSNetwork, convert

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEVICE = "devices/emulator-analog.yaml"


def normalize_dataset(name: str) -> str:
    """``fashion_mnist``, ``Fashion-MNIST`` -> ``fashion-mnist`` (the one spelling recorded)."""
    return str(name).strip().lower().replace("_", "-") if isinstance(name, str) else name


class FinetuneOptions(BaseModel):
    """Everything `hwloop finetune` needs; every field has an embedded default."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("dataset", mode="before")
    @classmethod
    def _dataset_spelling(cls, v):
        return normalize_dataset(v)

    device: str = Field(default=DEFAULT_DEVICE, description="profile path, serial URL/port or VISA resource")
    chip_seed: Optional[int] = Field(default=None, description="emulator chip instance (frozen mismatch)")
    profile_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="emulator only: profile fields to change, dotted for nested ones "
                    "(e.g. {'weight_bits': 4, 'mismatch.synapse_gain_sd': 0.05})")
    dataset: str = Field(default="fashion-mnist", pattern="^(fashion-mnist|mnist|synthetic)$")
    data_dir: Optional[str] = None
    arch: str = Field(default="fc2", pattern="^(fc2|fc16|lenet5|vgg16)$")
    pretrain_recipe: str = "default"
    pretrain_epochs: Optional[int] = Field(default=None, ge=0)
    train_subset: Optional[int] = Field(default=None, ge=1)
    test_subset: Optional[int] = Field(default=None, ge=1)
    window_percentile: Optional[float] = Field(default=None, gt=0, le=100)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    out: str = "runs/finetune"
    resume: bool = False
    calibration: Optional[str] = None
    cache_dir: Optional[str] = None
    eval_batch_size: int = Field(default=1000, ge=1)
    eval_repeats: int = Field(default=1, ge=1, le=100,
                              description="evaluate the device this many times (fresh jitter each), "
                                          "before and after fine-tuning: mean, SD, min, max")
    progress: bool = True
    plots: bool = Field(default=True, description="write the PNG plots beside the report")


# ---------------------------------------------------------------------------- data
def load_data(opts: FinetuneOptions):
    """(x_train, y_train, x_test, y_test): images in [0, 1] ``(N, 1, 28, 28)``, int64 labels."""
    if opts.dataset == "synthetic":
        from hwloop.data.datasets import synthetic_dataset
        n_tr, n_te = opts.train_subset or 2000, opts.test_subset or 500
        shape = (1, 12, 12) if opts.arch in ("fc2", "fc16") else (1, 28, 28)  # conv nets need 28x28
        x, y = synthetic_dataset(n_tr + n_te, shape, 4, seed=opts.finetune.seed, noise=0.35)
        return x[:n_tr], y[:n_tr], x[n_tr:], y[n_tr:]
    from hwloop.data.datasets import load_dataset
    xtr, ytr = load_dataset(opts.dataset, "train", opts.data_dir)
    xte, yte = load_dataset(opts.dataset, "test", opts.data_dir)
    if opts.train_subset:
        xtr, ytr = xtr[:opts.train_subset], ytr[:opts.train_subset]
    if opts.test_subset:
        xte, yte = xte[:opts.test_subset], yte[:opts.test_subset]
    return xtr, ytr, xte, yte


def data_source(opts: FinetuneOptions) -> dict[str, Any]:
    """Where the data of a run comes from: the IDX files found for ``opts`` (absolute paths),
    or ``"synthetic"`` with its seed. Raises :class:`~hwloop.errors.DatasetNotFound` as
    :func:`load_data` does."""
    if opts.dataset == "synthetic":
        return {"dataset": "synthetic", "seed": opts.finetune.seed}
    from hwloop.data.datasets import find_dataset_files
    from hwloop.errors import DataError
    files = [str(Path(f).resolve()) for split in ("train", "test")
             for f in find_dataset_files(opts.dataset, split, opts.data_dir)]
    if len({str(Path(f).parent) for f in files}) > 1:  # never a train split of one copy, test of another
        raise DataError(f"dataset {opts.dataset!r}: the train split was found in "
                        f"{Path(files[0]).parent} but the test split in {Path(files[2]).parent}; "
                        "put all four IDX files in one directory (or point --data-dir at it)")
    return {"dataset": opts.dataset, "files": files}


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 over the dtype, shape and bytes of each tensor: a content key that does not
    depend on thread counts or summation order (unlike a float sum)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def data_digest(data) -> str:
    """sha256 of (x_train, y_train, x_test, y_test) as :func:`load_data` returns them."""
    return tensor_digest(*data)


def cache_root(opts: FinetuneOptions) -> Path:
    if opts.cache_dir:
        return Path(opts.cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hwloop" / "models"


def twin_cache_path(opts: FinetuneOptions, data, digest: Optional[str] = None) -> Path:
    """The cache file of the ReLU twin for ``(data content, arch, recipe, seed)``.

    Keyed on a content hash of the data (:func:`data_digest`) and the full recipe, so
    ``finetune``, ``evaluate``, ``calibrate`` and ``sweep`` share one twin for the same inputs
    whatever their thread counts."""
    from hwloop.train.software import RECIPES
    xtr, ytr, xte, yte = data
    recipe = RECIPES[opts.pretrain_recipe].to_dict()
    if opts.pretrain_epochs is not None:
        recipe["epochs"] = opts.pretrain_epochs
    n_classes = int(max(int(ytr.max()), int(yte.max())) + 1)
    key_src = json.dumps({"dataset": opts.dataset, "arch": opts.arch, "recipe": recipe,
                          "seed": opts.finetune.seed, "classes": n_classes,
                          "data_sha256": digest or data_digest(data)}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    return cache_root(opts) / f"{opts.dataset}-{opts.arch}-{key}.pt"


def relu_twin(opts: FinetuneOptions, data, log: Callable[[str], None] = print,
              digest: Optional[str] = None):
    """The trained ReLU twin, from the cache when the same (data content, arch, recipe, seed)
    was trained before (:func:`twin_cache_path`). ``digest``: the data's
    :func:`data_digest` when the caller has it already. Returns ``(model, info)``."""
    from hwloop.train.software import RECIPES, train
    from hwloop.ttfs.architectures import build_relu

    xtr, ytr, xte, yte = data
    recipe = RECIPES[opts.pretrain_recipe].to_dict()
    if opts.pretrain_epochs is not None:
        recipe["epochs"] = opts.pretrain_epochs
    n_classes = int(max(int(ytr.max()), int(yte.max())) + 1)
    path = twin_cache_path(opts, data, digest)
    torch.manual_seed(opts.finetune.seed)
    model = build_relu(opts.arch, tuple(xtr.shape[1:]), n_classes)
    if path.exists():
        try:
            state = load_checkpoint(path)
            model.load_state_dict(state["model"])
            log(f"ReLU twin loaded from cache {path}")
            return model.eval(), {"cached": True, "path": str(path), **state.get("info", {})}
        except CheckpointError as exc:
            log(f"model cache unusable ({exc}); retraining")
    log(f"training the ReLU twin ({opts.arch}, {recipe['epochs']} epochs, recipe {opts.pretrain_recipe})")
    t0 = time.time()
    report = train(model, (xtr, ytr), (xte, yte), seed=opts.finetune.seed, progress=opts.progress,
                   **{k: recipe[k] for k in ("epochs", "batch_size", "lr", "schedule", "weight_decay",
                                             "label_smoothing", "shift")})
    info = {"test_accuracy": report.get("test_accuracy"), "train_time_s": round(time.time() - t0, 1),
            "recipe": recipe}
    save_checkpoint(path, {"model": model.state_dict(), "info": info})
    return model.eval(), {"cached": False, "path": str(path), **info}


# ---------------------------------------------------------------------------- device
def resolve_device_name(name: str) -> str:
    """A profile path relative to the current directory or to the hwloop checkout, or a bare
    profile name (``emulator-harsh`` -> ``devices/emulator-harsh.yaml``, as
    ``hwloop devices show`` takes it); serial URLs and VISA resources pass through."""
    if "://" in name or "::" in name or name.startswith(("/dev/", "COM", "ASRL", "TCPIP", "USB", "GPIB")):
        return name
    p = Path(name)
    if p.exists():
        return name
    if (REPO_ROOT / name).exists():
        return str(REPO_ROOT / name)
    if "/" not in name and "\\" not in name:
        from hwloop.devices.profile import profiles_dir
        for cand in (profiles_dir() / name, profiles_dir() / f"{name}.yaml",
                     profiles_dir() / f"{name}.yml"):
            if cand.is_file():
                return str(cand)
    return name


def override_profile(profile, overrides: dict[str, Any]):
    """A copy of a :class:`DeviceProfile` with dotted fields replaced, validated again
    (:class:`ProfileError` names a bad field, its value and the allowed range)."""
    from hwloop.devices.profile import validate_profile
    data = profile.model_dump()
    for key, value in overrides.items():
        node, parts = data, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                from hwloop.errors import ProfileError
                raise ProfileError(f"profile override {key!r}: {part!r} is not a group of fields")
            node = node[part]
        node[parts[-1]] = value
    return validate_profile(data, source=f"{profile.name} with overrides {overrides}")


def open_named_device(name: str, chip_seed: Optional[int] = None,
                      profile_overrides: Optional[dict[str, Any]] = None):
    """Open a device by its one string; emulator profiles may get field overrides."""
    from hwloop.devices.open import backend_for, open_device
    name = resolve_device_name(name)
    if profile_overrides:
        if backend_for(name) != "emulator":
            from hwloop.errors import DeviceError
            raise DeviceError(f"profile overrides need an emulator profile, not {name!r}")
        from hwloop.devices.emulator import EmulatorDevice
        from hwloop.devices.profile import load_profile
        prof = override_profile(load_profile(name), profile_overrides)
        return EmulatorDevice.from_profile(prof, chip_seed=chip_seed)
    kw = {} if chip_seed is None else {"chip_seed": chip_seed}
    return open_device(name, **kw)


def map_network(device, net: TTFSNetwork, x_train: torch.Tensor, window_percentile: Optional[float],
                calibration=None) -> tuple[TTFSNetwork, ProgramState, float]:
    """Shrink windows (Methods (ii)/(iv)), program, verify. Returns (shadow net, state, pct)."""
    info = device.info()
    prof = getattr(device, "profile", None)
    pct = window_percentile
    if pct is None:
        pct = getattr(prof, "window_percentile", None)
    if pct is None:
        pct = 99.0 if info.time_steps_per_layer else 100.0
    shadow = net
    if float(pct) < 100.0 or info.time_steps_per_layer:
        widths = latency_windows(net, x_train[:5000], float(pct))
        shadow = apply_windows(net, widths, clamp_early=True)
    clip = getattr(prof, "weight_clip_percentile", None)
    if calibration is not None:
        from hwloop.calibrate import compensate  # issue: calibration
        state = compensate.program_calibrated(device, shadow, calibration, clip_percentile=clip)
    else:
        state = program_network(device, shadow, clip_percentile=clip)
    return shadow, state, float(pct)


def state_to_dict(state: ProgramState) -> dict:
    return {"spec": state.spec.model_dump_json(),
            "weights": {int(k): [v[0], float(v[1])] for k, v in state.weights.items()},
            "thresholds": {int(k): v for k, v in state.thresholds.items()},
            "weight_bits": state.weight_bits, "clip_percentile": state.clip_percentile}


def state_from_dict(d: dict, like: ProgramState) -> ProgramState:
    """The saved state, keeping the class and extra fields of ``like`` (the state the mapping
    step just made: a calibrated state keeps its compensation)."""
    return dataclasses.replace(like, spec=NetworkSpec.model_validate_json(d["spec"]),
                               weights={int(k): (v[0], float(v[1])) for k, v in d["weights"].items()},
                               thresholds={int(k): v for k, v in d["thresholds"].items()},
                               weight_bits=d["weight_bits"], clip_percentile=d["clip_percentile"])


def reprogram(device, state: ProgramState) -> None:
    """Put a saved :class:`ProgramState` back on a device, verified."""
    from hwloop.errors import WriteVerifyError
    device.program(state.spec)
    bad = []
    for i, (codes, scale) in state.weights.items():
        device.write_weights(i, codes, scale)
        rc, rs = device.read_weights(i)
        if not (torch.equal(rc.to(codes.dtype), codes) and float(rs) == float(scale)):
            bad.append(i)
    for i, v in state.thresholds.items():
        device.write_thresholds(i, v)
        if not torch.equal(device.read_thresholds(i).to(torch.float64), v):
            bad.append(i)
    if bad:
        raise WriteVerifyError(f"reprogramming from the checkpoint failed to verify layers {sorted(set(bad))}",
                               layers=sorted(set(bad)))


# ---------------------------------------------------------------------------- the job
class _Interrupt(Exception):
    """Raised by the test hook ``stop_after_steps`` to simulate a killed run."""


#: the options that change a run's result, compared on ``--resume`` (``out``, ``resume``,
#: ``cache_dir`` and ``progress`` do not change it). The device is compared by what it is, not
#: by the string that reached it (a virtual chip restarted on another port is the same chip): its
#: device id and, for an emulator, its profile's content. The data, the twin and the calibration
#: record are compared by content as well (see ``inputs`` in :func:`run_finetune`).
RESULT_OPTIONS = ("chip_seed", "profile_overrides", "dataset", "data_dir", "arch",
                  "pretrain_recipe", "pretrain_epochs", "train_subset", "test_subset",
                  "window_percentile", "finetune", "calibration", "eval_batch_size",
                  "eval_repeats")


def option_mismatches(saved: dict, opts: FinetuneOptions) -> list[str]:
    """Every result-changing option (:data:`RESULT_OPTIONS`) whose value in a checkpoint's
    ``options`` differs from ``opts``, as ``"name: checkpoint X, now Y"`` (nested fine-tuning
    options dotted, e.g. ``finetune.lr``)."""
    now = opts.model_dump(mode="json")
    defaults = FinetuneOptions().model_dump(mode="json") if saved else {}
    out = []
    for k in RESULT_OPTIONS:
        a, b = saved.get(k, defaults.get(k)), now.get(k)  # an option newer than the checkpoint: its default
        if isinstance(b, dict) and isinstance(a, dict):
            out += [f"{k}.{kk}: checkpoint {a.get(kk)!r}, now {vv!r}" for kk, vv in b.items()
                    if a.get(kk) != vv]
            out += [f"{k}.{kk}: checkpoint {a[kk]!r}, now absent" for kk in a if kk not in b]
        elif a != b:
            out.append(f"{k}: checkpoint {a!r}, now {b!r}")
    return out


def input_mismatches(saved: dict, now: dict) -> list[str]:
    """Every content record of :func:`run_inputs` that differs (keys present in ``now``)."""
    return [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in now.items() if saved.get(k) != v]


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
    result is the same: the options of :data:`RESULT_OPTIONS`, the data's content hash, the
    ReLU twin's weights, the calibration record's content, the device id and its profile; a
    resumed run then equals an uninterrupted one bit for bit (weights, report, step log).

    ``stop_after_steps`` (tests): raise after that many fine-tuning steps in this call, as if
    the process had been killed mid-epoch.

    Raises:
        CheckpointError: ``resume`` without a checkpoint, a checkpoint without ``resume``, a
            checkpoint written with other inputs (every mismatch named), or the folder is in use.
    """
    from hwloop.train.lock import FolderLock
    existed = Path(opts.out).exists()
    try:
        with FolderLock(opts.out, "hwloop finetune"):
            return _run_finetune_locked(opts, log, stop_after_steps)
    except BaseException:
        if not existed:
            remove_if_empty(opts.out)
        raise


def remove_if_empty(folder) -> bool:
    """Remove ``folder`` when a failed run left nothing in it but its lock file."""
    from hwloop.train.lock import LOCK_NAME
    f = Path(folder)
    try:
        if f.is_dir() and all(c.name == LOCK_NAME for c in f.iterdir()):
            for c in f.iterdir():
                c.unlink()
            f.rmdir()
            return True
    except OSError:
        pass
    return False


def _run_finetune_locked(opts: FinetuneOptions, log: Callable[[str], None],
                         stop_after_steps: Optional[int]) -> dict[str, Any]:
    t_start = time.time()
    out = Path(opts.out)
    ckpt = out / "checkpoint.pt"
    ft = opts.finetune
    if opts.resume and not ckpt.exists():
        raise CheckpointError(f"--resume: no checkpoint at {ckpt} (nothing to resume; run without --resume)")
    if not opts.resume and ckpt.exists():
        raise CheckpointError(f"{ckpt} exists: pass --resume to continue that run, or choose another --out")
    ck = None
    if opts.resume:  # options first: a mismatch fails before any data is loaded or twin trained
        ck = _load_for_resume(ckpt, log)
        _check_resume(ckpt, "options", option_mismatches(ck.get("options", {}), opts))
        report_path = out / "report.json"
        if int(ck.get("epoch", 0)) >= ft.epochs and report_path.exists():
            # written last, so the run is complete: nothing to redo, and its report stays as it was
            log(f"{out}: the run is complete (all {ft.epochs} epochs and the final evaluation); "
                f"its report is {report_path}")
            return json.loads(report_path.read_text())
    ft_before = float(ck.get("finetune_time_s", 0.0)) if ck is not None else 0.0

    # the device and the calibration record first: a wrong name fails before any training
    calibration = None
    if opts.calibration:
        from hwloop.calibrate.record import load_record
        calibration = load_record(opts.calibration)
    device = open_named_device(opts.device, opts.chip_seed, opts.profile_overrides)
    try:
        info = device.info()
        if calibration is not None:
            from hwloop.calibrate.fit import spec_for_arch
            from hwloop.calibrate.record import check_record_matches
            check_record_matches(calibration, info.device_id, spec_for_arch(opts.arch, opts.dataset))
        source = data_source(opts)
        data = load_data(opts)
        xtr, ytr, xte, yte = data
        digest = data_digest(data)
        inputs = {"device_id": info.device_id, "device_info_sha256": _info_digest(info),
                  "model_sha256": getattr(device, "model_sha256", None),
                  "data_sha256": digest,
                  "calibration_sha256": file_sha256(opts.calibration) if opts.calibration else None}
        if ck is not None:
            _check_resume(ckpt, "inputs", input_mismatches(
                ck.get("inputs", {"device_id": ck.get("device_id")}), inputs))
        relu, relu_info = relu_twin(opts, data, log, digest)
        inputs["twin_sha256"] = _weights_digest(relu)
        if ck is not None:
            _check_resume(ckpt, "inputs", input_mismatches(ck.get("inputs", {}),
                                                           {"twin_sha256": inputs["twin_sha256"]}))
        net = convert(relu, xtr[:2000].to(torch.float64), dtype=torch.float64)
        ideal = copy.deepcopy(net)
        shadow, state, pct = map_network(device, net, xtr, opts.window_percentile, calibration)
        cal_info = None
        if calibration is not None:
            from hwloop.calibrate.record import content_hash
            cal_info = {"path": opts.calibration, "content_sha256": content_hash(calibration),
                        "device_id": calibration.device_id}
        log(f"device {info.device_id} (firmware {info.firmware_version}): weight bits "
            f"{state.weight_bits or 'float'}, time steps/layer {info.time_steps_per_layer or 'continuous'}, "
            f"windows at the {pct:g}th percentile, "
            + (f"calibrated with {opts.calibration} (sha256 {cal_info['content_sha256'][:16]}...)"
               if cal_info else "uncalibrated"))

        n_train = xtr.shape[0]
        steps_per_epoch = math.ceil(n_train / ft.batch_size)
        if ft.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, ft.max_steps_per_epoch)
        total_steps = steps_per_epoch * ft.epochs

        trainer = HILTrainer(device, shadow, state, ft)
        start_epoch, history, before = 0, [], None
        if ck is not None:
            shadow.load_state_dict(ck["shadow"])
            trainer.opt.load_state_dict(ck["optimizer"])
            trainer.state = state_from_dict(ck["state"], state)
            # the windows adapted by Eq. (8) live in the shadow; the chip is programmed with them
            trainer.state.spec = trainer.state.spec.with_windows(shadow.windows())
            trainer.nominal.load_state_dict(ck["shadow"])
            trainer._refresh_nominal()
            reprogram(device, trainer.state)
            trainer.device_calls = int(ck["device_calls"])
            start_epoch, history, before = int(ck["epoch"]), list(ck["history"]), ck["before"]
            log(f"resumed from {ckpt} after epoch {start_epoch}")

        if before is None:
            log("evaluating before fine-tuning (ReLU, ideal SNN, device"
                + (f" x {opts.eval_repeats}" if opts.eval_repeats > 1 else "") + ")")
            before = {"relu": evaluate_net(relu, xte, yte)["accuracy"],
                      "ideal_snn": evaluate_net(ideal, xte, yte),
                      "device": evaluate_repeated(device, shadow, xte, yte, opts, EVAL_BEFORE,
                                                  "evaluating (before)")}
            log("device before fine-tuning: " + format_eval(before["device"]))

        steps_done = 0
        log_path = out / "log.jsonl"
        _rewrite_log(log_path, start_epoch)  # each step once, whatever was interrupted before
        t_ft = time.time()
        with open(log_path, "a", encoding="utf-8") as logf:
            for epoch in range(start_epoch, ft.epochs):
                device.seed_noise(ft.seed * 1_000_003 + epoch)
                order = epoch_order(n_train, ft.seed, epoch)
                bar = _progress(opts.progress, steps_per_epoch, f"epoch {epoch + 1}/{ft.epochs}")
                sums = {"loss": 0.0, "acc": 0.0, "spn": 0.0, "energy": 0.0, "n": 0}
                t_epoch, health0 = time.time(), _health(device)
                for s in range(steps_per_epoch):
                    if stop_after_steps is not None and steps_done >= stop_after_steps:
                        raise _Interrupt(f"stopped after {steps_done} steps (test hook)")
                    g_step = epoch * steps_per_epoch + s
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
                history.append({"epoch": epoch + 1, "train_loss": sums["loss"] / max(sums["n"], 1),
                                "train_accuracy": sums["acc"] / max(sums["n"], 1),
                                "spikes_per_neuron": sums["spn"] / max(sums["n"], 1),
                                "energy_j_per_sample": sums["energy"] / max(sums["n"], 1)})
                from hwloop.train.progress import epoch_line, health_delta
                log(epoch_line(epoch + 1, ft.epochs, {**history[-1], "wall_time_s": time.time() - t_epoch},
                               health_delta(_health(device), health0)))
                # stuck per-layer scales (Methods (iii) keeps them fixed): warn, or rescale with
                # FinetuneConfig.rescale="auto"; the new scale is in trainer.state, checkpointed
                history[-1]["scale_checks"] = trainer.check_scales(log=log)
                save_checkpoint(ckpt, {"epoch": epoch + 1, "shadow": shadow.state_dict(),
                                       "optimizer": trainer.opt.state_dict(),
                                       "state": state_to_dict(trainer.state),
                                       "history": history, "before": before,
                                       "device_calls": trainer.device_calls,
                                       "finetune_time_s": ft_before + time.time() - t_ft,
                                       "device_id": info.device_id, "inputs": inputs,
                                       "options": opts.model_dump(mode="json")})
        ft_time = ft_before + time.time() - t_ft  # every epoch's, across resumes

        log("evaluating after fine-tuning")
        after = {"device": evaluate_repeated(device, shadow, xte, yte, opts, EVAL_AFTER,
                                             "evaluating (after)")}
        log("device after fine-tuning: " + format_eval(after["device"]))
        trace = None
        if opts.plots:  # a few test images through the chip for the raster (not in the results)
            try:
                from hwloop.train.plots import spike_trace
                device.seed_noise(ft.seed * 1_000_003 + EVAL_TRACE)
                trace = spike_trace(shadow, xte, yte, device=device)
            except Exception as exc:  # a picture never fails a finished run
                log(f"warning: no spike trace for the plots ({type(exc).__name__}: {exc})")
        report = {
            "dataset": opts.dataset, "arch": opts.arch, "n_train": int(n_train), "n_test": int(xte.shape[0]),
            "data": {**source, "sha256": digest},
            "window_percentile": pct, "weight_bits": state.weight_bits,
            "windows_tau_c": shadow.windows(), "latency_tau_c": shadow.t_read() - shadow.t_max0 + 1.0,
            "relu_twin": {**relu_info, "sha256": inputs["twin_sha256"]},
            "before": before, "after": after, "history": history,
            "finetune": ft.model_dump(), "steps_per_epoch": steps_per_epoch,
            "finetune_wall_time_s": round(ft_time, 2), "wall_time_s": round(time.time() - t_start, 2),
            "device_calls": trainer.device_calls + before["device"]["device_calls"]
                            + after["device"]["device_calls"],
            "final_weights_sha256": _weights_digest(shadow),
            "calibration": cal_info,
            "provenance": provenance(device, opts.device,
                                     seeds={"seed": ft.seed, "chip_seed": opts.chip_seed},
                                     calibration=opts.calibration),
        }
    finally:
        device.close()
    # the weights first, the report last: a report on disk means the run is complete (a sweep
    # records a point by its report and then deletes its checkpoint)
    tmp = out / "final_weights.pt.tmp"
    torch.save({"shadow": shadow.state_dict(),
                # what was programmed (codes, scales, thresholds): `hwloop evaluate --weights`
                # puts exactly this back on the chip instead of quantising afresh
                "state": state_to_dict(trainer.state), "device_id": info.device_id,
                "calibration": opts.calibration}, tmp)
    os.replace(tmp, out / "final_weights.pt")
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=float))
    os.replace(tmp, out / "report.json")
    if opts.plots:
        write_finetune_plots(report, out, trace, log)
    return report


#: noise seeds of the evaluations, offsets to ``seed * 1_000_003`` (the epochs use 0, 1, ...):
#: every seed is non-negative and none is shared with an epoch
EVAL_BEFORE, EVAL_AFTER, EVAL_TRACE = 500_000, 700_000, 900_000


def evaluate_repeated(device, net, x, y, opts: FinetuneOptions, offset: int, desc: str) -> dict:
    """:func:`~hwloop.train.hil.evaluate_device` ``opts.eval_repeats`` times, each with its own
    reproducible jitter seed. The first repeat's figures are returned as they are, with
    ``spread``: ``repeats`` and the accuracy's ``values``, ``mean``, ``sd``, ``min``, ``max``
    (on a chip without jitter every repeat is the same)."""
    from hwloop.train.progress import bar as make_bar
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


def format_eval(res: dict) -> str:
    """``accuracy 81.20 % (mean of 3: 81.07 +- 0.15, range 80.9-81.2), spikes/neuron ...``."""
    sp = res.get("spread") or {}
    acc = f"accuracy {100 * res['accuracy']:.2f} %"
    if sp.get("repeats", 1) > 1:
        acc = (f"accuracy {100 * sp['mean']:.2f} +- {100 * sp['sd']:.2f} % over {sp['repeats']} "
               f"repeats (range {100 * sp['min']:.2f}-{100 * sp['max']:.2f})")
    return (f"{acc}, spikes/neuron {res['spikes_per_neuron']:.3f}, energy/inference "
            f"{format_joules(res.get('energy_j_per_sample'))}")


def _health(device) -> Optional[dict]:
    h = getattr(device, "health", None)
    return dict(h) if h else None


PLOTS = ("learning_curve.png", "spike_raster.png", "spike_times.png")


def write_finetune_plots(report: dict, out: Path, trace: Optional[dict],
                         log: Callable[[str], None] = print) -> list[str]:
    """The learning curve on the chip and, with a ``trace``, the spike raster and the per-layer
    spike-time histograms against the windows, beside ``report.json``. Returns the paths."""
    from hwloop.train import plots
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


def _weights_digest(net: TTFSNetwork) -> str:
    h = hashlib.sha256()
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _progress(on: bool, total: int, desc: str):
    """A live bar on a terminal only (:mod:`hwloop.train.progress`); the epoch lines are logged."""
    from hwloop.train.progress import bar
    return bar(on, total, desc, unit="step")


def format_table(report: dict) -> str:
    """The closing table of `hwloop finetune`."""
    b, a = report["before"], report["after"]
    def acc(res: dict) -> str:
        sp = res.get("spread") or {}
        if sp.get("repeats", 1) > 1:
            return f"{100 * sp['mean']:.2f} +- {100 * sp['sd']:.2f}"
        return f"{100 * res['accuracy']:.2f}"
    rows = [
        ("ReLU (float)", f"{100 * b['relu']:.2f}", "-", "-"),
        ("ideal SNN (B1)", f"{100 * b['ideal_snn']['accuracy']:.2f}",
         f"{b['ideal_snn']['spikes_per_neuron']:.3f}", "-"),
        ("device, before", acc(b['device']), f"{b['device']['spikes_per_neuron']:.3f}",
         format_joules(b['device']['energy_j_per_sample'])),
        ("device, after", acc(a['device']), f"{a['device']['spikes_per_neuron']:.3f}",
         format_joules(a['device']['energy_j_per_sample'])),
    ]
    w = max(10, *(len(r[1]) for r in rows))
    lines = [f"{'':18} {'accuracy %':>{w}} {'spikes/neuron':>14} {'energy/inference':>17}"]
    lines += [f"{r[0]:18} {r[1]:>{w}} {r[2]:>14} {r[3]:>17}" for r in rows]
    reps = (b["device"].get("spread") or {}).get("repeats", 1)
    if reps > 1:
        lines.append(f"device accuracy: mean +- SD over {reps} evaluations with fresh jitter; "
                     f"fine-tuning changed it by {100 * (a['device']['spread']['mean'] - b['device']['spread']['mean']):+.2f} points")
    from hwloop.train.progress import link_health, plural
    health = (report.get("provenance") or {}).get("health")
    if health:
        lines.append(link_health({k: health[k] for k in ("retries", "crc_errors", "resends", "nudges",
                                                         "timeouts", "resyncs") if k in health}))
    lines.append(f"fine-tuning: {plural(report['finetune']['epochs'], 'epoch')} x "
                 f"{plural(report['steps_per_epoch'], 'step')}, "
                 f"{report['finetune_wall_time_s']:.1f} s; total wall time {report['wall_time_s']:.1f} s; "
                 f"device calls {report['device_calls']}")
    return "\n".join(lines)


def format_joules(v: float) -> str:
    """An energy in joules with a readable unit (nJ, pJ, fJ), or '-' when unknown."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    for unit, f in (("nJ", 1e-9), ("pJ", 1e-12), ("fJ", 1e-15)):
        if abs(v) >= f:
            return f"{v / f:.3f} {unit}"
    return f"{v:.3e} J"
