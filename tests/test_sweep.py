"""Constraint-study sweeps: value parsing, tables, resumability, plots, executors, the CLI.

Everything runs on the synthetic task (12x12 images, 4 classes) with a ReLU twin trained for one
epoch into a per-test cache, and a couple of fine-tuning steps per point: seconds in all.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from hwloop.errors import HwloopError, ProfileError
from hwloop.studies import executors as ex
from hwloop.studies import knobs as kn
from hwloop.studies import sweep as sw


def _spec(tmp_path: Path, **kw) -> sw.SweepSpec:
    base = dict(knobs=["weight-bits"], values=[["3,8"]], dataset="synthetic", train_subset=256,
                test_subset=128, pretrain_epochs=1, epochs=1, max_steps_per_epoch=2, batch_size=32,
                cache_dir=str(tmp_path / "cache"))
    base.update(kw)
    return sw.SweepSpec(**base)


# ------------------------------------------------------------------ parsing
def test_parse_values_forms():
    assert kn.parse_values("jitter", ["0,0.05", "0.1"]) == [0.0, 0.05, 0.1]
    assert kn.parse_values("weight-bits", ["2", "3,4"]) == [2, 3, 4]
    assert kn.parse_values("weight-bits", ["null", "8"]) == [None, 8]
    assert kn.parse_values("time-steps", ["16.0"]) == [16]
    assert kn.parse_values("latency", ["100,99,95"]) == [100.0, 99.0, 95.0]
    assert kn.parse_values("mismatch.synapse_gain_sd", ["0.01,0.05"]) == [0.01, 0.05]
    assert kn.parse_values("adaptive_windows", ["true", "false"]) == [True, False]
    with pytest.raises(HwloopError, match="cannot read"):
        kn.parse_values("weight-bits", ["2.5"])
    with pytest.raises(HwloopError, match="repeated"):
        kn.parse_values("jitter", ["0.1,0.1"])
    with pytest.raises(ProfileError, match="unknown knob"):
        kn.knob_for("no_such_field")


def test_parse_set_and_knob_fields():
    fixed = kn.parse_set(["weight_bits=4", "mismatch.synapse_gain_sd=0.03", "jitter=0.05",
                          "time_steps_per_layer=16"])
    assert fixed == {"weight_bits": 4, "mismatch.synapse_gain_sd": 0.03, "jitter_sd": 0.05,
                     "time_steps_per_layer": 16}
    with pytest.raises(ProfileError):
        kn.parse_set(["nope=1"])
    with pytest.raises(HwloopError):
        kn.parse_set(["weight_bits"])
    assert kn.KNOBS["time-steps"].implies == {"window_percentile": 99.0, "adaptive_windows": False}


def test_plan_validates_and_keys(tmp_path):
    spec = _spec(tmp_path, knobs=["jitter", "weight-bits"], values=[["0,0.1"], ["4,8"]], seeds=[0, 1],
                 fixed={"mismatch.synapse_gain_sd": 0.02})
    tasks = sw.plan(spec, tmp_path / "out")
    assert len(tasks) == 8 and len({t["key"] for t in tasks}) == 8
    t = tasks[0]
    assert t["overrides"]["jitter_sd"] == 0.0 and t["overrides"]["weight_bits"] == 4
    assert t["overrides"]["mismatch.synapse_gain_sd"] == 0.02
    assert t["options"]["chip_seed"] == 0 and t["options"]["finetune"]["seed"] == 0
    assert tasks[1]["options"]["chip_seed"] == 1 and tasks[1]["options"]["finetune"]["seed"] == 0
    # a value out of the profile's range fails before anything runs
    with pytest.raises(ProfileError):
        sw.plan(_spec(tmp_path, knobs=["weight-bits"], values=[["1"]]), tmp_path / "bad")
    # the key depends on everything that changes the result, not on the knob values alone
    other = sw.plan(_spec(tmp_path, knobs=["jitter", "weight-bits"], values=[["0,0.1"], ["4,8"]],
                          seeds=[0, 1], lr=1e-3, fixed={"mismatch.synapse_gain_sd": 0.02}), tmp_path / "out")
    assert {x["key"] for x in other}.isdisjoint({x["key"] for x in tasks})
    with pytest.raises(HwloopError, match="also swept"):
        _spec(tmp_path, fixed={"weight_bits": 4})


# ------------------------------------------------------------------ one real sweep
def test_sweep_writes_tables_and_plot(tmp_path):
    out = tmp_path / "out"
    res = sw.run_sweep(_spec(tmp_path), out, progress=False, log=lambda m: None)
    assert res["planned"] == 2 and res["ran"] == 2 and not res["failed"]
    rows = sw.load_rows(out / "results.jsonl")
    assert [r["knobs"]["weight-bits"] for r in rows] == [3, 8] or sorted(
        r["knobs"]["weight-bits"] for r in rows) == [3, 8]
    for r in rows:
        for f in ("accuracy_before", "accuracy_after", "ideal_snn_accuracy", "spikes_per_neuron_before",
                  "spikes_per_neuron_after", "energy_j_before", "energy_j_after", "wall_time_s"):
            assert r[f] is not None
        assert 0.0 <= r["accuracy_after"] <= 1.0 and r["energy_j_after"] > 0
        assert r["weight_bits"] == r["knobs"]["weight-bits"] and r["latency_tau_c"] > 1.0
        assert not (Path(r["point_dir"]) / "checkpoint.pt").exists()  # dropped once finished
        assert (Path(r["point_dir"]) / "report.json").exists()
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["weight-bits"] + sw.CSV_COLUMNS
        got = list(reader)
    assert sorted(int(r["weight-bits"]) for r in got) == [3, 8]
    doc = json.loads((out / "results.json").read_text())
    assert doc["spec"]["knobs"] == ["weight-bits"] and len(doc["points"]) == 2
    assert {tuple(s["knobs"].values()) for s in doc["summary"]} == {(3,), (8,)}
    assert doc["summary"][0]["accuracy_after"]["mean"] is not None
    assert (out / "accuracy_weight-bits.png").stat().st_size > 1000


# ------------------------------------------------------------------ resumability
CALLS: list[str] = []


def counting_point(task):
    """A top-level point function that counts its calls."""
    CALLS.append(task["key"])
    return sw.run_point(task)


def interrupting_point(task):
    """Finishes one point, then behaves as if Ctrl-C arrived."""
    if CALLS:
        raise KeyboardInterrupt
    return counting_point(task)


def failing_point(task):
    if task["knobs"].get("jitter") == 0.1:
        raise RuntimeError("device unplugged")
    return counting_point(task)


def test_interrupt_then_rerun_runs_only_missing_points(tmp_path):
    spec = _spec(tmp_path, knobs=["jitter"], values=[["0,0.1,0.2"]])
    out = tmp_path / "out"
    CALLS.clear()
    with pytest.raises(KeyboardInterrupt):
        sw.run_sweep(spec, out, point_fn=interrupting_point, progress=False, log=lambda m: None)
    first = list(CALLS)
    assert len(first) == 1 and len(sw.load_rows(out / "results.jsonl")) == 1
    CALLS.clear()
    res = sw.run_sweep(spec, out, point_fn=counting_point, progress=False, log=lambda m: None)
    assert res["skipped"] == 1 and res["ran"] == 2
    assert len(CALLS) == 2 and first[0] not in CALLS
    assert len(sw.load_rows(out / "results.jsonl")) == 3
    CALLS.clear()
    res = sw.run_sweep(spec, out, point_fn=counting_point, progress=False, log=lambda m: None)
    assert CALLS == [] and res["skipped"] == 3 and res["ran"] == 0
    # more values later: only the new one runs, the table holds the four
    res = sw.run_sweep(_spec(tmp_path, knobs=["jitter"], values=[["0,0.1,0.2,0.4"]]), out,
                       point_fn=counting_point, progress=False, log=lambda m: None)
    assert len(CALLS) == 1 and "jitter=0.4" in CALLS[0]
    assert len(json.loads((out / "results.json").read_text())["points"]) == 4


def test_failed_point_is_reported_and_retried(tmp_path):
    spec = _spec(tmp_path, knobs=["jitter"], values=[["0,0.1"]])
    out = tmp_path / "out"
    CALLS.clear()
    res = sw.run_sweep(spec, out, point_fn=failing_point, progress=False, log=lambda m: None)
    assert res["ran"] == 1 and len(res["failed"]) == 1 and "device unplugged" in res["failed"][0]["error"]
    CALLS.clear()
    res = sw.run_sweep(spec, out, point_fn=counting_point, progress=False, log=lambda m: None)
    assert res["ran"] == 1 and len(CALLS) == 1 and "jitter=0.1" in CALLS[0]


def test_torn_line_and_unrecorded_report(tmp_path, monkeypatch):
    spec = _spec(tmp_path, knobs=["jitter"], values=[["0,0.1"]])
    out = tmp_path / "out"
    sw.run_sweep(spec, out, progress=False, log=lambda m: None)
    lines = (out / "results.jsonl").read_text().splitlines()
    # the parent died after the point wrote its report but while appending its line
    (out / "results.jsonl").write_text(lines[0] + "\n" + lines[1][:40])
    import hwloop.train.finetune as fin
    calls = []
    monkeypatch.setattr(fin, "run_finetune", lambda *a, **k: calls.append(1))
    res = sw.run_sweep(spec, out, progress=False, log=lambda m: None)
    assert res["ran"] == 1 and calls == []  # recorded from report.json, not run again
    rows = sw.load_rows(out / "results.jsonl")
    assert len(rows) == 2 and len({r["key"] for r in rows}) == 2


# ------------------------------------------------------------------ grid and no-knob studies
def test_grid_heatmap_and_single_point(tmp_path):
    out = tmp_path / "grid"
    spec = _spec(tmp_path, knobs=["weight-bits", "jitter"], values=[["3,8"], ["0,0.2"]], max_steps_per_epoch=1)
    res = sw.run_sweep(spec, out, progress=False, log=lambda m: None)
    assert res["ran"] == 4
    assert (out / "heatmap_weight-bits_jitter.png").stat().st_size > 1000
    with open(out / "results.csv", newline="") as f:
        assert csv.DictReader(f).fieldnames[:2] == ["weight-bits", "jitter"]
    out2 = tmp_path / "combined"
    spec = _spec(tmp_path, knobs=[], values=[], fixed={"weight_bits": 4, "jitter_sd": 0.05},
                 max_steps_per_epoch=1)
    res = sw.run_sweep(spec, out2, progress=False, log=lambda m: None)
    assert res["ran"] == 1 and (out2 / "accuracy_point.png").exists()
    assert "point" in sw.format_summary(res["rows"], [])


# ------------------------------------------------------------------ executors
def threads_and_square(x):
    import torch
    return torch.get_num_threads(), x * x


def test_local_executor_processes(tmp_path):
    with ex.LocalExecutor(workers=2) as e:
        got = {i: r for i, r, err in e.map_unordered(threads_and_square, [1, 2, 3])}
    assert got == {0: (1, 1), 1: (1, 4), 2: (1, 9)}
    assert isinstance(ex.make_executor("local", 1), ex.SerialExecutor)
    with pytest.raises(HwloopError):
        ex.make_executor("nope")


def test_local_executor_runs_a_sweep(tmp_path):
    spec = _spec(tmp_path, knobs=["jitter"], values=[["0,0.1"]], max_steps_per_epoch=1)
    out = tmp_path / "out"
    sw.prepare_twins(spec, log=lambda m: None)
    with ex.LocalExecutor(workers=2) as e:
        res = sw.run_sweep(spec, out, e, progress=False, log=lambda m: None)
    assert res["ran"] == 2 and len(sw.load_rows(out / "results.jsonl")) == 2


def test_ray_executor(tmp_path):
    pytest.importorskip("ray")
    spec = _spec(tmp_path, knobs=["jitter"], values=[["0,0.1"]], max_steps_per_epoch=1)
    out = tmp_path / "out"
    with ex.RayExecutor(workers=2) as e:
        outcomes = list(e.map_unordered(threads_and_square, [3, 4]))
        assert [err for _, _, err in outcomes] == [None, None]
        assert sorted(r for _, r, _ in outcomes) == [(1, 9), (1, 16)]
        res = sw.run_sweep(spec, out, e, progress=False, log=lambda m: None)
    assert res["ran"] == 2 and not res["failed"]


# ------------------------------------------------------------------ command line
def test_cli_sweep(tmp_path, capsys):
    from hwloop.cli import main
    out = tmp_path / "cli"
    argv = ["sweep", "--knob", "weight-bits", "--values", "4", "8", "--dataset", "synthetic",
            "--train-subset", "256", "--test-subset", "128", "--pretrain-epochs", "1",
            "--max-steps-per-epoch", "1", "--workers", "1", "--no-progress",
            "--cache-dir", str(tmp_path / "cache"), "--set", "jitter_sd=0.01", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "2 point(s) run" in text and "acc after %" in text
    assert main(argv) == 0
    assert "0 point(s) run, 2 already done" in capsys.readouterr().out
    assert main(["sweep", "--knob", "bogus", "--values", "1", "--out", str(out)]) == 2
    assert main(["sweep", "--knob", "jitter", "--out", str(out)]) == 2
    assert "needs --values" in capsys.readouterr().err
