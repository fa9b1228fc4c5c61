"""Training speed of the B1 TTFS network against its ReLU twin (issue: B1 core).

Prints JSON: samples per second of one Adam training step (forward, cross-entropy, backward,
step; B1 also runs the Eq. (8) window rule each step) for FC2 and LeNet5 at batch 8 and 128,
measured in the same process, and the ratio of times B1 / ReLU (goal <= 1.1).

Run: ``.venv/bin/python bench/train_speed.py [--seconds 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hwloop  # noqa: E402
from hwloop.ttfs.architectures import build_relu  # noqa: E402


def _steps_per_second(step, seconds: float) -> float:
    for _ in range(5):  # warm-up
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return n / (time.perf_counter() - t0)


def measure(arch: str, batch: int, seconds: float) -> dict:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, 28, 28, generator=g)
    x[x < 0.5] = 0
    y = torch.randint(0, 10, (batch,), generator=g)
    relu = build_relu(arch)
    net = hwloop.convert(build_relu(arch), x)
    loss_fn = nn.CrossEntropyLoss()
    opt_r = torch.optim.Adam(relu.parameters(), lr=1e-4)
    opt_s = torch.optim.Adam(net.parameters(), lr=1e-4)

    def relu_step():
        opt_r.zero_grad(set_to_none=True)
        loss_fn(relu(x), y).backward()
        opt_r.step()

    t_in = net.encode(x)

    def b1_step():
        opt_s.zero_grad(set_to_none=True)
        stages, logits = net.run(t_in)
        loss_fn(logits, y).backward()
        opt_s.step()
        net.adapt_windows(stages)

    r = _steps_per_second(relu_step, seconds) * batch
    s = _steps_per_second(b1_step, seconds) * batch
    return {"arch": arch, "batch": batch, "relu_samples_per_s": round(r, 1),
            "b1_samples_per_s": round(s, 1), "time_ratio_b1_over_relu": round(r / s, 3)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="measuring time per point, s")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's); 1 is steadier on a busy machine")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [measure(a, b, args.seconds) for a in ("fc2", "lenet5") for b in (8, 128)]
    print(json.dumps({"bench": "train_speed", "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "cpu": platform.processor() or platform.machine(), "goal_ratio": 1.1,
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
