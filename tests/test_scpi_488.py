"""Standard SCPI on the virtual chip (issue #12, item 5): the IEEE 488.2 common commands and
status model, and SCPI-99 header rules (short and long forms, optional nodes, case, a leading
colon, ``;`` compounds with relative paths), driven through pyvisa like a lab's own script."""

from __future__ import annotations

import pytest

from hwloop.chip.core import ChipCore
from hwloop.chip.scpi_session import ScpiSession
from hwloop.chip.server import serve
from hwloop.wire.visa_device import VisaDevice
from hwloop.wire.scpi import (ESR_CME, ESR_DDE, ESR_EXE, ESR_OPC, SCPI_SYNTAX_ERROR,
                              SCPI_UNDEFINED_HEADER, STB_EAV, STB_ESB, STB_MSS, ScpiHeaderError,
                              scpi_resolve)

from fakes import FakeB1Device, grid_inputs
from test_transports import SPEC, setup

pyvisa = pytest.importorskip("pyvisa")


@pytest.fixture
def inst():
    chip = serve(FakeB1Device(time_step=1 / 64), transport="tcp", dialect="scpi")
    rm = pyvisa.ResourceManager("@py")
    res = rm.open_resource(chip.url, read_termination="\n", write_termination="\n",
                           timeout=2000)
    try:
        yield chip, rm, res
    finally:
        res.close()
        chip.stop()


def test_every_common_command_and_the_status_bits(inst):
    chip, rm, res = inst
    assert res.query("*IDN?").startswith("hwloop,FakeB1Device,fake-b1-0001,")
    res.write("*CLS")
    assert int(res.query("*ESR?")) == 0 and int(res.query("*STB?")) == 0
    assert int(res.query("*OPC?")) == 1
    res.write("*OPC")
    assert int(res.query("*ESR?")) == ESR_OPC  # and reading clears it
    assert int(res.query("*ESR?")) == 0
    res.write("*WAI")
    assert int(res.query("*TST?")) == 0
    res.write("*ESE 60")
    assert int(res.query("*ESE?")) == 60
    res.write("*SRE 36")
    assert int(res.query("*SRE?")) == 36
    # an unknown header: command error (-113), CME in *ESR?, EAV/ESB/MSS in *STB?
    res.write("HWL:BOGUS 1")
    stb = int(res.query("*STB?"))
    assert stb & STB_EAV and stb & STB_ESB and stb & STB_MSS, stb
    assert int(res.query("SYST:ERR:COUN?")) == 1
    assert int(res.query("*ESR?")) & ESR_CME
    assert res.query("SYST:ERR?").startswith("-113,")
    assert int(res.query("*STB?")) == 0  # queue empty, ESR read: nothing to report
    # an execution error (*ESE out of range: -222) sets EXE; a chip error sets DDE
    res.write("*ESE 300")
    res.write("HWL:WEIG:CRC? 0")  # no network programmed: the chip's NOT_PROGRAMMED (16)
    res.read()  # the failed query's empty response
    esr = int(res.query("*ESR?"))
    assert esr & ESR_EXE and esr & ESR_DDE and not esr & ESR_CME, esr
    errs = res.query("SYST:ERR:ALL?")
    assert errs.startswith("-222,") and ',16,"' in errs, errs
    assert res.query("SYST:ERR:ALL?") == '0,"No error"'
    res.write("*RST")
    assert int(res.query("*ESE?")) == 60  # *RST leaves the status enables alone
    res.write("*CLS")
    assert int(res.query("*ESR?")) == 0
    assert res.query("SYST:VERS?") == "1999.0"


def test_opc_after_a_run_and_compound_messages(inst):
    chip, rm, res = inst
    with VisaDevice(chip.url, timeout=2.0, resource_manager=rm) as dev:
        setup(dev)
        dev.run(grid_inputs(SPEC, 4, seed=1))
        assert int(dev._inst.query("*OPC?")) == 1  # on the link that ran
    assert int(res.query("*OPC?")) == 1
    idn = res.query("*IDN?")
    assert res.query("*CLS;*IDN?") == idn
    assert res.query("*IDN?;*OPC?") == idn + ";1"  # one response line, units joined by ;
    assert res.query(":SYST:ERR?") == '0,"No error"'
    assert res.query("SYSTEM:ERROR:NEXT?") == '0,"No error"'
    assert res.query("syst:err:next?;coun?") == '0,"No error";0'  # relative to SYST:ERR
    assert res.query(":system:version?;:SYST:ERR:COUNT?") == "1999.0;0"
    # a header error ends the message: the query after it answers empty, the error is queued
    assert res.query("HWL:NOPE;*OPC?") == ""
    assert res.query("SYST:ERR?").startswith("-113,")


