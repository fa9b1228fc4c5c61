"""Conversion from the traced graph: the layers people publish convert exactly (float64), every
stage against the ReLU activations; what has no exact twin is a clear error (issue #15)."""

import json

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import hwloop
from hwloop.cli import main
from hwloop.errors import ConversionError
from hwloop.ttfs.architectures import build_relu
from hwloop.ttfs.equivalence import equivalence, twin_stage_outputs
from hwloop.ttfs.pooling import PaddedMaxPool2d, relu_twin


# ----------------------------------------------------------------------------- models
class ViewFlatten(nn.Module):
    """The user-defined flatten of many published models."""

    def forward(self, x):
        return x.view(x.size(0), -1)


class FunctionalLeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 6, 3)
        self.fc, self.out = nn.Linear(6 * 2 * 2, 8), nn.Linear(8, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(torch.relu(self.c2(x)), kernel_size=2, stride=2)
        x = x.view(-1, 6 * 2 * 2)
        x = F.dropout(F.relu(self.fc(x)), 0.5, self.training)
        return self.out(x)


class FunctionalParams(nn.Module):
    """F.conv2d / F.linear / F.batch_norm with parameters, clamp(min=0), arithmetic, mean."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w1 = nn.Parameter(torch.randn(4, 1, 3, 3, generator=g) * 0.5)
        self.b1 = nn.Parameter(torch.randn(4, generator=g) * 0.1)
        self.register_buffer("rm", torch.rand(4, generator=g))
        self.register_buffer("rv", torch.rand(4, generator=g) + 0.5)
        self.w2 = nn.Parameter(torch.randn(3, 4, generator=g))

    def forward(self, x):
        x = F.conv2d(x, self.w1, self.b1, padding=1)
        x = F.batch_norm(x, self.rm, self.rv, training=False)
        x = torch.clamp(x * 2.0 + 0.1, min=0)
        x = x.mean((2, 3))
        return F.linear(x, self.w2)


def _with_bn(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            sign = torch.where(torch.rand(n, generator=g) < 0.4, -1.0, 1.0)
            sign[0] = -1.0  # at least one min pool / negative scale
            m.weight.data.copy_((torch.rand(n, generator=g) + 0.5) * sign)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def _models():
    """(id, model, per-sample input shape). The ONNX tests reuse them."""
    return [
        ("user_flatten", nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), ViewFlatten(),
                                       nn.Linear(3 * 10 * 10, 6), nn.ReLU(), nn.Linear(6, 3)), (1, 12, 12)),
        ("functional_lenet", FunctionalLeNet(), (1, 12, 12)),
        ("maxpool_3_2_1", nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                                        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
                                        nn.Flatten(), nn.Linear(4 * 3 * 3, 3)), (1, 12, 12)),
        ("avgpool", nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                                  nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2, stride=1),
                                  nn.Flatten(), nn.Linear(4 * 5 * 5, 3)), (1, 12, 12)),
        ("adaptive_avgpool", nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(3),
                                           nn.Conv2d(4, 5, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                           nn.Flatten(), nn.Linear(5, 3)), (1, 12, 12)),
        ("nested", nn.Sequential(nn.Sequential(nn.Conv2d(1, 3, 3), nn.Sequential(nn.ReLU(), nn.MaxPool2d(2))),
                                 nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(3 * 5 * 5, 7), nn.ReLU()),
                                               nn.Identity(), nn.Dropout(0.3)),
                                 nn.Linear(7, 3)), (1, 12, 12)),
    ]


def _extra_models():
    return [
        ("signed_padded_pool", _with_bn(nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4), nn.MaxPool2d(3, 2, 1),
            nn.Conv2d(4, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 3)))),
        ("pool_before_relu", nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(3, 2, 1), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1), nn.AvgPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3))),
        ("dilated_ceil_pool", nn.Sequential(
            nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1, dilation=2), nn.Conv2d(3, 3, 2), nn.ReLU(),
            nn.MaxPool2d(2, 2, ceil_mode=True), nn.Flatten(), nn.Linear(3 * 2 * 2, 3))),
        ("bn_around_avgpool", _with_bn(nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4), nn.AvgPool2d(2), nn.BatchNorm2d(4),
            nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((2, 3)), nn.Flatten(),
            nn.BatchNorm1d(24), nn.Linear(24, 3)))),
        ("grouped_dilated_conv", nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4),
            nn.ReLU(), nn.Conv2d(4, 6, 1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 12 * 12, 3))),
        ("functional_params", FunctionalParams()),
    ]


# ----------------------------------------------------------------------------- helpers
def _original_stages(model, x):
    """The original model's activations after every ReLU and max pool (fx interpreter)."""
    gm = fx.symbolic_trace(model)
    outs = [x]

    class Rec(fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            mod = self.module.get_submodule(n.target) if n.op == "call_module" else None
            name = getattr(n.target, "__name__", str(n.target))
            if isinstance(mod, (nn.ReLU, nn.MaxPool2d)) or (n.op == "call_function" and name in ("relu", "max_pool2d")):
                outs.append(v)
            return v

    Rec(gm).run(x)
    return outs


def _check_exact(model, x, original_stages=True):
    model = model.double().eval()
    x = x.double()
    net = hwloop.convert(model, x)
    with torch.no_grad():
        ref = model(x)
        assert (net(x) - ref).abs().max() <= 1e-9
        stages = net.spike_times(x)
        acts = net.activations(stages)
        twin_acts, twin_logits = twin_stage_outputs(relu_twin(net), x)
        assert (twin_logits - ref).abs().max() <= 1e-9
        assert len(acts) == len(twin_acts)
        for a, r, t in zip(acts[1:], twin_acts[1:], stages[1:]):
            assert a.shape == r.shape
            assert (a - r).abs().max() <= 1e-9
            assert torch.equal(torch.isinf(t), r == 0)  # silent exactly where the ReLU is 0
        if original_stages:
            orig = _original_stages(model, x)
            assert len(orig) == len(acts)
            for a, r in zip(acts, orig):
                assert (a - r).abs().max() <= 1e-9
        assert equivalence(net, model, x)["exact"]
    return net


def _x(shape, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g, dtype=torch.float64)
    x[x < 0.2] = 0.0
    return x


# ----------------------------------------------------------------------------- exact conversions
@pytest.mark.parametrize("name,model,shape", _models(), ids=[m[0] for m in _models()])
def test_published_shapes_convert_exactly(name, model, shape):
    torch.manual_seed(0)
    net = _check_exact(model, _x(shape))
    if name == "maxpool_3_2_1":
        pools = [l for l in net.layers if l.kind == "maxpool2d"]
        assert len(pools) == 2 and all(isinstance(p, PaddedMaxPool2d) for p in pools)
        assert pools[0].padding == (1, 1) and pools[0].stride == (2, 2)
    if name in ("avgpool", "adaptive_avgpool"):  # folded: no stage of their own
        assert [l.kind for l in net.layers] == ["conv2d", "conv2d", "flatten", "readout"]


@pytest.mark.parametrize("name,model", _extra_models(), ids=[m[0] for m in _extra_models()])
def test_more_exact_placements(name, model):
    shape = (1, 12, 12)
    _check_exact(model, _x(shape), original_stages=name in ("dilated_ceil_pool", "grouped_dilated_conv"))


def test_avgpool_folds_into_dense_fan_in():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2 * 13 * 13, 3))
    net = _check_exact(model, _x((1, 28, 28), n=4))
    assert net.layers[-1].in_features == 2 * 26 * 26  # the pool is in the readout's weights


