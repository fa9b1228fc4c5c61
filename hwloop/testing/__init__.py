"""Tools for bringing up a chip and testing a backend: the conformance suite
(:func:`check_device`) and the bring-up diagnostics (:func:`characterise`). See
``docs/drivers.md``."""

from hwloop.testing.characterise import characterise
from hwloop.testing.conformance import CHECKS, CheckResult, ConformanceReport, check_device

__all__ = ["CHECKS", "CheckResult", "ConformanceReport", "characterise", "check_device"]
