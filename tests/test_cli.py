"""The command-line front end: help, unknown commands, error handling, module discovery."""

from __future__ import annotations

import sys
import types

import pytest

import hwloop.cli as cli
from hwloop.errors import DatasetNotFound, HwloopError


def _fake_module(monkeypatch, name: str, command: str, action):
    mod = types.ModuleType(name)

    def register(subparsers):
        p = subparsers.add_parser(command, help=f"{command} (test)")
        p.add_argument("--value", type=int, default=0)
        p.set_defaults(func=action)

    mod.register = register
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


@pytest.fixture
def fake_commands(monkeypatch):
    def boom(args):
        raise DatasetNotFound("dataset 'x' not found in /nowhere")

    def ok(args):
        print(f"ok {args.value}")
        return 0

    def crash(args):
        raise ZeroDivisionError("a real bug")

    _fake_module(monkeypatch, "hwloop_test_cmd_boom", "boom", boom)
    _fake_module(monkeypatch, "hwloop_test_cmd_ok", "ok", ok)
    _fake_module(monkeypatch, "hwloop_test_cmd_crash", "crash", crash)
    monkeypatch.setattr(
        cli,
        "COMMAND_MODULES",
        ("hwloop_test_cmd_boom", "hwloop_test_cmd_ok", "hwloop_test_does_not_exist", "hwloop_test_cmd_crash"),
    )
    monkeypatch.delenv("HWLOOP_DEBUG", raising=False)


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: hwloop" in out and "--debug" in out and "time-to-first-spike" in out


def test_help_lists_registered_commands(fake_commands, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "boom" in out and "ok" in out and "crash" in out


def test_every_existing_command_has_help(capsys):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in sub.choices:
        with pytest.raises(SystemExit) as info:
            cli.main([name, "--help"])
        assert info.value.code == 0
        assert f"usage: hwloop {name}" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("hwloop 0.1")


def test_unknown_subcommand_is_usage_error(fake_commands, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["frobnicate"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'frobnicate'" in err


def test_no_subcommand_prints_help_and_fails(fake_commands, capsys):
    assert cli.main([]) == 2
    assert "usage: hwloop" in capsys.readouterr().err


def test_command_runs_and_returns_zero(fake_commands, capsys):
    assert cli.main(["ok", "--value", "7"]) == 0
    assert capsys.readouterr().out == "ok 7\n"


def test_hwloop_error_exits_2_without_traceback(fake_commands, capsys):
    assert cli.main(["boom"]) == 2
    err = capsys.readouterr().err
    assert err == "hwloop boom: error: dataset 'x' not found in /nowhere\n"
    assert "Traceback" not in err


def test_debug_shows_traceback(fake_commands, capsys):
    assert cli.main(["--debug", "boom"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "DatasetNotFound" in err
    assert err.rstrip().endswith("hwloop boom: error: dataset 'x' not found in /nowhere")


def test_debug_from_environment(fake_commands, capsys, monkeypatch):
    monkeypatch.setenv("HWLOOP_DEBUG", "1")
    assert cli.main(["boom"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_unexpected_exceptions_propagate(fake_commands):
    # a bug is not an HwloopError: it must not be hidden behind exit code 2
    with pytest.raises(ZeroDivisionError):
        cli.main(["crash"])


def test_missing_module_is_skipped_but_broken_import_is_not(monkeypatch):
    assert cli._load_command_modules(("hwloop_test_does_not_exist",)) == []
    # a module that exists but imports something missing must surface the error
    import importlib

    real_import = importlib.import_module

    def fake_import(name, *a, **k):
        if name == "hwloop_test_cmd_imports_missing":
            raise ModuleNotFoundError("No module named 'some_dependency'", name="some_dependency")
        return real_import(name, *a, **k)

    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    with pytest.raises(ModuleNotFoundError, match="some_dependency"):
        cli._load_command_modules(("hwloop_test_cmd_imports_missing",))


def test_command_modules_are_the_documented_ones():
    assert cli.COMMAND_MODULES == (
        "hwloop.commands.train",
        "hwloop.commands.devices",
        "hwloop.commands.finetune",
        "hwloop.commands.serve",
        "hwloop.commands.calibrate",
        "hwloop.commands.evaluate",
        "hwloop.commands.sweep",
        "hwloop.commands.report",
        "hwloop.commands.convert",
        "hwloop.commands.export",
        "hwloop.commands.check_device",
    )


def test_train_command_registered(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--arch", "--model", "--dataset", "--epochs", "--seed", "--batch-size", "--lr",
                 "--out", "--data-dir"):
        assert flag in out


def test_train_missing_dataset_is_clean_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("hwloop.data.datasets.SYSTEM_DATA_DIR", tmp_path / "system")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("HWLOOP_DATA", raising=False)
    monkeypatch.delenv("HWLOOP_DEBUG", raising=False)
    code = cli.main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "d"),
                     "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("hwloop train: error: dataset 'mnist' (train split) not found")
    assert str(tmp_path / "d") in err and "Traceback" not in err
    assert issubclass(DatasetNotFound, HwloopError)


def test_debug_flag_after_the_subcommand_shows_the_traceback(capsys):
    from hwloop import cli
    rc = cli.main(["devices", "show", "no-such-profile", "--debug"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" in err and "no-such-profile" in err
