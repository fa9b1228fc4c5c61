"""The hwloop backend of the XC-1 chip: :class:`ExampleChipDevice` translates the
:class:`~hwloop.devices.base.TTFSDevice` contract into XC-1 ASCII commands (see the package
docstring for the command set and ``docs/drivers.md`` for the walk-through).

Units: hwloop speaks tau_c, the XC-1 clock ticks (``tpt`` = 1024 ticks per tau_c): a time t
travels as ``rint(t * 1024)`` and comes back as ``tick / 1024``, exact on the 1/1024 tau_c grid
and within half a tick otherwise. Weights travel as integer codes, one row per line, and the
scale with the commit; thresholds as float64 ``repr`` text (exact).
"""

from __future__ import annotations

import contextlib
import math
import socket
import time
from typing import Optional

import torch

from hwloop.devices.base import (NEURON_KINDS, STAGE_KINDS, DeviceInfo, DeviceRecord, NetworkSpec,
                                 TTFSDevice, check_codes, check_fits)
from hwloop.errors import (DataError, DeviceError, DeviceLimitError, DeviceTimeout, ProtocolError,
                           WriteVerifyError)

__all__ = ["ExampleChipDevice"]

F64 = torch.float64
INF = math.inf
#: ERR codes of the XC-1 -> the hwloop exception a driver raises for them.
ERRORS = {"LIMIT": DeviceLimitError, "SYNTAX": ProtocolError}


