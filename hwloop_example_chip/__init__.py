"""XC-1: a worked example of a third-party hwloop backend for a chip with its own command set.

``docs/drivers.md`` walks through it. Three parts:

* :mod:`hwloop_example_chip.server`: the virtual XC-1, a TCP server on loopback whose physics is
  the hwloop emulator (:class:`hwloop.emulator.device.EmulatorDevice`);
* :mod:`hwloop_example_chip.driver`: :class:`ExampleChipDevice`, the
  :class:`~hwloop.devices.base.TTFSDevice` that speaks to it;
* :func:`open_device`: the opener registered in ``pyproject.toml`` under the entry-point group
  ``hwloop.devices`` with the name ``xchip``, so that every hwloop command opens
  ``--device xchip://HOST:PORT`` (and ``xchip://serve``, a private virtual XC-1 started in
  process) with no change to hwloop.

The XC-1 command set (ASCII lines over TCP; every command is answered by zero or more data lines
and then ``OK`` or ``ERR <CODE> <text>``, codes LIMIT, RANGE, STATE, SYNTAX, UNSUPPORTED,
INTERNAL; commands may be pipelined):

=========================================  ===================================================
``*IDN?``                                  ``XCHIP,XC-1,<device id>,<firmware>``
``CAP?``                                   ``CAP layers= neurons= fanin= bits= steps= tpt=
                                           tau_ps= batch= adaptive= kinds=`` (tpt: clock ticks
                                           per tau_c; tau_ps: tau_c in picoseconds)
``RST`` / ``SEED <n>`` / ``PING <token>``  power-on state / reseed the jitter / ``PONG <token>``
``DEF <n> <t_max0 tick> <AxBxC>``          start a network of n layers with that input shape
``LYR <kind> <in> <out> <t_min> <t_max>``  one layer (kinds dense, flatten, readout; windows
                                           in ticks, ``-`` for none)
``PROG``                                   program the defined network (weights, thresholds 0)
``WROW <layer> <row> <code> ...``          stage one row of integer codes
``WCOMMIT <layer> <scale>``                apply all staged rows of the layer at once; refused
                                           (and the stage discarded) if any row was refused
``WROW? <layer> <row>`` / ``WSCALE? <l>``  read back a row / the scale
``THR <layer> <float> ...`` / ``THR? <l>`` thresholds (readout: offsets), float64 ``repr``
``WIN <t_min tick> <t_max tick> ...``      windows of every neuron layer (adaptive chips)
``RUN <B>`` + B lines ``IN <addr>@<tick>`` run a batch; inputs as address events (flat
 ...                                       address, C order); the reply per sample: ``S <b>``,
                                           ``EV <stage> <addr>@<tick> ...`` per stage (input as
                                           seen, then each dense layer), ``VT <layer> <v> ...``,
                                           ``RO <logit> ...``, ``CNT <n> ...``, ``EN <J> ...``
=========================================  ===================================================
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

__all__ = ["ExampleChipDevice", "open_device", "SCHEME"]

SCHEME = "xchip"


def open_device(url: str, **kw):
    """The ``hwloop.devices`` entry point: open ``xchip://HOST:PORT``.

    ``xchip://serve`` (optionally ``?profile=emulator-analog&chip_seed=3&jitter_sd=0``) first
    starts a private virtual XC-1 in this process, stopped when the device is closed. Keywords
    hwloop passes that the XC-1 does not use (``chip_seed`` for a real chip, serial options) are
    ignored; ``timeout`` and ``verify`` are taken.
    """
    from hwloop_example_chip.driver import ExampleChipDevice
    opts = {k: kw[k] for k in ("timeout", "verify", "per_sample_timeout_s") if k in kw}
    parts = urlsplit(url)
    if parts.netloc == "serve":
        from hwloop_example_chip.server import serve_example_chip
        q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        seed = q.get("chip_seed", kw.get("chip_seed"))
        chip = serve_example_chip(profile=q.get("profile", "emulator-analog"),
                                  chip_seed=None if seed is None else int(seed),
                                  jitter_sd=float(q["jitter_sd"]) if "jitter_sd" in q else None)
        try:
            dev = ExampleChipDevice(chip.url, **opts)
        except BaseException:
            chip.stop()
            raise
        dev._owned = chip
        return dev
    return ExampleChipDevice(url, **opts)


def __getattr__(name):
    if name == "ExampleChipDevice":
        from hwloop_example_chip.driver import ExampleChipDevice
        return ExampleChipDevice
    raise AttributeError(name)
