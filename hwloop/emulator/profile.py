"""Device profiles: one YAML file per device in the top-level ``devices/`` folder.

A profile describes a concrete chip (or an emulated one): its limits, its precision (weight bits,
time steps per layer), its non-idealities (frozen mismatch, random jitter) and its energy
constants. It is validated by the pydantic model :class:`DeviceProfile` (unknown keys are
refused); a bad profile raises :class:`~hwloop.errors.ProfileError` naming the field, the value
and the allowed range.

Units (also recorded per field as ``unit`` in the field's JSON-schema extra, shown by
``hwloop devices show``):

* times in tau_c (the time constant of Eq. (1)) unless the name ends in ``_s`` (seconds);
* ``*_sd`` of gains are relative (0.02 = 2 %); the comparator offset is relative to the layer's
  base threshold (= the window width in the B1 model, i.e. ``threshold_voltage_v`` volts);
* capacitance in farads, voltage in volts, energy in joules.

See ``docs/emulator.md`` for the circuit each knob belongs to.
"""

from __future__ import annotations

import os
import reprlib
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hwloop.devices.base import DeviceInfo
from hwloop.errors import ProfileError
from hwloop.quant import default_clip_percentile

__all__ = [
    "DeviceProfile", "Limits", "Mismatch", "field_rows", "validate_profile",
    "find_profile", "list_profiles", "load_profile", "profiles_dir",
]


def _f(default: Any, unit: str, description: str, **constraints: Any) -> Any:
    """A pydantic Field with its unit recorded for ``hwloop devices show``."""
    return Field(default, description=description, json_schema_extra={"unit": unit}, **constraints)


class Limits(BaseModel):
    """What fits on the chip (checked by :func:`hwloop.devices.base.check_fits`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_layers: int = _f(64, "layers", "most layers (every kind counts, readout included)",
                         ge=1, le=4096)
    max_neurons_per_layer: int = _f(1_000_000, "neurons",
                                    "most neurons (capacitors) in one layer", ge=1, le=10**9)
    max_fan_in: int = _f(100_000, "synapses", "most synapses per neuron", ge=1, le=10**9)
    max_batch: int = _f(4096, "samples", "most samples per run() call", ge=1, le=10**7)


class Mismatch(BaseModel):
    """Frozen fabrication mismatch: drawn once per chip instance (``chip_seed``), fixed after.

    Each value is the standard deviation of a Gaussian; 0 turns that non-ideality off.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    synapse_gain_sd: float = _f(0.0, "relative",
                                "per-synapse current-gain mismatch: I_ij = g_ij W_ij, g ~ 1 + N(0, sd)",
                                ge=0.0, le=0.3)
    capacitance_sd: float = _f(0.0, "relative",
                               "per-neuron capacitance mismatch: C_i = C (1 + N(0, sd)); "
                               "V = Q / C_i in both phases", ge=0.0, le=0.3)
    ramp_current_sd: float = _f(0.0, "relative",
                                "per-neuron ramp-current mismatch in the window: "
                                "I_B,i = I_B (1 + N(0, sd)), slope B_i = I_B,i / C_i",
                                ge=0.0, le=0.3)
    threshold_offset_sd: float = _f(0.0, "relative to base threshold",
                                    "per-neuron comparator offset, as a fraction of the layer's "
                                    "base threshold (threshold_voltage_v volts = window width "
                                    "in potential units)", ge=0.0, le=0.3)
    comparator_delay_sd: float = _f(0.0, "tau_c",
                                    "per-neuron deviation of the comparator delay from its "
                                    "nominal value (frozen jitter); may be negative", ge=0.0,
                                    le=10.0)


