"""Make the figures of docs/model.md (paper Fig. 2 and Fig. 3 analogues).

Run: ``.venv/bin/python docs/make_figures.py`` (about a minute on 2 cores). Writes
``docs/figures/jacobian_spectra.png`` and ``docs/figures/trajectory_cosine.png`` and prints the
numbers it plotted as JSON.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import hwloop  # noqa: E402
from hwloop.ttfs import SpikingDense  # noqa: E402
from hwloop.ttfs.analysis import cosine_similarity, spike_time_jacobians  # noqa: E402


def deep_net(model: str, layers=8, width=340, seed=0):
    g = torch.Generator().manual_seed(seed)
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(width, width).double(), nn.ReLU()]
    mods.append(nn.Linear(width, 10).double())
    x = torch.rand(8, width, generator=g, dtype=torch.float64)
    net = hwloop.convert(nn.Sequential(*mods), x)
    with torch.no_grad():
        for layer in net.layers:
            if isinstance(layer, SpikingDense):
                layer.weight.copy_(torch.randn(width, width, generator=g, dtype=torch.float64) / width ** 0.5)
                layer.D.zero_()
                layer.model = model
        net.init_windows(x)
    return net, x


def fig2(out):
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    radii = {}
    for ax, model in zip(axes, ("alpha1", "b1")):
        net, x = deep_net(model)
        J = spike_time_jacobians(net, x[0])[4]  # a layer in the middle of the stack
        ev = torch.linalg.eigvals(J).numpy()
        ax.scatter(ev.real, ev.imag, s=4)
        th = torch.linspace(0, 6.3, 200)
        ax.plot(torch.cos(th), torch.sin(th), "k--", lw=0.8)
        r = float(abs(ev).max())
        radii[model] = r
        ax.set_title(f"{model}: spectral radius {r:.2f}")
        ax.set_xlabel("Re")
        ax.set_ylabel("Im")
        ax.set_aspect("equal", adjustable="datalim")
    fig.suptitle("Eigenvalues of dt^(5)/dt^(4), 8 layers x 340, W ~ N(0,1)/sqrt(340)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return radii


def fig3(out, steps=400, lr=0.1):
    g = torch.Generator().manual_seed(0)
    d, h, k, n = 36, 24, 4, 512
    protos = torch.rand(k, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    x = (protos[y] + 0.25 * torch.randn(n, d, generator=g, dtype=torch.float64)).clamp(0, 1)
    torch.manual_seed(1)
    relu = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, k)).double()
    with torch.no_grad():
        for m in relu:
            if isinstance(m, nn.Linear):
                m.weight.mul_(0.3)
    nets = {"relu": relu, "b1": hwloop.convert(copy.deepcopy(relu), x),
            "alpha1": hwloop.convert(copy.deepcopy(relu), x, model="alpha1")}
    opts = {kk: torch.optim.SGD(v.parameters(), lr=lr) for kk, v in nets.items()}
    cos = {"b1": [], "alpha1": []}
    for s in range(steps):
        i = (s * 16) % n
        for kk, m in nets.items():
            opts[kk].zero_grad()
            nn.functional.cross_entropy(m(x[i:i + 16]), y[i:i + 16]).backward()
            opts[kk].step()
        for kk in cos:
            cos[kk].append(cosine_similarity(nets["relu"], nets[kk]))
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(cos["b1"], label="B1 vs ReLU")
    ax.plot(cos["alpha1"], label="alpha1 vs ReLU")
    ax.set_xlabel("SGD step (batch 16, lr 0.1)")
    ax.set_ylabel("cosine similarity of weights")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return {kk: [round(v[j], 6) for j in (0, steps // 4, steps // 2, steps - 1)] for kk, v in cos.items()}


if __name__ == "__main__":
    os.makedirs(os.path.join(HERE, "figures"), exist_ok=True)
    r = fig2(os.path.join(HERE, "figures", "jacobian_spectra.png"))
    c = fig3(os.path.join(HERE, "figures", "trajectory_cosine.png"))
    print(json.dumps({"spectral_radius_layer5": r, "cosine_at_steps_0_100_200_399": c}, indent=2))
