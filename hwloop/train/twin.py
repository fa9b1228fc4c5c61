"""The data and the ReLU twin of a run: :func:`load_data`, :func:`data_source`, content
digests, and the model cache that ``finetune``, ``evaluate``, ``calibrate`` and ``sweep``
share (:func:`relu_twin`)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from hwloop.data.datasets import find_dataset_files, load_dataset, synthetic_dataset
from hwloop.errors import CheckpointError, DataError
from hwloop.train.checkpoint import load_checkpoint, save_checkpoint
from hwloop.train.options import FinetuneOptions
from hwloop.train.software import RECIPES, train
from hwloop.ttfs.architectures import build_relu

__all__ = ["cache_root", "data_digest", "data_source", "load_data", "relu_twin", "tensor_digest",
           "twin_cache_path", "weights_digest"]


# ---------------------------------------------------------------------------- data
def load_data(opts: FinetuneOptions):
    """(x_train, y_train, x_test, y_test): images in [0, 1] ``(N, 1, 28, 28)``, int64 labels."""
    if opts.dataset == "synthetic":
        n_tr, n_te = opts.train_subset or 2000, opts.test_subset or 500
        shape = (1, 12, 12) if opts.arch in ("fc2", "fc16") else (1, 28, 28)  # conv nets need 28x28
        x, y = synthetic_dataset(n_tr + n_te, shape, 4, seed=opts.finetune.seed, noise=0.35)
        return x[:n_tr], y[:n_tr], x[n_tr:], y[n_tr:]
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


# ---------------------------------------------------------------------------- the twin
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


def weights_digest(net: torch.nn.Module) -> str:
    """sha256 over the names and bytes of a model's state dict (the twin, the final weights)."""
    h = hashlib.sha256()
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