class DeviceProfile(BaseModel):
    """A validated device profile. Load with :func:`load_profile` or
    ``DeviceProfile.model_validate(mapping)`` (the latter raises pydantic's error; use
    :func:`validate_profile` for a :class:`ProfileError`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = _f(..., "-", "short name of the profile", min_length=1, max_length=100)
    description: str = _f("", "-", "one line on what the profile models", max_length=2000)
    device_id: str = _f(..., "-", "device id; the emulator appends '-seed<chip_seed>'",
                        min_length=1, max_length=200)
    backend: str = _f("emulator", "-", "which backend opens this profile", min_length=1,
                      max_length=100)
    tau_c_s: float = _f(1e-6, "s", "seconds per tau_c (the time unit of Eq. (1))",
                        gt=0.0, le=1.0)
    clock_period_s: float = _f(1e-8, "s", "clock period of the chip's timing logic",
                               gt=0.0, le=1.0)
    limits: Limits = Field(default_factory=Limits, description="what fits on the chip")
    weight_bits: Optional[int] = _f(None, "bits",
                                    "signed weight precision q: codes in [-2^(q-1), 2^(q-1)-1]; "
                                    "null = exact float64 weights (ideal emulator only)",
                                    ge=2, le=32)
    weight_clip_percentile: Optional[float] = _f(
        None, "percent", "outliers removed on each side before quantising (Methods (iii)); "
        "null = 1 for >= 5 bits, 4 for <= 4 bits", ge=0.0, lt=50.0)
    time_steps_per_layer: Optional[int] = _f(None, "steps",
                                             "time steps K per layer window (spike registered at "
                                             "the next tick); null = continuous time",
                                             ge=1, le=1_000_000)
    window_percentile: float = _f(100.0, "percent",
                                  "latency (Methods (iv)): each window holds this percentile of "
                                  "the training activations; 100 = windows as given",
                                  gt=0.0, le=100.0)
    mismatch: Mismatch = Field(default_factory=Mismatch,
                               description="frozen mismatch (standard deviations)")
    jitter_sd: float = _f(0.0, "tau_c",
                          "random jitter added to every emitted spike time and every input "
                          "spike, fresh each run", ge=0.0, le=10.0)
    capacitance_f: float = _f(1e-13, "F", "nominal neuron capacitance C", gt=0.0, le=1e-6)
    threshold_voltage_v: float = _f(0.5, "V",
                                    "voltage of a layer's base threshold (theta = window width "
                                    "in potential units); sets volts per potential unit",
                                    gt=0.0, le=100.0)
    transmission_energy_j: float = _f(0.0, "J", "energy T_r per emitted spike", ge=0.0, le=1e-6)
    adaptive_windows: bool = _f(True, "-", "whether set_windows (Eq. (8) on chip) is allowed")
    chip_seed: int = _f(0, "-", "default seed of the frozen mismatch (one seed = one chip)",
                        ge=0, le=2**63 - 1)

    # ------------------------------------------------------------------ derived
    @property
    def clip_percentile(self) -> float:
        """The weight clipping percentile in effect (default from the bit width)."""
        if self.weight_clip_percentile is not None:
            return float(self.weight_clip_percentile)
        return default_clip_percentile(self.weight_bits)

    @property
    def is_ideal(self) -> bool:
        """True when every non-ideality is off (float weights, continuous time, no noise)."""
        m = self.mismatch
        return (self.weight_bits is None and self.time_steps_per_layer is None
                and self.jitter_sd == 0 and self.window_percentile == 100
                and all(getattr(m, k) == 0 for k in Mismatch.model_fields))

    def device_info(self, chip_seed: Optional[int] = None) -> DeviceInfo:
        """The :class:`DeviceInfo` an emulator of this profile reports.

        ``weight_bits`` null (float weights) is reported as 32 (the largest the contract
        allows); the emulator then also accepts floating "codes" with scale 1.
        """
        seed = self.chip_seed if chip_seed is None else int(chip_seed)
        lim = self.limits
        return DeviceInfo(
            device_id=f"{self.device_id}-seed{seed}",
            firmware_version="emulator",
            max_layers=lim.max_layers,
            max_neurons_per_layer=lim.max_neurons_per_layer,
            max_fan_in=lim.max_fan_in,
            weight_bits=self.weight_bits if self.weight_bits is not None else 32,
            time_steps_per_layer=self.time_steps_per_layer,
            clock_period_s=self.clock_period_s,
            tau_c_s=self.tau_c_s,
            max_batch=lim.max_batch,
            adaptive_windows=self.adaptive_windows,
        )


# ---------------------------------------------------------------------- errors
def _field_info(loc: tuple) -> Any:
    """The FieldInfo at a pydantic error location, or None."""
    model: Any = DeviceProfile
    info = None
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        info = model.model_fields.get(str(part))
        if info is None:
            return None
        model = info.annotation
    return info


def _allowed(info: Any) -> str:
    """A human description of a field's allowed values, e.g. ``[0, 0.3]`` or ``(0, 1]``."""
    if info is None:
        return "see docs/emulator.md"
    lo = hi = None
    lo_open = hi_open = False
    lengths = []
    for m in info.metadata:
        for attr, is_lo, is_open in (("ge", True, False), ("gt", True, True),
                                     ("le", False, False), ("lt", False, True)):
            v = getattr(m, attr, None)
            if v is not None:
                if is_lo:
                    lo, lo_open = v, is_open
                else:
                    hi, hi_open = v, is_open
        for attr in ("min_length", "max_length"):
            v = getattr(m, attr, None)
            if v is not None:
                lengths.append(f"{attr}={v}")
    ann = str(info.annotation).replace("typing.", "")
    nullable = "Optional" in ann or "None" in ann
    if "bool" in ann:
        desc = "true or false"
    elif lo is not None or hi is not None:
        desc = (("(" if lo_open else "[") + (str(lo) if lo is not None else "-inf") + ", "
                + (str(hi) if hi is not None else "inf") + (")" if hi_open else "]"))
        if "int" in ann:
            desc = "integer in " + desc
    elif lengths:
        desc = "string with " + ", ".join(lengths)
    else:
        desc = ann
    unit = (info.json_schema_extra or {}).get("unit") if isinstance(info.json_schema_extra, dict) else None
    if unit and unit != "-":
        desc += f" ({unit})"
    if nullable:
        desc += " or null"
    return desc


