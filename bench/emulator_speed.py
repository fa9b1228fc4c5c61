"""Emulator inference speed vs the plain ReLU forward pass (prints JSON).

For FC2 (784-340-10) and LeNet5 on 28x28 inputs, batch 256: samples per second of
``EmulatorDevice.run`` with every non-ideality on (the ``emulator-analog`` profile: 6-bit weights,
32 time steps, frozen mismatch, jitter, energy) against the ReLU twin's forward pass in the same
process, both float64 and float32 for the ReLU. Timing: best of ``--repeats`` rounds of
``--iters`` calls each, after a warm-up; default torch threads. Goal: emulator time <= 1.5x the
float64 ReLU forward.

    PYTHONPATH=. .venv/bin/python bench/emulator_speed.py [--repeats 5] [--iters 5] [--batch 256] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from hwloop import convert
from hwloop.emulator.device import EmulatorDevice
from hwloop.mapping import apply_windows, latency_windows, program_network
from hwloop.ttfs.architectures import build_relu


CLOCK = time.perf_counter


def _best(fn, repeats: int, iters: int) -> float:
    """Best (smallest) mean time per call over ``repeats`` rounds of ``iters`` calls."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = CLOCK()
        for _ in range(iters):
            fn()
        best = min(best, (CLOCK() - t0) / iters)
    return best


def bench(arch: str, batch: int, repeats: int, iters: int, profile: str) -> dict:
    torch.manual_seed(0)
    shape = (1, 28, 28)
    relu = build_relu(arch, shape).double().eval()
    x = torch.rand(batch, *shape, dtype=torch.float64)
    net = convert(relu, x)
    net = apply_windows(net, latency_windows(net, x, 99))
    dev = EmulatorDevice.from_profile(profile, jitter_seed=0)
    program_network(dev, net)
    t_in = net.encode(x)
    relu32 = build_relu(arch, shape).float().eval()
    x32 = x.float()
    with torch.no_grad():
        t_emu = _best(lambda: dev.run(t_in), repeats, iters)
        t_relu = _best(lambda: relu(x), repeats, iters)
        t_relu32 = _best(lambda: relu32(x32), repeats, iters)
        t_snn = _best(lambda: net.run(t_in), repeats, iters)
    return {
        "arch": arch, "batch": batch,
        "emulator_samples_per_s": batch / t_emu,
        "relu_f64_samples_per_s": batch / t_relu,
        "relu_f32_samples_per_s": batch / t_relu32,
        "ttfs_closed_form_f64_samples_per_s": batch / t_snn,
        "emulator_over_relu_f64_time": t_emu / t_relu,
        "emulator_over_relu_f32_time": t_emu / t_relu32,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--profile", default="emulator-analog")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with process CPU time instead of wall clock (robust on a shared "
                         "machine with --threads 1)")
    args = ap.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    results = [bench(a, args.batch, args.repeats, args.iters, args.profile) for a in ("fc2", "lenet5")]
    print(json.dumps({"profile": args.profile, "torch": torch.__version__,
                      "clock": "process_time" if args.cpu_time else "perf_counter",
                      "threads": torch.get_num_threads(), "machine": platform.machine(),
                      "results": results, "goal_ratio": 1.5}, indent=2))


if __name__ == "__main__":
    main()
