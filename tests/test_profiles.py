"""Device profiles (hwloop.emulator.profile) and ``hwloop devices list/show/scan``."""

import argparse
import json
from pathlib import Path

import pytest
import yaml

from hwloop.emulator.profile import (DeviceProfile, field_rows, list_profiles, load_profile,
                                    profiles_dir, validate_profile)
from hwloop.errors import ProfileError

REPO = Path(__file__).resolve().parents[1]
DEVICES = REPO / "devices"
BASE = {"name": "t", "device_id": "t"}


def test_shipped_profiles_validate():
    names = {p.stem for p in DEVICES.glob("*.yaml")}
    assert {"emulator-ideal", "emulator-analog"} <= names
    for path in DEVICES.glob("*.yaml"):
        prof = load_profile(path)
        assert prof.name == path.stem
    ideal = load_profile(DEVICES / "emulator-ideal.yaml")
    assert ideal.is_ideal and ideal.weight_bits is None and ideal.time_steps_per_layer is None
    analog = load_profile(DEVICES / "emulator-analog.yaml")
    assert not analog.is_ideal
    assert analog.weight_bits == 6 and analog.time_steps_per_layer == 32
    assert analog.clip_percentile == 1.0 and analog.window_percentile == 99
    assert 0 < analog.mismatch.synapse_gain_sd <= 0.05 and 0 < analog.jitter_sd <= 0.05


def test_load_by_name_and_device_info():
    prof = load_profile("emulator-analog")
    info = prof.device_info(chip_seed=7)
    assert info.device_id == "emu-analog-seed7"
    assert info.weight_bits == 6 and info.time_steps_per_layer == 32
    assert info.adaptive_windows is False
    assert load_profile("emulator-ideal").device_info().weight_bits == 32  # float weights


def test_default_clip_percentile():
    assert validate_profile({**BASE, "weight_bits": 4}).clip_percentile == 4.0
    assert validate_profile({**BASE, "weight_bits": 8}).clip_percentile == 1.0
    assert validate_profile({**BASE, "weight_bits": 4, "weight_clip_percentile": 2}).clip_percentile == 2.0


@pytest.mark.parametrize("patch, field, value, allowed", [
    ({"jitter_sd": -0.1}, "jitter_sd", "-0.1", "[0.0, 10.0]"),
    ({"weight_bits": 40}, "weight_bits", "40", "[2, 32]"),
    ({"mismatch": {"capacitance_sd": 0.9}}, "mismatch.capacitance_sd", "0.9", "[0.0, 0.3]"),
    ({"tau_c_s": 0}, "tau_c_s", "0", "(0.0, 1.0]"),
    ({"window_percentile": 120}, "window_percentile", "120", "(0.0, 100.0]"),
    ({"limits": {"max_fan_in": 0}}, "limits.max_fan_in", "0", "[1, 1000000000]"),
    ({"time_steps_per_layer": "many"}, "time_steps_per_layer", "'many'", "or null"),
])
def test_bad_values_name_field_value_range(patch, field, value, allowed):
    with pytest.raises(ProfileError) as exc:
        validate_profile({**BASE, **patch})
    msg = str(exc.value)
    assert field in msg and value in msg and allowed in msg, msg
    assert isinstance(exc.value, ValueError)


def test_unknown_and_missing_fields():
    with pytest.raises(ProfileError, match=r"jitter: unknown field.*allowed fields: .*jitter_sd"):
        validate_profile({**BASE, "jitter": 0.1})
    with pytest.raises(ProfileError, match=r"mismatch\.gain_sd: unknown field.*synapse_gain_sd"):
        validate_profile({**BASE, "mismatch": {"gain_sd": 0.1}})
    with pytest.raises(ProfileError, match="device_id: required field is missing"):
        validate_profile({"name": "x"})
    with pytest.raises(ProfileError, match="expected a mapping"):
        validate_profile([1, 2])


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "mismatch": {"ramp_current_sd": -1}}))
    with pytest.raises(ProfileError, match=r"bad\.yaml.*mismatch\.ramp_current_sd = -1.*\[0\.0, 0\.3\]"):
        load_profile(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(broken)
    with pytest.raises(ProfileError, match="not found"):
        load_profile(tmp_path / "nope.yaml")


def test_model_validate_is_pydantic_and_forbids_extra():
    prof = DeviceProfile.model_validate({**BASE, "jitter_sd": 0.01})
    assert prof.jitter_sd == 0.01
    with pytest.raises(Exception):
        DeviceProfile.model_validate({**BASE, "extra": 1})


def test_every_field_has_unit_and_description():
    for name, _value, unit, desc in field_rows(load_profile("emulator-analog")):
        assert unit and desc, name


def test_profiles_dir_env(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({**BASE, "name": "mine"}))
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump({**BASE, "bogus": 1}))
    monkeypatch.setenv("HWLOOP_DEVICES", str(tmp_path))
    assert profiles_dir() == tmp_path
    entries = dict((p.name, v) for p, v in list_profiles())
    assert isinstance(entries["mine.yaml"], DeviceProfile)
    assert isinstance(entries["broken.yaml"], ProfileError)
    assert load_profile("mine").name == "mine"


# ---------------------------------------------------------------------- CLI
def _parser():
    from hwloop.commands import devices

    parser = argparse.ArgumentParser(prog="hwloop")
    devices.register(parser.add_subparsers(dest="command"))
    return parser


def _run(argv):
    args = _parser().parse_args(argv)
    return args.func(args)


def test_cli_devices_list(capsys):
    assert _run(["devices", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("emulator-ideal", "emulator-analog"):
        assert name in out
    assert "max_fan_in" in out and "float" in out
    assert _run(["devices", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    analog = next(r for r in rows if r["name"] == "emulator-analog")
    assert analog["bits"] == "6" and analog["steps"] == "32"


def test_cli_devices_show(capsys):
    assert _run(["devices", "show", "emulator-analog"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("jitter_sd"))
    assert "0.02" in line and "tau_c" in line
    line = next(l for l in out.splitlines() if l.startswith("capacitance_f"))
    assert "1e-13" in line and " F " in line
    assert "mismatch.synapse_gain_sd" in out
    assert _run(["devices", "show", str(DEVICES / "emulator-ideal.yaml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["weight_bits"] is None
    with pytest.raises(ProfileError, match="not found"):
        _run(["devices", "show", "no-such-profile"])


def test_cli_devices_through_main(capsys):
    from hwloop import cli

    assert cli.main(["devices", "list"]) == 0
    assert "emulator-analog" in capsys.readouterr().out
    assert cli.main(["devices", "show", "no-such-profile"]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_devices_scan_missing_module(capsys, monkeypatch):
    import importlib

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "hwloop.commands.devices_scan":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    assert _run(["devices", "scan"]) == 1
    assert "not available" in capsys.readouterr().err


def test_cli_devices_scan_delegates(capsys, monkeypatch):
    import sys
    import types

    mod = types.ModuleType("hwloop.commands.devices_scan")
    mod.scan = lambda visa_backend="@py": [{"kind": "serial", "name": "/dev/ttyX", "open_with": "/dev/ttyX"}]
    monkeypatch.setitem(sys.modules, "hwloop.commands.devices_scan", mod)
    assert _run(["devices", "scan"]) == 0
    assert "/dev/ttyX" in capsys.readouterr().out