#: Most characters of an offending value an error message repeats.
MAX_VALUE_CHARS = 200
#: Most YAML nodes a profile may expand to (aliases included): a profile has a few dozen.
MAX_YAML_NODES = 10_000
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxlevel = 3


def short_repr(value: Any, limit: int = MAX_VALUE_CHARS) -> str:
    """``repr(value)`` bounded in depth, items and characters (a value from a hostile file may
    be huge, or a structure of aliases that is huge once expanded)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _expanded_nodes(node, limit: int) -> int:
    """Nodes of a composed YAML document counting every alias as a full copy (memoised, so a
    "billion laughs" document is measured without being expanded); stops past ``limit``."""
    memo: dict[int, int] = {}

    def size(n) -> int:
        key = id(n)
        if key in memo:
            return memo[key]
        memo[key] = limit + 1  # a cycle counts as too large
        if isinstance(n, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in n.value)
        elif isinstance(n, yaml.SequenceNode):
            total = 1 + sum(size(v) for v in n.value)
        else:
            total = 1
        memo[key] = min(total, limit + 1)
        return memo[key]

    return size(node)


def safe_load_bounded(text: str, source: str, max_nodes: int = MAX_YAML_NODES):
    """``yaml.safe_load`` that refuses a document whose aliases expand beyond ``max_nodes``."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, max_nodes) > max_nodes:
            raise ProfileError(f"device profile {source}: YAML aliases expand to more than "
                               f"{max_nodes} nodes (an alias bomb?); refusing to load it")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _profile_error(exc: ValidationError, source: str) -> ProfileError:
    lines = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        field = ".".join(str(p) for p in loc) or "<profile>"
        value = short_repr(err.get("input"))
        if err.get("type") == "extra_forbidden":
            parent = _field_info(loc[:-1]) if len(loc) > 1 else None
            model = parent.annotation if parent is not None else DeviceProfile
            allowed = sorted(getattr(model, "model_fields", {}))
            lines.append(f"{field}: unknown field (value {value}); allowed fields: "
                         f"{', '.join(allowed)}")
            continue
        if err.get("type") == "missing":
            lines.append(f"{field}: required field is missing; allowed: {_allowed(_field_info(loc))}")
            continue
        lines.append(f"{field} = {value} is invalid: {short_repr(err.get('msg'))}; allowed: "
                     f"{_allowed(_field_info(loc))}")
    return ProfileError(f"invalid device profile {source}: " + "; ".join(lines))


