"""Atomic, checksummed checkpoints.

A checkpoint is one file written by :func:`torch.save` holding a dict::

    {"format": "hwloop-checkpoint", "version": 1, "sha256": <hex>, "payload": <bytes>}

where ``payload`` is the :func:`torch.save` serialisation of the caller's state (a dict of
tensors, numbers, strings, lists, dicts) and ``sha256`` its digest. Loading always uses
``torch.load(..., weights_only=True)``, so a checkpoint can never execute code; the checksum
catches bit rot and half-written files that still unpickle.

Saving writes a temporary file in the same directory, flushes and fsyncs it, moves the current
checkpoint (if any) to ``<name>.prev`` and then ``os.replace``-s the temporary file into place.
If anything fails before the final rename, the previous checkpoint is still on disk (either under
its own name or as ``<name>.prev``) and :func:`load_checkpoint` with ``fallback=True`` finds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hwloop.errors import CheckpointError

if TYPE_CHECKING:  # annotations only: this module stays light (no pydantic models imported)
    from hwloop.mapping import ProgramState

__all__ = ["FORMAT", "VERSION", "load_checkpoint", "prev_path", "save_checkpoint",
           "state_from_dict", "state_to_dict"]

FORMAT = "hwloop-checkpoint"
VERSION = 1


def prev_path(path: str | os.PathLike) -> Path:
    """Where the previous checkpoint is kept: ``<name>.prev``."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` to ``path``; keep the former file as ``<name>.prev``.

    ``state`` must be loadable with ``weights_only=True`` (tensors, plain containers, numbers,
    strings). Returns the path written.
    """
    path = Path(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint state must be a dict, got {type(state).__name__}")
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    # Check now, not at load time, that the state will load under weights_only=True.
    try:
        torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint state for {path} holds objects that cannot be loaded safely "
            f"(weights_only=True): {exc}"
        ) from exc
    record = {
        "format": FORMAT,
        "version": VERSION,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "payload": payload,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(record, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if path.exists():
            # Keep the previous checkpoint; hard link first so that `path` never disappears.
            prev = prev_path(path)
            tmp_prev = prev.with_name(prev.name + ".tmp")
            try:
                if tmp_prev.exists():
                    tmp_prev.unlink()
                os.link(path, tmp_prev)
            except OSError:
                # No hard links on this filesystem: copy the bytes instead.
                tmp_prev.write_bytes(path.read_bytes())
            os.replace(tmp_prev, prev)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    return path


def _load_one(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not an hwloop checkpoint (cannot be read: "
            f"{type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an hwloop checkpoint (no '{FORMAT}' header)")
    if record.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {record.get('version')!r} is not supported "
            f"(this hwloop reads version {VERSION})"
        )
    payload = record.get("payload")
    digest = record.get("sha256")
    if not isinstance(payload, (bytes, bytearray)) or not isinstance(digest, str):
        raise CheckpointError(f"{path}: checkpoint lacks its payload or checksum")
    actual = hashlib.sha256(payload).hexdigest()
    if actual != digest:
        raise CheckpointError(
            f"{path}: checksum mismatch (stored {digest[:12]}..., computed {actual[:12]}...): "
            "the file is corrupt"
        )
    try:
        state = torch.load(io.BytesIO(bytes(payload)), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: checkpoint payload cannot be read: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: checkpoint payload is not a dict")
    return state


def load_checkpoint(path: str | os.PathLike, fallback: bool = False) -> dict[str, Any]:
    """Load and verify a checkpoint written by :func:`save_checkpoint`.

    Raises :class:`CheckpointError` when the file is missing, unreadable, not an hwloop
    checkpoint, or fails its checksum. With ``fallback=True`` a broken or missing ``path`` falls
    back to ``<name>.prev``; the error then names both files.
    """
    path = Path(path)
    try:
        return _load_one(path)
    except CheckpointError as first:
        if not fallback:
            raise
        prev = prev_path(path)
        try:
            return _load_one(prev)
        except CheckpointError as second:
            raise CheckpointError(f"{first}; the previous checkpoint failed too: {second}") from first


# ---------------------------------------------------------------------------- program states
def state_to_dict(state: ProgramState) -> dict:
    """A :class:`~hwloop.mapping.ProgramState` as a checkpoint (or a weights file) holds it:
    the spec as JSON, codes and scales, thresholds, bits and clip percentile."""
    return {"spec": state.spec.model_dump_json(),
            "weights": {int(k): [v[0], float(v[1])] for k, v in state.weights.items()},
            "thresholds": {int(k): v for k, v in state.thresholds.items()},
            "weight_bits": state.weight_bits, "clip_percentile": state.clip_percentile}


def state_from_dict(d: dict, like: ProgramState) -> ProgramState:
    """The saved state, keeping the class and extra fields of ``like`` (the state the mapping
    step just made: a calibrated state keeps its compensation)."""
    return dataclasses.replace(like, spec=type(like.spec).model_validate_json(d["spec"]),
                               weights={int(k): (v[0], float(v[1])) for k, v in d["weights"].items()},
                               thresholds={int(k): v for k, v in d["thresholds"].items()},
                               weight_bits=d["weight_bits"], clip_percentile=d["clip_percentile"])
