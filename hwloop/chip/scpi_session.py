"""The SCPI dialect's side of the chip: one :class:`ScpiSession` per link (a bounded parser of
program messages and definite-length blocks, the error queue, the IEEE 488.2 status registers,
and a command table from canonical header to handler)."""

from __future__ import annotations

import collections
import math
import struct
from typing import Iterator, Optional

import numpy as np

from hwloop.chip.core import ChipCore, ChipError, Peer, Unit
from hwloop.devices.base import THRESHOLD_KINDS, WEIGHT_KINDS
from hwloop.wire.codec import (DT_CODE32, DT_F64, DT_TICKS, RUN_REQ, WRITE_WEIGHTS_SPARSE_HDR,
                               decode_run_request, decode_sparse, dumps)
from hwloop.wire.scpi import (ESR_OPC, SCPI_BLOCK_DATA_ERROR, SCPI_CONTROL, SCPI_DATA_OUT_OF_RANGE,
                              SCPI_DATA_TYPE_ERROR, SCPI_ERROR_QUEUE_LEN, SCPI_MAX_BLOCK,
                              SCPI_MAX_LINE, SCPI_QUEUE_OVERFLOW, SCPI_SYNTAX_ERROR, SCPI_TERM,
                              SCPI_TOO_MUCH_DATA, SCPI_UNDEFINED_HEADER, SCPI_VENDOR, SCPI_VERSION,
                              STB_EAV, STB_ESB, STB_MAV, STB_MSS, ScpiHeaderError, definite_block,
                              esr_bit_for, scpi_resolve, scpi_split_units)


def _text(s: str) -> bytes:
    return (s + SCPI_TERM).encode("utf-8")


