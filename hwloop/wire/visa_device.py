"""A TTFS chip behind VISA (pyvisa; pyvisa-py ``@py`` by default), SCPI dialect.

Commands are listed in :data:`hwloop.wire.scpi.SCPI_COMMANDS` and ``docs/protocol.md``.
Bulk data travels as IEEE 488.2 definite-length blocks (``write_binary_values`` /
``read_binary_values``). Every command that writes is followed by ``SYST:ERR?``; weight writes
are verified with ``HWL:WEIG:CRC?`` and threshold writes by read-back, as on the serial backend.

pyvisa-py keeps polling a TCP socket until its timeout after the peer has closed it; this backend
waits for replies itself on ``TCPIP::...::SOCKET`` resources (select + MSG_PEEK) and raises
:class:`DeviceError` as soon as the peer hangs up. On other resources a timed-out reply is followed
by a short ``*IDN?`` probe that tells a dead link (DeviceError) from a slow chip (DeviceTimeout).

SCPI replies carry no sequence number, so a reply that arrives after its command timed out would
otherwise be read as the reply to the next command. Every command is therefore marked in flight
until it completes; if one does not complete (a timeout, a hang-up, an interrupt, a reply that
does not parse), the next command is preceded by a resynchronisation (:meth:`VisaDevice._resync`):
``*CLS``, ``HWL:TFOR``, ``HWL:ECHO? <fresh token>``, and everything read before the token's echo
is discarded. If the echo does not come within ``resync_timeout``, the device is failed: that call
and every later one raise :class:`DeviceError` saying why. Commands that complete cost nothing
extra.

The link half (hang-up detection, reply waits, resynchronisation) is :mod:`hwloop.wire.visa_io`.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional

import numpy as np
import pyvisa
import torch

from hwloop.devices.base import WEIGHT_KINDS, NetworkSpec
from hwloop.errors import DeviceError, ProtocolError
from hwloop.wire.codec import (DT_CODE32, DT_COUNT, DT_F64, PROTOCOL_VERSION, RUN_REQ, Err,
                               chip_error)
from hwloop.wire.host import HEALTH_KEYS, HostDevice
from hwloop.wire.scpi import SCPI_ERROR_QUEUE_LEN, SCPI_TERM, SCPI_UNDEFINED_HEADER
from hwloop.wire.visa_io import VisaLink


class VisaDevice(VisaLink, HostDevice):
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
        resync_timeout: seconds to wait for the echo of the resynchronisation marker after a
            command that did not complete; default ``timeout`` plus twice that command's own
            timeout (the chip may still be finishing it).
        take_over: take control of the chip at once, even from another link
            (``HWL:LOCK:TAKE``); by default the first command that changes the chip takes
            control, and while another link has it those commands fail with a BUSY
            ``DeviceError`` naming its address.

    Raises (any method): :class:`DeviceTimeout` when the chip does not answer a command in time
    (the next command resynchronises first); :class:`DeviceError` when the peer hangs up, when
    the device is closed, and when resynchronising failed (then on every later call too, until
    the device is reopened); :class:`ProtocolError` for a malformed reply; chip errors from
    ``SYST:ERR?`` as :class:`DeviceLimitError`, :class:`ProtocolError` or :class:`DeviceError`.
    """

    def __init__(self, resource: str, *, backend: str = "@py", timeout: float = 5.0,
                 per_sample_timeout_s: float = 0.01, byte_rate: float = 10e6,
                 chunk_codes: int = 65536, write_retries: int = 2, time_format: str = "auto",
                 resource_manager: Any = None, open_timeout: float = 5.0, verify: bool = True,
                 sparse: bool = True, resync_timeout: Optional[float] = None,
                 take_over: bool = False):
        self.resource = resource
        self._init_host(verify=verify, write_retries=write_retries, sparse=sparse,
                        health=HEALTH_KEYS + ("verify_failures", "errors", "discarded_bytes"))
        self.timeout = float(timeout)
        self.per_sample_timeout_s = float(per_sample_timeout_s)
        self.byte_rate = float(byte_rate)
        self.chunk_codes = max(1, int(chunk_codes))
        self.resync_timeout = None if resync_timeout is None else float(resync_timeout)
        #: (command, its timeout) of a command that has not completed: the reply stream may be
        #: out of step until :meth:`_resync` has run.
        self._unsynced: Optional[tuple[str, float]] = None
        #: why the device failed (resynchronisation impossible); every later call raises it.
        self._failed: Optional[str] = None
        self._closed = False
        self._own_rm = resource_manager is None
        try:
            self._rm = resource_manager or pyvisa.ResourceManager(backend)
            self._inst = self._rm.open_resource(resource, open_timeout=int(open_timeout * 1000))
        except Exception as e:  # pyvisa raises several unrelated types here
            if self._own_rm and getattr(self, "_rm", None) is not None:
                self._close_rm()
            raise DeviceError(f"cannot open VISA resource {resource!r}: {e}") from e
        try:
            self._check_connected()
            self._inst.read_termination = SCPI_TERM
            self._inst.write_termination = SCPI_TERM
            self._inst.timeout = int(self.timeout * 1000)
            try:
                self._inst.chunk_size = 1 << 20
            except Exception:
                pass
            self._hello(time_format)
            if take_over:
                self._write("HWL:LOCK:TAKE")
                self._check_errors("HWL:LOCK:TAKE")
        except BaseException:
            self.close()
            raise

    # -- transactions: every command is in flight (``_unsynced``) until it has completed -------
    def _begin(self, what: str, timeout: float) -> None:
        """Start a command: refuse on a closed or failed device, resynchronise when the last
        command did not complete, then mark this one in flight."""
        self._ensure_alive(what)
        if self._unsynced is not None:
            self._resync()
        self._unsynced = (what, timeout)

    def _suspect(self, what: str) -> None:
        """A reply did not fit its command: resynchronise before the next one."""
        if self._unsynced is None:
            self._unsynced = (what, self.timeout)

    def _send(self, cmd: str) -> None:
        self.health["bytes_tx"] += len(cmd) + 1
        self._io(cmd, self._inst.write, cmd)

    def _send_block(self, cmd: str, values: np.ndarray, datatype: str) -> None:
        head = cmd.split(" ", 1)[0]
        arr = np.ascontiguousarray(values)
        self.health["bytes_tx"] += len(cmd) + arr.nbytes + 12
        self._io(head, self._inst.write_binary_values, cmd, arr, datatype=datatype,
                 is_big_endian=False, timeout=self.timeout + arr.nbytes / self.byte_rate)

    def _write(self, cmd: str) -> None:
        self._begin(cmd, self.timeout)
        self._send(cmd)
        self._unsynced = None

    def _write_block(self, cmd: str, values: np.ndarray, datatype: str) -> None:
        self._begin(cmd.split(" ", 1)[0], self.timeout)
        self._send_block(cmd, values, datatype)
        self._unsynced = None

    def _query(self, cmd: str, timeout: Optional[float] = None) -> str:
        t = self.timeout if timeout is None else timeout
        self._begin(cmd, t)
        self._send(cmd)
        self._wait_reply(cmd, t)
        s = self._io(cmd, self._inst.read, timeout=t)
        self._unsynced = None
        self.health["bytes_rx"] += len(s) + 1
        return s.strip()

    def _query_block(self, cmd: str, timeout: Optional[float] = None,
                     write_values: Optional[tuple[np.ndarray, str]] = None) -> bytes:
        t = self.timeout if timeout is None else timeout
        head = cmd.split(" ", 1)[0]
        self._begin(head, t)
        if write_values is None:
            self._send(cmd)
        else:
            self._send_block(cmd, *write_values)
        self._wait_reply(head, t)
        data = self._io(head, self._inst.read_binary_values, datatype="s", container=bytes,
                        timeout=t)
        self._unsynced = None
        self.health["bytes_rx"] += len(data) + 12
        if not data:
            self._check_errors(head)  # an empty block means the command failed
        return data

    def _check_errors(self, what: str) -> None:
        """Drain SYST:ERR?; raise for the first error (LIMIT -> DeviceLimitError)."""
        errors = []
        for _ in range(SCPI_ERROR_QUEUE_LEN + 1):
            line = self._query("SYST:ERR?")
            code_s, _, msg = line.partition(",")
            try:
                code = int(code_s)
            except ValueError as e:
                self._suspect("SYST:ERR?")
                raise ProtocolError(f"{self.resource}: bad SYST:ERR? reply {line!r}") from e
            if code == 0:
                break
            errors.append((code, msg.strip().strip('"')))
        if not errors:
            return
        self.health["errors"] += len(errors)
        code, msg = errors[0]
        if len(errors) > 1:
            msg += f" (+{len(errors) - 1} more)"
        raise chip_error(code, msg, f"{self.resource} {what}")

    # -- session ---------------------------------------------------------------------------------
    def _hello(self, time_format: str) -> None:
        self._write("*CLS")
        self.idn = self._query("*IDN?")
        doc = self._accept_hello(self._query("HWL:INFO?"), "HWL:INFO? reply")
        if doc.get("protocol_version") != PROTOCOL_VERSION:
            raise ProtocolError(f"{self.resource}: chip speaks protocol "
                                f"{doc.get('protocol_version')}, host {PROTOCOL_VERSION}")
        self._choose_formats(doc, time_format)
        self._set_tfor()

    def _set_tfor(self) -> None:
        self._write("HWL:TFOR " + ("F64" if self.f64 else "TICK"))
        self._check_errors("HWL:TFOR")


    # -- transport hooks of HostDevice -----------------------------------------------------------
    @property
    def _label(self) -> str:
        return self.resource

    def _ctx_run(self) -> str:
        return f"{self.resource} HWL:RUN?"

    def status(self) -> dict:
        return json.loads(self._query("HWL:STAT?"))

    def _program(self, spec: NetworkSpec) -> None:
        blob = np.frombuffer(spec.model_dump_json().encode("utf-8"), np.uint8)
        self._write_block("HWL:PROG ", blob, "B")
        self._check_errors("HWL:PROG")

    def _reset(self) -> None:
        self._write("*RST")
        self._check_errors("*RST")
        self._set_tfor()

    def _set_windows(self, arr: np.ndarray) -> None:
        self._write_block("HWL:WIND ", arr.reshape(-1), "d")
        self._check_errors("HWL:WIND")

    def _weight_step(self, wide: bool) -> int:
        return self.chunk_codes

    def _code_bytes(self, wide: bool) -> int:
        return DT_CODE32.itemsize  # codes always travel as int32 blocks

    def _send_weights(self, layer: int, flat: np.ndarray, scale: float, wide: bool,
                      todo: list[int], step: int, sparse: Optional[np.ndarray]) -> None:
        if sparse is not None:
            per = max(1, step // 2)
            pieces = range(0, sparse.size, per)
            for i, s in enumerate(pieces):
                idx = sparse[s:s + per]
                block = np.concatenate([idx.astype(DT_COUNT),
                                        flat[idx].astype(DT_CODE32).view(DT_COUNT)])
                commit = int(i == len(pieces) - 1)
                self._write_block(f"HWL:WEIG:SPAR {layer},{scale!r},{commit},", block, "I")
        else:
            for i, s in enumerate(todo):
                commit = int(i == len(todo) - 1)
                self._write_block(f"HWL:WEIG {layer},{scale!r},{s},{commit},",
                                  flat[s:s + step].astype(DT_CODE32), "i")
        self._check_errors("HWL:WEIG")

    def _weights_crc(self, layer: int) -> tuple[int, float, int]:
        line = self._query(f"HWL:WEIG:CRC? {layer}")
        if not line:
            self._check_errors("HWL:WEIG:CRC?")
            raise ProtocolError(f"{self.resource}: empty HWL:WEIG:CRC? reply")
        try:
            crc, scale, n = line.split(",")
            return int(crc), float(scale), int(n)
        except ValueError as e:
            self._suspect("HWL:WEIG:CRC?")
            raise ProtocolError(f"{self.resource}: bad HWL:WEIG:CRC? reply {line!r}") from e

    def _threshold_step(self) -> int:
        return self.chunk_codes

    def _send_thresholds(self, layer: int, flat: np.ndarray, todo: list[int],
                         step: int) -> None:
        for i, s in enumerate(todo):
            commit = int(i == len(todo) - 1)
            self._write_block(f"HWL:THR {layer},{s},{commit},", flat[s:s + step], "d")
        self._check_errors("HWL:THR")

    def _read_thr_flat(self, layer: int, n: int) -> np.ndarray:
        data = self._query_block(f"HWL:THR? {layer}", self.timeout + 8 * n / self.byte_rate)
        if len(data) != 8 * n:
            self._suspect("HWL:THR?")
            raise ProtocolError(f"{self.resource}: HWL:THR? returned {len(data)} bytes for "
                                f"{n} values")
        return np.frombuffer(data, DT_F64).astype(np.float64)

    def _decode_run(self, spec: NetworkSpec, b: int, body: bytes):
        try:
            return super()._decode_run(spec, b, body)
        except ProtocolError:
            self._suspect("HWL:RUN?")  # a reply that does not fit its run
            raise

    def _run_exchange(self, arr: np.ndarray, b: int, expect: int) -> bytes:
        # the SCPI dialect carries the batch size as an argument, the values as the block
        values = np.frombuffer(self._run_request(arr), np.uint8)[RUN_REQ.size:]
        t = self.timeout + self.per_sample_timeout_s * b + (values.nbytes + expect) / self.byte_rate
        return self._query_block(f"HWL:RUN? {b},", t, write_values=(values, "B"))

    # -- commands of the SCPI dialect ------------------------------------------------------------
    def lock_owner(self) -> Optional[str]:
        """The address of the link that controls the chip (``SYST:LOCK:OWN?``), or None."""
        owner = self._query("SYST:LOCK:OWN?").strip('"')
        return None if owner.upper() == "NONE" else owner

    def seed_noise(self, seed: int) -> None:
        """Reseed the chip's random jitter (``HWL:SEED``); ignored by a chip without it."""
        self._write(f"HWL:SEED {int(seed) & 0xFFFFFFFFFFFFFFFF}")
        try:
            self._check_errors("HWL:SEED")
        except DeviceError as e:
            if getattr(e, "code", None) not in (Err.UNSUPPORTED, SCPI_UNDEFINED_HEADER):
                raise

    # -- read-back -------------------------------------------------------------------------------
    def read_weights(self, layer: int) -> tuple[torch.Tensor, float]:
        spec = self._layer(layer, WEIGHT_KINDS)
        n = math.prod(spec.weight_shape)
        data = self._query_block(f"HWL:WEIG? {layer}", self.timeout + 4 * n / self.byte_rate)
        if len(data) != 4 * n:
            self._suspect("HWL:WEIG?")
            raise ProtocolError(f"{self.resource}: HWL:WEIG? returned {len(data)} bytes for "
                                f"{n} codes")
        scale_s = self._query(f"HWL:WEIG:SCAL? {layer}")
        codes = np.frombuffer(data, DT_CODE32).astype(np.int64)
        return torch.from_numpy(codes.reshape(spec.weight_shape)), float(scale_s)

    def _close_rm(self) -> None:
        """Close the resource manager unless other resources are open in it: pyvisa shares one
        manager per VISA library, and closing it would close every other VisaDevice too."""
        try:
            if not self._rm.list_opened_resources():
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
