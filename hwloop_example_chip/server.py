"""The virtual XC-1 chip: a TCP server on loopback that speaks the XC-1 ASCII command set
(``hwloop_example_chip/__init__.py`` documents it) and uses an
:class:`hwloop.emulator.device.EmulatorDevice` as its physics.

What makes it "a chip with its own command set" rather than the hwloop protocol: windows and
spike times are integer clock ticks (1024 per tau_c), weights are written one row per line with
a separate commit, inputs and outputs are address-event (AER) lists of ``addr@tick``, every
command answers ``OK`` or ``ERR <CODE> <text>``, and the chip only knows dense layers, flatten
and the readout.
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading
from typing import Optional

import torch

from hwloop.devices.base import LayerSpec, NetworkSpec
from hwloop.emulator.device import EmulatorDevice
from hwloop.emulator.profile import DeviceProfile, load_profile
from hwloop.errors import HwloopError

__all__ = ["ExampleChip", "TICKS_PER_TAU", "example_physics", "serve_example_chip"]

#: Clock ticks per tau_c of the XC-1 timing counter.
TICKS_PER_TAU = 1024
KINDS = ("dense", "flatten", "readout")
MAX_LINE = 1 << 20


def example_physics(profile: str | DeviceProfile = "emulator-analog", chip_seed: Optional[int] = None,
                    jitter_sd: Optional[float] = None, jitter_seed: Optional[int] = None,
                    max_batch: int = 256) -> EmulatorDevice:
    """The emulator inside the XC-1: a profile (default the analog one) with the XC-1's limits,
    adaptive windows and its own device id."""
    prof = profile if isinstance(profile, DeviceProfile) else load_profile(profile)
    upd = {"device_id": "xc1", "adaptive_windows": True,
           "limits": prof.limits.model_copy(update={"max_layers": 8, "max_neurons_per_layer": 512,
                                                    "max_fan_in": 1024, "max_batch": max_batch})}
    if jitter_sd is not None:
        upd["jitter_sd"] = float(jitter_sd)
    return EmulatorDevice.from_profile(prof.model_copy(update=upd), chip_seed=chip_seed,
                                       jitter_seed=jitter_seed)


class ChipError(Exception):
    def __init__(self, code: str, text: str):
        super().__init__(text)
        self.code = code


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split("x"))
    except ValueError:
        raise ChipError("SYNTAX", f"bad shape {text!r}") from None
    if not shape or min(shape) < 1:
        raise ChipError("RANGE", f"bad shape {text!r}")
    return shape


def _fmt(values) -> str:
    return " ".join(repr(float(v)) for v in values)


class _Firmware:
    """The chip's state and command interpreter (one per chip, shared by its connections)."""

    def __init__(self, physics: EmulatorDevice):
        self.phys = physics
        self.info = physics.info()
        self.R = TICKS_PER_TAU
        self.reset()

    def reset(self) -> None:
        self.phys.reset()
        self.defn: Optional[dict] = None
        self.spec: Optional[NetworkSpec] = None
        self.staged: dict[int, torch.Tensor] = {}
        self.stage_bad: dict[int, str] = {}

    # -- helpers --------------------------------------------------------------------------------
    def _layer(self, text: str, kinds) -> int:
        if self.spec is None:
            raise ChipError("STATE", "no network programmed")
        try:
            i = int(text)
        except ValueError:
            raise ChipError("SYNTAX", f"bad layer {text!r}") from None
        if not 0 <= i < len(self.spec.layers) or self.spec.layers[i].kind not in kinds:
            raise ChipError("RANGE", f"layer {i} has no {'/'.join(kinds)}")
        return i

    def _t(self, tick: str) -> float:
        try:
            k = int(tick)
        except ValueError:
            raise ChipError("SYNTAX", f"bad tick {tick!r}") from None
        if not 0 <= k < 2 ** 32:
            raise ChipError("RANGE", f"tick {k} out of range")
        return k / self.R

    # -- commands -------------------------------------------------------------------------------
    def execute(self, line: str, run_lines: Optional[list[str]] = None) -> list[str]:
        parts = line.split()
        cmd, args = parts[0].upper(), parts[1:]
        if cmd == "*IDN?":
            return [f"XCHIP,XC-1,{self.info.device_id},fw-0.3"]
        if cmd == "CAP?":
            i = self.info
            return [f"CAP layers={i.max_layers} neurons={i.max_neurons_per_layer} "
                    f"fanin={i.max_fan_in} bits={i.weight_bits} steps={i.time_steps_per_layer or 0} "
                    f"tpt={self.R} tau_ps={round(i.tau_c_s * 1e12)} batch={i.max_batch} "
                    f"adaptive={int(i.adaptive_windows)} kinds={','.join(KINDS)}"]
        if cmd == "RST":
            self.reset()
            return []
        if cmd == "SEED":
            self.phys.seed_noise(int(args[0]))
            return []
        if cmd == "PING":
            return [f"PONG {' '.join(args)}"]
        if cmd == "DEF":  # DEF <n_layers> <t_max0 tick> <input shape>
            self.defn = {"n": int(args[0]), "t_max0": self._t(args[1]), "input": _shape(args[2]),
                         "layers": []}
            return []
        if cmd == "LYR":  # LYR <kind> <in shape> <out shape> <t_min tick|-> <t_max tick|->
            if self.defn is None:
                raise ChipError("STATE", "LYR outside DEF")
            kind = args[0].lower()
            if kind not in KINDS:
                raise ChipError("UNSUPPORTED", f"layer kind {kind!r} (XC-1 has {', '.join(KINDS)})")
            ins, outs = _shape(args[1]), _shape(args[2])
            t_min = None if args[3] == "-" else self._t(args[3])
            t_max = None if args[4] == "-" else self._t(args[4])
            ws = (outs[0], ins[0]) if kind in ("dense", "readout") else ()
            self.defn["layers"].append(LayerSpec(kind=kind, in_shape=ins, out_shape=outs,
                                                 weight_shape=ws, t_min=t_min, t_max=t_max))
            return []
        if cmd == "PROG":
            d, self.defn = self.defn, None
            if d is None or len(d["layers"]) != d["n"]:
                raise ChipError("STATE", "PROG without a complete DEF")
            spec = NetworkSpec(input_shape=d["input"], t_max0=d["t_max0"], layers=tuple(d["layers"]))
            try:
                self.phys.program(spec)
            except HwloopError as e:
                raise ChipError("LIMIT" if "max_" in str(e) else "RANGE", str(e)) from None
            self.spec = spec
            self.staged, self.stage_bad = {}, {}
            return []
        if cmd == "WROW":  # WROW <layer> <row> <codes...>
            i = self._layer(args[0], ("dense", "readout"))
            out_n, fan_in = self.spec.layers[i].weight_shape
            stage = self.staged.setdefault(i, self.phys.read_weights(i)[0].clone())
            try:
                row = int(args[1])
                codes = [int(v) for v in args[2:]]
            except ValueError:
                self.stage_bad[i] = "bad code"
                raise ChipError("SYNTAX", "codes must be integers") from None
            lo, hi = -(2 ** (self.info.weight_bits - 1)), 2 ** (self.info.weight_bits - 1) - 1
            if not 0 <= row < out_n or len(codes) != fan_in:
                self.stage_bad[i] = f"row {row}"
                raise ChipError("RANGE", f"row {row} needs {fan_in} codes, row < {out_n}")
            if codes and (min(codes) < lo or max(codes) > hi):
                self.stage_bad[i] = f"row {row} code range"
                raise ChipError("RANGE", f"layer {i} row {row}: codes outside [{lo}, {hi}]")
            stage[row] = torch.tensor(codes, dtype=stage.dtype)
            return []
        if cmd == "WCOMMIT":  # WCOMMIT <layer> <scale>: apply the staged rows at once
            i = self._layer(args[0], ("dense", "readout"))
            bad = self.stage_bad.pop(i, None)
            stage = self.staged.pop(i, None)
            if bad is not None:
                raise ChipError("RANGE", f"layer {i}: staged rows discarded ({bad})")
            scale = float(args[1])
            if not (math.isfinite(scale) and scale > 0):
                raise ChipError("RANGE", f"scale {scale} must be finite and > 0")
            if stage is None:
                stage = self.phys.read_weights(i)[0]
            self.phys.write_weights(i, stage.to(torch.int64), scale)
            return []
        if cmd == "WROW?":
            i = self._layer(args[0], ("dense", "readout"))
            codes = self.phys.read_weights(i)[0]
            row = int(args[1])
            if not 0 <= row < codes.shape[0]:
                raise ChipError("RANGE", f"row {row}")
            return [" ".join(str(int(v)) for v in codes[row].tolist())]
        if cmd == "WSCALE?":
            i = self._layer(args[0], ("dense", "readout"))
            return [repr(float(self.phys.read_weights(i)[1]))]
        if cmd == "THR":
            i = self._layer(args[0], ("dense", "readout"))
            vals = torch.tensor([float(v) for v in args[1:]], dtype=torch.float64)
            shape = tuple(self.spec.layers[i].out_shape)
            if vals.numel() != math.prod(shape) or not bool(torch.isfinite(vals).all()):
                raise ChipError("RANGE", f"layer {i}: need {math.prod(shape)} finite thresholds")
            self.phys.write_thresholds(i, vals.reshape(shape))
            return []
        if cmd == "THR?":
            i = self._layer(args[0], ("dense", "readout"))
            return [_fmt(self.phys.read_thresholds(i).reshape(-1).tolist())]
        if cmd == "WIN":
            if self.spec is None:
                raise ChipError("STATE", "no network programmed")
            ticks = [self._t(v) for v in args]
            wins = list(zip(ticks[0::2], ticks[1::2]))
            if len(ticks) % 2 or len(wins) != len(self.spec.neuron_layers()):
                raise ChipError("RANGE", f"need {len(self.spec.neuron_layers())} tick pairs")
            try:
                self.phys.set_windows(wins)
            except HwloopError as e:
                raise ChipError("RANGE", str(e)) from None
            self.spec = self.phys.spec
            return []
        if cmd == "RUN":
            return self._run(int(args[0]), run_lines or [])
        raise ChipError("SYNTAX", f"unknown command {cmd!r}")

    def _run(self, b: int, lines: list[str]) -> list[str]:
        spec = self.spec
        if spec is None:
            raise ChipError("STATE", "no network programmed")
        if not 1 <= b <= self.info.max_batch:
            raise ChipError("LIMIT", f"batch {b} outside 1..{self.info.max_batch}")
        n_in = math.prod(spec.input_shape)
        x = torch.full((b, n_in), math.inf, dtype=torch.float64)
        for s, line in enumerate(lines):
            for ev in line.split()[1:]:
                addr, _, tick = ev.partition("@")
                a = int(addr)
                if not 0 <= a < n_in:
                    raise ChipError("RANGE", f"input address {a}")
                x[s, a] = self._t(tick)
        rec = self.phys.run(x.reshape(b, *spec.input_shape))
        wins = [None] + [(l.t_min, l.t_max) for l in spec.layers if l.kind == "dense"]
        out = []
        for s in range(b):
            out.append(f"S {s}")
            for k, (t, w) in enumerate(zip(rec.spike_times, wins)):
                row = t[s].reshape(-1)
                idx = torch.nonzero(torch.isfinite(row)).reshape(-1).tolist()
                evs = []
                for a in idx:
                    tick = int(round(float(row[a]) * self.R))
                    if w is not None:  # a spike registered at t_max would be no spike: clamp
                        tick = min(tick, int(round(w[1] * self.R)) - 1)
                    evs.append(f"{a}@{tick}")
                out.append(f"EV {k} " + " ".join(evs))
            for k, v in enumerate(rec.v_tmax):
                out.append(f"VT {k} " + _fmt(v[s].reshape(-1).tolist()))
            out.append("RO " + _fmt(rec.readout[s].tolist()))
            out.append("CNT " + " ".join(str(int(v)) for v in rec.spike_counts[s].tolist()))
            if rec.energy_j is not None:
                out.append("EN " + _fmt(rec.energy_j[s].tolist()))
        return out


