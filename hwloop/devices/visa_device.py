"""A TTFS chip behind VISA (pyvisa; pyvisa-py ``@py`` by default), SCPI dialect.

Commands are listed in :data:`hwloop.devices.protocol.SCPI_COMMANDS` and ``docs/protocol.md``.
Bulk data travels as IEEE 488.2 definite-length blocks (``write_binary_values`` /
``read_binary_values``). Every command that writes is followed by ``SYST:ERR?``; weight writes
are verified with ``HWL:WEIG:CRC?`` and threshold writes by read-back, as on the serial backend.

pyvisa-py keeps polling a TCP socket until its timeout after the peer has closed it; this backend
waits for replies itself on ``TCPIP::...::SOCKET`` resources (select + MSG_PEEK) and raises
:class:`DeviceError` as soon as the peer hangs up. On other resources a timed-out reply is followed
by a short ``*IDN?`` probe that tells a dead link (DeviceError) from a slow chip (DeviceTimeout).
"""

from __future__ import annotations

import json
import math
import select
import socket
import time
from typing import Any, Optional

import numpy as np
import torch

from hwloop.devices import protocol as P
from hwloop.devices.base import (DeviceInfo, DeviceRecord, NetworkSpec, TTFSDevice, check_codes,
                                 NEURON_KINDS, WEIGHT_KINDS)
from hwloop.errors import (DeviceError, DeviceLimitError, DeviceTimeout, ProtocolError,
                           WriteVerifyError)

THRESHOLD_KINDS = NEURON_KINDS + ("readout",)