def test_torch_export_program_converts():
    model = FunctionalLeNet().double().eval()
    ep = torch.export.export(model, (_x((1, 12, 12), n=2),))
    x = _x((1, 12, 12), n=2)  # an exported program is specialised to its example batch
    net = hwloop.convert(ep.module(), x)
    assert (net(x) - model(x)).abs().max() <= 1e-9


def test_twin_round_trip_and_existing_api():
    model = _extra_models()[0][1].double().eval()
    x = _x((1, 12, 12))
    net = hwloop.convert(model, x)
    net2 = hwloop.convert(relu_twin(net), x)  # PaddedSignedMaxPool2d converts back
    assert (net2(x) - net(x)).abs().max() <= 1e-12
    net32 = hwloop.convert(build_relu("lenet5", (1, 28, 28), 10), torch.rand(8, 1, 28, 28))
    assert net32.layers[-1].weight.dtype == torch.float32


# ----------------------------------------------------------------------------- errors
class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 2)

    def forward(self, x):
        x = x.flatten(1)
        h = torch.relu(self.fc1(x))
        return self.out(torch.relu(self.fc2(h)) + h)


class _Sigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(16, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.sigmoid(self.fc(x.flatten(1))))


class _Branch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 2), nn.Linear(16, 2)

    def forward(self, x):
        x = x.flatten(1)
        return self.a(x) - self.b(x)


class _Control(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))


def _fc(*mods, n_in=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(n_in, 8), *mods)


