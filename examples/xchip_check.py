"""Start a virtual XC-1 chip, open it by its URL scheme (entry point) and run the conformance
suite on it, with the stall and hang-up hooks the virtual chip offers."""

from hwloop.devices.open import open_device
from hwloop.testing import check_device
from hwloop_example_chip.server import serve_example_chip


def main() -> int:
    chip = serve_example_chip(chip_seed=3)
    try:
        dev = open_device(chip.url, timeout=0.5)  # found through the hwloop.devices entry point
        report = check_device(dev, stall=chip.stall, hangup=chip.hangup)
    finally:
        chip.stop()
    print(report.format_table())
    return 0 if report.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
