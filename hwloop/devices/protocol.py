"""The hwloop wire protocol: every constant, and the payload codecs shared by host and chip.

Two dialects carry the same operations (``docs/protocol.md`` is the normative description and
is checked against this module by ``tests/test_protocol.py``):

* **frame** (serial links: UART, USB-CDC, ``socket://``, pty): byte-stuffed binary frames (no
  0x00 inside), each terminated by one 0x00 byte. A raw (unstuffed) frame is::

      version u8 | seq u16 | cmd u8 | flags u8 | payload_len u32 | payload | crc32 u32

  all little endian; ``crc32`` is :func:`zlib.crc32` of every byte before it.
* **scpi** (VISA instruments): IEEE 488.2 text commands with definite-length binary blocks.

Units on the wire: spike times are clock ticks (uint32, ``TICK_SILENT`` for no spike) by
default, or exact float64 tau_c when the request sets :attr:`Flag.F64_TIMES` (the host uses that
when the chip offers it, which makes a run through a transport bit-identical to an in-process
run); windows and thresholds are float64 in tau_c / potential units; weights are signed integer
codes plus one float64 scale per layer.
"""

from __future__ import annotations

import enum
import json
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

# ------------------------------------------------------------------------------------------------
# Frame layout
# ------------------------------------------------------------------------------------------------

#: Version byte of every frame; a chip answers frames of another version with ``Err.VERSION``.
#: Version 2 added RESEND, NAK, the PENDING flag and the NO_REPLY error; version 3 replaced COBS
#: by the byte stuffing below and added WRITE_WEIGHTS_SPARSE and HELLO ``features``
#: (docs/protocol.md).
PROTOCOL_VERSION = 3

#: version u8, seq u16, cmd u8, flags u8, payload_len u32.
HEADER = struct.Struct("<BHBBI")
HEADER_SIZE = HEADER.size  # 9
CRC = struct.Struct("<I")
CRC_SIZE = CRC.size  # 4
FRAME_OVERHEAD = HEADER_SIZE + CRC_SIZE  # 13

#: Largest raw (decoded) frame, header and CRC included. Every length field is checked against
#: this bound before anything is allocated.
MAX_FRAME = 65536
MAX_PAYLOAD = MAX_FRAME - FRAME_OVERHEAD
#: Delimiter between stuffed frames.
DELIMITER = b"\x00"
#: Byte stuffing (``framing.stuff``): the raw byte values 0x00 and ZERO_SUB trade places; then
#: ESC is sent as ESC ESC_ESC and a 0x00 (a raw ZERO_SUB) as ESC ESC_ZERO.
ZERO_SUB = 0xA5
ESC = 0xA6
ESC_ZERO = 0x01
ESC_ESC = 0x02


def max_stuffed(n: int) -> int:
    """Largest stuffed encoding of ``n`` bytes (without the delimiter): every byte escaped."""
    return 2 * n


#: Largest encoded frame between two delimiters; a reader that sees more discards and resyncs.
MAX_ENCODED = max_stuffed(MAX_FRAME)

#: Chunk header at the start of the payload of every frame with :attr:`Flag.CHUNKED`:
#: chunk index u16, chunk total u16.
CHUNK_HEADER = struct.Struct("<HH")
#: Largest message (a request or reply reassembled from chunks).
MAX_MESSAGE = 64 * 1024 * 1024
#: Largest number of chunks in one message.
MAX_CHUNKS = 0xFFFF

#: Sequence numbers run 1..SEQ_MAX and wrap to 1 (0 is never sent).
SEQ_MAX = 0xFFFF


class Cmd(enum.IntEnum):
    """Command codes (the ``cmd`` byte). A reply carries the request's code, or ``ERROR``."""

    HELLO = 0x01
    PROGRAM = 0x02
    STATUS = 0x03
    RESET = 0x04
    SEED_NOISE = 0x05
    #: Ask again for chunks of a cached reply (selective resend); never executes anything.
    RESEND = 0x06
    #: Control of the chip (one controlling link at a time): payload ``op u8``
    #: (:class:`LockOp`); reply UTF-8 JSON ``{"owner": address or null, "you": bool}``. Only to
    #: a chip whose HELLO lists ``FEATURE_LOCK``.
    LOCK = 0x07
    WRITE_WEIGHTS = 0x10
    READ_WEIGHTS = 0x11
    WEIGHTS_CRC = 0x12
    #: Write scattered codes, (index, code) pairs, into the staged layer; only to a chip whose
    #: HELLO lists ``FEATURE_SPARSE`` in ``features``.
    WRITE_WEIGHTS_SPARSE = 0x13
    WRITE_THRESHOLDS = 0x18
    READ_THRESHOLDS = 0x19
    SET_WINDOWS = 0x20
    RUN_BATCH = 0x30
    #: (chip only) a frame arrived damaged; ``seq`` 0, payload ``reason u8``.
    NAK = 0x7E
    ERROR = 0x7F