def _peer_closed(conn: socket.socket) -> bool:
    import select
    try:
        r, _, _ = select.select([conn], [], [], 0)
        return bool(r) and conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class ExampleChip:
    """A running virtual XC-1 on ``127.0.0.1``; ``url`` is ``xchip://127.0.0.1:PORT``.

    ``stall()`` (a context manager) makes it stop answering, ``hangup()`` closes every
    connection, ``stop()`` shuts it down. The chip's state survives reconnects.
    """

    def __init__(self, physics: Optional[EmulatorDevice] = None, host: str = "127.0.0.1", port: int = 0):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the example chip binds loopback only")
        self.fw = _Firmware(physics if physics is not None else example_physics())
        self._lock = threading.Lock()
        self._go = threading.Event()
        self._go.set()
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._ls = socket.create_server((host, port))
        self.host, self.port = host, self._ls.getsockname()[1]
        self.commands = 0
        self._thread = threading.Thread(target=self._accept, daemon=True, name="xchip-accept")
        self._thread.start()

    @property
    def url(self) -> str:
        return f"xchip://{self.host}:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._ls.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True, name="xchip-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        try:
            while not self._stop.is_set():
                line = f.readline(MAX_LINE)
                if not line:
                    return
                text = line.decode("ascii", "replace").strip()
                if not text:
                    continue
                run_lines = None
                if text.split()[0].upper() == "RUN":
                    try:
                        b = int(text.split()[1])
                    except (IndexError, ValueError):
                        b = 0
                    run_lines = [f.readline(MAX_LINE).decode("ascii", "replace")
                                 for _ in range(max(0, min(b, 1 << 20)))]
                while not self._go.wait(0.05):  # stalled: hold the command
                    if self._stop.is_set():
                        return
                if _peer_closed(conn):  # the host gave up on this link: do not execute late
                    return
                with self._lock:
                    self.commands += 1
                    try:
                        reply = self.fw.execute(text, run_lines) + ["OK"]
                    except ChipError as e:
                        reply = [f"ERR {e.code} {' '.join(str(e).split())}"]
                    except (ValueError, IndexError) as e:
                        reply = [f"ERR SYNTAX {' '.join(str(e).split()) or 'bad arguments'}"]
                    except Exception as e:  # firmware fault
                        reply = [f"ERR INTERNAL {type(e).__name__}: {' '.join(str(e).split())}"]
                try:
                    conn.sendall(("\n".join(reply) + "\n").encode("ascii"))
                except OSError:
                    return
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    @contextlib.contextmanager
    def stall(self):
        """Inside the block the chip holds every command unanswered."""
        self._go.clear()
        try:
            yield
        finally:
            self._go.set()

    def hangup(self) -> None:
        """Close every connection from the chip's side."""
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                c.close()

    def stop(self) -> None:
        self._stop.set()
        self._go.set()
        with contextlib.suppress(OSError):
            self._ls.close()
        self.hangup()

    def __enter__(self) -> "ExampleChip":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_example_chip(profile: str = "emulator-analog", chip_seed: Optional[int] = None,
                       port: int = 0, jitter_sd: Optional[float] = None,
                       jitter_seed: Optional[int] = None) -> ExampleChip:
    """Start a virtual XC-1 in this process (threads) and return it."""
    return ExampleChip(example_physics(profile, chip_seed=chip_seed, jitter_sd=jitter_sd,
                                       jitter_seed=jitter_seed), port=port)
