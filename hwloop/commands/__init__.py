"""Subcommands of the ``hwloop`` command line.

Each module listed in :data:`hwloop.cli.COMMAND_MODULES` exposes ``register(subparsers)``: it adds
its parser with ``subparsers.add_parser(name, help=...)`` and sets ``func`` with
``parser.set_defaults(func=run)``, where ``run(args) -> int | None`` calls a library function
(argument parsing only here; no math). Errors are raised as :class:`hwloop.errors.HwloopError`
subclasses; :func:`hwloop.cli.main` turns them into a message and exit code 2.
"""

DATASETS = ("fashion-mnist", "mnist", "synthetic")
ARCHS = ("fc2", "fc16", "lenet5", "vgg16")


def add_device_args(p, default: str) -> None:
    """``--device`` (one string: profile path, serial URL/port or VISA resource) and
    ``--chip-seed``, as every command that talks to a chip takes them."""
    p.add_argument("--device", default=default,
                   help=f"profile path (emulator), serial URL/port, or VISA resource (default {default})")
    p.add_argument("--chip-seed", type=int, default=None, help="emulator chip instance (frozen mismatch)")


def add_data_args(p) -> None:
    """``--dataset``, ``--data-dir`` and ``--arch`` of the commands that build the ReLU twin."""
    p.add_argument("--dataset", default="fashion-mnist", choices=DATASETS)
    p.add_argument("--data-dir", default=None, help="directory holding the IDX files")
    p.add_argument("--arch", default="fc2", choices=ARCHS)
