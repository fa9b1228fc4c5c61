"""Training dynamics: B1 follows the ReLU trajectory, alpha1 drifts (Fig. 3); Jacobian spectra (Fig. 2)."""

import copy

import torch
from torch import nn

import hwloop
from hwloop.ttfs import SpikingDense
from hwloop.ttfs.analysis import cosine_similarity, spectral_radii, spike_time_jacobians


def _task(n=256, d=36, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(k, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    x = (protos[y] + 0.25 * torch.randn(n, d, generator=g, dtype=torch.float64)).clamp(0, 1)
    return x, y


def _relu(d=36, h=24, k=4, seed=1, scale=1.0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, k)).double()
    with torch.no_grad():
        for mod in m:
            if isinstance(mod, nn.Linear):
                mod.weight.mul_(scale)
    return m


def _train(model, x, y, steps, lr, batch=16, on_step=None):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    history = []
    for s in range(steps):
        i = (s * batch) % x.shape[0]
        xb, yb = x[i:i + batch], y[i:i + batch]
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()
        if on_step is not None:
            on_step(model, xb)
        history.append(copy.deepcopy(model))
    return history


def test_b1_and_relu_follow_the_same_trajectory():
    x, y = _task()
    relu = _relu()
    net = hwloop.convert(copy.deepcopy(relu), x)
    adapted = []

    def adapt(model, xb):
        adapted.append(model.adapt_windows(model.spike_times(xb)))

    steps, lr = 120, 0.05
    hr = _train(relu, x, y, steps, lr)
    hs = _train(net, x, y, steps, lr, on_step=adapt)
    worst = 0.0
    for a, b in zip(hr, hs):
        twin = b.to_relu()
        for pa, pb in zip(a.parameters(), twin.parameters()):
            worst = max(worst, float((pa - pb).detach().abs().max()))
    assert worst <= 1e-6
    # the trajectory really moved
    moved = float((hr[-1][0].weight - _relu()[0].weight).detach().abs().max())
    assert moved > 1e-2


def test_alpha1_from_equivalent_init_diverges_from_relu():
    x, y = _task()
    relu = _relu(scale=0.3)  # small row sums: the alpha1 mapping B = 1/(1 - sum_j w_ij) exists
    a1 = hwloop.convert(copy.deepcopy(relu), x, model="alpha1")
    b1 = hwloop.convert(copy.deepcopy(relu), x, model="b1")
    assert (a1(x) - relu(x)).abs().max() <= 1e-9  # equivalent at initialisation
    nets = [relu, a1, b1]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in nets]
    cos_a, cos_b = [], []
    for s in range(200):
        i = (s * 16) % x.shape[0]
        for m, o in zip(nets, opts):
            o.zero_grad()
            nn.functional.cross_entropy(m(x[i:i + 16]), y[i:i + 16]).backward()
            o.step()
        if s % 10 == 9:
            cos_a.append(cosine_similarity(relu, a1))
            cos_b.append(cosine_similarity(relu, b1))
    print("alpha1 cosine similarity, every 20 steps:", [round(c, 4) for c in cos_a[1::2]])
    assert min(cos_b) > 1 - 1e-9
    assert cos_a[-1] < 0.99  # alpha1 drifts away from the ReLU trajectory
    assert cos_a[-1] < cos_a[0] - 0.01


def _deep_net(model, layers=8, width=340, seed=0):
    """8 layers of 340 units, W ~ N(0, 1)/sqrt(340) taken as the SNN weights (Fig. 2)."""
    g = torch.Generator().manual_seed(seed)
    mods = []
    d = width
    for _ in range(layers):
        lin = nn.Linear(d, width).double()
        mods += [lin, nn.ReLU()]
    mods.append(nn.Linear(width, 10).double())
    relu = nn.Sequential(*mods)
    x = torch.rand(8, width, generator=g, dtype=torch.float64)
    net = hwloop.convert(relu, x)
    with torch.no_grad():
        for layer in net.layers:
            if isinstance(layer, SpikingDense):
                layer.weight.copy_(torch.randn(width, width, generator=g, dtype=torch.float64) / width ** 0.5)
                layer.D.zero_()
                if model == "alpha1":
                    layer.model = "alpha1"
        net.init_windows(x)
    return net, x


def test_jacobian_formula_matches_autograd():
    net, x = _deep_net("b1", layers=2, width=20)
    J = spike_time_jacobians(net, x[0])[1]
    stages = net.spike_times(x[:1])
    t1 = stages[1].detach().clone().requires_grad_(True)
    t2 = net.layers[1](t1)
    fired = torch.isfinite(t2[0])
    auto = torch.zeros_like(J)
    for i in torch.nonzero(fired).flatten().tolist():
        g, = torch.autograd.grad(t2[0, i], t1, retain_graph=True)
        auto[i] = torch.nan_to_num(g[0], nan=0.0)
    mask_in = torch.isfinite(stages[1][0])
    auto[:, ~mask_in] = 0
    assert (auto - J).abs().max() <= 1e-12


def test_spectral_radius_b1_below_one_alpha1_above():
    b1, x = _deep_net("b1")
    a1, _ = _deep_net("alpha1")
    rb = spectral_radii(spike_time_jacobians(b1, x[0])[1:])
    ra = spectral_radii(spike_time_jacobians(a1, x[0])[1:])
    assert max(rb) <= 1.05
    assert max(ra) > 1.0
    assert sum(ra) / len(ra) > 1.5 * sum(rb) / len(rb)
