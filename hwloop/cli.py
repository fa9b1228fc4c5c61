"""The ``hwloop`` command line: argument parsing only, every command calls a library function.

Subcommands live in the modules of :data:`COMMAND_MODULES`; each exposes ``register(subparsers)``
(see :mod:`hwloop.commands`). A module that does not exist yet is skipped, so the command line
works while parts of the package are still being written.

Exit codes: 0 success, 2 usage error or an :class:`~hwloop.errors.HwloopError` (message on
stderr, no traceback unless ``--debug``), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence

from hwloop.errors import HwloopError

COMMAND_MODULES: tuple[str, ...] = (
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

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("hwloop")
        except PackageNotFoundError:
            return "0.1.0+unknown"
    except ImportError:  # pragma: no cover
        return "unknown"


def _load_command_modules(names: Sequence[str]) -> list:
    """Import each command module; skip those that do not exist (that exact module only).

    A module that exists but fails to import because *it* imports something missing is a real
    bug, so that error propagates.
    """
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
    return modules


def build_parser(modules: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """Build the top-level parser with every available subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="hwloop",
        description=(
            "Hardware-in-the-loop training for time-to-first-spike (TTFS) neuromorphic chips "
            "(B1 model, Stanojevic et al. 2024)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--debug",
        action="store_true",
        default=bool(os.environ.get("HWLOOP_DEBUG")),
        help="show full tracebacks on errors (also: HWLOOP_DEBUG=1)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _load_command_modules(COMMAND_MODULES if modules is None else modules):
        register = getattr(module, "register", None)
        if register is None:
            raise RuntimeError(f"command module {module.__name__} has no register(subparsers)")
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line, also after the subcommand
    debug = "--debug" in argv[1:]
    if debug:
        argv = [argv[0]] + [a for a in argv[1:] if a != "--debug"]
    args = parser.parse_args(argv)
    args.debug = bool(args.debug or debug)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    try:
        result = func(args)
    except HwloopError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"hwloop {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        # a file or port the user named: missing, not writable, refused ...
        if args.debug:
            traceback.print_exc()
        print(f"hwloop {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, OverflowError) as exc:
        # bad values that reached a library check (pydantic's ValidationError is a ValueError);
        # --debug shows where
        if args.debug:
            traceback.print_exc()
        print(f"hwloop {args.command}: error: {_one_line(exc)} (--debug for details)",
              file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as exc:
        # a command may attach how to continue (e.g. finetune: the exact resume command)
        hint = getattr(exc, "hint", None)
        print(f"\nhwloop {args.command}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    return int(result or 0)


def _one_line(exc: Exception) -> str:
    """A pydantic ValidationError as 'field=value: message'; other errors as their text."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            e = errors()[0]
            loc = ".".join(str(x) for x in e.get("loc", ()))
            msg = str(e.get("msg", ""))
            if msg.startswith("Value error, "):  # pydantic's prefix for a validator's ValueError
                msg = msg[len("Value error, "):]
            return f"invalid {loc}={e.get('input')!r}: {msg}"
        except Exception:  # pragma: no cover - fall back to the plain text
            pass
    return " ".join(str(exc).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
