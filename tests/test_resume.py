"""`hwloop finetune` resume, inputs and output folder: every path is right or a clear error.

Regression tests of issue "no silent wrong result" (items 1, 2, 8, 9, 10, 11): each failed on the
main it was filed against.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hwloop.data.idx import write_idx
from hwloop.errors import CheckpointError, DatasetNotFound
from hwloop.provenance import file_sha256
from hwloop.train import evaluation as tev
from hwloop.train import finetune as fin
from hwloop.train import twin
from hwloop.train.checkpoint import load_checkpoint
from hwloop.train.finetune import run_finetune
from hwloop.train.options import FinetuneOptions, input_mismatches, option_mismatches
from hwloop.train.hil import FinetuneConfig
from hwloop.train.lock import FolderLock

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted(p.name for p in (ROOT / "devices").glob("emulator-*.yaml"))
STEPS, EPOCHS = 3, 2  # steps per epoch, epochs: 6 steps in all


def quiet(_msg: str) -> None:
    pass


def options(out, cache, device="emulator-ideal.yaml", **kw) -> FinetuneOptions:
    ft = kw.pop("finetune", {})
    base = dict(device=str(ROOT / "devices" / device), dataset="synthetic", arch="fc2",
                train_subset=120, test_subset=60, pretrain_epochs=2, cache_dir=str(cache),
                progress=False, out=str(out),
                finetune=FinetuneConfig(**{"epochs": EPOCHS, "batch_size": 24, "lr": 3e-3,
                                           "max_steps_per_epoch": STEPS, **ft}))
    base.update(kw)
    return FinetuneOptions(**base)


def interrupted_then_resumed(opts: FinetuneOptions, stop: int) -> dict:
    with pytest.raises(fin._Interrupt):
        run_finetune(opts, log=quiet, stop_after_steps=stop)
    if not (Path(opts.out) / "checkpoint.pt").exists():  # stopped before the first checkpoint
        return run_finetune(opts, log=quiet)
    return run_finetune(opts.model_copy(update={"resume": True}), log=quiet)


def comparable(report: dict) -> dict:
    """A report without what legitimately differs between two runs (times, host, cache hit)."""
    r = json.loads(json.dumps(report, default=float))
    for k in ("finetune_wall_time_s", "wall_time_s", "provenance"):
        r.pop(k)
    r["relu_twin"].pop("cached")
    r["relu_twin"].pop("train_time_s", None)
    return r


def read_log(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def weights(out) -> dict:
    return torch.load(Path(out) / "final_weights.pt", weights_only=True)["shadow"]


def assert_same_run(a_out, a_rep, b_out, b_rep) -> None:
    assert b_rep["final_weights_sha256"] == a_rep["final_weights_sha256"]
    wa, wb = weights(a_out), weights(b_out)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert comparable(a_rep) == comparable(b_rep)
    assert read_log(a_out) == read_log(b_out)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted run per shipped profile (computed on first use)."""
    base = tmp_path_factory.mktemp("full")
    done: dict[str, tuple[Path, dict]] = {}

    def get(profile: str):
        if profile not in done:
            out = base / profile
            done[profile] = (out, run_finetune(options(out, base / "cache", profile), log=quiet))
        return done[profile]
    return get


# ------------------------------------------------------------------ item 1: adaptive windows
def test_resume_with_adaptive_windows_is_bit_identical(tmp_path, monkeypatch):
    """The ideal profile adapts windows (Eq. (8)); before the fix the resumed chip was programmed
    with the mapped windows but the adapted thresholds: the network went silent (0 spikes,
    chance accuracy) with exit code 0."""
    from hwloop.emulator.device import EmulatorDevice
    three = {"finetune": {"epochs": 3}}
    full_out = tmp_path / "full"
    full = run_finetune(options(full_out, tmp_path / "cache", **three), log=quiet)
    opts = options(tmp_path / "part", tmp_path / "cache", **three)
    moved, real = [], EmulatorDevice.set_windows
    monkeypatch.setattr(EmulatorDevice, "set_windows", lambda self, w: (moved.append(w), real(self, w))[1])
    with pytest.raises(fin._Interrupt):
        run_finetune(opts, log=quiet, stop_after_steps=2 * STEPS + 1)  # in epoch 3
    assert moved  # the windows did adapt before the last checkpoint
    rep = run_finetune(opts.model_copy(update={"resume": True}), log=quiet)
    assert rep["after"]["device"]["spikes_per_neuron"] > 0.1
    assert_same_run(full_out, full, opts.out, rep)


