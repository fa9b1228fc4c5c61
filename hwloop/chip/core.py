"""The chip behind every dialect: :class:`ChipCore` wraps a :class:`TTFSDevice` with the state a
chip keeps between wire commands (staged partial writes, the tick ratio, which link controls it),
and :class:`Unit`, what a session hands the link for each piece of the stream it received.

A session (:mod:`hwloop.chip.frame_session`, :mod:`hwloop.chip.scpi_session`) turns received
bytes into units (``receive(data) -> iterator of Unit``); the link (:mod:`hwloop.chip.link`)
runs them, injects faults and sends the replies, without knowing the dialect.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from pydantic import ValidationError

from hwloop.devices.base import THRESHOLD_KINDS, WEIGHT_KINDS, NetworkSpec, TTFSDevice
from hwloop.errors import DeviceError, DeviceLimitError
from hwloop.wire.codec import (FEATURE_LOCK, FEATURE_SPARSE, PROTOCOL_VERSION, TIME_F64,
                               TIME_TICKS, Err, encode_run_reply, hello_json, ticks_per_tau_c,
                               weights_crc)

#: The logger of the virtual chip (links opened and closed, ownership, failures).
log = logging.getLogger("hwloop.chip")


@dataclass
class Unit:
    """One piece of a received stream, for the link to run (:func:`hwloop.chip.link.serve_link`).

    Attributes:
        run: ``run(heartbeat) -> replies``: execute and return the encoded replies.
            ``heartbeat(data, interval_s)`` is a context manager of the link that sends ``data``
            now and every ``interval_s`` while the body runs (the frame dialect's PENDING).
        commands: how many commands this unit holds (counted by ``disconnect_after``).
        droppable: the link may lose it before it runs (a request frame; fault injection).
        delayed: replies wait ``delay_s`` (fault injection); not for a NAK of damaged input.
        damaged: damaged input that the session only answers (counted as a bad frame).
        fail: ``fail(exc) -> replies`` for an unexpected exception of ``run`` (a bug: answered
            and logged, the link stays); None lets it propagate.
        label: how log messages name the unit.
    """

    run: Callable[[Callable], list]
    commands: int = 1
    droppable: bool = False
    delayed: bool = True
    damaged: bool = False
    fail: Optional[Callable[[Exception], list]] = None
    label: str = ""


class ChipError(Exception):
    """An operation the chip refuses: becomes an ERROR reply / a SYST:ERR? entry."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = int(code)
        self.message = message


class Peer:
    """Who is on the other end of a session: a name for messages (the client's address) and a
    way to tell whether that link is still there (``alive``)."""

    def __init__(self, name: str, alive: Optional[Callable[[], bool]] = None):
        self.name = name
        self._alive = alive

    def alive(self) -> bool:
        if self._alive is None:
            return True
        try:
            return bool(self._alive())
        except Exception:
            return False

    def __repr__(self) -> str:
        return f"Peer({self.name!r})"


class ChipCore:
    """Wraps a TTFSDevice with the chip's wire-level state: staged partial writes, tick ratio,
    and which link controls the chip (:meth:`claim`; docs/protocol.md, "Ownership")."""

    def __init__(self, device: TTFSDevice):
        self.device = device
        self.lock = threading.RLock()
        self.info = device.info()
        self.ratio = ticks_per_tau_c(self.info.tau_c_s, self.info.clock_period_s)
        self.spec: Optional[NetworkSpec] = None
        self._stage_w: dict[int, list] = {}
        self._stage_t: dict[int, np.ndarray] = {}
        self.runs = 0
        self.time_formats = [TIME_TICKS, TIME_F64]
        self.features = [FEATURE_SPARSE, FEATURE_LOCK]
        self.owner: Optional[Peer] = None
        self._owner_lock = threading.Lock()

    # -- ownership: one controlling link at a time -----------------------------------------------
    @staticmethod
    def busy_message(owner: Peer) -> str:
        return (f"chip busy: it is controlled by {owner.name}; this link may only query "
                "(identity, status, reads) until that link closes or releases it "
                "(take over with SerialDevice/VisaDevice take_over=True: LOCK take-over, "
                "SCPI HWL:LOCK:TAKE)")

    def _set_owner(self, peer: Optional[Peer], text: str, level: int = logging.INFO) -> None:
        self.owner = peer
        with self.lock:  # another link's staged partial writes must never be committed
            self._stage_w.clear()
            self._stage_t.clear()
        log.log(level, "virtual chip: %s", text)

    def claim(self, peer: Peer) -> None:
        """Give ``peer`` control when nobody (alive) has it; ChipError(BUSY) naming the owner
        otherwise."""
        with self._owner_lock:
            cur = self.owner
            if cur is peer:
                return
            if cur is not None and cur.alive():
                raise ChipError(Err.BUSY, self.busy_message(cur))
            self._set_owner(peer, f"{peer.name} took control of the chip" +
                            (f" ({cur.name} is gone)" if cur is not None else ""))

    def release(self, peer: Peer, why: str = "released the chip") -> bool:
        with self._owner_lock:
            if self.owner is not peer:
                return False
            self._set_owner(None, f"{peer.name} {why}")
            return True

    def take_over(self, peer: Peer) -> None:
        with self._owner_lock:
            cur = self.owner
            if cur is peer:
                return
            if cur is None:
                self._set_owner(peer, f"{peer.name} took control of the chip")
            else:
                self._set_owner(peer, f"{peer.name} took over the chip from {cur.name}",
                                logging.WARNING)

    def lock_state(self, peer: Peer) -> dict:
        with self._owner_lock:
            cur = self.owner
            return {"owner": None if cur is None else cur.name, "you": cur is peer}

    # -- helpers ---------------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable, *args):
        try:
            return fn(*args)
        except ChipError:
            raise
        except DeviceLimitError as e:
            raise ChipError(Err.LIMIT, str(e)) from e
        except DeviceError as e:
            raise ChipError(Err.DEVICE, f"{what}: {e}") from e
        except (ValueError, TypeError) as e:
            raise ChipError(Err.RANGE, f"{what}: {e}") from e
        except Exception as e:  # the wrapped device failed: report, keep serving
            raise ChipError(Err.INTERNAL, f"{what}: {type(e).__name__}: {e}") from e

    def layer_spec(self, layer: int, kinds: tuple[str, ...]):
        if self.spec is None:
            raise ChipError(Err.NOT_PROGRAMMED, "no network programmed")
        if not 0 <= layer < len(self.spec.layers):
            raise ChipError(Err.RANGE, f"layer {layer} out of range 0..{len(self.spec.layers)-1}")
        spec = self.spec.layers[layer]
        if spec.kind not in kinds:
            raise ChipError(Err.RANGE, f"layer {layer} is {spec.kind!r}; expected one of "
                                         f"{list(kinds)}")
        return spec

    @staticmethod
    def _range(offset: int, count: int, n: int, what: str) -> None:
        if offset + count > n:
            raise ChipError(Err.RANGE, f"{what}: offset {offset} + count {count} exceeds {n}")

    # -- operations ------------------------------------------------------------------------------
    def hello(self) -> dict:
        info = self.info.model_dump(mode="json")
        info["protocol_version"] = PROTOCOL_VERSION  # what this link speaks (provenance)
        doc = hello_json(info, self.time_formats, self.features)
        digest = getattr(self.device, "model_sha256", None)  # a virtual chip knows its model
        if digest:
            doc["model_sha256"] = digest
        return doc

    def seed_noise(self, seed: int) -> None:
        with self.lock:
            self._call("seed_noise", self.device.seed_noise, int(seed))

    def program(self, spec_json: bytes) -> None:
        try:
            spec = NetworkSpec.model_validate_json(spec_json)
        except (ValidationError, ValueError) as e:
            raise ChipError(Err.BAD_PAYLOAD, f"PROGRAM: invalid NetworkSpec JSON: {e}") from e
        with self.lock:
            self.spec = None
            self._stage_w.clear()
            self._stage_t.clear()
            self._call("program", self.device.program, spec)
            self.spec = spec

    def reset(self) -> None:
        with self.lock:
            self._call("reset", self.device.reset)
            self.spec = None
            self._stage_w.clear()
            self._stage_t.clear()

    def write_weights(self, layer: int, offset: int, codes: np.ndarray, scale: float,
                      commit: bool, indices: Optional[np.ndarray] = None) -> None:
        """Stage ``codes`` at ``offset`` (or, with ``indices``, at those flat indices: a sparse
        write, indices already checked increasing) and apply the layer on ``commit``."""
        with self.lock:
            spec = self.layer_spec(layer, WEIGHT_KINDS)
            n = math.prod(spec.weight_shape)
            if indices is None:
                self._range(offset, codes.size, n, f"WRITE_WEIGHTS layer {layer}")
            elif indices.size and int(indices[-1]) >= n:
                raise ChipError(Err.RANGE, f"WRITE_WEIGHTS_SPARSE layer {layer}: index "
                                             f"{int(indices[-1])} exceeds {n - 1}")
            bits = self.info.weight_bits
            lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            if codes.size and (codes.min() < lo or codes.max() > hi):
                raise ChipError(Err.RANGE, f"layer {layer}: codes must lie in [{lo}, {hi}] for "
                                             f"weight_bits={bits}")
            if not math.isfinite(scale):
                raise ChipError(Err.RANGE, f"layer {layer}: scale {scale} is not finite")
            st = self._stage_w.get(layer)
            if st is None:
                cur, _ = self._call("read_weights", self.device.read_weights, layer)
                st = [cur.detach().cpu().numpy().astype(np.int64).reshape(-1).copy(), scale]
                self._stage_w[layer] = st
            if indices is None:
                st[0][offset:offset + codes.size] = codes
            else:
                st[0][indices] = codes
            st[1] = float(scale)
            if commit:
                del self._stage_w[layer]
                self._call("write_weights", self.device.write_weights, layer,
                           torch.from_numpy(st[0].reshape(spec.weight_shape)), st[1])

    def read_weights(self, layer: int, offset: int, count: int) -> tuple[np.ndarray, float]:
        with self.lock:
            spec = self.layer_spec(layer, WEIGHT_KINDS)
            self._range(offset, count, math.prod(spec.weight_shape), f"READ_WEIGHTS layer {layer}")
            codes, scale = self._call("read_weights", self.device.read_weights, layer)
            flat = codes.detach().cpu().numpy().astype(np.int64).reshape(-1)
            return flat[offset:offset + count], float(scale)

    def weights_crc(self, layer: int) -> tuple[int, float, int]:
        with self.lock:
            self.layer_spec(layer, WEIGHT_KINDS)
            codes, scale = self._call("read_weights", self.device.read_weights, layer)
            flat = codes.detach().cpu().numpy().astype(np.int64).reshape(-1)
            return weights_crc(flat, float(scale)), float(scale), int(flat.size)

    def write_thresholds(self, layer: int, offset: int, values: np.ndarray, commit: bool) -> None:
        with self.lock:
            spec = self.layer_spec(layer, THRESHOLD_KINDS)
            n = math.prod(spec.out_shape)
            self._range(offset, values.size, n, f"WRITE_THRESHOLDS layer {layer}")
            st = self._stage_t.get(layer)
            if st is None:
                cur = self._call("read_thresholds", self.device.read_thresholds, layer)
                st = cur.detach().cpu().double().numpy().reshape(-1).copy()
                self._stage_t[layer] = st
            st[offset:offset + values.size] = values
            if commit:
                del self._stage_t[layer]
                self._call("write_thresholds", self.device.write_thresholds, layer,
                           torch.from_numpy(st.reshape(spec.out_shape)))

    def read_thresholds(self, layer: int, offset: int, count: int) -> np.ndarray:
        with self.lock:
            spec = self.layer_spec(layer, THRESHOLD_KINDS)
            self._range(offset, count, math.prod(spec.out_shape), f"READ_THRESHOLDS layer {layer}")
            cur = self._call("read_thresholds", self.device.read_thresholds, layer)
            return cur.detach().cpu().double().numpy().reshape(-1)[offset:offset + count]

    def set_windows(self, pairs: np.ndarray) -> None:
        with self.lock:
            if self.spec is None:
                raise ChipError(Err.NOT_PROGRAMMED, "no network programmed")
            wins = [(float(a), float(b)) for a, b in pairs.reshape(-1, 2)]
            self._call("set_windows", self.device.set_windows, wins)
            self.spec = self.spec.with_windows(wins)  # STATUS reports the new windows

    def run(self, times: np.ndarray, f64: bool) -> bytes:
        """``times``: (B, n) float64 tau_c. Returns the RUN_BATCH reply body."""
        with self.lock:
            if self.spec is None:
                raise ChipError(Err.NOT_PROGRAMMED, "no network programmed")
            b, n = times.shape
            if b < 1 or b > self.info.max_batch:
                raise ChipError(Err.LIMIT, f"batch of {b} outside 1..max_batch="
                                             f"{self.info.max_batch}")
            if n != math.prod(self.spec.input_shape):
                raise ChipError(Err.BAD_PAYLOAD, f"RUN_BATCH: {n} inputs per sample, network "
                                                   f"takes {self.spec.input_shape}")
            inp = torch.from_numpy(np.ascontiguousarray(times).reshape(b, *self.spec.input_shape))
            rec = self._call("run", self.device.run, inp)
            self.runs += 1
            try:
                return encode_run_reply(
                    [s.detach().cpu().double().numpy() for s in rec.spike_times],
                    rec.readout.detach().cpu().double().numpy(),
                    [v.detach().cpu().double().numpy() for v in rec.v_tmax],
                    rec.spike_counts.detach().cpu().numpy(),
                    None if rec.energy_j is None else rec.energy_j.detach().cpu().double().numpy(),
                    f64, self.ratio)
            except ValueError as e:
                raise ChipError(Err.RANGE, f"RUN_BATCH reply: {e}") from e

    def status(self) -> dict:
        with self.lock:
            return {"device_id": self.info.device_id, "programmed": self.spec is not None,
                    "spec": None if self.spec is None else self.spec.model_dump(mode="json"),
                    "runs": self.runs, "staged_weights": sorted(self._stage_w),
                    "staged_thresholds": sorted(self._stage_t)}
