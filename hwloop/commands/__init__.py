"""Subcommands of the ``hwloop`` command line.

Each module listed in :data:`hwloop.cli.COMMAND_MODULES` exposes ``register(subparsers)``: it adds
its parser with ``subparsers.add_parser(name, help=...)`` and sets ``func`` with
``parser.set_defaults(func=run)``, where ``run(args) -> int | None`` calls a library function
(argument parsing only here; no math). Errors are raised as :class:`hwloop.errors.HwloopError`
subclasses; :func:`hwloop.cli.main` turns them into a message and exit code 2.
"""