class ExampleChipDevice(TTFSDevice):
    """An XC-1 chip at ``xchip://HOST:PORT``.

    Args:
        url: ``xchip://HOST:PORT``.
        timeout: seconds to wait for a small reply; runs add ``per_sample_timeout_s`` per sample
            and bulk writes ``per_line_timeout_s`` per line.
        verify: read every write back and raise :class:`WriteVerifyError` on a mismatch
            (then :attr:`verifies_writes` is true).
    """

    def __init__(self, url: str, *, timeout: float = 2.0, verify: bool = True,
                 per_sample_timeout_s: float = 0.005, per_line_timeout_s: float = 0.0005):
        self.url = url
        rest = url.split("://", 1)[-1]
        host, _, port = rest.rpartition(":")
        if not host or not port.isdigit():
            raise DeviceError(f"XC-1 URL must be xchip://HOST:PORT, got {url!r}")
        self._addr = (host.strip("[]"), int(port))
        self.timeout = float(timeout)
        self.per_sample_timeout_s = float(per_sample_timeout_s)
        self.per_line_timeout_s = float(per_line_timeout_s)
        self.verify = bool(verify)
        self._sock: Optional[socket.socket] = None
        self._buf = b""
        self._closed = False
        self._spec: Optional[NetworkSpec] = None
        self._owned = None  # a virtual chip this driver started (xchip://serve), stopped on close
        self.health = {"commands": 0, "reconnects": 0, "timeouts": 0, "verify_failures": 0}
        idn = self._query("*IDN?")[0]
        cap = dict(kv.split("=", 1) for kv in self._query("CAP?")[0].split()[1:])
        self.ticks_per_tau = int(cap["tpt"])
        tau_c_s = int(cap["tau_ps"]) * 1e-12
        self._info = DeviceInfo(
            device_id=idn.split(",")[2], firmware_version=idn.split(",")[3], protocol_version=1,
            max_layers=int(cap["layers"]), max_neurons_per_layer=int(cap["neurons"]),
            max_fan_in=int(cap["fanin"]), weight_bits=int(cap["bits"]),
            time_steps_per_layer=int(cap["steps"]) or None, tau_c_s=tau_c_s,
            clock_period_s=tau_c_s / self.ticks_per_tau, layer_kinds=tuple(cap["kinds"].split(",")),
            max_batch=int(cap["batch"]), adaptive_windows=cap["adaptive"] == "1")

    # -- link ----------------------------------------------------------------------------------
    def _connect(self) -> socket.socket:
        if self._closed:
            raise DeviceError(f"{self.url}: device is closed")
        if self._sock is None:
            try:
                s = socket.create_connection(self._addr, timeout=self.timeout)
            except OSError as e:
                raise DeviceError(f"cannot reach the XC-1 at {self.url}: {e}") from e
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock, self._buf = s, b""
        return self._sock

    def _drop_link(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock, self._buf = None, b""

    def _readline(self, deadline: float, what: str) -> str:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout()
            self._sock.settimeout(left)
            chunk = self._sock.recv(1 << 16)
            if not chunk:
                raise ConnectionResetError("the chip hung up")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode("ascii").rstrip("\r")

    def _exchange(self, lines: list[str], blocks: int, timeout: float, what: str) -> list[list[str]]:
        """Send ``lines`` at once (pipelined), read ``blocks`` replies (each: data lines, then
        ``OK`` or ``ERR``). Raises the hwloop error of the first ``ERR`` after reading all of
        them, so the stream stays in step. A timeout or a hang-up drops the connection (the next
        call reconnects: the chip keeps its state, and a late reply goes to the old socket)."""
        sock = self._connect()
        deadline = time.monotonic() + timeout
        out, first_err = [], None
        try:
            sock.sendall(("\n".join(lines) + "\n").encode("ascii"))
            for _ in range(blocks):
                data = []
                while True:
                    line = self._readline(deadline, what)
                    if line == "OK":
                        break
                    if line.startswith("ERR "):
                        _, code, *text = line.split(" ", 2)
                        if first_err is None:
                            first_err = (code, text[0] if text else "")
                        break
                    data.append(line)
                out.append(data)
        except socket.timeout:
            self._drop_link()
            self.health["timeouts"] += 1
            raise DeviceTimeout(f"{self.url}: no reply to {what} within {timeout:.2f} s") from None
        except OSError as e:
            self._drop_link()
            self.health["reconnects"] += 1
            raise DeviceError(f"{self.url}: link lost during {what}: {e}") from None
        self.health["commands"] += len(lines)
        if first_err is not None:
            code, text = first_err
            raise ERRORS.get(code, DeviceError)(f"{self.url}: {what}: chip says {code}: {text}")
        return out

    def _query(self, line: str) -> list[str]:
        return self._exchange([line], 1, self.timeout, line.split()[0])[0]

    def _bulk(self, lines: list[str], what: str) -> list[list[str]]:
        return self._exchange(lines, len(lines), self.timeout + self.per_line_timeout_s * len(lines), what)

    # -- helpers -------------------------------------------------------------------------------
    def _tick(self, t: float) -> int:
        return int(round(float(t) * self.ticks_per_tau))  # round half to even, like rint

    def _need(self, layer: int, kinds: tuple[str, ...], what: str):
        if self._closed:
            raise DeviceError(f"{self.url}: device is closed")
        if self._spec is None:
            raise DeviceError(f"{self.url}: no network programmed (call program)")
        if not 0 <= int(layer) < len(self._spec.layers) or self._spec.layers[layer].kind not in kinds:
            raise DeviceError(f"{self.url}: layer {layer}: {what} needs a {'/'.join(kinds)} layer")
        return self._spec.layers[layer]

    # -- the contract --------------------------------------------------------------------------
    def info(self) -> DeviceInfo:
        return self._info

    @property
    def verifies_writes(self) -> bool:
        return self.verify

    def reset(self) -> None:
        self._query("RST")
        self._spec = None

    def seed_noise(self, seed: int) -> None:
        self._query(f"SEED {int(seed) & (2 ** 63 - 1)}")

    def program(self, spec: NetworkSpec) -> None:
        if self._closed:
            raise DeviceError(f"{self.url}: device is closed")
        check_fits(spec, self._info)  # DeviceLimitError naming the limit, before any traffic
        shp = lambda s: "x".join(str(int(v)) for v in s)  # noqa: E731
        tk = lambda t: "-" if t is None else str(self._tick(t))  # noqa: E731
        lines = [f"DEF {len(spec.layers)} {self._tick(spec.t_max0)} {shp(spec.input_shape)}"]
        for l in spec.layers:
            lines.append(f"LYR {l.kind} {shp(l.in_shape)} {shp(l.out_shape)} {tk(l.t_min)} {tk(l.t_max)}")
        lines.append("PROG")
        self._spec = None
        self._bulk(lines, "program")
        self._spec = spec

    def write_weights(self, layer: int, codes: torch.Tensor, scale: float) -> None:
        l = self._need(layer, ("dense", "readout"), "write_weights")
        codes = torch.as_tensor(codes)
        if tuple(codes.shape) != tuple(l.weight_shape):
            raise DeviceError(f"layer {layer}: weights must have shape {l.weight_shape}, got "
                              f"{tuple(codes.shape)}")
        if codes.is_floating_point():
            if not bool(torch.isfinite(codes).all()) or not bool((codes == codes.round()).all()):
                raise DeviceError(f"layer {layer}: XC-1 takes integer weight codes")
            codes = codes.to(torch.int64)
        check_codes(codes, self._info.weight_bits, layer)
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise DeviceError(f"layer {layer}: scale must be finite and > 0, got {scale}")
        c2 = codes.reshape(codes.shape[0], -1)
        lines = [f"WROW {layer} {r} " + " ".join(map(str, row)) for r, row in enumerate(c2.tolist())]
        lines.append(f"WCOMMIT {layer} {scale!r}")  # the rows take effect together, or not at all
        self._bulk(lines, f"write_weights {layer}")
        if self.verify:
            got, got_scale = self.read_weights(layer)
            if not torch.equal(got, codes.to(torch.int64)) or got_scale != scale:
                self.health["verify_failures"] += 1
                raise WriteVerifyError(f"{self.url}: layer {layer}: weights read back differ",
                                       layers=[layer])

    def read_weights(self, layer: int) -> tuple[torch.Tensor, float]:
        l = self._need(layer, ("dense", "readout"), "read_weights")
        rows = l.weight_shape[0]
        replies = self._bulk([f"WROW? {layer} {r}" for r in range(rows)] + [f"WSCALE? {layer}"],
                             f"read_weights {layer}")
        codes = torch.tensor([[int(v) for v in rep[0].split()] for rep in replies[:-1]],
                             dtype=torch.int64).reshape(l.weight_shape)
        return codes, float(replies[-1][0])

    def write_thresholds(self, layer: int, values: torch.Tensor) -> None:
        l = self._need(layer, ("dense", "readout"), "write_thresholds")
        values = torch.as_tensor(values, dtype=F64)
        if tuple(values.shape) != tuple(l.out_shape):
            raise DeviceError(f"layer {layer}: thresholds must have shape {l.out_shape}, got "
                              f"{tuple(values.shape)}")
        if not bool(torch.isfinite(values).all()):
            raise DeviceError(f"layer {layer}: thresholds must be finite")
        self._query(f"THR {layer} " + " ".join(repr(v) for v in values.reshape(-1).tolist()))
        if self.verify and not torch.equal(self.read_thresholds(layer), values):
            self.health["verify_failures"] += 1
            raise WriteVerifyError(f"{self.url}: layer {layer}: thresholds read back differ",
                                   layers=[layer])

    def read_thresholds(self, layer: int) -> torch.Tensor:
        l = self._need(layer, ("dense", "readout"), "read_thresholds")
        vals = [float(v) for v in self._query(f"THR? {layer}")[0].split()]
        return torch.tensor(vals, dtype=F64).reshape(l.out_shape)

    def set_windows(self, windows: list[tuple[float, float]]) -> None:
        if self._closed or self._spec is None:
            raise DeviceError(f"{self.url}: no network programmed (or closed)")
        if not self._info.adaptive_windows:
            raise DeviceError(f"{self.url}: this XC-1 has fixed windows")
        try:
            new = self._spec.with_windows(windows)
        except ValueError as e:
            raise DeviceError(f"{self.url}: {e}") from None
        self._query("WIN " + " ".join(f"{self._tick(a)} {self._tick(b)}" for a, b in new.windows()))
        self._spec = new

    def run(self, input_spike_times: torch.Tensor) -> DeviceRecord:
        spec = self._spec
        if self._closed or spec is None:
            raise DeviceError(f"{self.url}: no network programmed (or closed)")
        x = torch.as_tensor(input_spike_times)
        if x.ndim != len(spec.input_shape) + 1 or tuple(x.shape[1:]) != tuple(spec.input_shape):
            raise DataError(f"input spike times must have shape (B, {spec.input_shape}), got "
                            f"{tuple(x.shape)}")
        b = int(x.shape[0])
        if b > self._info.max_batch:
            raise DeviceLimitError(f"batch of {b} samples; device allows max_batch={self._info.max_batch}")
        flat = x.reshape(b, -1).to(F64)
        if bool(torch.isnan(flat).any()) or bool((flat < 0).any()) or bool((flat == -INF).any()):
            raise DataError("input spike times must be >= 0 or +inf (no NaN)")
        ticks = torch.where(torch.isfinite(flat), torch.round(flat * self.ticks_per_tau),
                            torch.full_like(flat, -1.0)).to(torch.int64)
        lines = [f"RUN {b}"]
        for row in ticks.tolist():  # address events: only the inputs that spike
            lines.append("IN " + " ".join(f"{a}@{k}" for a, k in enumerate(row) if k >= 0))
        reply = self._exchange(lines, 1, self.timeout + self.per_sample_timeout_s * b, "run")[0]
        return self._parse_record(reply, b, spec)

    def _parse_record(self, lines: list[str], b: int, spec: NetworkSpec) -> DeviceRecord:
        stage_shapes = [tuple(spec.input_shape)] + [tuple(l.out_shape) for l in spec.layers
                                                    if l.kind in STAGE_KINDS]
        neuron = [l for l in spec.layers if l.kind in NEURON_KINDS]
        n_out = next((l.out_shape[0] for l in spec.layers if l.kind == "readout"), 0)
        times = [torch.full((b, math.prod(s)), INF, dtype=F64) for s in stage_shapes]
        v_tmax = [torch.zeros((b, l.n_neurons), dtype=F64) for l in neuron]
        readout = torch.zeros((b, n_out), dtype=F64)
        counts = torch.zeros((b, len(neuron)), dtype=torch.int64)
        energy, has_energy = torch.zeros((b, len(neuron)), dtype=F64), False
        s = -1
        try:
            for line in lines:
                tag, *rest = line.split()
                if tag == "S":
                    s = int(rest[0])
                elif tag == "EV":
                    st, evs = int(rest[0]), rest[1:]
                    for ev in evs:
                        a, _, k = ev.partition("@")
                        times[st][s, int(a)] = int(k) / self.ticks_per_tau
                elif tag == "VT":
                    v_tmax[int(rest[0])][s] = torch.tensor([float(v) for v in rest[1:]], dtype=F64)
                elif tag == "RO":
                    readout[s] = torch.tensor([float(v) for v in rest], dtype=F64)
                elif tag == "CNT":
                    counts[s] = torch.tensor([int(v) for v in rest], dtype=torch.int64)
                elif tag == "EN":
                    energy[s] = torch.tensor([float(v) for v in rest], dtype=F64)
                    has_energy = True
        except (ValueError, IndexError, RuntimeError) as e:
            raise ProtocolError(f"{self.url}: malformed run reply line {line!r}: {e}") from None
        if s != b - 1:
            raise ProtocolError(f"{self.url}: run reply holds {s + 1} samples, expected {b}")
        return DeviceRecord(
            spike_times=[t.reshape(b, *shape) for t, shape in zip(times, stage_shapes)],
            readout=readout, v_tmax=[v.reshape(b, *l.out_shape) for v, l in zip(v_tmax, neuron)],
            spike_counts=counts, neurons_per_layer=[l.n_neurons for l in neuron],
            energy_j=energy if has_energy else None,
            meta={"device_id": self._info.device_id, "url": self.url})

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._drop_link()
        if self._owned is not None:
            self._owned.stop()
            self._owned = None