ERRORS = [
    ("tanh", _fc(nn.Tanh(), nn.Linear(8, 2)), "Tanh is not ReLU"),
    ("sigmoid", _Sigmoid(), r"sigmoid is not ReLU.*exact twin"),
    ("leaky_relu", _fc(nn.LeakyReLU(), nn.Linear(8, 2)), "negative activation has no spike time"),
    ("relu6", _fc(nn.ReLU6(), nn.Linear(8, 2)), "clips activations"),
    ("residual", _Residual(), "combines several activations.*residual add"),
    ("branch", _Branch(), "a second time"),
    ("relu_after_readout", _fc(nn.ReLU(), nn.Linear(8, 2), nn.ReLU()), "Linear readout.*no ReLU after it"),
    ("softmax", _fc(nn.ReLU(), nn.Linear(8, 2), nn.Softmax(dim=1)), "softmax after the readout"),
    ("control_flow", _Control(), "could not be traced with torch.fx"),
    ("avg_then_max", nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.AvgPool2d(2), nn.MaxPool2d(2),
                                   nn.Flatten(), nn.Linear(2, 2)), "max pooling after an average pool"),
    ("adaptive_unequal_before_conv", nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(3),
                                                   nn.Conv2d(2, 2, 1), nn.ReLU(), nn.Flatten(),
                                                   nn.Linear(18, 2)), "unequal windows"),
    ("avg_excl_pad_before_conv", nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(),
                                               nn.AvgPool2d(3, 1, 1, count_include_pad=False),
                                               nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                               nn.Linear(32, 2)), "does not fold into one convolution exactly"),
    ("reflect_padding", nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                                      nn.Flatten(), nn.Linear(32, 2)), "padding_mode='reflect'"),
    ("two_weight_layers", _fc(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), "two weight layers"),
]


@pytest.mark.parametrize("name,model,match", ERRORS, ids=[e[0] for e in ERRORS])
def test_non_convertible_ops_are_named(name, model, match):
    with pytest.raises(ConversionError, match=match) as exc:
        hwloop.convert(model.eval(), torch.rand(4, 1, 4, 4))
    msg = str(exc.value)
    if name not in ("relu_after_readout", "control_flow"):
        assert msg.startswith("node '")  # the node is named
    if name in ("sigmoid", "residual", "branch"):
        assert "test_convert_trace.py:" in msg  # with its source line
    if name == "sigmoid":
        assert "`return self.out(torch.sigmoid(self.fc(x.flatten(1))))`" in msg


@pytest.mark.parametrize("fn,match", [
    (lambda x: x.transpose(2, 3).flatten(1), "reorders features"),
    (lambda x: x.reshape(-1, 8), "does not keep the batch dimension"),
    (lambda x: torch.flatten(x), "merges the batch"),
    (lambda x: torch.cat([x, x], 1).flatten(1), "combines several activations"),
    (lambda x: x[:, :1].flatten(1), "slices an activation"),
])
def test_shape_operations_that_are_not_a_flatten(fn, match):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 2, 1)

        def forward(self, x):
            return fn(torch.relu(self.c(x)))

    with pytest.raises(ConversionError, match=match):
        hwloop.convert(M(), torch.rand(4, 1, 4, 4))


# ----------------------------------------------------------------------------- the command line
def test_cli_convert_state_dict(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_relu("lenet5", (1, 28, 28), 10)
    sd = tmp_path / "lenet.pt"
    torch.save(model.state_dict(), sd)
    out = tmp_path / "net.pt"
    assert main(["convert", str(sd), "--arch", "lenet5", "--samples", "8", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fan-in" in text and "-> exact" in text and "maxpool2d" in text
    assert " 150 " in text  # fan-in of the second conv, 6 x 5 x 5
    from hwloop.interop.netfile import load_network

    net = load_network(out)
    x = torch.rand(5, 1, 28, 28)
    assert (net(x) - model(x)).abs().max() <= 1e-4
    assert main(["convert", str(sd), "--out", str(out)]) == 2  # a state dict needs --arch
    assert "--arch" in capsys.readouterr().err


def test_cli_convert_export_program_json(tmp_path, capsys):
    model = FunctionalLeNet().eval()
    path = tmp_path / "lenet.pt2"
    torch.export.save(torch.export.export(model, (torch.rand(2, 1, 12, 12),)), str(path))
    assert main(["convert", str(path), "--samples", "6", "--dtype", "float64", "--json",
                 "--out", str(tmp_path / "n.pt")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "export" and report["check"]["exact"]
    assert [r["kind"] for r in report["topology"]] == ["conv2d", "maxpool2d", "conv2d", "maxpool2d",
                                                       "flatten", "dense", "readout"]
    assert report["topology"][2]["fan_in"] == 4 * 3 * 3
