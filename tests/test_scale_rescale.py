"""Issue #10, item 6: fixed per-layer scales that cannot move (Methods (iii) fine-tuning).

An all-zero layer is programmed with scale 1.0, so its codes never leave 0; a tiny layer gets a
tiny scale, so its codes saturate as the float weights grow. ``HILTrainer.check_scales`` at an
epoch boundary warns naming the layer and, with ``rescale="auto"``, re-quantises it.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import hwloop
from hwloop.data.datasets import synthetic_dataset
from hwloop.emulator.device import EmulatorDevice
from hwloop.emulator.profile import load_profile
from hwloop.mapping import program_network
from hwloop.mapping import reprogram
from hwloop.train.checkpoint import state_from_dict, state_to_dict
from hwloop.train.options import REPO_ROOT
from hwloop.train.hil import FinetuneConfig, HILTrainer, ScaleWarning, evaluate_device

IDEAL = str(REPO_ROOT / "devices" / "emulator-ideal.yaml")
HARSH = str(REPO_ROOT / "devices" / "emulator-harsh.yaml")
HIDDEN = 2  # the second dense layer of _problem: Flatten, Dense, Dense, Readout


def _device(bits=4):
    return EmulatorDevice.from_profile(load_profile(IDEAL).model_copy(update={"weight_bits": bits}))


def _problem(seed=0):
    x, y = synthetic_dataset(768, (1, 8, 8), 4, seed=seed, noise=0.3)
    x = x.double()
    torch.manual_seed(seed)
    relu = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4)).double()
    opt = torch.optim.Adam(relu.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(relu(x[:512]), y[:512]).backward()
        opt.step()
    net = hwloop.convert(relu, x[:256])
    assert type(net.layers[HIDDEN]).__name__ == "SpikingDense"
    return net, x, y


def _zeroed(net):
    net = copy.deepcopy(net)
    with torch.no_grad():
        net.layers[HIDDEN].weight.zero_()
    return net


def _finetune(net, x, y, rescale, epochs=4, steps=12, batch=32, lr=3e-3):
    """run_finetune's loop in small: epochs of steps, check_scales at each epoch boundary."""
    dev = _device()
    cfg = FinetuneConfig(lr=lr, batch_size=batch, lr_schedule="constant", label_smoothing=0.0,
                         rescale=rescale)
    trainer = HILTrainer(dev, net, program_network(dev, net), cfg)
    found = []
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(epoch)
        order = torch.randperm(512, generator=g)
        for s in range(steps):
            idx = order[s * batch:(s + 1) * batch]
            trainer.step(x[idx], y[idx])
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            found.append((trainer.check_scales(), [str(m.message) for m in w
                                                   if issubclass(m.category, ScaleWarning)]))
    return dev, trainer, found


def test_all_zero_layer_recovers_under_auto():
    net, x, y = _problem()
    xte, yte = x[512:], y[512:]
    # off: the zero layer is stuck at codes 0 (scale 1.0) for good
    dev_off, tr_off, found_off = _finetune(_zeroed(net), x, y, "off")
    codes, scale = tr_off.state.weights[HIDDEN]
    assert scale == 1.0 and int(codes.abs().sum()) == 0
    assert float(tr_off.shadow.layers[HIDDEN].weight.detach().abs().max()) > 0  # float moved
    assert all(f == ([], []) for f in found_off)
    acc_off = evaluate_device(dev_off, tr_off.shadow, xte, yte)["accuracy"]
    # auto: rescaled at the first epoch boundary, codes leave 0, accuracy rises
    dev, tr, found = _finetune(_zeroed(net), x, y, "auto")
    recs, msgs = found[0]
    assert [r["layer"] for r in recs] == [HIDDEN] and recs[0]["rescaled"]
    assert recs[0]["nonzero_codes"] == 0 and recs[0]["new_scale"] < 0.1
    assert any(f"layer {HIDDEN}" in m and "all codes are 0" in m for m in msgs)
    codes, scale = tr.state.weights[HIDDEN]
    assert int((codes != 0).sum()) > 0.5 * codes.numel() and scale < 0.1
    rc, rs = dev.read_weights(HIDDEN)
    assert torch.equal(rc, codes) and rs == scale
    acc = evaluate_device(dev, tr.shadow, xte, yte)["accuracy"]
    assert acc >= acc_off + 0.25, (acc_off, acc)
    # the chip computes the trainer's nominal network after the rescale
    t_in = net.encode(xte)
    with torch.no_grad():
        _, logits = tr.nominal.run(t_in)
    assert float((dev.run(t_in).readout - logits).abs().max()) <= 1e-9


