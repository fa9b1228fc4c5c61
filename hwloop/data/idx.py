"""Reader and writer for the IDX file format (the format of the MNIST family of datasets).

Layout of an IDX file (all integers big-endian):

* bytes 0-1: zero;
* byte 2: element type code (0x08 ubyte, 0x09 sbyte, 0x0B int16, 0x0C int32, 0x0D float32,
  0x0E float64);
* byte 3: number of dimensions ``ndim``;
* ``ndim`` unsigned 32-bit sizes;
* the elements, row-major, big-endian.

Files may be raw or gzip-compressed (detected from the gzip magic bytes, not only the suffix).
Every inconsistency raises :class:`hwloop.errors.DataError` naming the file.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from hwloop.errors import DataError

__all__ = ["IDX_DTYPES", "read_idx", "read_idx_header", "write_idx"]

#: type code -> numpy big-endian dtype
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_OF_KIND = {(dt.kind, dt.itemsize): code for code, dt in IDX_DTYPES.items()}

_GZIP_MAGIC = b"\x1f\x8b"
# Refuse absurd headers before trying to allocate (a corrupt header could ask for terabytes).
_MAX_ELEMENTS = 1 << 34


def _read_bytes(path: Path, header_only: bool = False) -> tuple[bytes, bool]:
    """The file's IDX bytes, and whether they were cut short after what the header declares
    (then their length says nothing about how many trailing bytes the file has). A gzip file is decompressed header first, and then at most one
    byte more than that header declares, so a small file that expands to gigabytes (a gzip
    bomb) costs no more memory than the data it claims to hold."""
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
            if magic != _GZIP_MAGIC:
                if path.suffix == ".gz":
                    raise DataError(f"{path} has a .gz suffix but is not gzip data (first bytes "
                                    f"{(magic + f.read(2))!r})")
                return magic + f.read(), False
            f.seek(0)
            try:
                with gzip.GzipFile(fileobj=f) as gz:
                    head = gz.read(4)
                    if len(head) == 4 and head[:2] == b"\0\0":
                        head += gz.read(4 * head[3])
                    if header_only:
                        return head, True
                    try:
                        dtype, shape, offset = _parse_header(head, path)
                    except DataError:
                        return head, True  # read_idx reports it
                    count = 1
                    for n in shape:
                        count *= n
                    return head + gz.read(count * dtype.itemsize + 1), True  # +1: trailing?
            except (OSError, EOFError, zlib.error) as exc:
                raise DataError(f"corrupt or truncated gzip file {path}: {exc}") from exc
    except FileNotFoundError as exc:
        raise DataError(f"IDX file not found: {path}") from exc
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc


def _parse_header(data: bytes, path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    if len(data) < 4:
        raise DataError(f"{path}: file too short for an IDX header ({len(data)} bytes)")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise DataError(
            f"{path}: bad IDX magic number 0x{int.from_bytes(data[:4], 'big'):08x} "
            "(the first two bytes must be zero)"
        )
    if code not in IDX_DTYPES:
        raise DataError(
            f"{path}: unknown IDX element type 0x{code:02x} "
            f"(known: {', '.join(f'0x{c:02x}' for c in IDX_DTYPES)})"
        )
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares zero dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{path}: truncated IDX header (needs {header_len} bytes, has {len(data)})")
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    n = 1
    for s in shape:
        n *= s
    if n > _MAX_ELEMENTS:
        raise DataError(f"{path}: IDX header declares an implausible shape {shape}")
    return IDX_DTYPES[code], tuple(int(s) for s in shape), header_len


def read_idx_header(path: str | os.PathLike) -> tuple[np.dtype, tuple[int, ...]]:
    """Return ``(dtype, shape)`` declared by the IDX file at ``path``."""
    path = Path(path)
    dtype, shape, _ = _parse_header(_read_bytes(path, header_only=True)[0], path)
    return dtype, shape


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip) into a native-endian numpy array of the declared shape.

    Raises :class:`DataError` on a missing, corrupt or truncated file, or trailing bytes.
    """
    path = Path(path)
    data, bounded = _read_bytes(path)
    dtype, shape, offset = _parse_header(data, path)
    count = int(np.prod(shape, dtype=np.int64))
    expected = offset + count * dtype.itemsize
    if len(data) < expected:
        raise DataError(
            f"{path}: truncated IDX file: header declares shape {shape} of {dtype.name} "
            f"({expected} bytes in all) but the file holds {len(data)} bytes"
        )
    if len(data) > expected:
        extra = "" if bounded else f"{len(data) - expected} "
        raise DataError(
            f"{path}: {extra}unexpected trailing bytes after the IDX data (shape {shape})"
        )
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return arr.reshape(shape).astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array) -> Path:
    """Write ``array`` as an IDX file; gzip-compressed if ``path`` ends in ``.gz``.

    Supported dtypes: uint8, int8, int16, int32, float32, float64. Returns the path.
    """
    path = Path(path)
    arr = np.asarray(array)
    if arr.ndim == 0 or arr.ndim > 255:
        raise DataError(f"IDX needs 1..255 dimensions, got {arr.ndim}")
    code = _CODE_OF_KIND.get((arr.dtype.kind, arr.dtype.itemsize))
    if code is None:
        raise DataError(f"dtype {arr.dtype} cannot be stored in IDX")
    header = struct.pack(">HBB", 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + np.ascontiguousarray(arr, dtype=IDX_DTYPES[code]).tobytes()
    if path.suffix == ".gz":
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path
