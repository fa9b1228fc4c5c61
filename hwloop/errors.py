"""The exception hierarchy of hwloop.

Every error raised on purpose by hwloop derives from :class:`HwloopError`. Each leaf also
subclasses the matching built-in exception, so ``except ValueError`` keeps working for callers
that do not know hwloop.
"""

from __future__ import annotations


class HwloopError(Exception):
    """Base class of every error raised on purpose by hwloop."""


class DataError(HwloopError, ValueError):
    """Input data out of range (NaN, pixel values outside [0, 1], wrong shape)."""


class DatasetNotFound(HwloopError, FileNotFoundError):
    """A dataset's files were not found in any of the searched places."""


class ConversionError(HwloopError, ValueError):
    """A ReLU model cannot be converted (unsupported layer or placement)."""


class ProfileError(HwloopError, ValueError):
    """A device profile (YAML) is invalid: names the field, its value and the allowed range."""


class DeviceError(HwloopError, RuntimeError):
    """A device reported an error or is in a state that does not allow the call."""


class DeviceLimitError(DeviceError, ValueError):
    """A network does not fit a device's limits (layers, neurons, fan-in, weight bits ...)."""


class DeviceTimeout(DeviceError, TimeoutError):
    """A device did not answer in time."""


class ProtocolError(DeviceError):
    """A malformed frame or reply: bad CRC, bad length, unknown command, wrong sequence."""


class WriteVerifyError(DeviceError):
    """Weights or thresholds read back from a device differ from what was written.

    ``layers`` lists the layer indices whose programmed state is not what the host intended.
    """

    def __init__(self, message: str, layers: list[int] | None = None):
        super().__init__(message)
        self.layers = list(layers or [])


class CheckpointError(HwloopError, RuntimeError):
    """A checkpoint is missing, corrupt or does not match the run being resumed."""


class CalibrationError(HwloopError, ValueError):
    """A calibration record is invalid or does not match the device it is applied to."""