def test_warn_names_the_layer_and_changes_nothing():
    net, x, y = _problem()
    dev, tr, found = _finetune(_zeroed(net), x, y, "warn", epochs=1)
    recs, msgs = found[0]
    assert [r["layer"] for r in recs] == [HIDDEN] and not recs[0]["rescaled"]
    assert len(msgs) == 1 and msgs[0].startswith(f"layer {HIDDEN} (dense)")
    assert "rescale='auto'" in msgs[0]
    assert tr.state.weights[HIDDEN][1] == 1.0 and int(tr.state.weights[HIDDEN][0].abs().sum()) == 0
    with pytest.warns(ScaleWarning, match=rf"layer {HIDDEN}\b.*scale 1\b"):
        tr.check_scales()


def test_tiny_layer_saturates_and_auto_rescales():
    net, x, y = _problem()
    tiny = copy.deepcopy(net)
    with torch.no_grad():
        tiny.layers[1].weight.mul_(0.01)
    dev = _device()
    state = program_network(dev, tiny)
    small_scale = state.weights[1][1]
    cfg = FinetuneConfig(lr=1e-3, batch_size=32, rescale="warn")
    tr = HILTrainer(dev, tiny, state, cfg)
    with torch.no_grad():  # the float weights grow 100x (as in the report)
        tiny.layers[1].weight.copy_(net.layers[1].weight)
    tr.write_back()
    codes = tr.state.weights[1][0]
    sat_before = float(((codes == 7) | (codes == -8)).double().mean())
    assert sat_before > 0.5
    log = []
    with pytest.warns(ScaleWarning, match=r"layer 1 \(dense\).*saturate"):
        recs = tr.check_scales(log=log.append)
    assert [r["layer"] for r in recs] == [1] and recs[0]["saturated_fraction"] > 0.5
    assert len(log) == 1 and "layer 1" in log[0]
    tr.config = cfg.model_copy(update={"rescale": "auto"})
    with pytest.warns(ScaleWarning, match="re-quantised"):
        recs = tr.check_scales()
    assert recs[0]["rescaled"] and recs[0]["new_scale"] > 20 * small_scale
    codes = tr.state.weights[1][0]
    assert float(((codes == 7) | (codes == -8)).double().mean()) < 0.15
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tr.check_scales() == []  # fixed now
    assert tr.write_back() == 0  # consistent with the write-back rule


def test_rescaled_state_checkpoints_and_resumes_exactly():
    """The scale lives in state.weights, which state_to_dict saves: a reprogrammed fresh chip
    runs exactly what the trainer had."""
    net, x, y = _problem()
    dev, tr, _ = _finetune(_zeroed(net), x, y, "auto", epochs=1)
    saved = state_to_dict(tr.state)
    dev2 = _device()
    st2 = state_from_dict(saved, tr.state)
    reprogram(dev2, st2)
    assert st2.weights[HIDDEN][1] == tr.state.weights[HIDDEN][1] != 1.0
    t_in = net.encode(x[:64])
    assert torch.equal(dev.run(t_in).readout, dev2.run(t_in).readout)


def test_healthy_net_is_not_flagged():
    net, x, y = _problem()
    dev = EmulatorDevice.from_profile(HARSH, chip_seed=1)
    state = program_network(dev, net)
    tr = HILTrainer(dev, net, state, FinetuneConfig(lr=1e-3, batch_size=32, rescale="auto"))
    for s in range(8):
        tr.step(x[32 * s:32 * (s + 1)], y[32 * s:32 * (s + 1)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tr.check_scales() == []


def test_off_and_float_devices_skip():
    net, x, y = _problem()
    dev = EmulatorDevice.from_profile(IDEAL)  # float weights: no scales to check
    tr = HILTrainer(dev, _zeroed(net), program_network(dev, _zeroed(net)),
                    FinetuneConfig(rescale="auto"))
    assert tr.check_scales() == []
    with pytest.raises(Exception):
        FinetuneConfig(rescale="sometimes")