class Flag(enum.IntFlag):
    """Bits of the ``flags`` byte."""

    NONE = 0x00
    #: Set on every frame sent by the chip.
    REPLY = 0x01
    #: The payload starts with a ``CHUNK_HEADER``; the message spans several frames.
    CHUNKED = 0x02
    #: WRITE_WEIGHTS / WRITE_THRESHOLDS: apply the staged layer after this chunk.
    COMMIT = 0x04
    #: WRITE_WEIGHTS / READ_WEIGHTS: codes are int32 (else int16).
    WIDE = 0x08
    #: RUN_BATCH: spike times are float64 tau_c (else uint32 clock ticks).
    F64_TIMES = 0x10
    #: On a reply frame with empty payload: the request arrived intact and is being executed;
    #: the reply follows (repeated every ``PENDING_INTERVAL_S`` while the chip works).
    PENDING = 0x20


class Err(enum.IntEnum):
    """Error codes of an ERROR reply (payload: code u16 | UTF-8 message)."""

    UNKNOWN_COMMAND = 0x0001
    BAD_PAYLOAD = 0x0002
    VERSION = 0x0003
    CHUNK = 0x0004
    TOO_LARGE = 0x0005
    NO_REPLY = 0x0006
    NOT_PROGRAMMED = 0x0010
    LIMIT = 0x0011
    RANGE = 0x0012
    UNSUPPORTED = 0x0013
    #: Another link controls the chip (the message names its address); this link may only query.
    BUSY = 0x0014
    DEVICE = 0x0020
    INTERNAL = 0x00FF


#: Error codes a host maps to :class:`hwloop.errors.ProtocolError` (the others map to
#: ``DeviceError``, and ``LIMIT`` to ``DeviceLimitError``).
PROTOCOL_ERRORS = frozenset({Err.UNKNOWN_COMMAND, Err.BAD_PAYLOAD, Err.VERSION, Err.CHUNK,
                             Err.TOO_LARGE, Err.NO_REPLY})


class NakReason(enum.IntEnum):
    """The ``reason u8`` payload of a NAK: why the chip threw a piece of the stream away."""

    CRC = 1  # decoded, but the CRC does not match
    ESCAPE = 2  # not valid stuffing (an escape byte not followed by 0x01 / 0x02)
    LENGTH = 3  # shorter than a header, or a length field that disagrees / is out of bounds
    OVERFLOW = 4  # more than MAX_ENCODED bytes without a delimiter


class LockOp(enum.IntEnum):
    """The ``op u8`` payload of LOCK."""

    QUERY = 0  # who controls the chip; changes nothing
    REQUEST = 1  # take control if nobody has it (else BUSY)
    RELEASE = 2  # give control up (a no-op for a link that does not hold it)
    TAKE_OVER = 3  # take control even from another link (that link's next command gets BUSY)


#: LOCK payload: op u8 (:class:`LockOp`).
LOCK_PAYLOAD = struct.Struct("<B")
#: Commands that need control of the chip (they change its state or draw its noise); every
#: other command (HELLO, STATUS, reads, CRC, RESEND, LOCK) is open to every link.
CONTROL_COMMANDS = frozenset({Cmd.PROGRAM, Cmd.RESET, Cmd.SEED_NOISE, Cmd.WRITE_WEIGHTS,
                              Cmd.WRITE_WEIGHTS_SPARSE, Cmd.WRITE_THRESHOLDS, Cmd.SET_WINDOWS,
                              Cmd.RUN_BATCH})

#: NAK payload: reason u8 (:class:`NakReason`).
NAK_PAYLOAD = struct.Struct("<B")
#: RESEND request: number of chunk indices u16, then that many chunk indices u16.
RESEND_HDR = struct.Struct("<H")
#: Most chunk indices one RESEND may name.
MAX_RESEND = 1024
#: A chip that works on a request longer than this sends a PENDING frame at once and again
#: every PENDING_INTERVAL_S until the reply is ready, s.
PENDING_INTERVAL_S = 0.02
#: Commands for which the virtual chip sends PENDING (a real chip may send it for any command).
PENDING_COMMANDS = frozenset({Cmd.PROGRAM, Cmd.RUN_BATCH})

# ------------------------------------------------------------------------------------------------
# Data types and payload structures
# ------------------------------------------------------------------------------------------------

DT_TICKS = np.dtype("<u4")
DT_F64 = np.dtype("<f8")
DT_CODE16 = np.dtype("<i2")
DT_CODE32 = np.dtype("<i4")
DT_COUNT = np.dtype("<u4")

