"""``hwloop serve``: run a virtual chip (an emulator profile) on a pty or a TCP port."""

from __future__ import annotations

import sys


def _parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--tcp wants HOST:PORT (PORT 0 picks a free one), got {text!r}")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve an emulated chip over a pty or TCP (frame or SCPI dialect)",
        description=(
            "Serve the emulator built from a device profile as a virtual chip, speaking the wire "
            "protocol of docs/protocol.md. Prints the pty path or bound port and the string to "
            "pass to open_device / --device. Binds loopback only unless --allow-remote."
        ),
    )
    p.add_argument("--profile", required=True, help="device profile (YAML) of the emulator")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--pty", action="store_true", help="serve on a new pseudo-terminal")
    where.add_argument("--tcp", metavar="HOST:PORT", help="serve on TCP (e.g. 127.0.0.1:0)")
    p.add_argument("--dialect", choices=("frame", "scpi"), default="frame",
                   help="frame: byte-stuffed binary frames with CRC-32 for pyserial (default); scpi: for VISA")
    p.add_argument("--chip-seed", type=int, default=None, help="seed of the chip's mismatch")
    p.add_argument("--bit-flip-rate", type=float, default=0.0, help="bit flips per byte")
    p.add_argument("--drop-rate", type=float, default=0.0, help="dropped frames per frame")
    p.add_argument("--dup-rate", type=float, default=0.0, help="duplicated frames per frame")
    p.add_argument("--delay-s", type=float, default=0.0, help="delay before every reply, s")
    p.add_argument("--disconnect-after", type=int, default=None, metavar="N",
                   help="hang up when the N-th frame arrives")
    p.add_argument("--fault-seed", type=int, default=0, help="seed of the fault injector")
    p.add_argument("--idle-timeout", type=float, default=3600.0, metavar="S",
                   help="close a link that sends nothing for S seconds (0: never; default 3600)")
    p.add_argument("--max-connections", type=int, default=64, metavar="N",
                   help="links open at once; more are closed at once (default 64)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow binding a non-loopback address (the link has no authentication)")
    p.set_defaults(func=run)


def run(args) -> int:
    # lazy: import-time cost (torch and the library load only when the command runs; `hwloop --help` stays fast)
    from hwloop.chip.server import FaultConfig, serve
    from hwloop.errors import DeviceError

    try:
        faults = FaultConfig(bit_flip_rate=args.bit_flip_rate, drop_rate=args.drop_rate,
                             dup_rate=args.dup_rate, delay_s=args.delay_s,
                             disconnect_after=args.disconnect_after, seed=args.fault_seed)
        host, port = _parse_hostport(args.tcp) if args.tcp else ("127.0.0.1", 0)
    except ValueError as e:
        raise DeviceError(str(e)) from e
    from hwloop.emulator.device import EmulatorDevice  # lazy: import-time cost (torch)

    device = EmulatorDevice.from_profile(args.profile, chip_seed=args.chip_seed)
    try:
        serve(device, transport="tcp" if args.tcp else "pty", host=host, port=port,
              dialect=args.dialect, faults=faults, foreground=True,
              allow_remote=args.allow_remote, idle_timeout=args.idle_timeout,
              max_connections=args.max_connections,
              announce=lambda line: print(line + "  (Ctrl-C stops)", flush=True))
    except (ValueError, OSError) as e:
        raise DeviceError(f"cannot serve: {e}") from e
    print("virtual chip stopped", file=sys.stderr)
    return 0
