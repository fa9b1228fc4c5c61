"""Issue #10, item 5: thresholds are computed from what is on the chip, everywhere.

A conv layer's fused-BN input shift is moved into its thresholds with the layer's weights.
``program_network`` used the written codes x scale, ``HILTrainer.write_back`` the float shadow
weights: a write-back with no optimiser step changed the thresholds, and the chip then computed
another network than the trainer's nominal one.
"""

import copy

import torch
from torch import nn

import hwloop
from hwloop.data.datasets import synthetic_dataset
from hwloop.emulator.device import EmulatorDevice
from hwloop.emulator.profile import load_profile
from hwloop.mapping import dequantized_network, layer_thresholds, network_thresholds, program_network
from hwloop.train.options import REPO_ROOT
from hwloop.train.hil import FinetuneConfig, HILTrainer

IDEAL = str(REPO_ROOT / "devices" / "emulator-ideal.yaml")
HARSH = str(REPO_ROOT / "devices" / "emulator-harsh.yaml")


def _conv_net_with_in_shift(seed=1):
    x, y = synthetic_dataset(128, (1, 12, 12), 4, seed=seed, noise=0.45)
    x = x.double()
    torch.manual_seed(seed)
    relu = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 6 * 6, 4)).double()
    with torch.no_grad():
        relu[3].running_mean.uniform_(-0.5, 0.5)
        relu[3].running_var.uniform_(0.3, 1.5)
        relu[3].bias.uniform_(-0.5, 0.5)
    relu.eval()
    net = hwloop.convert(relu, x[:64])
    shifted = [i for i, l in enumerate(net.layers) if getattr(l, "in_shift", None) is not None]
    assert shifted and float(net.layers[shifted[0]].in_shift.detach().abs().max()) > 0.05
    return net, x, y, shifted[0]


def _quantised_ideal(bits=4):
    """emulator-ideal with integer weight codes: exact float64 arithmetic otherwise."""
    return EmulatorDevice.from_profile(load_profile(IDEAL).model_copy(update={"weight_bits": bits}))


def _trainer(dev, net):
    state = program_network(dev, net)
    assert state.weight_bits == 4
    return HILTrainer(dev, net, state, FinetuneConfig(lr=1e-3, batch_size=32)), state


def test_write_back_without_a_step_writes_nothing_on_a_4bit_conv_net():
    net, x, _, k = _conv_net_with_in_shift()
    dev = _quantised_ideal()
    trainer, state = _trainer(dev, net)
    before = {i: v.clone() for i, v in state.thresholds.items()}
    assert trainer.write_back() == 0
    assert trainer.writes == 0
    for i, v in before.items():
        assert torch.equal(trainer.state.thresholds[i], v), f"layer {i} thresholds changed"
        assert torch.equal(dev.read_thresholds(i), v)
    # the chip computes the trainer's nominal network (float64 arithmetic on the device)
    t_in = net.encode(x)
    rec = dev.run(t_in)
    with torch.no_grad():
        ref, logits = trainer.nominal.run(t_in)
    for a, b in zip(rec.spike_times, ref):
        assert torch.equal(torch.isinf(a), torch.isinf(b))
        fin = torch.isfinite(a)
        assert torch.allclose(a[fin], b[fin], rtol=0.0, atol=1e-9)
    assert float((rec.readout - logits).abs().max()) <= 1e-9
    # and the conv layer with the shift does depend on which weights are used (the test bites)
    assert not torch.equal(layer_thresholds(net, k, net.layers[k].weight.detach(), 1.0),
                           state.thresholds[k])


def test_write_back_on_a_quantised_chip_gives_identical_spikes():
    """emulator-harsh (4 bits, 16 steps, mismatch): no write, the same spikes before and after."""
    net, x, _, _ = _conv_net_with_in_shift(seed=2)
    dev = EmulatorDevice.from_profile(HARSH, chip_seed=0)
    trainer, state = _trainer(dev, net)
    t_in = net.encode(x[:64])
    dev.seed_noise(5)
    r0 = dev.run(t_in)
    assert trainer.write_back() == 0
    dev.seed_noise(5)
    r1 = dev.run(t_in)
    for a, b in zip(r0.spike_times, r1.spike_times):
        assert torch.equal(a, b)


def test_thresholds_follow_the_written_codes():
    """One rule: layer_thresholds(net, i, codes, scale) == thresholds of the dequantised net."""
    net, _, _, k = _conv_net_with_in_shift()
    dev = _quantised_ideal()
    state = program_network(dev, net)
    deq = network_thresholds(dequantized_network(net, state))
    for i, (codes, scale) in state.weights.items():
        assert torch.equal(layer_thresholds(net, i, codes, scale), state.thresholds[i])
        assert torch.equal(deq[i], state.thresholds[i])
    assert torch.equal(network_thresholds(net, state.weights)[k], state.thresholds[k])


def test_after_a_real_step_thresholds_use_the_new_codes():
    net, x, y, k = _conv_net_with_in_shift()
    dev = _quantised_ideal()
    trainer, _ = _trainer(dev, net)
    for s in range(3):
        trainer.step(x[32 * s:32 * (s + 1)], y[32 * s:32 * (s + 1)])
    codes, scale = trainer.state.weights[k]
    assert torch.equal(trainer.state.thresholds[k], layer_thresholds(trainer.shadow, k, codes, scale))
    assert torch.equal(dev.read_thresholds(k), trainer.state.thresholds[k])
    t_in = net.encode(x[:64])
    rec = dev.run(t_in)
    with torch.no_grad():
        _, logits = trainer.nominal.run(t_in)
    assert float((rec.readout - logits).abs().max()) <= 1e-9


def test_float_device_thresholds_unchanged():
    """Float weights (scale 1): the thresholds are those of the float network, as before."""
    net, _, _, _ = _conv_net_with_in_shift()
    dev = EmulatorDevice.from_profile(IDEAL)
    state = program_network(dev, copy.deepcopy(net))
    ref = network_thresholds(net)
    for i, v in state.thresholds.items():
        assert torch.equal(v, ref[i])