#: Spike time of a silent neuron in ticks.
TICK_SILENT = 0xFFFFFFFF
#: Latest representable spike time in ticks.
TICK_MAX = 0xFFFFFFFE

#: HELLO request: host protocol version u8, largest reply payload the host wants per frame u32
#: (0: the chip's default, MAX_PAYLOAD).
HELLO_REQ = struct.Struct("<BI")
#: HELLO reply: protocol version u8, then a UTF-8 JSON object (see :func:`hello_json`).
HELLO_REPLY = struct.Struct("<B")
#: SEED_NOISE request: seed u64.
SEED = struct.Struct("<Q")
#: Layer index u16 (WEIGHTS_CRC request).
LAYER = struct.Struct("<H")
#: WRITE_WEIGHTS header: layer u16, offset u32, count u32, scale f64; then ``count`` codes.
WRITE_WEIGHTS_HDR = struct.Struct("<HIId")
#: WRITE_WEIGHTS_SPARSE header: layer u16, count u32, scale f64; then ``count`` indices u32
#: (strictly increasing, each < the layer's number of codes), then ``count`` codes.
WRITE_WEIGHTS_SPARSE_HDR = struct.Struct("<HId")
#: READ_WEIGHTS / READ_THRESHOLDS request: layer u16, offset u32, count u32.
READ_RANGE = struct.Struct("<HII")
#: READ_WEIGHTS reply header: scale f64, count u32; then ``count`` codes.
READ_WEIGHTS_REPLY = struct.Struct("<dI")
#: WEIGHTS_CRC reply: crc32 u32 (of the whole layer's codes as int32 LE followed by the scale as
#: float64 LE), scale f64, number of codes u32.
WEIGHTS_CRC_REPLY = struct.Struct("<IdI")
#: WRITE_THRESHOLDS header: layer u16, offset u32, count u32; then ``count`` float64.
WRITE_THRESHOLDS_HDR = struct.Struct("<HII")
#: READ_THRESHOLDS reply header: count u32; then ``count`` float64.
COUNT = struct.Struct("<I")
#: SET_WINDOWS: number of neuron layers u16; then (t_min f64, t_max f64) per layer, tau_c.
WINDOWS_HDR = struct.Struct("<H")
#: RUN_BATCH request header: batch size u32, values per sample u32; then B*n times.
RUN_REQ = struct.Struct("<II")
#: RUN_BATCH reply header: batch u32, stages u16, neuron layers u16, classes u32, has_energy u8.
RUN_REPLY = struct.Struct("<IHHIB")
#: ERROR reply header: code u16; then a UTF-8 message.
ERROR_HDR = struct.Struct("<H")

#: Time formats a chip may offer in its HELLO JSON (``time_formats``).
TIME_TICKS = "ticks"
TIME_F64 = "f64"
#: Optional commands a chip may offer in its HELLO JSON (``features``).
FEATURE_SPARSE = "sparse_weights"
#: The chip has the LOCK command (one controlling link at a time).
FEATURE_LOCK = "lock"

# ------------------------------------------------------------------------------------------------
# SCPI dialect
# ------------------------------------------------------------------------------------------------

SCPI_TERM = "\n"
#: Largest text line (without a block) a SCPI chip accepts.
SCPI_MAX_LINE = 4096
#: Largest definite-length block a SCPI chip accepts.
SCPI_MAX_BLOCK = MAX_MESSAGE
SCPI_VENDOR = "hwloop"

