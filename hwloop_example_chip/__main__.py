"""``python -m hwloop_example_chip [--profile P] [--port N] [--chip-seed S]``: serve a virtual
XC-1 on 127.0.0.1 until Ctrl-C; prints the URL to pass to ``--device``."""

from __future__ import annotations

import argparse
import time

from hwloop_example_chip.server import serve_example_chip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hwloop_example_chip", description=__doc__)
    p.add_argument("--profile", default="emulator-analog", help="emulator profile of the physics")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--chip-seed", type=int, default=None)
    p.add_argument("--jitter-sd", type=float, default=None)
    a = p.parse_args(argv)
    chip = serve_example_chip(a.profile, chip_seed=a.chip_seed, port=a.port, jitter_sd=a.jitter_sd)
    print(f"XC-1 virtual chip; url: {chip.url}  (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        chip.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
