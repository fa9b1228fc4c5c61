"""B1 TTFS network == ReLU network: activations, logits, gradients (paper Eq. (2), (9))."""

import math

import pytest
import torch
from torch import nn

import hwloop
from hwloop.errors import ConversionError, DataError
from hwloop.ttfs import SignedMaxPool2d, backward_from_spike_times, encode
from hwloop.ttfs.architectures import build_relu

torch.manual_seed(0)


def _randomize_bn(model, g):
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g, dtype=torch.float64) * 1.5 + 0.5)
            sign = torch.where(torch.rand(n, generator=g) < 0.3, -1.0, 1.0).double()
            m.weight.data.copy_((torch.rand(n, generator=g, dtype=torch.float64) + 0.5) * sign)
            m.bias.data.copy_(torch.rand(n, generator=g, dtype=torch.float64) - 0.5)


def _relu_stage_outputs(model, x):
    """ReLU activations after every ReLU (and every pool) in order of the TTFS stages."""
    outs, h = [], x
    for m in model:
        h = m(h)
        if isinstance(m, (nn.ReLU, nn.MaxPool2d, SignedMaxPool2d)):
            outs.append(h)
    return outs


def _nets():
    g = torch.Generator().manual_seed(7)
    fc = nn.Sequential(nn.Flatten(), nn.Linear(36, 20), nn.BatchNorm1d(20), nn.ReLU(), nn.Dropout(0.2),
                       nn.Linear(20, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 5))
    conv = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(), nn.BatchNorm2d(6),      # BN after ReLU
        nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(),                                    # -> in_shift
        nn.Conv2d(5, 5, 2, stride=1, padding=0), nn.ReLU(), nn.BatchNorm2d(5),       # BN, negative
        nn.MaxPool2d(2, 1),                                                          # -> signed pool
        nn.Conv2d(5, 4, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4, 3))
    for m in (fc, conv):
        m.double()
        _randomize_bn(m, g)
        m.eval()
    return [("fc", fc, (1, 6, 6)), ("conv", conv, (1, 12, 12))]


@pytest.mark.parametrize("name,relu,shape", _nets(), ids=["fc", "conv"])
def test_b1_stages_and_logits_equal_relu(name, relu, shape):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(32, *shape, generator=g, dtype=torch.float64)
    x[x < 0.2] = 0.0  # silent input pixels
    net = hwloop.convert(relu, x)
    assert net.layers[-1].weight.dtype == torch.float64
    stages = net.spike_times(x)
    acts = net.activations(stages)
    # hidden stages: (t_max - t) equals the ReLU twin's activation (Eq. (2)); silent exactly
    # where the ReLU unit is zero. The twin itself reproduces the original's logits.
    hidden = acts[1:]
    twin = net.to_relu()
    assert (twin(x) - relu(x)).abs().max() <= 1e-9
    twin_outs = _relu_stage_outputs(twin, x)
    for a, r, t in zip(hidden, [o for o in twin_outs], stages[1:]):
        assert a.shape == r.shape
        assert (a - r).abs().max() <= 1e-9
        assert torch.equal(torch.isinf(t), r == 0)
    assert (net(x) - relu(x)).abs().max() <= 1e-9
    # input stage: the TTFS code of Eq. (input coding), inf for x = 0
    assert torch.equal(stages[0], encode(x))
    # hidden spike times lie inside their windows
    refs = net.stage_refs()
    for t, r in zip(stages[1:], refs[1:]):
        fin = t[torch.isfinite(t)]
        assert bool((fin < r).all())


def test_signed_pool_and_in_shift_were_used():
    name, relu, shape = _nets()[1]
    x = torch.rand(4, *shape, dtype=torch.float64)
    net = hwloop.convert(relu, x)
    kinds = [l.kind for l in net.layers]
    assert kinds.count("maxpool2d") == 2
    pools = [l for l in net.layers if l.kind == "maxpool2d"]
    assert pools[1].sign is not None and bool((pools[1].sign < 0).any())
    convs = [l for l in net.layers if l.kind == "conv2d"]
    assert convs[2].in_shift is not None  # BN after ReLU before a zero-padded conv