def validate_profile(data: Any, source: str = "<mapping>") -> DeviceProfile:
    """Validate a mapping as a :class:`DeviceProfile`; raise :class:`ProfileError` if bad."""
    if isinstance(data, DeviceProfile):
        return data
    if not isinstance(data, dict):
        raise ProfileError(f"invalid device profile {source}: expected a mapping of fields, got "
                           f"{type(data).__name__}")
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as exc:
        raise _profile_error(exc, source) from None


# ---------------------------------------------------------------------- files
def profiles_dir() -> Path:
    """The folder of device profiles: ``$HWLOOP_DEVICES``, else ``./devices`` if it exists,
    else the ``devices/`` folder next to the ``hwloop`` package (a source checkout)."""
    env = os.environ.get("HWLOOP_DEVICES")
    if env:
        return Path(env)
    here = Path.cwd() / "devices"
    if here.is_dir() and any(here.glob("*.yaml")):
        return here
    return Path(__file__).resolve().parents[2] / "devices"


def find_profile(name_or_path: Union[str, os.PathLike]) -> Path:
    """Resolve a profile path or a bare name (``emulator-analog``) in :func:`profiles_dir`."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (profiles_dir() / p, profiles_dir() / f"{p}.yaml", profiles_dir() / f"{p}.yml"):
        if cand.is_file():
            return cand
    known = ", ".join(sorted(q.stem for q in profiles_dir().glob("*.yaml"))) or "none"
    raise ProfileError(f"device profile {str(name_or_path)!r} not found (as a path or in "
                       f"{profiles_dir()}; known profiles: {known})")


def load_profile(path: Union[str, os.PathLike]) -> DeviceProfile:
    """Load and validate a YAML profile (a path, or a name in :func:`profiles_dir`).

    Raises:
        ProfileError: file missing, not YAML, or a field invalid (names field, value, range).
    """
    p = find_profile(path)
    try:
        data = safe_load_bounded(p.read_text(), str(p))
    except yaml.YAMLError as exc:
        raise ProfileError(f"device profile {p} is not valid YAML: {exc}") from None
    return validate_profile(data, str(p))


def list_profiles() -> list[tuple[Path, Union[DeviceProfile, ProfileError]]]:
    """Every ``*.yaml`` in :func:`profiles_dir`, sorted, each with its profile or its error."""
    out: list[tuple[Path, Union[DeviceProfile, ProfileError]]] = []
    for p in sorted(profiles_dir().glob("*.yaml")):
        try:
            out.append((p, load_profile(p)))
        except ProfileError as exc:
            out.append((p, exc))
    return out


def field_rows(profile: DeviceProfile) -> list[tuple[str, Any, str, str]]:
    """(field, value, unit, description) for every field, nested ones dotted."""
    rows: list[tuple[str, Any, str, str]] = []

    def walk(model: BaseModel, prefix: str) -> None:
        for name, info in type(model).model_fields.items():
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                walk(value, f"{prefix}{name}.")
                continue
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            rows.append((prefix + name, value, str(extra.get("unit", "-")), info.description or ""))

    walk(profile, "")
    return rows
