"""Atomic, checksummed checkpoints."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from hwloop.errors import CheckpointError, HwloopError
from hwloop.train.checkpoint import load_checkpoint, prev_path, save_checkpoint


def _state(v: float) -> dict:
    return {"model": {"w": torch.full((3, 2), v)}, "epoch": int(v), "name": "fc2", "hist": [v, 2 * v]}


def test_round_trip(tmp_path):
    path = save_checkpoint(tmp_path / "run" / "ck.pt", _state(1.5))
    assert path == tmp_path / "run" / "ck.pt" and path.is_file()
    back = load_checkpoint(path)
    assert torch.equal(back["model"]["w"], torch.full((3, 2), 1.5))
    assert back["epoch"] == 1 and back["name"] == "fc2" and back["hist"] == [1.5, 3.0]
    # no temporary files left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["ck.pt"]


def test_previous_kept_as_prev(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, _state(1))
    save_checkpoint(path, _state(2))
    assert load_checkpoint(path)["epoch"] == 2
    assert load_checkpoint(prev_path(path))["epoch"] == 1
    save_checkpoint(path, _state(3))
    assert load_checkpoint(prev_path(path))["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt", "ck.pt.prev"]


def test_crash_at_final_rename_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, _state(1))
    real_replace = os.replace

    def crash_on_final(src, dst):
        if os.fspath(dst) == os.fspath(path):
            raise OSError("simulated power loss")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_final)
    with pytest.raises(OSError, match="simulated power loss"):
        save_checkpoint(path, _state(2))
    monkeypatch.setattr(os, "replace", real_replace)
    assert load_checkpoint(path)["epoch"] == 1  # the old checkpoint is intact under its name
    assert load_checkpoint(prev_path(path))["epoch"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_crash_during_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, _state(1))
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # 1st: payload to memory; 2nd: the record to the temp file
            f.write(b"partial garbage")
            raise RuntimeError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, _state(2))
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


def test_missing_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing.pt")
    err = CheckpointError("x")
    assert isinstance(err, HwloopError) and isinstance(err, RuntimeError)


def test_garbage_file_raises(tmp_path):
    bad = tmp_path / "ck.pt"
    bad.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt or not an hwloop checkpoint"):
        load_checkpoint(bad)


def test_truncated_file_raises(tmp_path):
    path = save_checkpoint(tmp_path / "ck.pt", _state(1))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_checksum_detects_payload_change(tmp_path):
    path = save_checkpoint(tmp_path / "ck.pt", _state(1))
    record = torch.load(path, weights_only=True)
    payload = bytearray(record["payload"])
    payload[-30] ^= 0xFF  # flip bits inside the serialised tensor data
    record["payload"] = bytes(payload)
    torch.save(record, path)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)


def test_plain_torch_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not an hwloop checkpoint"):
        load_checkpoint(path)


def test_fallback_to_prev(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, _state(1))
    save_checkpoint(path, _state(2))
    path.write_bytes(b"broken")
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert load_checkpoint(path, fallback=True)["epoch"] == 1
    prev_path(path).write_bytes(b"also broken")
    with pytest.raises(CheckpointError, match="previous checkpoint failed too"):
        load_checkpoint(path, fallback=True)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_loading_is_weights_only(tmp_path, monkeypatch):
    # Objects that need arbitrary unpickling are refused at save time ...
    with pytest.raises(CheckpointError, match="weights_only"):
        save_checkpoint(tmp_path / "ck.pt", {"obj": _Evil()})
    assert not (tmp_path / "ck.pt").exists()
    # ... and a malicious file is refused at load time without running anything.
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump(_Evil(), fh, protocol=2)
    ran = []
    monkeypatch.setattr(os, "system", lambda cmd: ran.append(cmd) or 0)
    with pytest.raises(CheckpointError):
        load_checkpoint(evil)
    assert ran == []
    # every torch.load in the module passes weights_only=True
    calls = []
    real_load = torch.load

    def spy(*a, **k):
        calls.append(k.get("weights_only"))
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    save_checkpoint(tmp_path / "ok.pt", _state(4))
    assert load_checkpoint(tmp_path / "ok.pt")["epoch"] == 4
    assert calls and all(c is True for c in calls)


def test_state_must_be_dict(tmp_path):
    with pytest.raises(CheckpointError, match="must be a dict"):
        save_checkpoint(tmp_path / "ck.pt", [1, 2])


def test_training_writes_checkpoints_and_resumes_exactly(tmp_path):
    """hwloop.train.software saves one checkpoint per epoch; a resumed run ends where an
    uninterrupted one does."""
    from torch import nn

    from hwloop.data import synthetic_dataset
    from hwloop.train.software import train

    x, y = synthetic_dataset(96, (1, 6, 6), 3, seed=0)

    def fresh():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 3))

    kw = dict(epochs=3, batch_size=32, lr=1e-2, seed=5, progress=False)
    full = fresh()
    rep_full = train(full, (x, y), (x, y), out_dir=tmp_path / "full", **kw)
    ck = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    assert ck["epoch"] == 2 and ck["step"] == 9 and len(ck["history"]) == 3
    assert load_checkpoint(tmp_path / "full" / "checkpoint.pt.prev")["epoch"] == 1
    assert (tmp_path / "full" / "report.json").is_file()

    part = fresh()
    train(part, (x, y), (x, y), out_dir=tmp_path / "part", max_steps=6, **kw)  # stops after epoch 2
    assert load_checkpoint(tmp_path / "part" / "checkpoint.pt")["epoch"] == 1
    resumed = fresh()
    rep = train(resumed, (x, y), (x, y), out_dir=tmp_path / "part", resume=True, **kw)
    assert rep["steps"] == 9 and rep["epochs_run"] == 3
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert rep["test_accuracy"] == rep_full["test_accuracy"]


def test_progress_line_of_a_ttfs_network(capsys):
    """The per-epoch line of a TTFS net shows its total spikes per neuron (it crashed on the
    per-layer dict)."""
    from torch import nn

    import hwloop
    from hwloop.data import synthetic_dataset
    from hwloop.train.software import train
    x, y = synthetic_dataset(64, (1, 6, 6), 3, seed=0)
    torch.manual_seed(0)
    net = hwloop.convert(nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 3)), x)
    rep = train(net, (x, y), (x, y), epochs=1, batch_size=32, progress=True)
    assert 0.0 <= rep["test_accuracy"] <= 1.0
    assert "spikes/neuron" in capsys.readouterr().err
