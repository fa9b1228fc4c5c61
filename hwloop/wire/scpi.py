"""The SCPI dialect (VISA instruments): the table-driven command headers (SCPI-99 short and long
forms), definite-length blocks, IEEE 488.2 status bits and the SCPI error numbers.

A line (``\\n``) is one program message; ``;`` separates its units; bulk data travels as
IEEE 488.2 definite-length blocks (``#<digits><length><bytes>``). Payload layouts inside blocks
are those of :mod:`hwloop.wire.codec`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hwloop.wire.codec import MAX_MESSAGE

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


def definite_block(data: bytes) -> bytes:
    """``data`` as an IEEE 488.2 definite-length block, ``#<n><length><data>``, plus the line
    terminator."""
    n = str(len(data))
    return b"#" + str(len(n)).encode() + n.encode() + data + SCPI_TERM.encode()
