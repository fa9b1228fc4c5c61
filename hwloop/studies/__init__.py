"""Constraint studies: sweeps of device-profile knobs, the executors that run them, their plots.

A sweep is a base device profile, one or two knobs with their values (a grid for two), a number
of seeds and a number of fine-tuning epochs. Every point is one :func:`hwloop.train.finetune.run_finetune`
call, which measures the device before and after hardware-in-the-loop fine-tuning. See
:mod:`hwloop.studies.sweep` and ``docs/constraint-studies.md``.
"""

from hwloop.studies.knobs import KNOBS, Knob, parse_set, parse_values
from hwloop.studies.sweep import SweepSpec, plan, run_point, run_sweep

__all__ = ["KNOBS", "Knob", "SweepSpec", "parse_set", "parse_values", "plan", "run_point", "run_sweep"]