#: The command table, SCPI-99 style: the upper-case letters of a mnemonic are its short form,
#: the whole word its long form (either is accepted, in any case); ``[:NODE]`` may be omitted;
#: a trailing ``?`` makes it a query. pattern -> (arguments, reply, needs control of the chip).
SCPI_TABLE = {
    "*IDN?": ("", "vendor,model,device_id,firmware", False),
    "*RST": ("", "-", True),
    "*CLS": ("", "- (clears the error queue and the event status register)", False),
    "*OPC": ("", "- (sets OPC in the event status register: every command before it is done)",
             False),
    "*OPC?": ("", "1 (once every command before it is done)", False),
    "*WAI": ("", "- (commands execute in order: nothing to wait for)", False),
    "*ESR?": ("", "<event status register 0..255> (read and cleared)", False),
    "*ESE": ("<mask 0..255>", "-", False),
    "*ESE?": ("", "<mask>", False),
    "*STB?": ("", "<status byte 0..255>", False),
    "*SRE": ("<mask 0..255>", "-", False),
    "*SRE?": ("", "<mask>", False),
    "*TST?": ("", "0 (self-test passed) or 1", False),
    "SYSTem:ERRor[:NEXT]?": ("", 'code,"message" (0,"No error" when empty)', False),
    "SYSTem:ERRor:ALL?": ("", 'code,"message"[,code,"message"...] (the whole queue)', False),
    "SYSTem:ERRor:COUNt?": ("", "<entries in the error queue>", False),
    "SYSTem:VERSion?": ("", "1999.0", False),
    "SYSTem:LOCK:REQuest?": ("", "1 (this link controls the chip) or 0 (another one does)",
                             False),
    "SYSTem:LOCK:RELease": ("", "- (gives control up)", False),
    "SYSTem:LOCK:OWNer?": ("", '"<address of the controlling link>" or "NONE"', False),
    "HWLoop:LOCK:TAKE": ("", "- (takes control even from another link)", False),
    "HWLoop:INFO?": ("", "JSON: {protocol_version, info, time_formats, features}", False),
    "HWLoop:STATus?": ("", "JSON status", False),
    "HWLoop:ECHO?": ("<token: 1-64 of [A-Za-z0-9_.-]>",
                     "<token> (the host's resynchronisation marker)", False),
    "HWLoop:SEED": ("<seed>", "-", True),
    "HWLoop:PROGram": ("#<block: NetworkSpec JSON>", "-", True),
    "HWLoop:WEIGhts": ("<layer>,<scale>[,<offset>,<commit 0|1>],#<block int32 LE>", "-", True),
    "HWLoop:WEIGhts:SPARse": ("<layer>,<scale>[,<commit 0|1>],#<block: n indices u32 LE, then "
                              "n codes int32 LE>", "-", True),
    "HWLoop:WEIGhts?": ("<layer>", "#<block int32 LE codes>", False),
    "HWLoop:WEIGhts:SCALe?": ("<layer>", "<scale>", False),
    "HWLoop:WEIGhts:CRC?": ("<layer>", "<crc32>,<scale>,<count>", False),
    "HWLoop:THReshold": ("<layer>[,<offset>,<commit 0|1>],#<block float64 LE>", "-", True),
    "HWLoop:THReshold?": ("<layer>", "#<block float64 LE>", False),
    "HWLoop:WINDows": ("#<block float64 LE: t_min,t_max per neuron layer>", "-", True),
    "HWLoop:TFORmat": ("TICK|F64", "-", False),
    "HWLoop:TFORmat?": ("", "TICK|F64", False),
    "HWLoop:RUN?": ("<batch>,#<block: input times, uint32 ticks or float64 per HWL:TFOR>",
                    "#<block: RUN_BATCH reply body>", True),
}

_MNEMONIC = re.compile(r"(\[)?:?([A-Za-z][A-Za-z0-9]*)(\])?")


@dataclass(frozen=True)
class ScpiNode:
    long: str  # upper case
    short: str
    optional: bool


@dataclass(frozen=True)
class ScpiHeader:
    """One compiled entry of :data:`SCPI_TABLE`."""

    pattern: str
    key: str  # the canonical short form without optional nodes, e.g. "SYST:ERR?"
    nodes: tuple  # of ScpiNode; empty for a common command
    query: bool
    control: bool


def _compile_header(pattern: str, control: bool) -> ScpiHeader:
    query = pattern.endswith("?")
    body = pattern[:-1] if query else pattern
    if body.startswith("*"):
        return ScpiHeader(pattern, body.upper() + ("?" if query else ""), (), query, control)
    nodes, pos = [], 0
    while pos < len(body):
        m = _MNEMONIC.match(body, pos)
        if m is None or bool(m.group(1)) != bool(m.group(3)):
            raise ValueError(f"bad SCPI pattern {pattern!r} at {pos}")
        word = m.group(2)
        short = "".join(c for c in word if c.isupper() or c.isdigit()) or word.upper()
        nodes.append(ScpiNode(word.upper(), short, bool(m.group(1))))
        pos = m.end()
    key = ":".join(n.short for n in nodes if not n.optional) + ("?" if query else "")
    return ScpiHeader(pattern, key, tuple(nodes), query, control)


SCPI_HEADERS = tuple(_compile_header(p, c) for p, (_, _, c) in SCPI_TABLE.items())
#: canonical short header -> (arguments, reply); kept here so docs and server agree.
SCPI_COMMANDS = {h.key: SCPI_TABLE[h.pattern][:2] for h in SCPI_HEADERS}
#: canonical headers that need control of the chip.
SCPI_CONTROL = frozenset(h.key for h in SCPI_HEADERS if h.control)
SCPI_VERSION = "1999.0"


