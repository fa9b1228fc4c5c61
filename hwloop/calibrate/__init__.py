"""Calibration of a TTFS chip's frozen mismatch (docs/calibration.md).

* :mod:`~hwloop.calibrate.probes`: probe programs and input patterns, through the TTFSDevice
  contract only;
* :mod:`~hwloop.calibrate.fit`: the circuit model and :func:`calibrate_device`, which runs the
  steps of :mod:`~hwloop.calibrate.sweeps` (threshold sweep, jitter, per-layer fits) and
  :mod:`~hwloop.calibrate.synapses` (synapse probes), with the estimators of
  :mod:`~hwloop.calibrate.estimators` and the options of :mod:`~hwloop.calibrate.options`;
* :mod:`~hwloop.calibrate.record`: :class:`CalibrationRecord`, :func:`save_record`,
  :func:`load_record` (hash-verified); its values and shapes are checked by
  :mod:`~hwloop.calibrate.validate`, its per-synapse arrays are :mod:`~hwloop.calibrate.array`;
* :mod:`~hwloop.calibrate.compensate`: :func:`program_calibrated`.

Random jitter (new every run) cannot be calibrated away; it is only measured.
"""

from hwloop.calibrate.compensate import CalibratedProgramState, Compensation, program_calibrated
from hwloop.calibrate.fit import CalibrationOptions, calibrate_device
from hwloop.calibrate.record import CalibrationRecord, check_record_matches, load_record, save_record

__all__ = ["CalibratedProgramState", "CalibrationOptions", "CalibrationRecord", "Compensation",
           "calibrate_device", "check_record_matches", "load_record", "program_calibrated",
           "save_record"]