@pytest.mark.parametrize("name,relu,shape", _nets(), ids=["fc", "conv"])
def test_gradients_equal_relu_and_recorded_backward(name, relu, shape):
    g = torch.Generator().manual_seed(5)
    x = torch.rand(16, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, relu[-1].out_features, (16,), generator=g)
    net = hwloop.convert(relu, x)
    twin = net.to_relu()
    loss_fn = nn.CrossEntropyLoss()
    logits = net(x)
    loss_fn(logits, y).backward()
    loss_fn(twin(x), y).backward()
    # pair parameters: TTFS (W, D) <-> ReLU (weight, bias), in order
    snn_params = [(k, p) for k, p in net.named_parameters()]
    relu_params = [(k, p) for k, p in twin.named_parameters()]
    assert len(snn_params) == len(relu_params)
    for (ks, ps), (kr, pr) in zip(snn_params, relu_params):
        assert ps.shape == pr.shape, (ks, kr)
        assert (ps.grad - pr.grad).abs().max() <= 1e-9, (ks, kr)
    # standalone backward from recorded spike times
    stages = [t.detach() for t in net.spike_times(x)]
    logits = net.forward_times(stages[0])
    glog = torch.autograd.grad(loss_fn(logits, y), logits)[0]
    grads = backward_from_spike_times(net, stages, glog)
    assert set(grads) == {k for k, _ in snn_params}
    for k, p in snn_params:
        assert (grads[k] - p.grad).abs().max() <= 1e-9, k


def test_float32_default_close():
    relu = build_relu("fc2", (1, 28, 28), 10)
    x = torch.rand(64, 1, 28, 28)
    net = hwloop.convert(relu, x)
    assert net.layers[-1].weight.dtype == torch.float32
    assert (net(x) - relu(x)).abs().max() <= 1e-4


def test_bad_inputs_are_clear_errors():
    relu = build_relu("fc2", (1, 28, 28), 10)
    x = torch.rand(4, 1, 28, 28)
    net = hwloop.convert(relu, x)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        net(bad)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        net(x * 3)
    with pytest.raises(DataError, match="shape"):
        net(x[:, :, :10])
    # average pooling is linear: it folds exactly into the next layer (traced conversion)
    avg = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(2 * 13 * 13, 3)).double()
    folded = hwloop.convert(avg, x.double(), dtype=torch.float64)
    assert (folded(x.double()) - avg(x.double())).abs().max() < 1e-9
    with pytest.raises(ConversionError, match="Tanh"):
        hwloop.convert(nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.Tanh(), nn.Linear(8, 3)), x)
    with pytest.raises(ConversionError, match="Linear readout"):
        hwloop.convert(nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.ReLU()), x)
    with pytest.raises(ConversionError, match="Sigmoid"):
        hwloop.convert(nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Sigmoid(), nn.Linear(10, 2)), x)


def test_convert_round_trip_of_to_relu():
    name, relu, shape = _nets()[1]
    x = torch.rand(8, *shape, dtype=torch.float64)
    net = hwloop.convert(relu, x)
    net2 = hwloop.convert(net.to_relu(), x)
    assert (net2(x) - net(x)).abs().max() <= 1e-12


def test_adapt_windows_eq8_keeps_function():
    relu = build_relu("fc2", (1, 8, 8), 4).double()
    x = torch.rand(16, 1, 8, 8, dtype=torch.float64)
    net = hwloop.convert(relu, x)
    before = net(x)
    (t_min, t_max), = net.windows()
    with torch.no_grad():
        net.layers[1].weight.mul_(50.0)  # activations now far exceed the window
    stages = net.spike_times(x)
    amax = float(net.activations(stages)[1].max().detach())
    assert amax * 10 > t_max - t_min
    assert net.adapt_windows(stages)
    (t_min2, t_max2), = net.windows()
    assert t_min2 == t_min
    assert math.isclose(t_max2 - t_min2, 10 * amax, rel_tol=1e-12)
    # a second call with the same activations changes nothing
    assert not net.adapt_windows(net.spike_times(x))
    assert (net.to_relu()(x) - net(x)).abs().max() <= 1e-9
    del before