def test_resume_during_the_final_evaluation(tmp_path, uninterrupted, monkeypatch):
    full_out, full = uninterrupted("emulator-ideal.yaml")
    opts = options(tmp_path / "part", full_out.parent / "cache")
    calls = {"n": 0}
    real = tev.evaluate_device

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the evaluation after fine-tuning
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(tev, "evaluate_device", dying)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(opts, log=quiet)
    monkeypatch.setattr(tev, "evaluate_device", real)
    rep = run_finetune(opts.model_copy(update={"resume": True}), log=quiet)
    assert_same_run(full_out, full, opts.out, rep)


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(profile=st.sampled_from(PROFILES), stop=st.integers(0, STEPS * EPOCHS - 1))
def test_property_interrupt_anywhere_resume_equals_uninterrupted(tmp_path, uninterrupted, profile, stop):
    """Any shipped profile, interrupted at any step, then resumed: final weights, report and step
    log equal an uninterrupted run's."""
    full_out, full = uninterrupted(profile)
    out = tmp_path / f"part-{profile}-{stop}"
    shutil.rmtree(out, ignore_errors=True)
    rep = interrupted_then_resumed(options(out, full_out.parent / "cache", profile), stop)
    assert_same_run(full_out, full, out, rep)


# ------------------------------------------------------------------ item 11: the step log
def test_log_holds_each_step_once_after_interruptions(tmp_path, uninterrupted):
    full_out, _ = uninterrupted("emulator-harsh.yaml")
    opts = options(tmp_path / "part", full_out.parent / "cache", "emulator-harsh.yaml")
    with pytest.raises(fin._Interrupt):  # before the first checkpoint: rows but no checkpoint
        run_finetune(opts, log=quiet, stop_after_steps=2)
    assert len(read_log(opts.out)) == 2 and not (Path(opts.out) / "checkpoint.pt").exists()
    with pytest.raises(fin._Interrupt):  # a fresh run replaces those rows
        run_finetune(opts, log=quiet, stop_after_steps=STEPS + 2)
    with pytest.raises(fin._Interrupt):  # resumed, interrupted again in the same epoch
        run_finetune(opts.model_copy(update={"resume": True}), log=quiet, stop_after_steps=1)
    with open(Path(opts.out) / "log.jsonl", "a") as f:
        f.write('{"epoch": 1, "step": 9, "lo')  # a line torn by a kill
    run_finetune(opts.model_copy(update={"resume": True}), log=quiet)
    rows = read_log(opts.out)
    assert [r["step"] for r in rows] == list(range(STEPS * EPOCHS))
    assert rows == read_log(full_out)