class VisaDevice(TTFSDevice):
    """A chip behind a VISA resource string (``TCPIP::host::port::SOCKET``, ``ASRL...``,
    ``USB...``, ``GPIB...``).

    Args:
        resource: the VISA resource name.
        backend: the pyvisa backend, ``"@py"`` (pyvisa-py) by default.
        timeout: seconds for an ordinary query; runs add ``per_sample_timeout_s`` per sample and
            bulk transfers ``bytes / byte_rate``.
        chunk_codes: weight codes (and threshold values) per write command; only chunks that
            changed since the last verified write are sent.
        time_format: "auto" (F64 when the chip offers it), "f64" or "ticks".
        sparse: send changed codes as (index, code) pairs (``HWL:WEIG:SPAR``) when the chip
            offers it (``features`` of ``HWL:INFO?``) and that is smaller than the changed chunks.
        resource_manager: an existing ``pyvisa.ResourceManager`` to use.
    """

    def __init__(self, resource: str, *, backend: str = "@py", timeout: float = 5.0,
                 per_sample_timeout_s: float = 0.01, byte_rate: float = 10e6,
                 chunk_codes: int = 65536, write_retries: int = 2, time_format: str = "auto",
                 resource_manager: Any = None, open_timeout: float = 5.0, verify: bool = True,
                 sparse: bool = True):
        import pyvisa
        self.resource = resource
        self.sparse = bool(sparse)
        self._sparse = False
        self.timeout = float(timeout)
        self.per_sample_timeout_s = float(per_sample_timeout_s)
        self.byte_rate = float(byte_rate)
        self.chunk_codes = max(1, int(chunk_codes))
        self.write_retries = int(write_retries)
        self.verify = verify
        self.health = {"retries": 0, "crc_errors": 0, "timeouts": 0, "resyncs": 0,
                       "bytes_tx": 0, "bytes_rx": 0, "verify_failures": 0, "errors": 0}
        self._closed = False
        self._spec: Optional[NetworkSpec] = None
        self._shadow_w: dict[int, tuple[np.ndarray, float]] = {}
        self._shadow_t: dict[int, np.ndarray] = {}
        self._own_rm = resource_manager is None
        try:
            self._rm = resource_manager or pyvisa.ResourceManager(backend)
            self._inst = self._rm.open_resource(resource, open_timeout=int(open_timeout * 1000))
        except Exception as e:  # pyvisa raises several unrelated types here
            if self._own_rm and getattr(self, "_rm", None) is not None:
                self._close_rm()
            raise DeviceError(f"cannot open VISA resource {resource!r}: {e}") from e
        try:
            self._inst.read_termination = P.SCPI_TERM
            self._inst.write_termination = P.SCPI_TERM
            self._inst.timeout = int(self.timeout * 1000)
            try:
                self._inst.chunk_size = 1 << 20
            except Exception:
                pass
            self._hello(time_format)
        except BaseException:
            self.close()
            raise

    # -- link ------------------------------------------------------------------------------------
    def _session(self):
        """The pyvisa-py TCPIP socket session, or None for other resources / backends."""
        try:
            sess = self._rm.visalib.sessions[self._inst.session]
        except Exception:
            return None
        return sess if isinstance(getattr(sess, "interface", None), socket.socket) else None

    def _peer_closed(self, sess) -> bool:
        try:
            data = sess.interface.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        return data == b""

    def _hangup(self, what: str) -> DeviceError:
        return DeviceError(f"{self.resource}: peer hung up during {what}")

    def _ensure_alive(self, what: str) -> None:
        if self._closed:
            raise DeviceError(f"{self.resource}: device is closed")
        sess = self._session()
        if sess is not None and not getattr(sess, "_pending_buffer", None) and \
                self._peer_closed(sess):
            raise self._hangup(what)

    def _wait_reply(self, what: str, timeout: float) -> None:
        """Wait until reply bytes are there (socket resources); hang-up -> DeviceError."""
        sess = self._session()
        if sess is None:
            return
        deadline = time.monotonic() + timeout
        while True:
            if getattr(sess, "_pending_buffer", None):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.health["timeouts"] += 1
                raise DeviceTimeout(f"{self.resource}: no reply to {what} within {timeout:.3g} s")
            try:
                r, _, _ = select.select([sess.interface], [], [], min(remaining, 0.2))
            except (OSError, ValueError) as e:
                raise self._hangup(what) from e
            if r:
                if self._peer_closed(sess):
                    raise self._hangup(what)
                return

    def _io(self, what: str, fn, *args, timeout: Optional[float] = None, **kw):
        import pyvisa
        t = self.timeout if timeout is None else timeout
        try:
            self._inst.timeout = int(t * 1000)
            return fn(*args, **kw)
        except pyvisa.errors.VisaIOError as e:
            if e.error_code == pyvisa.constants.StatusCode.error_timeout:
                self.health["timeouts"] += 1
                if not self._probe():
                    raise DeviceError(f"{self.resource}: no reply to {what} and the chip does not "
                                      f"answer *IDN? (hung up?): {e}") from e
                raise DeviceTimeout(f"{self.resource}: {what} timed out after {t:.3g} s") from e
            raise DeviceError(f"{self.resource}: {what} failed: {e}") from e
        except (OSError, ValueError) as e:
            raise DeviceError(f"{self.resource}: {what} failed (peer hung up?): {e}") from e

    def _probe(self) -> bool:
        sess = self._session()
        if sess is not None:
            return not self._peer_closed(sess)
        try:
            self._inst.timeout = 500
            self._inst.query("*IDN?")
            return True
        except Exception:
            return False

    def _write(self, cmd: str) -> None:
        self._ensure_alive(cmd)
        self.health["bytes_tx"] += len(cmd) + 1
        self._io(cmd, self._inst.write, cmd)

    def _write_block(self, cmd: str, values: np.ndarray, datatype: str) -> None:
        head = cmd.split(" ", 1)[0]
        self._ensure_alive(head)
        arr = np.ascontiguousarray(values)
        self.health["bytes_tx"] += len(cmd) + arr.nbytes + 12
        self._io(head, self._inst.write_binary_values, cmd, arr, datatype=datatype,
                 is_big_endian=False, timeout=self.timeout + arr.nbytes / self.byte_rate)

    def _query(self, cmd: str, timeout: Optional[float] = None) -> str:
        t = self.timeout if timeout is None else timeout
        self._write(cmd)
        self._wait_reply(cmd, t)
        s = self._io(cmd, self._inst.read, timeout=t)
        self.health["bytes_rx"] += len(s) + 1
        return s.strip()

    def _query_block(self, cmd: str, timeout: Optional[float] = None,
                     write_values: Optional[tuple[np.ndarray, str]] = None) -> bytes:
        t = self.timeout if timeout is None else timeout
        head = cmd.split(" ", 1)[0]
        if write_values is None:
            self._write(cmd)
        else:
            self._write_block(cmd, *write_values)
        self._wait_reply(head, t)
        data = self._io(head, self._inst.read_binary_values, datatype="s", container=bytes,
                        timeout=t)
        self.health["bytes_rx"] += len(data) + 12
        if not data:
            self._check_errors(head)  # an empty block means the command failed
        return data

    def _check_errors(self, what: str) -> None:
        """Drain SYST:ERR?; raise for the first error (LIMIT -> DeviceLimitError)."""
        errors = []
        for _ in range(P.SCPI_ERROR_QUEUE_LEN + 1):
            line = self._query("SYST:ERR?")
            code_s, _, msg = line.partition(",")
            try:
                code = int(code_s)
            except ValueError as e:
                raise ProtocolError(f"{self.resource}: bad SYST:ERR? reply {line!r}") from e
            if code == 0:
                break
            errors.append((code, msg.strip().strip('"')))
        if not errors:
            return
        self.health["errors"] += len(errors)
        code, msg = errors[0]
        text = f"{self.resource} {what}: chip error {code}: {msg}"
        if len(errors) > 1:
            text += f" (+{len(errors) - 1} more)"
        if code == P.Err.LIMIT:
            exc = DeviceLimitError(text)
        elif code < 0 or code in P.PROTOCOL_ERRORS:
            exc = ProtocolError(text)
        else:
            exc = DeviceError(text)
        exc.code = code
        raise exc

    # -- session ---------------------------------------------------------------------------------
    def _hello(self, time_format: str) -> None:
        self._write("*CLS")
        self.idn = self._query("*IDN?")
        try:
            doc = json.loads(self._query("HWL:INFO?"))
            self._info = DeviceInfo.model_validate(doc["info"])
        except (ValueError, KeyError, TypeError) as e:
            raise ProtocolError(f"{self.resource}: bad HWL:INFO? reply: {e}") from e
        if doc.get("protocol_version") != P.PROTOCOL_VERSION:
            raise ProtocolError(f"{self.resource}: chip speaks protocol "
                                f"{doc.get('protocol_version')}, host {P.PROTOCOL_VERSION}")
        formats = doc.get("time_formats", [P.TIME_TICKS])
        if time_format == "auto":
            self.f64 = P.TIME_F64 in formats
        elif time_format in (P.TIME_F64, P.TIME_TICKS):
            if time_format not in formats:
                raise DeviceError(f"{self.resource} does not offer time format {time_format!r}")
            self.f64 = time_format == P.TIME_F64
        else:
            raise ValueError(f"time_format must be 'auto', 'f64' or 'ticks', got {time_format!r}")
        self.ratio = P.ticks_per_tau_c(self._info.tau_c_s, self._info.clock_period_s)
        features = doc.get("features", [])
        self._sparse = self.sparse and isinstance(features, list) and \
            P.FEATURE_SPARSE in features
        self._set_tfor()

    def _set_tfor(self) -> None:
        self._write("HWL:TFOR " + ("F64" if self.f64 else "TICK"))
        self._check_errors("HWL:TFOR")


    @property
    def verifies_writes(self) -> bool:
        """Every write is checked in the driver (weights by WEIGHTS_CRC, thresholds by
        read-back) unless constructed with ``verify=False``."""
        return bool(self.verify)

    def info(self) -> DeviceInfo:
        return self._info

    def status(self) -> dict:
        return json.loads(self._query("HWL:STAT?"))

    def _require_spec(self) -> NetworkSpec:
        if self._spec is None:
            st = self.status()
            if not st.get("programmed"):
                raise DeviceError(f"{self._info.device_id} at {self.resource}: no network "
                                  "programmed")
            self._spec = NetworkSpec.model_validate(st["spec"])
        return self._spec

    def _layer(self, layer: int, kinds: tuple[str, ...]):
        spec = self._require_spec()
        if not 0 <= layer < len(spec.layers) or spec.layers[layer].kind not in kinds:
            raise DeviceError(f"{self._info.device_id}: layer {layer} is not one of {list(kinds)} "
                              "in the programmed network")
        return spec.layers[layer]

    def program(self, spec: NetworkSpec) -> None:
        self._spec = None
        self._shadow_w.clear()
        self._shadow_t.clear()
        blob = np.frombuffer(spec.model_dump_json().encode("utf-8"), np.uint8)
        self._write_block("HWL:PROG ", blob, "B")
        self._check_errors("HWL:PROG")
        self._spec = spec

    def seed_noise(self, seed: int) -> None:
        """Reseed the chip's random jitter (``HWL:SEED``); ignored by a chip without it."""
        self._write(f"HWL:SEED {int(seed) & 0xFFFFFFFFFFFFFFFF}")
        try:
            self._check_errors("HWL:SEED")
        except DeviceError as e:
            if getattr(e, "code", None) not in (P.Err.UNSUPPORTED, P.SCPI_UNDEFINED_HEADER):
                raise

    def reset(self) -> None:
        self._spec = None
        self._shadow_w.clear()
        self._shadow_t.clear()
        self._write("*RST")
        self._check_errors("*RST")
        self._set_tfor()

    # -- weights ---------------------------------------------------------------------------------
    def _weights_crc(self, layer: int) -> tuple[int, float, int]:
        line = self._query(f"HWL:WEIG:CRC? {layer}")
        if not line:
            self._check_errors("HWL:WEIG:CRC?")
            raise ProtocolError(f"{self.resource}: empty HWL:WEIG:CRC? reply")
        try:
            crc, scale, n = line.split(",")
            return int(crc), float(scale), int(n)
        except ValueError as e:
            raise ProtocolError(f"{self.resource}: bad HWL:WEIG:CRC? reply {line!r}") from e

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
        step = self.chunk_codes
        starts = list(range(0, flat.size, step)) or [0]
        shadow = self._shadow_w.pop(layer, None)
        sparse = None  # flat indices of the changed codes, when HWL:WEIG:SPAR is smaller
        if shadow is None or shadow[0].shape != flat.shape:
            todo = starts
        else:
            diff = flat != shadow[0]
            todo = [s for s in starts if diff[s:s + step].any()]
            if not todo and shadow[1] != scale:
                todo = starts[:1]
            changed = np.flatnonzero(diff)
            if self._sparse and changed.size and \
                    2 * changed.size < sum(min(step, flat.size - s) for s in todo):
                sparse = changed
        expect = P.weights_crc(flat, scale)
        for attempt in range(self.write_retries + 1):
            if sparse is not None:
                per = max(1, step // 2)
                pieces = range(0, sparse.size, per)
                for i, s in enumerate(pieces):
                    idx = sparse[s:s + per]
                    block = np.concatenate([idx.astype(P.DT_COUNT),
                                            flat[idx].astype(P.DT_CODE32).view(P.DT_COUNT)])
                    commit = int(i == len(pieces) - 1)
                    self._write_block(f"HWL:WEIG:SPAR {layer},{scale!r},{commit},", block, "I")
            else:
                for i, s in enumerate(todo):
                    commit = int(i == len(todo) - 1)
                    self._write_block(f"HWL:WEIG {layer},{scale!r},{s},{commit},",
                                      flat[s:s + step].astype(P.DT_CODE32), "i")
            self._check_errors("HWL:WEIG")
            if not self.verify:
                break
            crc, dscale, n = self._weights_crc(layer)
            if crc == expect and dscale == scale and n == flat.size:
                break
            self.health["verify_failures"] += 1
            todo, sparse = starts, None
        else:
            raise WriteVerifyError(
                f"{self._info.device_id} at {self.resource}: layer {layer} weights do not verify "
                f"after {self.write_retries + 1} writes (chip CRC {crc:#010x}, scale {dscale!r}; "
                f"expected {expect:#010x}, {scale!r})", layers=[layer])
        self._shadow_w[layer] = (flat.copy(), scale)

    def read_weights(self, layer: int) -> tuple[torch.Tensor, float]:
        spec = self._layer(layer, WEIGHT_KINDS)
        n = math.prod(spec.weight_shape)
        data = self._query_block(f"HWL:WEIG? {layer}", self.timeout + 4 * n / self.byte_rate)
        if len(data) != 4 * n:
            raise ProtocolError(f"{self.resource}: HWL:WEIG? returned {len(data)} bytes for "
                                f"{n} codes")
        scale_s = self._query(f"HWL:WEIG:SCAL? {layer}")
        codes = np.frombuffer(data, P.DT_CODE32).astype(np.int64)
        return torch.from_numpy(codes.reshape(spec.weight_shape)), float(scale_s)

    # -- thresholds ------------------------------------------------------------------------------
    def _read_thr_flat(self, layer: int, n: int) -> np.ndarray:
        data = self._query_block(f"HWL:THR? {layer}", self.timeout + 8 * n / self.byte_rate)
        if len(data) != 8 * n:
            raise ProtocolError(f"{self.resource}: HWL:THR? returned {len(data)} bytes for "
                                f"{n} values")
        return np.frombuffer(data, P.DT_F64).astype(np.float64)

    def write_thresholds(self, layer: int, values: torch.Tensor) -> None:
        spec = self._layer(layer, THRESHOLD_KINDS)
        if tuple(values.shape) != tuple(spec.out_shape):
            raise DeviceError(f"layer {layer}: thresholds of shape {tuple(values.shape)}, "
                              f"expected {spec.out_shape}")
        flat = values.detach().cpu().reshape(-1).double().numpy().copy()
        if not np.all(np.isfinite(flat)):
            raise DeviceError(f"layer {layer}: thresholds must be finite")
        step = self.chunk_codes
        starts = list(range(0, flat.size, step))
        shadow = self._shadow_t.pop(layer, None)
        if shadow is None or shadow.shape != flat.shape:
            todo = starts
        else:
            todo = [s for s in starts if flat[s:s + step].tobytes() != shadow[s:s + step].tobytes()]
        for attempt in range(self.write_retries + 1):
            for i, s in enumerate(todo):
                commit = int(i == len(todo) - 1)
                self._write_block(f"HWL:THR {layer},{s},{commit},", flat[s:s + step], "d")
            self._check_errors("HWL:THR")
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
                f"{self._info.device_id} at {self.resource}: layer {layer} thresholds do not "
                f"verify after {self.write_retries + 1} writes ({bad.size} differ)",
                layers=[layer])
        self._shadow_t[layer] = flat

    def read_thresholds(self, layer: int) -> torch.Tensor:
        spec = self._layer(layer, THRESHOLD_KINDS)
        return torch.from_numpy(self._read_thr_flat(layer, math.prod(spec.out_shape))
                                .reshape(spec.out_shape))

    # -- windows and runs ------------------------------------------------------------------------
    def set_windows(self, windows: list[tuple[float, float]]) -> None:
        spec = self._require_spec()
        arr = np.asarray(windows, dtype=np.float64).reshape(-1, 2)
        self._write_block("HWL:WIND ", arr.reshape(-1), "d")
        self._check_errors("HWL:WIND")
        self._spec = P.spec_with_windows(spec, arr.tolist())

    def _check_run_size(self, spec: NetworkSpec, b: int) -> int:
        """Expected reply bytes of a run; DeviceLimitError when one message cannot hold it."""
        stages = [math.prod(spec.input_shape)] + [math.prod(spec.layers[i].out_shape)
                                                  for i in spec.stage_layers()]
        layers = [math.prod(spec.layers[i].out_shape) for i in spec.neuron_layers()]
        classes = sum(math.prod(l.out_shape) for l in spec.layers if l.kind == "readout")
        size = P.run_reply_size(b, stages, layers, classes, self.f64)
        if size > P.MAX_MESSAGE:
            most = P.max_batch_for_message(stages, layers, classes, self.f64)
            raise DeviceLimitError(
                f"a batch of {b} needs a {size}-byte reply, beyond MAX_MESSAGE={P.MAX_MESSAGE}; "
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
            raise DeviceLimitError(f"batch of {b} exceeds max_batch={self._info.max_batch}")
        self._check_run_size(spec, b)
        arr = x.reshape(b, -1).numpy()
        try:
            values = arr.astype(P.DT_F64) if self.f64 else P.times_to_ticks(arr, self.ratio)
        except ValueError as e:
            raise DeviceError(f"{self.resource} HWL:RUN?: {e}") from e
        stage_ids, neuron_ids = spec.stage_layers(), spec.neuron_layers()
        nbytes = values.nbytes + self._check_run_size(spec, b)
        t = self.timeout + self.per_sample_timeout_s * b + nbytes / self.byte_rate
        body = self._query_block(f"HWL:RUN? {b},", t,
                                 write_values=(values.reshape(-1), "d" if self.f64 else "I"))
        try:
            rep = P.decode_run_reply(body, self.f64, self.ratio)
        except ValueError as e:
            raise ProtocolError(f"{self.resource} HWL:RUN?: {e}") from e
        shapes = [tuple(spec.input_shape)] + [tuple(spec.layers[i].out_shape) for i in stage_ids]
        if rep.batch != b or len(rep.stage_times) != len(shapes) or \
                len(rep.v_tmax) != len(neuron_ids):
            raise ProtocolError(f"{self.resource} HWL:RUN?: reply does not match the network")
        try:
            spike_times = [torch.from_numpy(t.reshape(b, *s)) for t, s in
                           zip(rep.stage_times, shapes)]
            v_tmax = [torch.from_numpy(v.reshape(b, *spec.layers[i].out_shape))
                      for v, i in zip(rep.v_tmax, neuron_ids)]
        except ValueError as e:
            raise ProtocolError(f"{self.resource} HWL:RUN?: {e}") from e
        return DeviceRecord(
            spike_times=spike_times, readout=torch.from_numpy(rep.readout), v_tmax=v_tmax,
            spike_counts=torch.from_numpy(rep.spike_counts),
            neurons_per_layer=[spec.layers[i].n_neurons for i in neuron_ids],
            energy_j=None if rep.energy_j is None else torch.from_numpy(rep.energy_j),
            meta={"device_id": self._info.device_id, "transport": self.resource,
                  "time_format": P.TIME_F64 if self.f64 else P.TIME_TICKS})

    def _close_rm(self) -> None:
        try:
            self._rm.close()
        except Exception:
            pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._inst.close()
        except Exception:
            pass
        if self._own_rm:
            self._close_rm()