@pytest.mark.parametrize("header,path,key", [
    ("*IDN?", (), "*IDN?"),
    ("*idn?", (), "*IDN?"),
    ("*OPC", ("SYST",), "*OPC"),
    ("SYST:ERR?", (), "SYST:ERR?"),
    ("SYSTEM:ERROR?", (), "SYST:ERR?"),
    ("system:error:next?", (), "SYST:ERR?"),
    (":SYST:ERR?", ("HWL",), "SYST:ERR?"),
    ("Syst:Err:Next?", (), "SYST:ERR?"),
    ("SYST:ERR:ALL?", (), "SYST:ERR:ALL?"),
    ("SYST:ERR:COUNT?", (), "SYST:ERR:COUN?"),
    ("SYST:ERR:COUN?", (), "SYST:ERR:COUN?"),
    ("COUN?", ("SYST", "ERR"), "SYST:ERR:COUN?"),
    ("NEXT?", ("SYST", "ERR"), "SYST:ERR?"),
    ("SYSTEM:VERSION?", (), "SYST:VERS?"),
    ("HWLOOP:WEIGHTS:SPARSE", (), "HWL:WEIG:SPAR"),
    ("hwl:weig:spar", (), "HWL:WEIG:SPAR"),
    ("HWL:WEIG?", (), "HWL:WEIG?"),
    ("HWL:WEIG", (), "HWL:WEIG"),
    ("WEIG:CRC?", ("HWL",), "HWL:WEIG:CRC?"),
    ("HWL:TFORMAT?", (), "HWL:TFOR?"),
    ("HWL:THRESHOLD", (), "HWL:THR"),
    ("HWL:RUN?", (), "HWL:RUN?"),
    ("SYST:LOCK:OWNER?", (), "SYST:LOCK:OWN?"),
    ("HWL:LOCK:TAKE", (), "HWL:LOCK:TAKE"),
])
def test_header_forms(header, path, key):
    assert scpi_resolve(header, path)[0].key == key


@pytest.mark.parametrize("header,path,code", [
    ("SYSTE:ERR?", (), SCPI_UNDEFINED_HEADER),  # neither short nor long form
    ("SYST:ERRO?", (), SCPI_UNDEFINED_HEADER),
    ("SYST:ERR", (), SCPI_UNDEFINED_HEADER),  # no such command, only the query
    ("ERR?", (), SCPI_UNDEFINED_HEADER),  # relative to the root
    ("COUN?", ("SYST",), SCPI_UNDEFINED_HEADER),
    ("*FOO?", (), SCPI_UNDEFINED_HEADER),
    ("SYST::ERR?", (), SCPI_SYNTAX_ERROR),
    ("SYST:ERR??", (), SCPI_SYNTAX_ERROR),
    ("*", (), SCPI_SYNTAX_ERROR),
])
def test_header_errors(header, path, code):
    with pytest.raises(ScpiHeaderError) as ei:
        scpi_resolve(header, path)
    assert ei.value.code == code


def test_path_is_reset_by_a_new_message_and_kept_by_common_commands():
    s = ScpiSession(ChipCore(FakeB1Device()))
    out, n = s.feed(b"SYST:ERR:NEXT?;*CLS;COUN?\n")
    assert out == [b'0,"No error";0\n'] and n == 3
    out, _ = s.feed(b"COUN?\n")  # a new message starts at the root
    assert out == [b"\n"]
    assert s.feed(b"SYST:ERR?;COUN?\n")[0][0].startswith(b"-113,")  # SYST:COUN? is not one
    # a block unit followed by more units in the same message
    blk = SPEC.model_dump_json().encode()
    head = b"#" + str(len(str(len(blk)))).encode() + str(len(blk)).encode()
    out, n = s.feed(b"*CLS;HWL:PROG " + head + blk + b";STAT?;*OPC?\n")
    assert n == 4 and out[0].endswith(b";1\n") and b'"programmed":true' in out[0]