# ------------------------------------------------------------------ item 2: other inputs
@pytest.mark.parametrize("change, named", [
    ({"train_subset": 96}, "train_subset: checkpoint 120, now 96"),
    ({"test_subset": 30}, "test_subset: checkpoint 60, now 30"),
    ({"window_percentile": 99.0}, "window_percentile: checkpoint None, now 99.0"),
    ({"arch": "fc16"}, "arch: checkpoint 'fc2', now 'fc16'"),
    ({"chip_seed": 3}, "chip_seed: checkpoint None, now 3"),
    ({"finetune": {"lr": 1e-3}}, "finetune.lr: checkpoint 0.003, now 0.001"),
    ({"eval_batch_size": 7}, "eval_batch_size: checkpoint 1000, now 7"),
])
def test_resume_with_other_inputs_is_refused(tmp_path, change, named):
    opts = options(tmp_path / "run", tmp_path / "cache")
    with pytest.raises(fin._Interrupt):
        run_finetune(opts, log=quiet, stop_after_steps=STEPS + 1)
    other = options(tmp_path / "run", tmp_path / "cache", resume=True, **change)
    with pytest.raises(CheckpointError) as info:
        run_finetune(other, log=quiet)
    assert named in str(info.value) and "checkpoint.pt" in str(info.value)
    # nothing was lost: the same options still resume
    rep = run_finetune(opts.model_copy(update={"resume": True}), log=quiet)
    assert len(rep["history"]) == EPOCHS


def test_every_mismatch_is_listed_at_once(tmp_path):
    opts = options(tmp_path / "run", tmp_path / "cache")
    with pytest.raises(fin._Interrupt):
        run_finetune(opts, log=quiet, stop_after_steps=STEPS)
    other = options(tmp_path / "run", tmp_path / "cache", resume=True, train_subset=96,
                    window_percentile=99.0)
    with pytest.raises(CheckpointError, match="train_subset.*window_percentile"):
        run_finetune(other, log=quiet)


def _idx_dataset(directory: Path, seed: int, n_train=96, n_test=48) -> None:
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))


def test_resume_on_changed_data_files_is_refused(tmp_path):
    """Same options, other file contents: the data's content hash is compared."""
    data = tmp_path / "data"
    _idx_dataset(data, seed=0)
    opts = options(tmp_path / "run", tmp_path / "cache", dataset="mnist", data_dir=str(data),
                   train_subset=None, test_subset=None)
    with pytest.raises(fin._Interrupt):
        run_finetune(opts, log=quiet, stop_after_steps=STEPS)
    _idx_dataset(data, seed=1)
    with pytest.raises(CheckpointError, match="data_sha256"):
        run_finetune(opts.model_copy(update={"resume": True}), log=quiet)


def test_resume_on_another_calibration_record_is_refused(tmp_path):
    rec = ROOT / "calibration" / "emu-mismatch-seed5.json"
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    shutil.copy(rec, a)
    opts = options(tmp_path / "run", tmp_path / "cache")
    saved_inputs = {"calibration_sha256": file_sha256(str(a))}
    now = {"calibration_sha256": file_sha256(str(rec))}
    assert input_mismatches(saved_inputs, now) == []
    b.write_text(a.read_text().replace("}", " }", 1))  # same record, other bytes: content differs
    assert input_mismatches(saved_inputs, {"calibration_sha256": file_sha256(str(b))})
    saved = opts.model_dump(mode="json")
    other = opts.model_copy(update={"calibration": str(b)})
    assert option_mismatches(saved, other) == [f"calibration: checkpoint None, now {str(b)!r}"]


# ------------------------------------------------------------------ item 8: the twin cache key
def test_twin_cache_key_is_the_data_content(tmp_path):
    """The key was the first 64 images' float sum: a change further on reused a twin trained on
    other data, and the sum itself differed between thread counts."""
    opts = options(tmp_path / "o", tmp_path / "cache")
    data = twin.load_data(opts)
    key = twin.twin_cache_path(opts, data)
    xtr = data[0].clone()
    xtr[100, 0, 0, 0] = 1.0 - xtr[100, 0, 0, 0]
    assert twin.twin_cache_path(opts, (xtr, *data[1:])) != key
    ytr = data[1].clone()
    ytr[90] = (ytr[90] + 1) % 4
    assert twin.twin_cache_path(opts, (data[0], ytr, *data[2:])) != key
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert twin.twin_cache_path(opts, twin.load_data(opts)) == key
    finally:
        torch.set_num_threads(threads)
    assert twin.twin_cache_path(opts.model_copy(update={"pretrain_epochs": 3}), data) != key