class ScpiHeaderError(ValueError):
    """A header that is not valid SCPI syntax (``code`` -102) or names no command (-113)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _match_nodes(nodes: tuple, parts: list[str]) -> bool:
    def rec(i: int, j: int) -> bool:
        if j == len(parts):
            return all(n.optional for n in nodes[i:])
        if i == len(nodes):
            return False
        n = nodes[i]
        if parts[j] in (n.long, n.short) and rec(i + 1, j + 1):
            return True
        return n.optional and rec(i + 1, j)
    return rec(0, 0)


def scpi_resolve(header: str, path: tuple = ()) -> tuple[ScpiHeader, tuple]:
    """Resolve one header of a program message unit (IEEE 488.2 / SCPI-99 rules).

    ``path`` is the current path (the nodes before the last mnemonic of the previous unit of the
    same program message; ``()`` at the start of a message). A header that starts with ``:`` is
    absolute, one that starts with ``*`` is a common command (the path is kept), any other is
    relative to ``path``. Each mnemonic matches its short or long form in any case; optional
    nodes may be left out. Returns (the table entry, the path for the next unit).

    Raises:
        ScpiHeaderError: -102 for bad syntax, -113 for a header that names no command.
    """
    h = header.strip()
    if not h:
        raise ScpiHeaderError(SCPI_SYNTAX_ERROR, "Syntax error; empty header")
    query = h.endswith("?")
    body = h[:-1] if query else h
    if body.startswith("*"):
        name = body[1:]
        if not name.isalpha():
            raise ScpiHeaderError(SCPI_SYNTAX_ERROR, f"Syntax error; bad common command {h!r}")
        key = "*" + name.upper() + ("?" if query else "")
        for e in SCPI_HEADERS:
            if not e.nodes and e.key == key:
                return e, path
        raise ScpiHeaderError(SCPI_UNDEFINED_HEADER, f"Undefined header {h!r}")
    absolute = body.startswith(":")
    parts = body[1:].split(":") if absolute else body.split(":")
    if not all(p and p[0].isalpha() and p.isalnum() and p.isascii() for p in parts):
        raise ScpiHeaderError(SCPI_SYNTAX_ERROR, f"Syntax error; bad header {h!r}")
    parts = [p.upper() for p in parts]
    full = parts if absolute else list(path) + parts
    for e in SCPI_HEADERS:
        if e.nodes and e.query == query and _match_nodes(e.nodes, full):
            return e, tuple(full[:-1])
    raise ScpiHeaderError(SCPI_UNDEFINED_HEADER, f"Undefined header {h!r}")


def scpi_split_units(text: str) -> list[str]:
    """The program message units of ``text``, split at ``;`` outside quoted strings."""
    units, cur, quote = [], [], None
    for c in text:
        if quote:
            cur.append(c)
            if c == quote:
                quote = None
        elif c in "\"'":
            quote = c
            cur.append(c)
        elif c == ";":
            units.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    units.append("".join(cur))
    return units


#: IEEE 488.2 standard event status register (``*ESR?``) bits.
ESR_OPC = 0x01  # operation complete (*OPC)
ESR_QYE = 0x04  # query error (-4xx)
ESR_DDE = 0x08  # device-dependent error (-3xx and the chip's own positive codes)
ESR_EXE = 0x10  # execution error (-2xx)
ESR_CME = 0x20  # command error (-1xx)
#: Status byte (``*STB?``) bits.
STB_EAV = 0x04  # the error queue is not empty (SCPI)
STB_MAV = 0x10  # a response is waiting in the output queue
STB_ESB = 0x20  # (ESR & ESE) != 0
STB_MSS = 0x40  # master summary: (STB & SRE) != 0


def esr_bit_for(code: int) -> int:
    """The event status register bit an error of SCPI ``code`` sets."""
    if -199 <= code <= -100:
        return ESR_CME
    if -299 <= code <= -200:
        return ESR_EXE
    if -499 <= code <= -400:
        return ESR_QYE
    return ESR_DDE if code != 0 else 0


#: SCPI error numbers: IEEE 488.2 / SCPI standard negatives for parsing, our ``Err`` codes
#: (positive) for device-specific errors.
SCPI_NO_ERROR = 0
SCPI_COMMAND_ERROR = -100
SCPI_SYNTAX_ERROR = -102
SCPI_DATA_TYPE_ERROR = -104
SCPI_UNDEFINED_HEADER = -113
SCPI_BLOCK_DATA_ERROR = -160
SCPI_EXECUTION_ERROR = -200
SCPI_DATA_OUT_OF_RANGE = -222
SCPI_TOO_MUCH_DATA = -223
SCPI_QUEUE_OVERFLOW = -350
SCPI_ERROR_QUEUE_LEN = 16

# ------------------------------------------------------------------------------------------------
# Time conversion
# ------------------------------------------------------------------------------------------------


def ticks_per_tau_c(tau_c_s: float, clock_period_s: float) -> float:
    """Clock ticks per tau_c, ``tau_c_s / clock_period_s``."""
    return float(tau_c_s) / float(clock_period_s)


def times_to_ticks(times: np.ndarray, ratio: float) -> np.ndarray:
    """tau_c -> ticks: ``rint(t * ratio)`` (round half to even), ``+inf`` -> ``TICK_SILENT``.

    Resolution loss: a time moves by up to half a tick (0.5 / ratio tau_c). The conversion is
    exact both ways when ``ratio`` is a power of two and the times lie on the tick grid.

    Raises:
        ValueError: a time is NaN, -inf, negative or beyond ``TICK_MAX`` ticks.
    """
    t = np.asarray(times, dtype=np.float64)
    silent = np.isposinf(t)
    finite = t[~silent]
    if finite.size and (not np.all(np.isfinite(finite)) or finite.min() < 0):
        raise ValueError("spike times must be >= 0 (or +inf for no spike); got "
                         f"min={finite.min() if np.all(np.isfinite(finite)) else 'nan/-inf'}")
    ticks = np.rint(np.where(silent, 0.0, t) * ratio)
    if ticks.size and ticks.max() > TICK_MAX:
        raise ValueError(f"spike time {float(t[~silent].max())} tau_c is beyond the tick range "
                         f"({TICK_MAX} ticks at {ratio} ticks/tau_c)")
    out = ticks.astype(DT_TICKS)
    out[silent] = TICK_SILENT
    return out


def ticks_to_times(ticks: np.ndarray, ratio: float) -> np.ndarray:
    """ticks -> tau_c: ``ticks / ratio``, ``TICK_SILENT`` -> ``+inf``."""
    k = np.asarray(ticks, dtype=DT_TICKS)
    t = k.astype(np.float64) / ratio
    t[k == TICK_SILENT] = np.inf
    return t


# ------------------------------------------------------------------------------------------------
# Payload codecs
# ------------------------------------------------------------------------------------------------


def weights_crc(codes: np.ndarray, scale: float) -> int:
    """CRC of a layer as WEIGHTS_CRC reports it: crc32(codes as int32 LE || scale as f64 LE)."""
    data = np.ascontiguousarray(np.asarray(codes).reshape(-1), dtype=DT_CODE32).tobytes()
    return zlib.crc32(struct.pack("<d", float(scale)), zlib.crc32(data)) & 0xFFFFFFFF


def code_dtype(wide: bool) -> np.dtype:
    return DT_CODE32 if wide else DT_CODE16


def encode_sparse(layer: int, indices: np.ndarray, codes: np.ndarray, scale: float,
                  wide: bool) -> bytes:
    """WRITE_WEIGHTS_SPARSE payload: ``codes[k]`` goes to flat index ``indices[k]``."""
    idx = np.asarray(indices, dtype=np.int64)
    return (WRITE_WEIGHTS_SPARSE_HDR.pack(int(layer), idx.size, float(scale)) +
            idx.astype(DT_COUNT).tobytes() + np.asarray(codes).astype(code_dtype(wide)).tobytes())


def decode_sparse(payload: bytes, wide: bool, n_codes: Optional[int] = None
                  ) -> tuple[int, np.ndarray, np.ndarray, float]:
    """Inverse of :func:`encode_sparse`: (layer, indices int64, codes int64, scale).

    Raises:
        ValueError: the count disagrees with the payload size, or the indices are not strictly
            increasing, or (when ``n_codes`` is given) one is ``>= n_codes``.
    """
    if len(payload) < WRITE_WEIGHTS_SPARSE_HDR.size:
        raise ValueError("WRITE_WEIGHTS_SPARSE payload shorter than its header")
    layer, count, scale = WRITE_WEIGHTS_SPARSE_HDR.unpack_from(payload)
    dt = code_dtype(wide)
    if len(payload) != WRITE_WEIGHTS_SPARSE_HDR.size + count * (4 + dt.itemsize):
        raise ValueError(f"payload of {len(payload)} bytes does not hold {count} (index, code) "
                         "pairs")
    off = WRITE_WEIGHTS_SPARSE_HDR.size
    idx = np.frombuffer(payload, DT_COUNT, count, off).astype(np.int64)
    codes = np.frombuffer(payload, dt, count, off + 4 * count).astype(np.int64)
    if count > 1 and not bool(np.all(np.diff(idx) > 0)):
        raise ValueError("indices must be strictly increasing")
    if n_codes is not None and count and int(idx[-1]) >= n_codes:
        raise ValueError(f"index {int(idx[-1])} beyond the layer's {n_codes} codes")
    return layer, idx, codes, scale


def error_payload(code: int, message: str) -> bytes:
    msg = message.encode("utf-8", "replace")[: MAX_PAYLOAD - ERROR_HDR.size - 64]
    return ERROR_HDR.pack(int(code)) + msg


def parse_error_payload(payload: bytes) -> tuple[int, str]:
    if len(payload) < ERROR_HDR.size:
        return int(Err.BAD_PAYLOAD), "short ERROR payload"
    (code,) = ERROR_HDR.unpack_from(payload)
    return code, payload[ERROR_HDR.size:].decode("utf-8", "replace")


def resend_payload(indices) -> bytes:
    """RESEND payload naming chunk ``indices`` (1..MAX_RESEND of them, each < 65536)."""
    idx = [int(i) for i in indices]
    if not 1 <= len(idx) <= MAX_RESEND:
        raise ValueError(f"a RESEND names 1..{MAX_RESEND} chunks, not {len(idx)}")
    return RESEND_HDR.pack(len(idx)) + np.asarray(idx, dtype="<u2").tobytes()


def parse_resend_payload(payload: bytes) -> list[int]:
    """Chunk indices of a RESEND payload; ValueError when the count is out of bounds or
    disagrees with the payload size."""
    if len(payload) < RESEND_HDR.size:
        raise ValueError("RESEND payload shorter than its header")
    (n,) = RESEND_HDR.unpack_from(payload)
    if not 1 <= n <= MAX_RESEND or len(payload) != RESEND_HDR.size + 2 * n:
        raise ValueError(f"RESEND payload of {len(payload)} bytes does not hold {n} indices "
                         f"(1..{MAX_RESEND})")
    return np.frombuffer(payload, "<u2", n, RESEND_HDR.size).astype(int).tolist()


def err_name(code: int) -> str:
    try:
        return Err(code).name
    except ValueError:
        return f"0x{code:04x}"


def cmd_name(cmd: int) -> str:
    try:
        return Cmd(cmd).name
    except ValueError:
        return f"0x{cmd:02x}"


def hello_json(info_dict: dict, time_formats: list[str], features=()) -> dict:
    """The JSON object of a HELLO reply and of ``HWL:INFO?`` (``features`` only when some)."""
    doc = {"protocol_version": PROTOCOL_VERSION, "info": info_dict,
           "time_formats": list(time_formats)}
    if features:
        doc["features"] = list(features)
    return doc


@dataclass
class RunReply:
    """A decoded RUN_BATCH reply (numpy, flat per sample)."""

    batch: int
    stage_times: list[np.ndarray]  # (B, n_stage) float64 tau_c, +inf silent
    readout: np.ndarray  # (B, n_classes)
    v_tmax: list[np.ndarray]  # (B, n_layer)
    spike_counts: np.ndarray  # (B, n_layers) int64
    energy_j: Optional[np.ndarray]  # (B, n_layers) or None


def encode_run_request(times: np.ndarray, f64: bool, ratio: float) -> bytes:
    """``times``: (B, n) float64 tau_c."""
    t = np.asarray(times, dtype=np.float64)
    b, n = t.shape
    data = t.astype(DT_F64) if f64 else times_to_ticks(t, ratio)
    return RUN_REQ.pack(b, n) + data.tobytes()


def decode_run_request(payload: bytes, f64: bool, ratio: float,
                       max_values: int = MAX_MESSAGE) -> np.ndarray:
    """Inverse of :func:`encode_run_request`; raises ValueError on any inconsistency."""
    if len(payload) < RUN_REQ.size:
        raise ValueError("RUN_BATCH payload shorter than its header")
    b, n = RUN_REQ.unpack_from(payload)
    dt = DT_F64 if f64 else DT_TICKS
    if b * n > max_values or len(payload) != RUN_REQ.size + b * n * dt.itemsize:
        raise ValueError(f"RUN_BATCH payload of {len(payload)} bytes does not hold {b}x{n} "
                         f"{'float64' if f64 else 'uint32'} times")
    data = np.frombuffer(payload, dtype=dt, count=b * n, offset=RUN_REQ.size).reshape(b, n)
    if f64:
        return data.astype(np.float64)
    return ticks_to_times(data, ratio)


def encode_run_reply(stage_times: list[np.ndarray], readout: np.ndarray, v_tmax: list[np.ndarray],
                     spike_counts: np.ndarray, energy_j: Optional[np.ndarray], f64: bool,
                     ratio: float) -> bytes:
    """All arrays (B, n...) flattened per sample. Layout (every array C order, little endian)::

        RUN_REPLY header | n per stage u32[S] | n per neuron layer u32[L]
        | stage times (uint32 ticks or float64 tau_c) | readout f64[B, C]
        | v_tmax f64 per layer | spike counts u32[B, L] | energy f64[B, L] (if has_energy)
    """
    b = int(readout.shape[0])
    st = [np.asarray(s, dtype=np.float64).reshape(b, -1) for s in stage_times]
    vt = [np.asarray(v, dtype=np.float64).reshape(b, -1) for v in v_tmax]
    ro = np.asarray(readout, dtype=np.float64).reshape(b, -1)
    counts = np.asarray(spike_counts).reshape(b, len(vt))
    if counts.size and (counts.min() < 0 or counts.max() > 0xFFFFFFFF):
        raise ValueError("spike counts out of uint32 range")
    parts = [RUN_REPLY.pack(b, len(st), len(vt), ro.shape[1], 1 if energy_j is not None else 0),
             np.array([s.shape[1] for s in st], dtype=DT_COUNT).tobytes(),
             np.array([v.shape[1] for v in vt], dtype=DT_COUNT).tobytes()]
    for s in st:
        parts.append(s.astype(DT_F64).tobytes() if f64 else times_to_ticks(s, ratio).tobytes())
    parts.append(ro.astype(DT_F64).tobytes())
    parts.extend(v.astype(DT_F64).tobytes() for v in vt)
    parts.append(counts.astype(DT_COUNT).tobytes())
    if energy_j is not None:
        parts.append(np.asarray(energy_j, dtype=np.float64).reshape(b, len(vt))
                     .astype(DT_F64).tobytes())
    return b"".join(parts)


def run_reply_size(batch: int, stage_sizes: list[int], layer_sizes: list[int], n_classes: int,
                   f64: bool, has_energy: bool = True) -> int:
    """Bytes of a RUN_BATCH reply body (with energy unless ``has_energy`` is False)."""
    per_sample = (sum(stage_sizes) * (8 if f64 else 4) + 8 * n_classes + 8 * sum(layer_sizes)
                  + 4 * len(layer_sizes) + (8 * len(layer_sizes) if has_energy else 0))
    return RUN_REPLY.size + 4 * (len(stage_sizes) + len(layer_sizes)) + batch * per_sample


def max_batch_for_message(stage_sizes: list[int], layer_sizes: list[int], n_classes: int,
                          f64: bool, limit: int = MAX_MESSAGE) -> int:
    """Largest batch whose RUN_BATCH request and reply both fit in ``limit`` bytes."""
    per_reply = run_reply_size(1, stage_sizes, layer_sizes, n_classes, f64) - \
        run_reply_size(0, stage_sizes, layer_sizes, n_classes, f64)
    per_req = (stage_sizes[0] if stage_sizes else 0) * (8 if f64 else 4)
    return max(0, (limit - 64) // max(per_reply, per_req, 1))


def decode_run_reply(payload: bytes, f64: bool, ratio: float) -> RunReply:
    """Inverse of :func:`encode_run_reply`; every length is checked against the payload size."""
    mv = memoryview(payload)
    pos = 0

    def take(dtype: np.dtype, count: int) -> np.ndarray:
        nonlocal pos
        nbytes = count * dtype.itemsize
        if count < 0 or pos + nbytes > len(mv):
            raise ValueError(f"RUN_BATCH reply truncated: need {nbytes} bytes at offset {pos}, "
                             f"have {len(mv) - pos}")
        arr = np.frombuffer(mv, dtype=dtype, count=count, offset=pos)
        pos += nbytes
        return arr

    if len(mv) < RUN_REPLY.size:
        raise ValueError("RUN_BATCH reply shorter than its header")
    b, n_st, n_l, n_cls, has_energy = RUN_REPLY.unpack_from(mv)
    pos = RUN_REPLY.size
    st_n = take(DT_COUNT, n_st).astype(np.int64)
    l_n = take(DT_COUNT, n_l).astype(np.int64)
    tdt = DT_F64 if f64 else DT_TICKS
    stages = []
    for n in st_n:
        raw = take(tdt, b * int(n)).reshape(b, int(n))
        stages.append(raw.astype(np.float64) if f64 else ticks_to_times(raw, ratio))
    readout = take(DT_F64, b * n_cls).reshape(b, n_cls).astype(np.float64)
    v = [take(DT_F64, b * int(n)).reshape(b, int(n)).astype(np.float64) for n in l_n]
    counts = take(DT_COUNT, b * n_l).reshape(b, n_l).astype(np.int64)
    energy = take(DT_F64, b * n_l).reshape(b, n_l).astype(np.float64) if has_energy else None
    if pos != len(mv):
        raise ValueError(f"RUN_BATCH reply has {len(mv) - pos} trailing bytes")
    return RunReply(b, stages, readout, v, counts, energy)


def spec_with_windows(spec, windows):
    """``spec`` (a NetworkSpec) with new (t_min, t_max) per neuron layer
    (:meth:`NetworkSpec.with_windows`); ValueError for a wrong count or a bad window."""
    return spec.with_windows(windows)


def dumps(obj) -> bytes:
    """Compact UTF-8 JSON used by PROGRAM, HELLO and STATUS."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")
