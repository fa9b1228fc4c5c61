"""ONNX in and out (issue #15): torch -> ONNX -> hwloop converts exactly; the ReLU twin exported
as ONNX matches the twin under onnxruntime. Skips without the optional extra hwloop[onnx]."""

import warnings

import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import hwloop  # noqa: E402
from hwloop.cli import main  # noqa: E402
from hwloop.errors import ConversionError  # noqa: E402
from hwloop.interop.onnx_export import export_onnx, run_onnxruntime, twin_to_onnx  # noqa: E402
from hwloop.interop.onnx_import import import_onnx, load_onnx  # noqa: E402
from hwloop.ttfs.pooling import relu_twin  # noqa: E402

try:
    from test_convert_trace import _check_exact, _extra_models, _models, _x
except ImportError:  # pragma: no cover - pytest with --import-mode=importlib
    from tests.test_convert_trace import _check_exact, _extra_models, _models, _x

SHAPE = (1, 12, 12)
ALL = _models() + [(n, m, SHAPE) for n, m in _extra_models()]


def _fresh(name):
    """A new instance of a test model (the parametrised ones are shared and cast)."""
    return {n: m for n, m, _ in _models() + [(n, m, SHAPE) for n, m in _extra_models()]}[name]


def _to_onnx(model, x, path):
    """torch -> ONNX with torch's TorchScript-based exporter, batch left dynamic."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x[:2],), str(path), dynamo=False, input_names=["input"],
                          dynamic_axes={"input": {0: "batch"}})
    return path


@pytest.mark.parametrize("name,model,shape", ALL, ids=[m[0] for m in ALL])
def test_onnx_round_trip_converts_exactly(name, model, shape, tmp_path):
    torch.manual_seed(0)
    model = model.double().eval()
    x = _x(shape)
    gm, in_shape = load_onnx(_to_onnx(model, x, tmp_path / f"{name}.onnx"))
    assert in_shape == shape
    with torch.no_grad():
        assert (gm(x) - model(x)).abs().max() <= 1e-12  # the import computes what torch did
    net = _check_exact(gm, x, original_stages=name not in ("signed_padded_pool", "bn_around_avgpool",
                                                          "functional_params", "pool_before_relu"))
    with torch.no_grad():
        assert (net(x) - model(x)).abs().max() <= 1e-9


def test_onnx_errors_name_the_onnx_node(tmp_path):
    fc = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.rand(4, 1, 4, 4)
    gm, _ = load_onnx(_to_onnx(fc, x, tmp_path / "tanh.onnx"))
    with pytest.raises(ConversionError, match=r"from ONNX node '.*' \(Tanh\): tanh is not ReLU"):
        hwloop.convert(gm, x)

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 2)

        def forward(self, x):
            h = torch.relu(self.a(x.flatten(1)))
            return self.b(h + x.flatten(1))

    gm, _ = load_onnx(_to_onnx(Res(), x, tmp_path / "res.onnx"))
    with pytest.raises(ConversionError, match=r"\(Add\): combines several activations"):
        hwloop.convert(gm, x)
    soft = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2), nn.Softmax(1))
    gm, _ = load_onnx(_to_onnx(soft, x, tmp_path / "soft.onnx"))
    with pytest.raises(ConversionError, match="softmax after the readout"):
        hwloop.convert(gm, x)


def test_onnx_unknown_operator_and_bad_file(tmp_path):
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("LRN", ["x"], ["y"], size=3, name="norm1")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 2, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 2, 4, 4])])
    with pytest.raises(ConversionError, match=r"ONNX node 'norm1' \(LRN\).*LRN has no hwloop equivalent"):
        import_onnx(helper.make_model(g))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ConversionError, match="not a readable ONNX model"):
        load_onnx(bad)


@pytest.mark.parametrize("name", ["functional_lenet", "maxpool_3_2_1", "signed_padded_pool", "avgpool"])
def test_export_twin_checked_with_onnxruntime(name, tmp_path):
    model = _fresh(name).double().eval()
    x = _x(SHAPE, n=16)
    net = hwloop.convert(model, x)
    info = export_onnx(net, tmp_path / "twin.onnx", x)
    twin32 = relu_twin(net).float()
    with torch.no_grad():
        ref = twin32(x.float())
    got = run_onnxruntime(tmp_path / "twin.onnx", x)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-5 * (1 + ref.abs().max())
    assert info["max_abs_diff"] <= 1e-5 * (1 + float(ref.abs().max()))
    # and back: the exported twin converts to the same network (float32 weights)
    gm, shape = load_onnx(tmp_path / "twin.onnx")
    net2 = hwloop.convert(gm, x, dtype=torch.float64)
    assert shape == SHAPE and [l.kind for l in net2.layers] == [l.kind for l in net.layers]
    assert (net2(x) - net(x)).abs().max() <= 1e-5


def test_export_of_signed_pool_and_in_shift_uses_where_and_add():
    model = _extra_models()[0][1].double().eval()
    net = hwloop.convert(model, _x(SHAPE))
    ops = [n.op_type for n in twin_to_onnx(net).graph.node]
    assert "Where" in ops and "Add" in ops  # min pool for negative BN scales, the BN shift


def test_cli_convert_onnx_and_export(tmp_path, capsys):
    model = _fresh("functional_lenet").eval()
    src = _to_onnx(model, torch.rand(2, *SHAPE), tmp_path / "lenet.onnx")
    net_file, out = tmp_path / "net.pt", tmp_path / "twin.onnx"
    assert main(["convert", str(src), "--samples", "8", "--out", str(net_file)]) == 0
    text = capsys.readouterr().out
    assert "(onnx)" in text and "fan-in" in text and "-> exact" in text
    assert main(["export", str(net_file), "--format", "onnx", "--out", str(out), "--samples", "8"]) == 0
    text = capsys.readouterr().out
    assert "onnxruntime vs twin" in text and out.exists()
    x = torch.rand(3, *SHAPE)
    with torch.no_grad():
        assert (run_onnxruntime(out, x) - model(x)).abs().max() <= 1e-5
