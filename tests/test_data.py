"""IDX reader/writer, dataset search order and errors, synthetic data, batch iterator."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from hwloop.data import (
    candidate_dirs,
    iterate_batches,
    load_dataset,
    read_idx,
    read_idx_header,
    synthetic_dataset,
    write_idx,
)
from hwloop.errors import DataError, DatasetNotFound, HwloopError

SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No user settings leak into the search order; the cache lives under tmp_path."""
    monkeypatch.delenv("HWLOOP_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def make_split(directory: Path, n: int, split: str = "train", gz: bool = True, seed: int = 0):
    """Write a tiny IDX split; returns the uint8 images and labels written."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255  # make sure both ends of the range occur
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    suffix = ".gz" if gz else ""
    write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return images, labels


# ----------------------------------------------------------------------------- IDX format
@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]
)
def test_idx_round_trip(tmp_path, suffix, dtype):
    arr = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype) if dtype != np.uint8 else (
        np.arange(30, dtype=np.uint8).reshape(2, 3, 5) * 8
    )
    path = write_idx(tmp_path / f"a.idx{suffix}", arr)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype)
    assert back.shape == (2, 3, 5)
    np.testing.assert_array_equal(back, arr)
    dt, shape = read_idx_header(path)
    assert shape == (2, 3, 5) and dt.itemsize == np.dtype(dtype).itemsize


def test_idx_header_is_big_endian_and_spec_conformant(tmp_path):
    arr = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int32)
    raw = write_idx(tmp_path / "x.idx", arr).read_bytes()
    # magic: 0x00 0x00, type 0x0C (int32), ndim 2; dims 2 and 3 as big-endian uint32
    assert raw[:4] == b"\x00\x00\x0c\x02"
    assert struct.unpack(">II", raw[4:12]) == (2, 3)
    assert struct.unpack(">6i", raw[12:]) == (1, 2, 3, 4, 5, 6)
    gz = write_idx(tmp_path / "x.idx.gz", arr).read_bytes()
    assert gz[:2] == b"\x1f\x8b" and gzip.decompress(gz) == raw


def test_gzip_detected_by_content_not_suffix(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    raw = write_idx(tmp_path / "x.idx", arr).read_bytes()
    odd = tmp_path / "compressed-without-suffix"
    odd.write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(read_idx(odd), arr)


def test_truncated_idx_raises_data_error(tmp_path):
    arr = np.zeros((10, 28, 28), dtype=np.uint8)
    raw = write_idx(tmp_path / "ok.idx", arr).read_bytes()
    cut = tmp_path / "cut.idx"
    cut.write_bytes(raw[:-100])
    with pytest.raises(DataError, match=r"truncated.*\(10, 28, 28\)"):
        read_idx(cut)
    header_only = tmp_path / "hdr.idx"
    header_only.write_bytes(raw[:6])
    with pytest.raises(DataError, match="truncated IDX header"):
        read_idx(header_only)
    tiny = tmp_path / "tiny.idx"
    tiny.write_bytes(b"\x00")
    with pytest.raises(DataError, match="too short"):
        read_idx(tiny)


def test_trailing_bytes_raise(tmp_path):
    raw = write_idx(tmp_path / "ok.idx", np.zeros(4, dtype=np.uint8)).read_bytes()
    bad = tmp_path / "long.idx"
    bad.write_bytes(raw + b"\x01\x02")
    with pytest.raises(DataError, match="2 unexpected trailing bytes"):
        read_idx(bad)


def test_bad_magic_and_type_raise(tmp_path):
    raw = bytearray(write_idx(tmp_path / "ok.idx", np.zeros(4, dtype=np.uint8)).read_bytes())
    bad_magic = tmp_path / "magic.idx"
    bad_magic.write_bytes(b"\x01\x00" + bytes(raw[2:]))
    with pytest.raises(DataError, match="magic"):
        read_idx(bad_magic)
    bad_type = tmp_path / "type.idx"
    raw[2] = 0x42
    bad_type.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="element type 0x42"):
        read_idx(bad_type)


def test_corrupt_gzip_raises_data_error(tmp_path):
    raw = write_idx(tmp_path / "ok.idx.gz", np.arange(1000, dtype=np.int32)).read_bytes()
    cut = tmp_path / "cut.idx.gz"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="gzip"):
        read_idx(cut)
    fake = tmp_path / "fake.idx.gz"
    fake.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(DataError, match="not gzip"):
        read_idx(fake)


def test_missing_idx_file_raises(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "nope.idx")


# ----------------------------------------------------------------------------- datasets
def test_load_dataset_from_data_dir_scales_and_types(tmp_path):
    images, labels = make_split(tmp_path, 7, "train", gz=True)
    make_split(tmp_path, 3, "test", gz=False, seed=1)
    x, y = load_dataset("fashion-mnist", "train", data_dir=tmp_path)
    assert x.dtype == torch.float32 and x.shape == (7, 1, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (7,)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    np.testing.assert_allclose(x[:, 0].numpy(), images / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(y.numpy(), labels.astype(np.int64))
    xt, yt = load_dataset("fashion-mnist", "test", data_dir=tmp_path)  # raw files
    assert xt.shape == (3, 1, 28, 28) and yt.shape == (3,)


def test_search_order(tmp_path, monkeypatch):
    explicit, env, cache = tmp_path / "explicit", tmp_path / "env", tmp_path / "xdg-cache"
    make_split(explicit / "mnist", 2)  # data_dir/<name>
    make_split(env, 3)  # $HWLOOP_DATA itself
    make_split(cache / "hwloop" / "mnist", 4)  # user cache
    monkeypatch.setenv("HWLOOP_DATA", str(env))
    monkeypatch.setattr("hwloop.data.datasets.SYSTEM_DATA_DIR", tmp_path / "system")
    assert load_dataset("mnist", data_dir=explicit)[0].shape[0] == 2
    assert load_dataset("mnist")[0].shape[0] == 3
    monkeypatch.setenv("HWLOOP_DATA", str(tmp_path / "empty"))
    make_split(tmp_path / "empty" / "mnist", 5)  # $HWLOOP_DATA/<name>
    assert load_dataset("mnist")[0].shape[0] == 5
    monkeypatch.delenv("HWLOOP_DATA")
    assert load_dataset("mnist")[0].shape[0] == 4
    make_split(tmp_path / "system" / "mnist", 6)
    (cache / "hwloop" / "mnist" / "train-labels-idx1-ubyte.gz").unlink()  # incomplete: skipped
    assert load_dataset("mnist")[0].shape[0] == 6

    # an explicit directory is searched alone: never replaced by another copy
    assert candidate_dirs("mnist", data_dir=explicit) == [explicit, explicit / "mnist"]
    assert candidate_dirs("mnist") == [cache / "hwloop" / "mnist", tmp_path / "system" / "mnist"]


def test_explicit_data_dir_without_the_dataset_is_an_error(tmp_path, monkeypatch):
    """A --data-dir that does not hold the files must not fall back to the system copy (issue:
    a nonexistent --data-dir ran the whole job on /usr/share/datasets, exit 0)."""
    make_split(tmp_path / "system" / "mnist", 6)
    monkeypatch.setattr("hwloop.data.datasets.SYSTEM_DATA_DIR", tmp_path / "system")
    monkeypatch.delenv("HWLOOP_DATA", raising=False)
    assert load_dataset("mnist")[0].shape[0] == 6  # the fall-back search itself works
    with pytest.raises(DatasetNotFound, match="does not exist") as info:
        load_dataset("mnist", data_dir=tmp_path / "typo")
    assert str(tmp_path / "typo") in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFound, match="does not hold it"):
        load_dataset("mnist", data_dir=tmp_path / "empty")


def test_missing_dataset_lists_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("HWLOOP_DATA", str(tmp_path / "env"))
    monkeypatch.setattr("hwloop.data.datasets.SYSTEM_DATA_DIR", tmp_path / "system")
    with pytest.raises(DatasetNotFound) as info:
        load_dataset("fashion-mnist", "test", data_dir=tmp_path / "given")
    msg = str(info.value)
    for place in (tmp_path / "given", tmp_path / "given" / "fashion-mnist"):
        assert f"  - {place}\n" in msg
    assert str(tmp_path / "env") not in msg
    with pytest.raises(DatasetNotFound) as info:
        load_dataset("fashion-mnist", "test")
    msg = str(info.value)
    for place in (
        tmp_path / "env",
        tmp_path / "env" / "fashion-mnist",
        tmp_path / "xdg-cache" / "hwloop" / "fashion-mnist",
        tmp_path / "system" / "fashion-mnist",
    ):
        assert f"  - {place}\n" in msg
    assert "t10k-images-idx3-ubyte" in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "t10k-labels-idx1-ubyte.gz" in msg
    assert isinstance(info.value, HwloopError) and isinstance(info.value, FileNotFoundError)


def test_label_count_mismatch_raises(tmp_path):
    make_split(tmp_path, 5)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(4, dtype=np.uint8))
    with pytest.raises(DataError, match="5 images but .* 4 labels"):
        load_dataset("mnist", data_dir=tmp_path)


def test_unknown_dataset_and_split(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'cifar10'"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="unknown split"):
        load_dataset("mnist", split="validation", data_dir=tmp_path)


@pytest.mark.skipif(not SYSTEM_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_test_split():
    x, y = load_dataset("fashion-mnist", "test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.bincount(y).tolist() == [1000] * 10


# ----------------------------------------------------------------------------- synthetic, batches
def test_synthetic_dataset_shape_range_and_learnable():
    x, y = synthetic_dataset(200, (1, 8, 8), 4, seed=3)
    assert x.shape == (200, 1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and torch.bincount(y).tolist() == [50] * 4
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float((x == 0).float().mean()) > 0.2  # many silent inputs, like real images
    # nearest class mean classifies it almost perfectly: the task is learnable
    means = torch.stack([x[y == c].mean(0) for c in range(4)]).flatten(1)
    pred = torch.cdist(x.flatten(1), means).argmin(1)
    assert float((pred == y).float().mean()) > 0.95
    x2, y2 = synthetic_dataset(200, (1, 8, 8), 4, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, synthetic_dataset(200, (1, 8, 8), 4, seed=4)[0])


def test_iterate_batches_covers_everything_once():
    x = torch.arange(10).float().unsqueeze(1)
    y = torch.arange(10)
    plain = list(iterate_batches(x, y, 4))
    assert [b[1].tolist() for b in plain] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    g = torch.Generator().manual_seed(0)
    shuffled = list(iterate_batches(x, y, 4, shuffle=True, generator=g))
    seen = torch.cat([b[1] for b in shuffled])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    for xb, yb in shuffled:
        assert torch.equal(xb[:, 0].long(), yb)
    g2 = torch.Generator().manual_seed(0)
    again = torch.cat([b[1] for b in iterate_batches(x, y, 4, shuffle=True, generator=g2)])
    assert torch.equal(seen, again)
    assert [len(b[1]) for b in iterate_batches(x, y, 4, drop_last=True)] == [4, 4]
    with pytest.raises(DataError):
        list(iterate_batches(x, y[:5], 4))
