"""Hardware-in-the-loop fine-tuning with exact B1 gradients computed off-chip.

One step, data flowing one way::

    x -> encode -> device.run -> DeviceRecord (measured spike times, readout)
      -> logits, loss (off-chip) -> backward_from_spike_times (measured times, nominal weights)
      -> optimiser step on float64 shadow weights -> quantise with the layer's fixed scale
      -> write changed layers back, verified (hwloop.mapping.write_layer) -> next batch

The *shadow* network holds the float weights the optimiser trains; the *nominal* network holds
what the host believes is programmed on the chip (the dequantised codes and the thresholds
written), and is where the gradient of Eq. (3)-(4) is evaluated (quantisation-aware training,
Methods (iii): gradient at the quantised weights, applied to the float weights, with the
quantisation steps fixed during fine-tuning).

Fixed scales can be wrong for good: a layer programmed all-zero gets scale 1 and its codes never
leave 0; a layer programmed tiny gets a tiny scale and saturates as its float weights grow.
:meth:`HILTrainer.check_scales`, run at epoch boundaries, finds such layers, warns
(:class:`ScaleWarning`, naming the layer) and, with ``FinetuneConfig.rescale="auto"``,
re-quantises them with a fresh scale (the state, which the checkpoint saves, records it).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from hwloop.devices.base import DeviceRecord, TTFSDevice
from hwloop.errors import WriteVerifyError
from hwloop.mapping import (ProgramState, WriteCount, layer_thresholds, quantize_fixed,
                            weight_layer_indices, write_layer)
from hwloop.quant import code_range, quantize_weights
from hwloop.ttfs import TTFSNetwork, apply_gradients, backward_from_spike_times
from hwloop.ttfs.layers import Readout


class FinetuneConfig(BaseModel):
    """Hyper-parameters of hardware-in-the-loop fine-tuning."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=3, ge=0, description="epochs of fine-tuning")
    lr: float = Field(default=3e-4, gt=0, le=1.0, description="Adam learning rate")
    lr_schedule: str = Field(default="cosine", pattern="^(cosine|constant)$")
    batch_size: int = Field(default=64, ge=1, le=65536)
    l1: float = Field(default=0.0, ge=0, description="activity penalty lambda (Table 2, +L1)")
    label_smoothing: float = Field(default=0.1, ge=0, lt=1,
                                   description="as in the ReLU twin's default recipe")
    seed: int = Field(default=0, ge=0)
    max_steps_per_epoch: Optional[int] = Field(default=None, ge=1,
                                               description="stop each epoch early (subset)")
    adapt_windows: bool = Field(default=True, description="Eq. (8) where the device allows it")
    write_retries: int = Field(default=2, ge=0, le=10)
    rescale: Literal["off", "warn", "auto"] = Field(
        default="warn",
        description="epoch-boundary check of the fixed per-layer scales (HILTrainer.check_scales): "
                    "'off' skips it; 'warn' warns naming each layer whose codes are stuck (all "
                    "zero while its float weights are not, saturated, or a fresh scale off by "
                    "more than rescale_ratio); 'auto' also re-quantises such a layer with a fresh "
                    "scale (Methods (iii) percentiles), writes and verifies it")
    rescale_saturation: float = Field(
        default=0.25, gt=0.0, le=1.0,
        description="a layer is stuck when more than this fraction of its non-zero float weights "
                    "lie beyond the range its scale represents (clipped codes)")
    rescale_ratio: float = Field(
        default=4.0, gt=1.0,
        description="a layer is stuck when a fresh quantisation of its float weights would give "
                    "a scale more than this factor larger or smaller than the fixed one")


class ScaleWarning(UserWarning):
    """A layer's fixed quantisation scale cannot represent its float weights (see
    :meth:`HILTrainer.check_scales`)."""


@dataclass
class StepResult:
    loss: float
    accuracy: float
    spikes_per_neuron: float
    energy_j: float  # mean joules per sample of this batch
    layers_written: int


