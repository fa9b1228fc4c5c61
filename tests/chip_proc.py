"""A virtual chip in a process of its own, for tests that measure the server (RSS, descriptors).

    python tests/chip_proc.py [--dialect frame|scpi] [--nofile N] [--idle-timeout S]

Serves :class:`fakes.FakeB1Device` on TCP loopback, prints the chip's url on the first line of
stdout, logs WARNING and above to stderr, and serves until stdin closes (or it is killed).
``--nofile`` lowers RLIMIT_NOFILE once the chip listens.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dialect", default="frame")
    ap.add_argument("--nofile", type=int, default=None)
    ap.add_argument("--idle-timeout", type=float, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s %(message)s")
    from fakes import FakeB1Device
    from hwloop.chip.server import serve
    kw = {} if args.idle_timeout is None else {"idle_timeout": args.idle_timeout}
    chip = serve(FakeB1Device(), transport="tcp", dialect=args.dialect, **kw)
    if args.nofile:
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, args.nofile))
    print(chip.url, flush=True)
    sys.stdin.read()  # until the test closes our stdin
    chip.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
