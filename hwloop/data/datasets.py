"""Datasets of the MNIST family (IDX files on disk), a synthetic task for fast tests, and a
light batch iterator.

Where the files of a dataset ``name`` are looked for (first directory holding both files of the
requested split wins; each file may be raw or ``.gz``):

* a ``data_dir`` given by the caller: ``data_dir``, then ``data_dir/<name>``, and nowhere else.
  An explicit path that does not hold the dataset is an error (:class:`DatasetNotFound`), never a
  silent fall-back to another copy;
* without one, in order: ``$HWLOOP_DATA``, then ``$HWLOOP_DATA/<name>``; the user cache
  ``${XDG_CACHE_HOME:-~/.cache}/hwloop/<name>``; the system-wide ``/usr/share/datasets/<name>``
  (Debian's ``dataset-fashion-mnist``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from hwloop.data.idx import read_idx
from hwloop.errors import DataError, DatasetNotFound

__all__ = [
    "DATASETS",
    "SYSTEM_DATA_DIR",
    "candidate_dirs",
    "find_dataset_files",
    "iterate_batches",
    "load_dataset",
    "synthetic_dataset",
]

#: dataset name -> (image shape, number of classes)
DATASETS: dict[str, tuple[tuple[int, int, int], int]] = {
    "mnist": ((1, 28, 28), 10),
    "fashion-mnist": ((1, 28, 28), 10),
}
SYSTEM_DATA_DIR = Path("/usr/share/datasets")

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_HOW_TO_GET = {
    "fashion-mnist": (
        "install the Debian package: `sudo apt-get install dataset-fashion-mnist` "
        "(puts the files in /usr/share/datasets/fashion-mnist)"
    ),
    "mnist": None,
}


def _normalise_name(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    if key == "fashion":
        key = "fashion-mnist"
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return key


def _user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hwloop"


def candidate_dirs(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Every directory searched for ``name``'s files, in search order (only ``data_dir`` and
    ``data_dir/<name>`` when ``data_dir`` is given)."""
    name = _normalise_name(name)
    dirs: list[Path] = []
    if data_dir is not None:
        return [Path(data_dir), Path(data_dir) / name]
    env = os.environ.get("HWLOOP_DATA")
    if env:
        dirs += [Path(env), Path(env) / name]
    dirs.append(_user_cache_dir() / name)
    dirs.append(SYSTEM_DATA_DIR / name)
    seen: set[Path] = set()
    unique = []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            unique.append(d)
    return unique


def _find_in(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_dataset_files(
    name: str, split: str = "train", data_dir: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """Return ``(images_path, labels_path)`` for a split, or raise :class:`DatasetNotFound`."""
    key = _normalise_name(name)
    if split not in _FILES:
        raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
    img_stem, lbl_stem = _FILES[split]
    looked = candidate_dirs(key, data_dir)
    for directory in looked:
        img, lbl = _find_in(directory, img_stem), _find_in(directory, lbl_stem)
        if img is not None and lbl is not None:
            return img, lbl
    if data_dir is not None:
        given = Path(data_dir)
        where = (f"the data directory given ({data_dir}) does not hold it" if given.is_dir()
                 else f"the data directory given ({data_dir}) is a file, not a directory"
                 if given.exists() else f"the data directory given ({data_dir}) does not exist")
        raise DatasetNotFound(
            f"dataset {key!r} ({split} split) not found: {where}; no directory holds both "
            f"{img_stem}[.gz] and {lbl_stem}[.gz].\nLooked in:\n"
            + "".join(f"  - {d}\n" for d in looked)
            + "An explicit --data-dir is never replaced by another copy: fix the path, or leave it "
              "out to search $HWLOOP_DATA, the user cache and /usr/share/datasets.")
    lines = [
        f"dataset {key!r} ({split} split) not found: no directory holds both "
        f"{img_stem}[.gz] and {lbl_stem}[.gz].",
        "Looked in:",
        *(f"  - {d}" for d in looked),
        "To get the files:",
    ]
    if _HOW_TO_GET.get(key):
        lines.append(f"  - {_HOW_TO_GET[key]}, or")
    lines.append(
        "  - download the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        f"t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) into {_user_cache_dir() / key}"
    )
    lines.append("  - or point --data-dir / $HWLOOP_DATA at a directory that holds them.")
    raise DatasetNotFound("\n".join(lines))


def load_dataset(
    name: str, split: str = "train", data_dir: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a split of ``"mnist"`` or ``"fashion-mnist"``.

    Returns ``(images, labels)``: images float32 of shape ``(N, 1, 28, 28)`` scaled to [0, 1],
    labels int64 of shape ``(N,)``.
    """
    key = _normalise_name(name)
    img_path, lbl_path = find_dataset_files(key, split, data_dir)
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    (c, h, w), n_classes = DATASETS[key]
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (h, w):
        raise DataError(
            f"{img_path}: expected uint8 images of shape (N, {h}, {w}), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1:
        raise DataError(f"{lbl_path}: expected a 1-D label array, got shape {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{img_path} holds {images.shape[0]} images but {lbl_path} holds {labels.shape[0]} labels"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(f"{lbl_path}: labels outside 0..{n_classes - 1}")
    x = torch.from_numpy(images).to(torch.float32).div_(255.0).reshape(-1, c, h, w)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def synthetic_dataset(
    n: int,
    shape: tuple[int, ...] = (1, 28, 28),
    n_classes: int = 10,
    seed: int = 0,
    noise: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A small learnable task for fast tests.

    Each class has a fixed random prototype image in [0, 1] (sparse bright pixels, like a digit);
    samples are prototypes plus Gaussian noise, clipped to [0, 1]. The prototypes depend only on
    ``(shape, n_classes, seed)``: two calls with the same seed describe the same task, so a train
    and a test set can be drawn with ``seed`` and e.g. ``seed`` but different ``n`` (the first
    ``min(n)`` samples coincide) or by slicing one call. Returns float32 ``(n, *shape)`` and int64
    labels ``(n,)``, classes balanced round-robin then shuffled.
    """
    if n < 0 or n_classes < 1:
        raise DataError(f"need n >= 0 and n_classes >= 1, got n={n}, n_classes={n_classes}")
    g = torch.Generator().manual_seed(int(seed))
    protos = torch.rand((n_classes, *shape), generator=g)
    protos = torch.where(protos > 0.6, protos, torch.zeros(()))  # sparse, many exact zeros
    labels = torch.arange(n, dtype=torch.int64) % n_classes
    labels = labels[torch.randperm(n, generator=g)]
    x = protos[labels] + noise * torch.randn((n, *shape), generator=g)
    return x.clamp_(0.0, 1.0).to(torch.float32), labels


def iterate_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x_batch, y_batch)`` slices of in-memory tensors, no worker processes.

    With ``shuffle`` a fresh permutation is drawn from ``generator`` (reproducible when seeded).
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    n = x.shape[0]
    if y.shape[0] != n:
        raise DataError(f"x has {n} samples but y has {y.shape[0]}")
    order = torch.randperm(n, generator=generator) if shuffle else None
    stop = n - (n % batch_size) if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            yield x[start : start + batch_size], y[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]