class HILTrainer:
    """Fine-tunes a B1 network on a device with exact gradients from measured spike times.

    Args:
        device: any :class:`TTFSDevice`, already programmed with ``net`` (see
            :func:`hwloop.mapping.program_network`), whose codes and scales are ``state``.
        net: the float64 B1 network (it becomes the shadow and is trained in place).
        state: what is programmed (:class:`hwloop.mapping.ProgramState`); its per-layer scales
            stay fixed while fine-tuning (Methods (iii)), except where :meth:`check_scales`
            rescales a stuck layer (``config.rescale="auto"``). Updated in place as writes
            verify.
        config: :class:`FinetuneConfig`.
    """

    def __init__(self, device: TTFSDevice, net: TTFSNetwork, state: ProgramState,
                 config: FinetuneConfig):
        self.device, self.shadow, self.state, self.config = device, net, state, config
        self.weight_bits = state.weight_bits
        # Eq. (8) where the device allows it; never on a calibrated chip, whose threshold
        # compensation holds for the programmed window widths only
        self.adaptive = bool(config.adapt_windows and device.info().adaptive_windows
                             and state.compensation is None)
        self.opt = torch.optim.Adam(self.shadow.parameters(), lr=config.lr)
        self.nominal = copy.deepcopy(self.shadow)
        self._refresh_nominal()
        self.device_calls = 0
        self.writes = 0

    # ------------------------------------------------------------------ nominal network
    @torch.no_grad()
    def _refresh_nominal(self, layers: Optional[Iterable[int]] = None) -> None:
        for i in (weight_layer_indices(self.shadow) if layers is None else layers):
            dst, src = self.nominal.layers[i], self.shadow.layers[i]
            # a calibrated state knows the weights the chip really applies (hwloop.calibrate)
            dst.weight.copy_(self.state.effective_weight(i, *self.state.weights[i]))
            if isinstance(src, Readout):
                dst.bias.copy_(src.bias)
            else:
                dst.D.copy_(src.D)
                if getattr(src, "in_shift", None) is not None:
                    dst.in_shift.copy_(src.in_shift)
        for dl, sl in zip(self.nominal.neuron_layers(), self.shadow.neuron_layers()):
            if (float(dl.t_min), float(dl.t_max)) != (float(sl.t_min), float(sl.t_max)):
                dl.set_window(float(sl.t_min), float(sl.t_max))

    # ------------------------------------------------------------------ one step
    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[StepResult, DeviceRecord]:
        """One fine-tuning step on a batch ``x`` ``(B, *input_shape)`` in [0, 1], labels ``y``."""
        t_in = self.shadow.encode(x.to(torch.float64))
        record = self.device.run(t_in)
        self.device_calls += 1
        logits = record.readout.to(torch.float64).detach().requires_grad_(True)
        loss = F.cross_entropy(logits, y, label_smoothing=self.config.label_smoothing)
        (glog,) = torch.autograd.grad(loss, logits)
        grads = backward_from_spike_times(self.nominal, record.spike_times, glog, l1=self.config.l1)
        self.opt.zero_grad(set_to_none=True)
        apply_gradients(self.shadow, grads)
        self.opt.step()
        if self.adaptive and self.shadow.adapt_windows(record.spike_times):
            self.device.set_windows(self.shadow.windows())
            self.state.spec = self.state.spec.with_windows(self.shadow.windows())  # what is on the chip
            self.device_calls += 1
        written = self.write_back()
        acc = float((logits.detach().argmax(1) == y).to(torch.float64).mean())
        energy = float(record.energy_j.sum(1).mean()) if record.energy_j is not None else math.nan
        return StepResult(float(loss.detach()), acc, record.spikes_per_neuron(), energy, written), record

    # ------------------------------------------------------------------ write back
    def write_back(self) -> int:
        """Quantise the shadow with each layer's fixed scale, write the layers whose codes or
        thresholds changed, verified (:func:`hwloop.mapping.write_layer`: read back only when
        the driver does not verify its own writes by CRC). Returns the number of writes.

        Raises:
            WriteVerifyError: a layer still differs after ``config.write_retries`` retries; its
                ``layers`` attribute names every layer whose programmed state is not the
                intended one (the host's ``state`` keeps what was last verified).
        """
        failed, changed = [], []
        n = 0
        for i in weight_layer_indices(self.shadow):
            layer = self.shadow.layers[i]
            old_codes, scale = self.state.weights[i]
            codes = quantize_fixed(layer.weight, scale, self.weight_bits)
            # thresholds from what is (to be) on the chip, as program_network: a conv input
            # shift's contribution uses codes x scale, not the float shadow weights
            theta = layer_thresholds(self.shadow, i, codes, scale)
            w_changed = not torch.equal(codes, old_codes)
            t_changed = not torch.equal(theta, self.state.thresholds[i])
            if not (w_changed or t_changed):
                continue
            ok, k = self._write_layer(i, codes, scale, theta, w_changed, t_changed)
            n += k
            if not ok:
                failed.append(i)
                continue
            self.state.weights[i], self.state.thresholds[i] = (codes, scale), theta
            changed.append(i)
        self.writes += n
        self._refresh_nominal(changed)
        self._raise_unverified(failed, "write verification failed for layers")
        return n

    def _write_layer(self, i: int, codes: torch.Tensor, scale: float, theta: torch.Tensor,
                     w_changed: bool = True, t_changed: bool = True) -> tuple[bool, int]:
        """:func:`hwloop.mapping.write_layer` for layer ``i``'s codes/scale and/or thresholds,
        retrying ``config.write_retries`` times. Returns (verified, writes); the device calls
        are counted. Does not touch ``state``."""
        count = WriteCount()
        try:
            write_layer(self.device, i, codes if w_changed else None, scale,
                        theta if t_changed else None, retries=self.config.write_retries,
                        count=count)
            ok = True
        except WriteVerifyError as exc:
            if exc.layers != [i] or self.device.verifies_writes:
                raise  # a driver's own verification fails the step at once, as before
            ok = False
        finally:
            self.device_calls += count.calls
        return ok, count.writes

    # ------------------------------------------------------------------ scale checks
    @torch.no_grad()
    def check_scales(self, log: Optional[Callable[[str], None]] = None) -> list[dict]:
        """Find layers whose fixed scale keeps their codes stuck; warn, and rescale in "auto".

        Meant for epoch boundaries (before the checkpoint is saved). Per ``config.rescale``:
        "off" returns ``[]`` at once; "warn" and "auto" check every weight layer of a
        quantised state (a float-weight state has no scales: ``[]``). A layer with non-zero
        float weights is *stuck* when

        * its codes on the fixed scale are all 0 (e.g. it was programmed all-zero: scale 1);
        * more than ``config.rescale_saturation`` of its non-zero float weights lie beyond the
          range the scale represents, i.e. are clipped at the end codes (a tiny initial scale);
        * a fresh quantisation (:func:`hwloop.quant.quantize_weights`, the state's clip
          percentile) would give a scale more than ``config.rescale_ratio`` times larger or
          smaller than the fixed one.

        Each stuck layer raises a :class:`ScaleWarning` naming the layer and the figures (and
        is passed to ``log`` if given). In "auto" the layer is re-quantised with the fresh scale,
        its thresholds recomputed from the new codes (:func:`hwloop.mapping.layer_thresholds`),
        written and verified; ``state.weights[i]``/``state.thresholds[i]`` and the nominal
        network are updated. The shadow weights and the optimiser state are not touched, so
        saving ``state`` in the checkpoint keeps a resumed run exact.

        Warns:
            :class:`ScaleWarning` per stuck layer (in "warn" and "auto").

        Returns:
            One dict per stuck layer: ``layer`` (index), ``kind``, ``reasons`` (list of str),
            ``scale`` (the fixed one), ``fresh_scale``, ``scale_ratio`` (fresh / fixed),
            ``nonzero_codes``, ``weights`` (count), ``nonzero_weights``, ``saturated_fraction``
            (of the non-zero weights), ``max_abs_weight``, ``rescaled`` (bool) and
            ``new_scale`` (the scale now programmed).

        Raises:
            WriteVerifyError: ("auto") a rescaled layer did not verify after
                ``config.write_retries`` retries (``layers`` names it; ``state`` keeps the last
                verified codes and scale).
        """
        mode = self.config.rescale
        bits = self.weight_bits
        if mode == "off" or bits is None:
            return []
        found, failed, changed = [], [], []
        for i in weight_layer_indices(self.shadow):
            diagnosis = self._diagnose_scale(i, bits)
            if diagnosis is None:
                continue
            rec, fresh_codes = diagnosis
            if mode == "auto":
                fresh = rec["fresh_scale"]
                theta = layer_thresholds(self.shadow, i, fresh_codes, fresh)
                ok, n = self._write_layer(i, fresh_codes, fresh, theta)
                self.writes += n
                if ok:
                    self.state.weights[i] = (fresh_codes, float(fresh))
                    self.state.thresholds[i] = theta
                    changed.append(i)
                    rec.update(rescaled=True, new_scale=float(fresh))
                else:
                    failed.append(i)
            msg = _scale_message(rec, bits, mode)
            warnings.warn(msg, ScaleWarning, stacklevel=2)
            if log is not None:
                log(f"warning: {msg}")
            found.append(rec)
        self._refresh_nominal(changed)
        self._raise_unverified(failed, "rescale failed to verify for layers")
        return found

    def _raise_unverified(self, failed: list[int], what: str) -> None:
        """:class:`WriteVerifyError` naming the layers whose programmed state is not the intended
        one (none: nothing raised)."""
        if failed:
            raise WriteVerifyError(f"{what} {failed} after {self.config.write_retries} retries; the "
                                   "chip's state of those layers is not the intended one",
                                   layers=failed)

    def _diagnose_scale(self, i: int, bits: int) -> Optional[tuple[dict, torch.Tensor]]:
        """(the record of :meth:`check_scales`, the fresh codes) when layer ``i``'s fixed scale
        is stuck, else None."""
        lo, hi = code_range(bits)
        layer = self.shadow.layers[i]
        w = layer.weight.detach().to(torch.float64)
        n_nz = int((w != 0).sum())
        if n_nz == 0:
            return None  # nothing to represent: all-zero codes are right
        _, scale = self.state.weights[i]
        codes = quantize_fixed(w, scale, bits)
        u = w / float(scale)
        saturated = int(((u > hi + 0.5) | (u < lo - 0.5)).sum()) / n_nz
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fresh one is only a yardstick here
            fresh_codes, fresh = quantize_weights(w, bits, self.state.clip_percentile, layer=i)
        ratio = fresh / float(scale)
        nz_codes = int((codes != 0).sum())
        reasons = []
        if nz_codes == 0:
            reasons.append("all codes are 0 while the float weights are not")
        if saturated > self.config.rescale_saturation:
            reasons.append(f"{100 * saturated:.1f} % of the non-zero weights saturate")
        if not 1.0 / self.config.rescale_ratio <= ratio <= self.config.rescale_ratio:
            reasons.append(f"a fresh scale would be {ratio:.3g} x the fixed one")
        if not reasons:
            return None
        rec = {"layer": i, "kind": getattr(layer, "kind", type(layer).__name__.lower()),
               "reasons": reasons, "scale": float(scale), "fresh_scale": float(fresh),
               "scale_ratio": float(ratio), "nonzero_codes": nz_codes, "weights": w.numel(),
               "nonzero_weights": n_nz, "saturated_fraction": saturated,
               "max_abs_weight": float(w.abs().max()), "rescaled": False,
               "new_scale": float(scale)}
        return rec, fresh_codes

    # ------------------------------------------------------------------ epochs
    def lr_at(self, step: int, total: int) -> float:
        if self.config.lr_schedule == "constant" or total <= 1:
            return self.config.lr
        return self.config.lr * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr


def _scale_message(rec: dict, bits: int, mode: str) -> str:
    """The warning of :meth:`HILTrainer.check_scales` for one stuck layer."""
    msg = (f"layer {rec['layer']} ({rec['kind']}): its fixed {bits}-bit scale {rec['scale']:.4g} "
           f"cannot represent its float weights: {'; '.join(rec['reasons'])} "
           f"({rec['nonzero_codes']} of {rec['weights']} codes non-zero, max |w| "
           f"{rec['max_abs_weight']:.4g}, fresh scale {rec['fresh_scale']:.4g})")
    return msg + (" -> re-quantised with the fresh scale" if rec["rescaled"] else
                  " -> rescale failed to verify" if mode == "auto" else
                  "; FinetuneConfig(rescale='auto') re-quantises it at epoch boundaries")


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of an epoch: a permutation that depends only on (seed, epoch), so a
    resumed run replays exactly the batches of an uninterrupted one."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


@torch.no_grad()
def evaluate_device(device: TTFSDevice, net: TTFSNetwork, x: torch.Tensor, y: torch.Tensor,
                    batch_size: int = 1000, progress: Optional[Callable[[int], None]] = None) -> dict:
    """Accuracy, spikes per neuron and energy of the network programmed on ``device``.

    Returns a dict: ``accuracy`` (fraction), ``spikes_per_neuron`` (average over all neuron
    layers), ``spikes_per_neuron_layers``, ``energy_j_per_sample`` (joules; ``nan`` if the
    device reports none), ``energy_j_per_sample_layers``, ``device_calls``, ``samples``.
    """
    info = device.info()
    bs = max(1, min(batch_size, info.max_batch))
    correct, spikes, energy, calls = 0, None, None, 0
    neurons = None
    for s in range(0, x.shape[0], bs):
        xb = x[s:s + bs].to(torch.float64)
        rec = device.run(net.encode(xb))
        calls += 1
        correct += int((rec.readout.argmax(1) == y[s:s + bs]).sum())
        c = rec.spike_counts.to(torch.float64).sum(0)
        spikes = c if spikes is None else spikes + c
        if rec.energy_j is not None:
            e = rec.energy_j.to(torch.float64).sum(0)
            energy = e if energy is None else energy + e
        neurons = rec.neurons_per_layer
        if progress:
            progress(xb.shape[0])
    n = x.shape[0]
    per_layer = [float(spikes[k]) / (n * neurons[k]) for k in range(len(neurons))]
    out = {"accuracy": correct / n,
           "spikes_per_neuron": float(spikes.sum()) / (n * sum(neurons)),
           "spikes_per_neuron_layers": per_layer,
           "energy_j_per_sample": float(energy.sum()) / n if energy is not None else math.nan,
           "energy_j_per_sample_layers": [float(e) / n for e in energy] if energy is not None else [],
           "device_calls": calls, "samples": n}
    return out


@torch.no_grad()
def evaluate_net(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> dict:
    """Accuracy (and spikes per neuron for a TTFS network) of a software model."""
    correct, sp, n = 0, 0.0, x.shape[0]
    for s in range(0, n, batch_size):
        xb = x[s:s + batch_size]
        if isinstance(model, TTFSNetwork):
            xb = xb.to(model.layers[-1].weight.dtype)
            stages, logits = model.run(model.encode(xb))
            sp += model.spikes_per_neuron(stages)["total"] * xb.shape[0]
        else:
            p = next(model.parameters())
            logits = model(xb.to(p.dtype))
        correct += int((logits.argmax(1) == y[s:s + batch_size]).sum())
    out = {"accuracy": correct / n}
    if isinstance(model, TTFSNetwork):
        out["spikes_per_neuron"] = sp / n
    return out
