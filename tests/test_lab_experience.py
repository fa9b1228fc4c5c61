"""Issue 17, the lab experience: resume from the folder alone, bare profile names, plots beside
every report and `hwloop report`, quiet-when-piped progress, the small messages.

Every command runs through the command line (:func:`hwloop.cli.main`) on tiny synthetic data,
its twin cache isolated under ``XDG_CACHE_HOME``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

import hwloop.cli as cli
from hwloop.devices.open import resolve_device_name
from hwloop.train import twin

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "synthetic", "--train-subset", "120", "--test-subset", "60",
        "--pretrain-epochs", "2"]
# a non-default run: other device, seed, learning rate, batch, steps, repeats
NON_DEFAULT = ["--device", "emulator-harsh", *TINY, "--epochs", "2", "--batch-size", "24",
               "--lr", "3e-3", "--max-steps-per-epoch", "3", "--seed", "1", "--eval-repeats", "2",
               "--no-progress"]


@pytest.fixture(scope="module")
def xdg(tmp_path_factory):
    """One twin cache for the module (the twin is trained once)."""
    d = tmp_path_factory.mktemp("xdg")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(d))
        mp.delenv("HWLOOP_DEBUG", raising=False)
        mp.delenv("HWLOOP_PROGRESS", raising=False)
        yield d


def hw(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def full_run(xdg, tmp_path_factory):
    """An uninterrupted non-default fine-tuning run: (folder, stdout)."""
    import contextlib
    import io
    out = tmp_path_factory.mktemp("full") / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(["finetune", *NON_DEFAULT, "--out", str(out)]) == 0
    return out, buf.getvalue()


def _comparable(out: Path) -> dict:
    r = json.loads((out / "report.json").read_text())
    for k in ("finetune_wall_time_s", "wall_time_s", "provenance"):
        r.pop(k)
    for k in ("cached", "train_time_s", "path"):
        r["relu_twin"].pop(k, None)
    return r


def _png_ok(path: Path) -> None:
    """A valid PNG of sensible size: signature, IHDR, >= 300x200 pixels, 5 kB - 3 MB."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    assert w >= 300 and h >= 200, (path, w, h)
    assert 5_000 < len(data) < 3_000_000, (path, len(data))
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"