def test_recorded_backward_with_l1_matches_autograd():
    name, relu, shape = _nets()[1]
    g = torch.Generator().manual_seed(11)
    x = torch.rand(8, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    net = hwloop.convert(relu, x)
    stages = net.spike_times(x)
    logits = net.forward_times(stages[0])
    from hwloop.ttfs import l1_penalty
    loss = nn.functional.cross_entropy(logits, y) + l1_penalty(net, stages, 0.01)
    loss.backward()
    det = [t.detach() for t in stages]
    logits2 = net.forward_times(det[0]).detach().requires_grad_(True)
    glog = torch.autograd.grad(nn.functional.cross_entropy(logits2, y), logits2)[0]
    grads = backward_from_spike_times(net, det, glog, l1=0.01)
    for k, p in net.named_parameters():
        assert (grads[k] - p.grad).abs().max() <= 1e-9, k


@pytest.mark.parametrize("arch,shape,width", [("fc16", (1, 8, 8), 1.0), ("lenet5", (1, 28, 28), 1.0),
                                              ("vgg16", (3, 32, 32), 0.0625)])
def test_paper_architectures_convert_exactly(arch, shape, width):
    """FC16, LeNet5 and the VGG16 of the Methods (BN after ReLU, at 1/16 width) in float64."""
    g = torch.Generator().manual_seed(2)
    relu = build_relu(arch, shape, 10, width=width).double()
    _randomize_bn(relu, g)
    relu.eval()
    x = torch.rand(6, *shape, generator=g, dtype=torch.float64)
    net = hwloop.convert(relu, x)
    assert (net(x) - relu(x)).abs().max() <= 1e-9
    n_conv = sum(isinstance(m, nn.Conv2d) for m in relu)
    assert sum(l.kind == "conv2d" for l in net.layers) == n_conv
    if arch == "vgg16":
        assert n_conv == 13 and any(getattr(l, "in_shift", None) is not None for l in net.layers)


def test_recorded_backward_with_clamped_windows_matches_autograd():
    """Shrunk windows with early spikes clamped at t_min (Methods (ii)/(iv)): the recorded-time
    backward equals autograd through the clamped closed form (no gradient where it saturates)."""
    for name, relu, shape in _nets():
        g = torch.Generator().manual_seed(13)
        x = torch.rand(16, *shape, generator=g, dtype=torch.float64)
        y = torch.randint(0, relu[-1].out_features, (16,), generator=g)
        net = hwloop.convert(relu, x)
        acts = net.activations(net.spike_times(x))
        widths = []
        for i, layer in enumerate(net.layers):
            if layer.kind in ("dense", "conv2d"):
                a = acts[net._stage_index(i)]
                widths.append(float(torch.quantile(a[a > 0].detach(), 0.8)))  # 20 % come early
        net.set_widths(widths)
        net.set_clamp_early(True)
        stages = net.spike_times(x)
        early = sum(int((s == l.t_min).sum()) for s, l in
                    zip([stages[net._stage_index(i)] for i, l in enumerate(net.layers)
                         if l.kind in ("dense", "conv2d")], net.neuron_layers()))
        assert early > 0
        loss = nn.functional.cross_entropy(net.forward_times(stages[0]), y)
        loss.backward()
        det = [t.detach() for t in stages]
        logits = net.forward_times(det[0]).detach().requires_grad_(True)
        glog = torch.autograd.grad(nn.functional.cross_entropy(logits, y), logits)[0]
        grads = backward_from_spike_times(net, det, glog)
        for k, p in net.named_parameters():
            assert (grads[k] - p.grad).abs().max() <= 1e-9, (name, k)