class ScpiSession:
    """One connection of the SCPI dialect: a bounded parser, dispatch, the error queue and the
    IEEE 488.2 status registers.

    A line (``\\n``) is one program message; ``;`` separates its units. Headers are resolved
    by :func:`hwloop.wire.scpi.scpi_resolve` from :data:`hwloop.wire.scpi.SCPI_TABLE` (short and long forms,
    optional nodes, any case, a leading ``:``, paths relative to the previous unit). The
    responses of the queries of one message travel as one line, joined by ``;``.
    """

    BLOCK_QUERIES = ("HWL:WEIG?", "HWL:THR?", "HWL:RUN?")

    def __init__(self, core: ChipCore, peer: Optional[Peer] = None):
        self.core = core
        self.peer = peer or Peer("an in-process session")
        self.buf = bytearray()
        self.skip = 0
        self.discard_line = False
        self.errors: collections.deque = collections.deque()
        self.f64 = False
        self.esr = 0  # standard event status register
        self.ese = 0  # its enable mask
        self.sre = 0  # service request enable mask
        self.stats = {"commands": 0, "errors": 0}
        self._path: tuple = ()  # the current header path inside a program message
        self._parts: list[bytes] = []  # responses of this message's queries
        self._skip_rest = False  # a header error: the rest of the message is not executed

    def close(self) -> None:
        self.buf = bytearray()
        self.skip = 0
        self._parts = []

    def push_error(self, code: int, message: str) -> None:
        self.stats["errors"] += 1
        self.esr |= esr_bit_for(int(code))
        if len(self.errors) >= SCPI_ERROR_QUEUE_LEN:
            self.errors[-1] = (SCPI_QUEUE_OVERFLOW, "Queue overflow")
            return
        self.errors.append((int(code), message.replace('"', "'").replace("\n", " ")))

    def stb(self) -> int:
        """The status byte: EAV (error queue), MAV (a response of this message waits), ESB,
        MSS."""
        v = (STB_EAV if self.errors else 0) | (STB_MAV if any(self._parts) else 0) | \
            (STB_ESB if self.esr & self.ese else 0)
        return v | (STB_MSS if v & self.sre & ~STB_MSS else 0)

    def _end_message(self, out: list[bytes]) -> None:
        if self._parts:
            out.append(b";".join(self._parts) + SCPI_TERM.encode())
        self._parts = []
        self._path = ()
        self._skip_rest = False

    def _units(self, text: bytes, block: Optional[bytes]) -> int:
        """Execute the units of ``text`` (the last one gets ``block``); returns their count."""
        try:
            s = text.decode("ascii")
        except UnicodeDecodeError:
            self.push_error(SCPI_SYNTAX_ERROR, "Syntax error; non-ASCII header")
            self._skip_rest = True
            return 1
        units = scpi_split_units(s)
        n = 0
        for i, u in enumerate(units):
            last = i == len(units) - 1
            if not u.strip() and not (last and block is not None):
                continue
            n += 1
            self.dispatch(u.encode("ascii"), block if last else None)
        return n

    # -- the link's interface -------------------------------------------------------------------
    def receive(self, data: bytes) -> Iterator[Unit]:
        """One unit with the responses to the program messages completed by ``data`` (the
        commands run as they are parsed; ``commands`` counts the message units seen)."""
        replies, n = self.feed(data)
        yield Unit(run=lambda heartbeat: replies, commands=n, label="SCPI commands")

    # -- the parser ------------------------------------------------------------------------------
    def feed(self, data: bytes) -> tuple[list[bytes], int]:
        """Returns (responses, number of complete message units seen)."""
        self.buf += data
        out: list[bytes] = []
        ncmd = 0
        while True:
            if self.skip:
                k = min(self.skip, len(self.buf))
                del self.buf[:k]
                self.skip -= k
                if self.skip:
                    break
            if self.discard_line:
                nl = self.buf.find(b"\n")
                if nl < 0:
                    self.buf.clear()
                    break
                del self.buf[:nl + 1]
                self.discard_line = False
                self._end_message(out)
            nl = self.buf.find(b"\n")
            hs = self.buf.find(b"#")
            if hs >= 0 and (nl < 0 or hs < nl):
                n = self._block_message(hs, out)
                if n is None:
                    break
                ncmd += n
            elif nl >= 0:
                text = bytes(self.buf[:nl])
                del self.buf[:nl + 1]
                ncmd += self._units(text, None)
                self._end_message(out)
            else:
                if len(self.buf) > SCPI_MAX_LINE:
                    self.push_error(SCPI_SYNTAX_ERROR, "Program message too long")
                    self.buf.clear()
                    self.discard_line = True
                break
        return out, ncmd

    def _refuse_block(self, hs: int, drop: int, code: int, message: str) -> None:
        """A block that cannot be taken: the error, the units before it, ``drop`` bytes gone and
        the rest of the line discarded."""
        self.push_error(code, message)
        self._fail_block_unit(bytes(self.buf[:hs]))
        del self.buf[:drop]
        self.discard_line = True

    def _block_message(self, hs: int, out: list[bytes]) -> Optional[int]:
        """Take the units up to and including the block that starts at ``hs`` (``#``): the
        number of message units run, or None while the block is not complete."""
        if hs > SCPI_MAX_LINE:
            self.push_error(SCPI_SYNTAX_ERROR, "Header too long")
            del self.buf[:hs]
            self.discard_line = True
            return 0
        if len(self.buf) < hs + 2:
            return None
        nd = self.buf[hs + 1] - 0x30
        if not 1 <= nd <= 9:
            self._refuse_block(hs, hs + 2, SCPI_BLOCK_DATA_ERROR,
                               "Block data error; only definite-length blocks #1-#9")
            return 0
        if len(self.buf) < hs + 2 + nd:
            return None
        digits = bytes(self.buf[hs + 2:hs + 2 + nd])
        if not digits.isdigit():
            self._refuse_block(hs, hs + 2 + nd, SCPI_BLOCK_DATA_ERROR,
                               "Block data error; bad length digits")
            return 0
        length = int(digits)
        start = hs + 2 + nd
        if length > SCPI_MAX_BLOCK:
            self.push_error(SCPI_TOO_MUCH_DATA,
                            f"Too much data; block of {length} > {SCPI_MAX_BLOCK}")
            self._fail_block_unit(bytes(self.buf[:hs]))
            del self.buf[:start]
            self.skip = length
            return 1
        end = start + length
        if len(self.buf) < end + 1:
            return None
        text = bytes(self.buf[:hs])
        block = bytes(self.buf[start:end])
        tail = self.buf[end]
        del self.buf[:end + (1 if tail in (0x0A, 0x3B) else 0)]
        n = self._units(text, block)
        if tail == 0x3B:  # ';': the program message goes on
            return n
        if tail != 0x0A:
            self.discard_line = True
            return n
        self._end_message(out)
        return n

    def _fail_block_unit(self, text: bytes) -> None:
        """A unit whose block was refused: the units before it run, it answers empty."""
        try:
            units = scpi_split_units(text.decode("ascii"))
        except UnicodeDecodeError:
            units = [""]
        for u in units[:-1]:
            if u.strip():
                self.dispatch(u.encode("ascii"), None)
        head = units[-1].strip().split(None, 1)[0] if units[-1].strip() else ""
        if head.endswith("?"):
            try:
                key = scpi_resolve(head, self._path)[0].key
            except ScpiHeaderError:
                key = head.upper()
            self._parts.append(b"#10" if key in self.BLOCK_QUERIES else b"")
        self._skip_rest = True

    def dispatch(self, text: bytes, block: Optional[bytes]) -> None:
        """Execute one program message unit; a query adds its response (empty when it failed)
        to the message's responses."""
        s = text.decode("ascii", "replace").strip()
        parts = s.split(None, 1)
        head = parts[0] if parts else ""
        rest = parts[1] if len(parts) > 1 else ""
        is_query = head.endswith("?")
        if self._skip_rest:
            if is_query:
                self._parts.append(b"")
            return
        self.stats["commands"] += 1
        try:
            entry, self._path = scpi_resolve(head, self._path)
        except ScpiHeaderError as e:
            self.push_error(e.code, str(e))
            self._skip_rest = True  # IEEE 488.2: the rest of the message is not executed
            if is_query:
                self._parts.append(b"")
            return
        key = entry.key
        args = [a.strip() for a in rest.split(",")]
        while args and args[-1] == "":
            args.pop()
        r = None
        try:
            if key in SCPI_CONTROL:
                self.core.claim(self.peer)  # BUSY while another link controls the chip
            r = self._command(key, args, block)
        except ChipError as e:
            self.push_error(e.code, f"{key}: {e.message}")
        except (ValueError, IndexError, struct.error) as e:
            self.push_error(SCPI_DATA_TYPE_ERROR, f"{key}: bad arguments: {e}")
        if entry.query:
            if r is None:  # a failed query answers an empty response so the host does not wait
                r = b"#10" if key in self.BLOCK_QUERIES else b""
            elif r.endswith(b"\n"):
                r = r[:-1]
            self._parts.append(r)

    @staticmethod
    def _mask(args: list[str], what: str) -> int:
        if len(args) != 1:
            raise ValueError(f"{what} takes one number 0..255")
        v = float(args[0])
        if v != int(v) or not 0 <= v <= 255:
            raise ChipError(SCPI_DATA_OUT_OF_RANGE, f"Data out of range; {what} {args[0]} "
                                                      "outside 0..255")
        return int(v)

    def _need_block(self, head: str, block: Optional[bytes]) -> bytes:
        if block is None:
            raise ValueError(f"{head} needs a definite-length block")
        return block

    # -- the command table -----------------------------------------------------------------------
    def _command(self, head: str, args: list[str], block: Optional[bytes]) -> Optional[bytes]:
        handler = self.COMMANDS.get(head)
        if handler is None:
            raise ChipError(SCPI_UNDEFINED_HEADER, f"Undefined header {head!r}")
        return handler(self, args, block)

    # IEEE 488.2 common commands
    def _idn(self, args, block):
        i = self.core.info
        fields = [SCPI_VENDOR, type(self.core.device).__name__, i.device_id, i.firmware_version]
        return _text(",".join(f.replace(",", "_") for f in fields))

    def _rst(self, args, block):
        self.core.reset()
        self.f64 = False

    def _cls(self, args, block):
        self.errors.clear()
        self.esr = 0

    def _opc(self, args, block):  # commands execute in order: every one before this is done
        self.esr |= ESR_OPC

    def _opc_query(self, args, block):
        return _text("1")

    def _wai(self, args, block):
        return None

    def _esr_query(self, args, block):
        v, self.esr = self.esr, 0
        return _text(str(v))

    def _ese(self, args, block):
        self.ese = self._mask(args, "*ESE")

    def _ese_query(self, args, block):
        return _text(str(self.ese))

    def _stb_query(self, args, block):
        return _text(str(self.stb()))

    def _sre(self, args, block):
        self.sre = self._mask(args, "*SRE") & ~STB_MSS

    def _sre_query(self, args, block):
        return _text(str(self.sre))

    def _tst_query(self, args, block):  # the self-test: the device answers for itself
        try:
            self.core.device.info()
            self.core.status()
            return _text("0")
        except Exception:
            return _text("1")

    # SCPI system subsystem
    def _err_next(self, args, block):
        if not self.errors:
            return _text('0,"No error"')
        code, msg = self.errors.popleft()
        return _text(f'{code},"{msg}"')

    def _err_all(self, args, block):
        if not self.errors:
            return _text('0,"No error"')
        items = [f'{c},"{m}"' for c, m in self.errors]
        self.errors.clear()
        return _text(",".join(items))

    def _err_count(self, args, block):
        return _text(str(len(self.errors)))

    def _version(self, args, block):
        return _text(SCPI_VERSION)

    def _lock_request(self, args, block):
        try:
            self.core.claim(self.peer)
            return _text("1")
        except ChipError:
            return _text("0")

    def _lock_release(self, args, block):
        self.core.release(self.peer)

    def _lock_owner(self, args, block):
        owner = self.core.lock_state(self.peer)["owner"]
        return _text('"' + (owner or "NONE").replace('"', "'") + '"')

    def _lock_take(self, args, block):
        self.core.take_over(self.peer)

    # the chip's own commands (HWLoop:...)
    def _echo(self, args, block):  # the host's resynchronisation marker (VisaDevice._resync)
        token = args[0] if len(args) == 1 else ""
        if not (0 < len(token) <= 64 and all(c.isascii() and (c.isalnum() or c in "-_.")
                                              for c in token)):
            raise ValueError("HWL:ECHO? takes one token of 1-64 characters [A-Za-z0-9_.-]")
        return _text(token)

    def _info(self, args, block):
        return _text(dumps(self.core.hello()).decode())

    def _status(self, args, block):
        return _text(dumps(self.core.status()).decode())

    def _seed(self, args, block):
        seed = int(args[0])
        if not 0 <= seed < 2 ** 64:
            raise ValueError(f"seed {seed} outside 0..2^64-1")
        self.core.seed_noise(seed)

    def _program(self, args, block):
        self.core.program(self._need_block("HWL:PROG", block))

    def _weights(self, args, block):
        blk = self._need_block("HWL:WEIG", block)
        layer, scale = int(args[0]), float(args[1])
        offset = int(args[2]) if len(args) > 2 else 0
        commit = bool(int(args[3])) if len(args) > 3 else True
        if len(blk) % 4:
            raise ValueError("int32 block length not a multiple of 4")
        codes = np.frombuffer(blk, DT_CODE32).astype(np.int64)
        self.core.write_weights(layer, offset, codes, scale, commit)

    def _weights_sparse(self, args, block):
        blk = self._need_block("HWL:WEIG:SPAR", block)
        layer, scale = int(args[0]), float(args[1])
        commit = bool(int(args[2])) if len(args) > 2 else True
        if len(blk) % 8:
            raise ValueError("sparse block length not a multiple of 8")
        cnt = len(blk) // 8
        _, idx, codes, _ = decode_sparse(WRITE_WEIGHTS_SPARSE_HDR.pack(0, cnt, 0.0) + blk, True)
        self.core.write_weights(layer, 0, codes, scale, commit, idx)

    def _weights_query(self, args, block):
        layer = int(args[0])
        spec = self.core.layer_spec(layer, WEIGHT_KINDS)
        codes, _ = self.core.read_weights(layer, 0, math.prod(spec.weight_shape))
        return definite_block(codes.astype(DT_CODE32).tobytes())

    def _scale_query(self, args, block):
        _, scale = self.core.read_weights(int(args[0]), 0, 0)
        return _text(repr(scale))

    def _crc_query(self, args, block):
        crc, scale, n = self.core.weights_crc(int(args[0]))
        return _text(f"{crc},{scale!r},{n}")

    def _thresholds(self, args, block):
        blk = self._need_block("HWL:THR", block)
        layer = int(args[0])
        offset = int(args[1]) if len(args) > 1 else 0
        commit = bool(int(args[2])) if len(args) > 2 else True
        if len(blk) % 8:
            raise ValueError("float64 block length not a multiple of 8")
        self.core.write_thresholds(layer, offset, np.frombuffer(blk, DT_F64).astype(np.float64),
                                   commit)

    def _thresholds_query(self, args, block):
        layer = int(args[0])
        spec = self.core.layer_spec(layer, THRESHOLD_KINDS)
        vals = self.core.read_thresholds(layer, 0, math.prod(spec.out_shape))
        return definite_block(vals.astype(DT_F64).tobytes())

    def _windows(self, args, block):
        blk = self._need_block("HWL:WIND", block)
        if len(blk) % 16:
            raise ValueError("window block must hold float64 pairs")
        self.core.set_windows(np.frombuffer(blk, DT_F64))

    def _time_format(self, args, block):
        fmt = args[0].upper()
        if fmt not in ("TICK", "F64"):
            raise ValueError(f"time format {fmt!r}; expected TICK or F64")
        self.f64 = fmt == "F64"

    def _time_format_query(self, args, block):
        return _text("F64" if self.f64 else "TICK")

    def _run(self, args, block):
        blk = self._need_block("HWL:RUN?", block)
        b = int(args[0])
        dt = DT_F64 if self.f64 else DT_TICKS
        if b < 1 or len(blk) % (b * dt.itemsize):
            raise ValueError(f"block of {len(blk)} bytes does not hold {b} samples")
        n = len(blk) // (b * dt.itemsize)
        times = decode_run_request(RUN_REQ.pack(b, n) + blk, self.f64, self.core.ratio)
        return definite_block(self.core.run(times, self.f64))

    #: canonical header (:data:`hwloop.wire.scpi.SCPI_COMMANDS`) -> handler(session, args,
    #: block) -> response (None: no response)
    COMMANDS = {
        "*IDN?": _idn, "*RST": _rst, "*CLS": _cls, "*OPC": _opc, "*OPC?": _opc_query,
        "*WAI": _wai, "*ESR?": _esr_query, "*ESE": _ese, "*ESE?": _ese_query,
        "*STB?": _stb_query, "*SRE": _sre, "*SRE?": _sre_query, "*TST?": _tst_query,
        "SYST:ERR?": _err_next, "SYST:ERR:ALL?": _err_all, "SYST:ERR:COUN?": _err_count,
        "SYST:VERS?": _version, "SYST:LOCK:REQ?": _lock_request, "SYST:LOCK:REL": _lock_release,
        "SYST:LOCK:OWN?": _lock_owner, "HWL:LOCK:TAKE": _lock_take, "HWL:ECHO?": _echo,
        "HWL:INFO?": _info, "HWL:STAT?": _status, "HWL:SEED": _seed, "HWL:PROG": _program,
        "HWL:WEIG": _weights, "HWL:WEIG:SPAR": _weights_sparse, "HWL:WEIG?": _weights_query,
        "HWL:WEIG:SCAL?": _scale_query, "HWL:WEIG:CRC?": _crc_query, "HWL:THR": _thresholds,
        "HWL:THR?": _thresholds_query, "HWL:WIND": _windows, "HWL:TFOR": _time_format,
        "HWL:TFOR?": _time_format_query, "HWL:RUN?": _run,
    }