def test_sweep_and_finetune_share_one_twin(tmp_path):
    """`hwloop sweep` (one thread) pre-trains the twin that `finetune` (more threads) loads."""
    from hwloop.studies.sweep import SweepSpec, prepare_twins
    spec = SweepSpec(dataset="synthetic", arch="fc2", train_subset=120, test_subset=60,
                     pretrain_epochs=2, cache_dir=str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        prepare_twins(spec, log=quiet)
        torch.set_num_threads(2)
        _, info = twin.relu_twin(options(tmp_path / "o", tmp_path / "cache"),
                                twin.load_data(options(tmp_path / "o", tmp_path / "cache")), quiet)
    finally:
        torch.set_num_threads(threads)
    assert info["cached"] and len(list((tmp_path / "cache").glob("*.pt"))) == 1


# ------------------------------------------------------------------ item 9: data from elsewhere
def test_missing_data_dir_is_an_error_and_the_report_names_the_source(tmp_path):
    with pytest.raises(DatasetNotFound, match="does not exist"):
        run_finetune(options(tmp_path / "run", tmp_path / "cache", dataset="fashion-mnist",
                             data_dir=str(tmp_path / "nope")), log=quiet)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    data = tmp_path / "data"
    _idx_dataset(data, seed=0)
    rep = run_finetune(options(tmp_path / "run2", tmp_path / "cache", dataset="mnist", data_dir=str(data),
                               train_subset=None, test_subset=None), log=quiet)
    assert rep["data"]["files"][0] == str((data / "train-images-idx3-ubyte").resolve())
    assert rep["data"]["sha256"] == twin.data_digest(twin.load_data(
        options(tmp_path / "x", tmp_path / "cache", dataset="mnist", data_dir=str(data),
                train_subset=None, test_subset=None)))


# ------------------------------------------------------------------ item 10: one writer
def test_second_writer_on_one_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    with FolderLock(out, "test holder"):
        with pytest.raises(CheckpointError, match="in use by another hwloop finetune"):
            run_finetune(options(out, tmp_path / "cache"), log=quiet)
        assert not (out / "log.jsonl").exists() and not (out / "report.json").exists()
    rep = run_finetune(options(out, tmp_path / "cache"), log=quiet)  # released: it runs
    assert len(read_log(out)) == STEPS * EPOCHS and rep["history"]


def test_lock_is_released_by_a_crash_and_across_processes(tmp_path):
    import subprocess
    import sys
    out = tmp_path / "run"
    code = ("import sys, time; from hwloop.train.lock import FolderLock; "
            f"l = FolderLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(30)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError, match=rf"pid {p.pid}"):
            FolderLock(out).acquire()
    finally:
        p.kill()
        p.wait(10)
    FolderLock(out).acquire().release()  # the killed holder left no stale lock


def test_evaluate_records_the_data_source(tmp_path, monkeypatch):
    from hwloop.train.evaluation import evaluate_on_device
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the twin cache
    data = tmp_path / "data"
    _idx_dataset(data, seed=0)
    with pytest.raises(DatasetNotFound, match="does not exist"):
        evaluate_on_device(str(ROOT / "devices" / "emulator-ideal.yaml"), dataset="mnist",
                           data_dir=str(tmp_path / "nope"), log=quiet)
    out = evaluate_on_device(str(ROOT / "devices" / "emulator-ideal.yaml"), dataset="mnist",
                             data_dir=str(data), pretrain_epochs=1, log=quiet)
    assert out["data"]["files"][2] == str((data / "t10k-images-idx3-ubyte").resolve())
    assert len(out["data"]["sha256"]) == 64 and out["n_test"] == 48


def test_resume_on_an_edited_profile_file_is_refused(tmp_path):
    prof = tmp_path / "chip.yaml"
    shutil.copy(ROOT / "devices" / "emulator-harsh.yaml", prof)
    opts = options(tmp_path / "run", tmp_path / "cache", device=str(prof))
    with pytest.raises(fin._Interrupt):
        run_finetune(opts, log=quiet, stop_after_steps=STEPS + 1)
    text = prof.read_text()
    assert "jitter_sd:" in text
    prof.write_text(text.replace("jitter_sd:", "jitter_sd: 0.3 #", 1))  # same device id
    with pytest.raises(CheckpointError, match="model_sha256"):
        run_finetune(opts.model_copy(update={"resume": True}), log=quiet)


def test_train_and_test_splits_come_from_one_directory(tmp_path):
    """A --data-dir holding only the train split must not take the test split from a copy in
    --data-dir/<name> (or anywhere else)."""
    from hwloop.errors import DataError
    data = tmp_path / "data"
    _idx_dataset(data / "mnist", seed=0)  # a full copy below
    (data / "mnist" / "train-images-idx3-ubyte").rename(data / "train-images-idx3-ubyte")
    (data / "mnist" / "train-labels-idx1-ubyte").rename(data / "train-labels-idx1-ubyte")
    _idx_dataset(tmp_path / "other", seed=1)
    shutil.copy(tmp_path / "other" / "train-images-idx3-ubyte", data / "mnist")
    shutil.copy(tmp_path / "other" / "train-labels-idx1-ubyte", data / "mnist")
    opts = options(tmp_path / "run", tmp_path / "cache", dataset="mnist", data_dir=str(data),
                   train_subset=None, test_subset=None)
    with pytest.raises(DataError, match="train split was found in .* but the test split in"):
        run_finetune(opts, log=quiet)
    with pytest.raises(DatasetNotFound, match="is a file, not a directory"):
        twin.load_data(opts.model_copy(update={"data_dir": str(data / "train-images-idx3-ubyte")}))


def test_sweep_points_are_keyed_on_the_data(tmp_path):
    """A sweep rerun on other data (another --data-dir, or changed files) must not reuse the
    points of the first: the config hash covers where the data comes from and its content."""
    from hwloop.studies.sweep import SweepSpec, _data_sha, config_hash
    one, two = tmp_path / "one", tmp_path / "two"
    _idx_dataset(one, seed=0)
    _idx_dataset(two, seed=1)
    spec = lambda d: SweepSpec(dataset="mnist", data_dir=str(d), cache_dir=str(tmp_path / "c"))
    assert config_hash(spec(one)) == config_hash(spec(one))
    assert config_hash(spec(one)) != config_hash(spec(two))
    _data_sha.cache_clear()
    before = config_hash(spec(one))
    _idx_dataset(one, seed=2)  # same folder, new files
    _data_sha.cache_clear()
    assert config_hash(spec(one)) != before


def test_resume_of_a_finished_run_keeps_its_report(tmp_path, uninterrupted):
    full_out, full = uninterrupted("emulator-harsh.yaml")
    out = tmp_path / "done"
    shutil.copytree(full_out, out)
    before = (out / "report.json").read_bytes()
    rep = run_finetune(options(out, full_out.parent / "cache", "emulator-harsh.yaml", resume=True), log=quiet)
    assert (out / "report.json").read_bytes() == before
    assert rep["final_weights_sha256"] == full["final_weights_sha256"]


def test_finetune_time_is_cumulative_across_resumes(tmp_path, uninterrupted):
    full_out, _ = uninterrupted("emulator-ideal.yaml")
    opts = options(tmp_path / "part", full_out.parent / "cache")
    with pytest.raises(fin._Interrupt):
        run_finetune(opts, log=quiet, stop_after_steps=STEPS + 1)
    ck = load_checkpoint(Path(opts.out) / "checkpoint.pt")
    assert ck["finetune_time_s"] > 0
    rep = run_finetune(opts.model_copy(update={"resume": True}), log=quiet)
    assert rep["finetune_wall_time_s"] >= round(ck["finetune_time_s"], 2)