# ------------------------------------------------------------------ (1) resume from the folder
def test_interrupted_non_default_run_resumes_from_the_folder_alone(full_run, tmp_path, capsys, monkeypatch):
    full_out, _ = full_run
    part = tmp_path / "part"
    from hwloop.train.hil import HILTrainer
    real, calls = HILTrainer.step, {"n": 0}

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # in epoch 2, after the first checkpoint
            raise KeyboardInterrupt
        return real(self, *a, **k)
    monkeypatch.setattr(HILTrainer, "step", step)
    rc, _, err = hw(capsys, "finetune", *NON_DEFAULT, "--out", part)
    assert rc == 130
    assert f"hwloop finetune --resume {part}" in err  # the exact command to continue
    monkeypatch.setattr(HILTrainer, "step", real)

    # options given as well are compared: every mismatch at once, nothing lost
    rc, _, err = hw(capsys, "finetune", "--resume", part, "--lr", "1e-3", "--epochs", "5",
                    "--device", "emulator-harsh")
    assert rc == 2
    assert "finetune.lr: checkpoint 0.003, now 0.001" in err and "finetune.epochs: checkpoint 2, now 5" in err

    rc, out, _ = hw(capsys, "finetune", "--resume", part)
    assert rc == 0, out
    a = torch.load(full_out / "final_weights.pt", weights_only=True)["shadow"]
    b = torch.load(part / "final_weights.pt", weights_only=True)["shadow"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _comparable(full_out) == _comparable(part)
    assert (full_out / "log.jsonl").read_text() == (part / "log.jsonl").read_text()


def test_resume_of_a_run_without_checkpoint_says_so(xdg, tmp_path, capsys):
    rc, _, err = hw(capsys, "finetune", "--resume", tmp_path / "nothing")
    assert rc == 2 and "no checkpoint" in err
    assert not (tmp_path / "nothing").exists()


# ------------------------------------------------------------------ (2) devices
def test_bare_profile_names_and_the_device_first(xdg, tmp_path, capsys, monkeypatch):
    assert resolve_device_name("emulator-harsh") == str(ROOT / "devices" / "emulator-harsh.yaml")
    assert resolve_device_name("socket://localhost:9") == "socket://localhost:9"

    def no_training(*a, **k):
        raise AssertionError("the twin was trained before the device was opened")
    monkeypatch.setattr(twin, "relu_twin", no_training)
    for cmd in (["evaluate"], ["finetune"]):
        rc, _, err = hw(capsys, *cmd, "--device", "no-such-chip.yaml", *TINY, "--out", tmp_path / cmd[0])
        assert rc == 2 and "no-such-chip" in err, err
        assert not (tmp_path / cmd[0]).exists()  # a failed run leaves no empty folder


# ------------------------------------------------------------------ (3) plots and `hwloop report`
def test_finetune_plots_and_report(full_run, capsys):
    out, printed = full_run
    for name in ("learning_curve.png", "spike_raster.png", "spike_times.png"):
        _png_ok(out / name)
    rc, again, _ = hw(capsys, "report", out)
    assert rc == 0
    assert again.strip() and again.strip() in printed  # the same summary as at the end of the run
    assert "plots:" in again and "learning_curve.png" in again
    assert "+-" in again  # the accuracy's spread over the repeats


def test_evaluate_train_calibrate_sweep_plots_and_report(xdg, tmp_path, capsys):
    # evaluate
    ev = tmp_path / "eval"
    rc, printed, _ = hw(capsys, "evaluate", "--device", "emulator-harsh", *TINY, "--repeats", "2",
                        "--no-progress", "--out", ev)
    assert rc == 0
    for name in ("spike_raster.png", "spike_times.png", "spikes_per_layer.png"):
        _png_ok(ev / name)
    assert hw(capsys, "report", ev)[1].strip() in printed
    # calibrate: the hash shown is the one finetune shows (the record's content hash)
    rec = tmp_path / "cal" / "rec.json"
    rc, printed, _ = hw(capsys, "calibrate", "--device", "emulator-mismatch", "--chip-seed", "5",
                        "--dataset", "synthetic", "--repeats", "2", "--levels", "4", "--widths", "2,8",
                        "--no-synapse-gains", "--out", rec)
    assert rc == 0
    _png_ok(tmp_path / "cal" / "rec.fit.png")
    assert hw(capsys, "report", rec)[1].strip() in printed
    from hwloop.calibrate.record import content_hash, load_record
    h = content_hash(load_record(str(rec)))[:16]
    assert f"sha256 {h}" in printed
    rc, printed, _ = hw(capsys, "finetune", "--device", "emulator-mismatch", "--chip-seed", "5", *TINY,
                        "--epochs", "1", "--max-steps-per-epoch", "1", "--calibration", rec,
                        "--no-progress", "--no-plots", "--out", tmp_path / "ftcal")
    assert rc == 0 and f"calibrated with {rec} (sha256 {h}" in printed
    assert "1 epoch x 1 step," in printed  # not "1 epochs"
    # train (software), on a tiny IDX data set
    from tests.test_resume import _idx_dataset
    data = tmp_path / "idx"
    _idx_dataset(data, seed=0)
    tr = tmp_path / "train"
    rc, printed, _ = hw(capsys, "train", "--dataset", "MNIST", "--data-dir", data, "--epochs", "2",
                        "--no-progress", "--out", tr)
    assert rc == 0
    for name in ("learning_curve.png", "spike_raster.png", "spike_times.png"):
        _png_ok(tr / name)
    assert hw(capsys, "report", tr)[1].strip() in printed
    assert json.loads((tr / "report.json").read_text())["dataset"] == "mnist"
    # sweep
    sw = tmp_path / "sweep"
    rc, printed, _ = hw(capsys, "sweep", "--knob", "weight-bits", "--values", "4", "8", *TINY,
                        "--max-steps-per-epoch", "1", "--workers", "1", "--out", sw)
    assert rc == 0
    pngs = list(sw.glob("*.png"))
    assert pngs
    for p in pngs:
        _png_ok(p)
    table = hw(capsys, "report", sw)[1]
    assert table.splitlines()[0] in printed and table.splitlines()[1] in printed


# ------------------------------------------------------------------ (4) progress
def test_piped_progress_is_one_line_per_epoch(full_run):
    _, printed = full_run
    assert "\r" not in printed
    lines = [ln for ln in printed.splitlines() if ln.startswith("epoch ")]
    assert [ln.split(":")[0] for ln in lines] == ["epoch 1/2", "epoch 2/2"]
    assert all("train accuracy" in ln and "spikes/neuron" in ln and "energy" in ln for ln in lines)


def test_link_health_is_printed_when_the_device_has_it(monkeypatch):
    from hwloop.train import progress
    row = {"train_loss": 0.5, "train_accuracy": 0.9, "spikes_per_neuron": 0.4,
           "energy_j_per_sample": 2e-9}
    d = progress.health_delta({"retries": 40, "crc_errors": 3, "bytes_tx": 10}, {"retries": 4})
    line = progress.epoch_line(2, 3, row, d)
    assert line.startswith("epoch 2/3: loss 0.5000") and "2.000 nJ" in line
    assert "link: 36 retries, 3 crc errors" in line and "bytes" not in line
    assert progress.link_health({}) == ""
    monkeypatch.setenv("HWLOOP_PROGRESS", "never")
    assert progress.bar(True, 10, "x") is None
    monkeypatch.setenv("HWLOOP_PROGRESS", "always")
    b = progress.bar(True, 10, "x")
    assert b is not None
    b.close()


# ------------------------------------------------------------------ (5) messages
def test_small_messages(full_run, xdg, tmp_path, capsys):
    out, _ = full_run
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    report = json.loads((out / "report.json").read_text())
    # epochs are numbered from 1 in the step log and in the report
    assert sorted({r["epoch"] for r in rows}) == [h["epoch"] for h in report["history"]] == [1, 2]
    assert report["provenance"]["seeds"]["jitter_seed"] >= 0
    from hwloop.commands.finetune import options_from_args
    parser = cli.build_parser()
    args = parser.parse_args(["finetune", "--dataset", "fashion_mnist", "--out", str(tmp_path / "o")])
    assert options_from_args(args).dataset == "fashion-mnist"
    rc, _, err = hw(capsys, "sweep", "--knob", "weight-bitz", "--values", "4", "--out", tmp_path / "s")
    assert rc == 2 and "unknown knob 'weight-bitz'" in err and "Value error" not in err
