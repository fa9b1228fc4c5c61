"""The per-synapse array of a calibration record: base64 of little-endian float32, validated
(shape, byte count, every value finite) when built or loaded, decoded once."""

from __future__ import annotations

import base64
import binascii
import math
from typing import Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, PrivateAttr, model_validator

from hwloop.calibrate.validate import _fail, _first_outside, _more
from hwloop.errors import CalibrationError

__all__ = ["Array"]


class Array(BaseModel):
    """A float array stored as base64 of little-endian float32 (per-synapse data).

    Validated: ``shape`` non-negative, ``b64`` strict base64 of exactly ``4 prod(shape)`` bytes,
    every value finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, revalidate_instances="always")

    shape: tuple[int, ...]
    b64: str
    #: the decoded bytes (validated), so that the array is decoded once
    _raw: Optional[bytes] = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _decode(self) -> "Array":
        if any(s < 0 for s in self.shape):
            raise _fail("shape", f"shape {tuple(self.shape)} has a negative size")
        n = int(np.prod(self.shape, dtype=np.int64))
        try:
            raw = base64.b64decode(self.b64.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as exc:
            raise _fail("b64", f"not valid base64 ({exc}) for shape {tuple(self.shape)} "
                               f"({n} float32 values): the array was truncated or edited") from None
        if len(raw) != 4 * n:
            raise _fail("b64", f"holds {len(raw)} bytes ({len(raw) / 4:g} float32 values), shape "
                               f"{tuple(self.shape)} needs {4 * n} bytes ({n} values): the array was "
                               "truncated or edited")
        a = np.frombuffer(raw, dtype="<f4")
        bad = _first_outside(a, -math.inf, math.inf)
        if bad is not None:
            j, cnt = bad
            raise _fail("b64", f"element {self._where(j)} is {float(a[j])!r}{_more(cnt)}; values "
                               "must be finite numbers")
        self._raw = raw
        return self

    def _where(self, flat: int) -> tuple[int, ...]:
        return tuple(int(i) for i in np.unravel_index(flat, self.shape)) if self.shape else ()

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "Array":
        a = np.ascontiguousarray(t.detach().cpu().to(torch.float32).numpy(), dtype="<f4")
        return cls(shape=tuple(int(s) for s in a.shape), b64=base64.b64encode(a.tobytes()).decode())

    def numpy(self) -> np.ndarray:
        """The values, flat, float32 (read-only view of the decoded buffer)."""
        if self._raw is None:  # pragma: no cover - set by the validator
            self._raw = base64.b64decode(self.b64.encode())
        return np.frombuffer(self._raw, dtype="<f4")

    def tensor(self) -> torch.Tensor:
        a = self.numpy()
        if a.size != int(np.prod(self.shape, dtype=np.int64)):  # pragma: no cover - validated
            raise CalibrationError(f"calibration array of shape {self.shape} holds {a.size} values")
        return torch.from_numpy(a.copy()).reshape(self.shape).to(torch.float64)
