"""Subcommands of the ``hwloop`` command line.

Each module listed in :data:`hwloop.cli.COMMAND_MODULES` exposes ``register(subparsers)``: it adds
its parser with ``subparsers.add_parser(name, help=...)`` and sets ``func`` with
``parser.set_defaults(func=run)``, where ``run(args) -> int | None`` calls a library function
(argument parsing only here; no math). Errors are raised as :class:`hwloop.errors.HwloopError`
subclasses; :func:`hwloop.cli.main` turns them into a message and exit code 2.
"""

DATASETS = ("fashion-mnist", "mnist", "synthetic")
ARCHS = ("fc2", "fc16", "lenet5", "vgg16")


def dataset_name(value: str) -> str:
    """``--dataset`` spelled any way (``fashion_mnist``, ``Fashion-MNIST``): one recorded name."""
    return str(value).strip().lower().replace("_", "-")


def add_device_args(p, default: str, sentinel: bool = False) -> None:
    """``--device`` (one string: a profile path or a bare profile name such as
    ``emulator-harsh``, a serial URL/port or a VISA resource) and ``--chip-seed``, as every
    command that talks to a chip takes them. ``sentinel``: the parsed default is None (the
    command fills it in), so a command can tell an option given from one left out."""
    p.add_argument("--device", default=None if sentinel else default,
                   help="profile path or name (emulator, e.g. emulator-harsh), serial URL/port, or "
                        f"VISA resource (default {default})")
    p.add_argument("--chip-seed", type=int, default=None, help="emulator chip instance (frozen mismatch)")


def add_data_args(p, sentinel: bool = False) -> None:
    """``--dataset``, ``--data-dir`` and ``--arch`` of the commands that build the ReLU twin."""
    p.add_argument("--dataset", default=None if sentinel else "fashion-mnist", type=dataset_name,
                   choices=DATASETS, help="default fashion-mnist")
    p.add_argument("--data-dir", default=None, help="directory holding the IDX files")
    p.add_argument("--arch", default=None if sentinel else "fc2", choices=ARCHS, help="default fc2")


def clean_msg(msg: str) -> str:
    """pydantic's error message without its ``Value error, `` prefix."""
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg
