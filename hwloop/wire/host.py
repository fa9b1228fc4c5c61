"""Host-side logic shared by the wire backends (:mod:`serial_device`, :mod:`visa_device`).

:class:`HostDevice` owns what does not depend on the transport: the checks of a request against
the programmed network and the chip's limits, the shadow of the programmed weight codes and
thresholds (only what changed is sent; dense chunks or (index, code) pairs, whichever is
smaller), verification of every write (weights by the chip's CRC, thresholds by read-back) with
full rewrites and :class:`WriteVerifyError`, the time-format choice of the handshake, and the
decoding of a run reply into a :class:`DeviceRecord`. A backend implements the small hooks below
that move bytes (see "transport hooks").
"""

from __future__ import annotations

import abc
import json
import math
from typing import Optional

import numpy as np
import torch

from hwloop.devices.base import (THRESHOLD_KINDS, WEIGHT_KINDS, DeviceInfo, DeviceRecord,
                                 NetworkSpec, TTFSDevice, check_codes)
from hwloop.errors import DeviceError, DeviceLimitError, ProtocolError, WriteVerifyError
from hwloop.wire.codec import (FEATURE_SPARSE, MAX_MESSAGE, TIME_F64, TIME_TICKS, decode_run_reply,
                               encode_run_request,
                               max_batch_for_message, run_reply_size, ticks_per_tau_c, weights_crc)

#: Health counters every backend keeps (a backend adds its own).
HEALTH_KEYS = ("retries", "crc_errors", "timeouts", "resyncs", "bytes_tx", "bytes_rx")


class HostDevice(TTFSDevice):
    """A chip reached over a link; the transport-independent half of a wire backend.

    A subclass calls :meth:`_init_host` first in its constructor, :meth:`_accept_hello` with the
    chip's self-description, and implements the transport hooks.
    """

    _info: DeviceInfo
    f64: bool
    ratio: float

    def _init_host(self, *, verify: bool, write_retries: int, sparse: bool,
                   health: tuple[str, ...]) -> None:
        self.sparse = bool(sparse)
        self._sparse = False  # the chip offers sparse writes and the caller allows them
        self.write_retries = int(write_retries)
        self.verify = verify
        self.health = {k: 0 for k in health}
        self._spec: Optional[NetworkSpec] = None
        self._shadow_w: dict[int, tuple[np.ndarray, float]] = {}
        self._shadow_t: dict[int, np.ndarray] = {}

    # -- transport hooks -------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def _label(self) -> str:
        """The link in messages (a URL, a VISA resource)."""

    @abc.abstractmethod
    def _ctx_run(self) -> str:
        """How messages about a run name it."""

    @abc.abstractmethod
    def status(self) -> dict: ...

    @abc.abstractmethod
    def _program(self, spec: NetworkSpec) -> None: ...

    @abc.abstractmethod
    def _reset(self) -> None: ...

    @abc.abstractmethod
    def _set_windows(self, arr: np.ndarray) -> None:
        """Send windows, an (n, 2) float64 array."""

    @abc.abstractmethod
    def _weight_step(self, wide: bool) -> int:
        """Codes per dense weight write."""

    @abc.abstractmethod
    def _code_bytes(self, wide: bool) -> int:
        """Bytes of one code in a dense write (a sparse pair costs 4 more)."""

    @abc.abstractmethod
    def _send_weights(self, layer: int, flat: np.ndarray, scale: float, wide: bool,
                      todo: list[int], step: int, sparse: Optional[np.ndarray]) -> None:
        """Write the dense chunks starting at ``todo`` or, when ``sparse`` is given, the codes at
        those flat indices; the last write commits."""

    @abc.abstractmethod
    def _weights_crc(self, layer: int) -> tuple[int, float, int]:
        """The chip's (CRC, scale, code count) of a layer."""

    @abc.abstractmethod
    def _threshold_step(self) -> int:
        """Values per threshold write."""

    @abc.abstractmethod
    def _send_thresholds(self, layer: int, flat: np.ndarray, todo: list[int],
                         step: int) -> None:
        """Write the chunks starting at ``todo``; the last write commits."""

    @abc.abstractmethod
    def _read_thr_flat(self, layer: int, n: int) -> np.ndarray: ...

    @abc.abstractmethod
    def _run_exchange(self, arr: np.ndarray, b: int, expect: int) -> bytes:
        """Send a (b, n_in) float64 batch and return the reply body (``expect`` bytes)."""

    # -- handshake -------------------------------------------------------------------------------
    def _accept_hello(self, doc_json: bytes, what: str) -> dict:
        """The chip's self-description (JSON), its ``info`` taken."""
        try:
            doc = json.loads(doc_json)
            info = DeviceInfo.model_validate(doc["info"])
        except (ValueError, KeyError, TypeError) as e:
            raise ProtocolError(f"{self._label}: bad {what}: {e}") from e
        self._info = info
        return doc

    def _choose_formats(self, doc: dict, time_format: str) -> None:
        """Time format and sparse writes, from what the chip offers and the caller asks."""
        formats = doc.get("time_formats", [TIME_TICKS])
        if time_format == "auto":
            self.f64 = TIME_F64 in formats
        elif time_format in (TIME_F64, TIME_TICKS):
            if time_format not in formats:
                raise DeviceError(f"{self._info.device_id} at {self._label} does not offer time "
                                  f"format {time_format!r} (offers {formats})")
            self.f64 = time_format == TIME_F64
        else:
            raise ValueError(f"time_format must be 'auto', 'f64' or 'ticks', got {time_format!r}")
        self.ratio = ticks_per_tau_c(self._info.tau_c_s, self._info.clock_period_s)
        #: the chip's model digest when it tells one (a virtual chip: profile and chip seed),
        #: compared on resume and by calibration records; None for a chip that does not
        digest = doc.get("model_sha256")
        self.model_sha256 = digest if isinstance(digest, str) else None
        features = doc.get("features", [])
        self._features = list(features) if isinstance(features, list) else []
        self._sparse = self.sparse and isinstance(features, list) and \
            FEATURE_SPARSE in features

    # -- the contract ----------------------------------------------------------------------------
    @property
    def verifies_writes(self) -> bool:
        """Every write is checked in the driver (weights by WEIGHTS_CRC, thresholds by
        read-back) unless constructed with ``verify=False``."""
        return bool(self.verify)

    def info(self) -> DeviceInfo:
        return self._info

    def _require_spec(self) -> NetworkSpec:
        if self._spec is None:
            st = self.status()
            if not st.get("programmed"):
                raise DeviceError(f"{self._info.device_id} at {self._label}: no network "
                                  "programmed")
            self._spec = NetworkSpec.model_validate(st["spec"])
        return self._spec

    def _layer(self, layer: int, kinds: tuple[str, ...]):
        spec = self._require_spec()
        if not 0 <= layer < len(spec.layers) or spec.layers[layer].kind not in kinds:
            raise DeviceError(f"{self._info.device_id}: layer {layer} is not one of {list(kinds)} "
                              "in the programmed network")
        return spec.layers[layer]

    def _forget(self) -> None:
        self._spec = None
        self._shadow_w.clear()
        self._shadow_t.clear()

    def program(self, spec: NetworkSpec) -> None:
        self._forget()
        self._program(spec)
        self._spec = spec

    def reset(self) -> None:
        self._forget()
        self._reset()

    # -- weights ---------------------------------------------------------------------------------
    def write_weights(self, layer: int, codes: torch.Tensor, scale: float) -> None:
        spec = self._layer(layer, WEIGHT_KINDS)
        if tuple(codes.shape) != tuple(spec.weight_shape):
            raise DeviceError(f"layer {layer}: codes of shape {tuple(codes.shape)}, expected "
                              f"{spec.weight_shape}")
        if codes.is_floating_point() and not bool((codes == codes.round()).all()):
            raise DeviceError(f"layer {layer}: the wire carries integer weight codes; got "
                              f"non-integral {codes.dtype} values (quantise first)")
        check_codes(codes, self._info.weight_bits, layer)
        scale = float(scale)
        flat = codes.detach().cpu().reshape(-1).numpy().astype(np.int64)
        wide = self._info.weight_bits > 16
        step = self._weight_step(wide)
        starts = list(range(0, flat.size, step)) or [0]
        shadow = self._shadow_w.pop(layer, None)
        sparse = None  # flat indices of the changed codes, when a sparse write is smaller
        if shadow is None or shadow[0].shape != flat.shape:
            todo = starts
        else:
            diff = flat != shadow[0]
            changed = np.flatnonzero(diff)
            todo = [s for s in starts if diff[s:s + step].any()]
            if not todo and shadow[1] != scale:
                todo = starts[:1]
            if self._sparse and changed.size:
                size = self._code_bytes(wide)
                dense_bytes = sum(min(step, flat.size - s) for s in todo) * size
                if changed.size * (4 + size) < dense_bytes:
                    sparse = changed
        expect = weights_crc(flat, scale)
        for attempt in range(self.write_retries + 1):
            self._send_weights(layer, flat, scale, wide, todo, step, sparse)
            if not self.verify:
                break
            crc, dscale, n = self._weights_crc(layer)
            if crc == expect and n == flat.size and dscale == scale:
                break
            self.health["verify_failures"] += 1
            todo, sparse = starts, None  # rewrite everything
        else:
            raise WriteVerifyError(
                f"{self._info.device_id} at {self._label}: layer {layer} weights do not verify "
                f"after {self.write_retries + 1} writes (chip CRC 0x{crc:08x}, scale {dscale!r}, "
                f"{n} codes; expected 0x{expect:08x}, {scale!r}, {flat.size})", layers=[layer])
        self._shadow_w[layer] = (flat.copy(), scale)

    # -- thresholds ------------------------------------------------------------------------------
    def write_thresholds(self, layer: int, values: torch.Tensor) -> None:
        spec = self._layer(layer, THRESHOLD_KINDS)
        if tuple(values.shape) != tuple(spec.out_shape):
            raise DeviceError(f"layer {layer}: thresholds of shape {tuple(values.shape)}, "
                              f"expected {spec.out_shape}")
        flat = values.detach().cpu().reshape(-1).double().numpy().copy()
        if not np.all(np.isfinite(flat)):
            raise DeviceError(f"layer {layer}: thresholds must be finite")
        step = self._threshold_step()
        starts = list(range(0, flat.size, step))
        shadow = self._shadow_t.pop(layer, None)
        if shadow is None or shadow.shape != flat.shape:
            todo = starts
        else:
            todo = [s for s in starts if flat[s:s + step].tobytes() != shadow[s:s + step].tobytes()]
        for attempt in range(self.write_retries + 1):
            self._send_thresholds(layer, flat, todo, step)
            if not self.verify:
                break
            back = self._read_thr_flat(layer, flat.size)
            bad = np.flatnonzero(back.view(np.int64) != flat.view(np.int64))
            if not bad.size:
                break
            self.health["verify_failures"] += 1
            todo = starts
        else:
            raise WriteVerifyError(
                f"{self._info.device_id} at {self._label}: layer {layer} thresholds do not verify "
                f"after {self.write_retries + 1} writes ({bad.size} of {flat.size} differ, first "
                f"at index {int(bad[0])}: wrote {flat[bad[0]]!r}, read {back[bad[0]]!r})",
                layers=[layer])
        self._shadow_t[layer] = flat

    def read_thresholds(self, layer: int) -> torch.Tensor:
        spec = self._layer(layer, THRESHOLD_KINDS)
        n = math.prod(spec.out_shape)
        return torch.from_numpy(self._read_thr_flat(layer, n).reshape(spec.out_shape))

    # -- windows and runs ------------------------------------------------------------------------
    def set_windows(self, windows: list[tuple[float, float]]) -> None:
        spec = self._require_spec()
        arr = np.asarray(windows, dtype=np.float64).reshape(-1, 2)
        self._set_windows(arr)
        self._spec = spec.with_windows(arr.tolist())

    def _check_run_size(self, spec: NetworkSpec, b: int) -> int:
        """Expected reply bytes of a run; DeviceLimitError when one message cannot hold it."""
        stages = [math.prod(spec.input_shape)] + [math.prod(spec.layers[i].out_shape)
                                                  for i in spec.stage_layers()]
        layers = [math.prod(spec.layers[i].out_shape) for i in spec.neuron_layers()]
        classes = sum(math.prod(l.out_shape) for l in spec.layers if l.kind == "readout")
        size = run_reply_size(b, stages, layers, classes, self.f64)
        if size > MAX_MESSAGE:
            most = max_batch_for_message(stages, layers, classes, self.f64)
            raise DeviceLimitError(
                f"a batch of {b} needs a {size}-byte reply, beyond MAX_MESSAGE={MAX_MESSAGE}; "
                f"run at most {most} samples at a time on this network")
        return size

    def run(self, input_spike_times: torch.Tensor) -> DeviceRecord:
        spec = self._require_spec()
        x = input_spike_times.detach().cpu().double()
        if tuple(x.shape[1:]) != tuple(spec.input_shape):
            raise DeviceError(f"input of shape {tuple(x.shape)}; the network takes "
                              f"(B, {', '.join(map(str, spec.input_shape))})")
        b = int(x.shape[0])
        if b > self._info.max_batch:
            raise DeviceLimitError(f"batch of {b} exceeds max_batch={self._info.max_batch} of "
                                   f"{self._info.device_id}")
        expect = self._check_run_size(spec, b)
        body = self._run_exchange(x.reshape(b, -1).numpy(), b, expect)
        return self._decode_run(spec, b, body)

    def _run_request(self, arr: np.ndarray) -> bytes:
        """The RUN_BATCH request of a (B, n) batch of input times (float64 or ticks, as the
        handshake chose); DeviceError when the times cannot be sent."""
        try:
            return encode_run_request(arr, self.f64, self.ratio)
        except ValueError as e:
            raise DeviceError(f"{self._ctx_run()}: {e}") from e

    def _decode_run(self, spec: NetworkSpec, b: int, body: bytes) -> DeviceRecord:
        ctx = self._ctx_run()
        stage_ids, neuron_ids = spec.stage_layers(), spec.neuron_layers()
        try:
            rep = decode_run_reply(body, self.f64, self.ratio)
        except ValueError as e:
            raise ProtocolError(f"{ctx}: {e}") from e
        shapes = [tuple(spec.input_shape)] + [tuple(spec.layers[i].out_shape) for i in stage_ids]
        if rep.batch != b or len(rep.stage_times) != len(shapes) or \
                len(rep.v_tmax) != len(neuron_ids):
            raise ProtocolError(f"{ctx}: reply shape does not match the programmed network "
                                f"({rep.batch} samples, {len(rep.stage_times)} stages, "
                                f"{len(rep.v_tmax)} layers)")
        try:
            spike_times = [torch.from_numpy(t.reshape(b, *s)) for t, s in
                           zip(rep.stage_times, shapes)]
            v_tmax = [torch.from_numpy(v.reshape(b, *spec.layers[i].out_shape))
                      for v, i in zip(rep.v_tmax, neuron_ids)]
        except ValueError as e:
            raise ProtocolError(f"{ctx}: {e}") from e
        return DeviceRecord(
            spike_times=spike_times, readout=torch.from_numpy(rep.readout), v_tmax=v_tmax,
            spike_counts=torch.from_numpy(rep.spike_counts),
            neurons_per_layer=[spec.layers[i].n_neurons for i in neuron_ids],
            energy_j=None if rep.energy_j is None else torch.from_numpy(rep.energy_j),
            meta={"device_id": self._info.device_id, "transport": self._label,
                  "time_format": TIME_F64 if self.f64 else TIME_TICKS})
