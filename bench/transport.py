"""Transport overhead of hardware-in-the-loop fine-tuning: one HIL epoch through each link.

    PYTHONPATH=. python bench/transport.py [--train 600] [--repeats 1] [--out bench.json]

Runs ``hwloop.train.finetune.run_finetune`` (synthetic data, FC2, analog emulator profile, chip
seed 5) for one fine-tuning epoch against

* the in-process emulator (the reference),
* the virtual chip on a pty, frame dialect (pyserial),
* the virtual chip on TCP loopback, frame dialect (``socket://``), clean and with link faults
  ``FaultConfig(bit_flip_rate=1e-4, drop_rate=0.01)`` (and on the pty with the same faults),
* the virtual chip on TCP loopback, SCPI dialect (pyvisa-py ``TCPIP::127.0.0.1::PORT::SOCKET``),

and prints JSON: per row the epoch's wall time (``finetune_wall_time_s`` of the report; the
minimum over ``--repeats``), the overhead over the in-process run in percent, whether the final
weights equal the in-process run's, and the bytes on the wire (host ``health`` bytes_tx +
bytes_rx) during the epoch, per training sample, and over the whole run (set-up and the two
evaluations included).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hwloop.devices import open as open_mod  # noqa: E402
from hwloop.emulator.device import EmulatorDevice  # noqa: E402
from hwloop.chip.server import FaultConfig, serve  # noqa: E402
from hwloop.train.finetune import run_finetune  # noqa: E402
from hwloop.train.options import FinetuneOptions  # noqa: E402
from hwloop.train.hil import FinetuneConfig  # noqa: E402

ANALOG = str(ROOT / "devices" / "emulator-analog.yaml")
CHIP_SEED = 5
FAULTS = dict(bit_flip_rate=1e-4, drop_rate=0.01, seed=3)


class _Tap:
    """Wraps open_device to catch the device run_finetune opens, and snapshots its health at the
    start of the epoch (its SEED_NOISE call) and at its end (the "evaluating after" log line)."""

    def __init__(self):
        self.dev = None
        self.start = None
        self.end = None
        self._orig = open_mod.open_device

    def _bytes(self):
        h = getattr(self.dev, "health", None)
        return None if h is None else int(h["bytes_tx"]) + int(h["bytes_rx"])

    def __enter__(self):
        def opener(*a, **kw):
            dev = self._orig(*a, **kw)
            self.dev = dev
            seed = dev.seed_noise

            def seed_noise(s):
                if self.start is None:
                    self.start = self._bytes()
                return seed(s)

            dev.seed_noise = seed_noise
            return dev

        open_mod.open_device = opener
        return self

    def log(self, msg: str) -> None:
        if msg.startswith("evaluating after"):
            self.end = self._bytes()

    def __exit__(self, *exc):
        open_mod.open_device = self._orig


def _run(name: str, device: str, tmp: Path, train: int, test: int, batch: int) -> dict:
    opts = FinetuneOptions(dataset="synthetic", device=device,
                           chip_seed=CHIP_SEED if device == ANALOG else None,
                           out=str(tmp / name), cache_dir=str(tmp / "cache"), pretrain_epochs=2,
                           train_subset=train, test_subset=test, progress=False,
                           eval_batch_size=60,
                           finetune=FinetuneConfig(epochs=1, lr=3e-3, batch_size=batch))
    with _Tap() as tap:
        rep = run_finetune(opts, log=tap.log)
    health = rep["provenance"].get("health") or {}
    out = {"finetune_wall_time_s": rep["finetune_wall_time_s"],
           "final_weights_sha256": rep["final_weights_sha256"]}
    if health:
        out["health"] = health
        if tap.start is not None and tap.end is not None:
            out["epoch_bytes"] = tap.end - tap.start
            out["bytes_per_sample"] = round((tap.end - tap.start) / train, 1)
        out["run_bytes"] = int(health["bytes_tx"]) + int(health["bytes_rx"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=600, help="training samples (one epoch)")
    ap.add_argument("--test", type=int, default=120)
    ap.add_argument("--batch", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-pty-faults", action="store_true")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    rows = [("in_process", None, None, None),
            ("pty_frame", "pty", "frame", None),
            ("tcp_frame", "tcp", "frame", None),
            ("tcp_frame_faults", "tcp", "frame", FAULTS),
            ("visa_tcp_scpi", "tcp", "scpi", None)]
    if not args.no_pty_faults:
        rows.insert(4, ("pty_frame_faults", "pty", "frame", FAULTS))
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        # train the ReLU twin once (cached), outside the timings
        _run("warmup", ANALOG, tmp, args.train, args.test, args.batch)
        for rep_i in range(args.repeats):
            for name, transport, dialect, faults in rows:
                if transport is None:
                    r = _run(f"{name}{rep_i}", ANALOG, tmp, args.train, args.test, args.batch)
                else:
                    chip = serve(EmulatorDevice.from_profile(ANALOG, chip_seed=CHIP_SEED),
                                 transport=transport, dialect=dialect,
                                 faults=FaultConfig(**faults) if faults else None)
                    try:
                        r = _run(f"{name}{rep_i}", chip.url, tmp, args.train, args.test,
                                 args.batch)
                    finally:
                        chip.stop()
                    if faults:
                        r["injected"] = {k: sum(s[k] for s in chip.fault_stats)
                                         for k in ("flipped_bits", "dropped", "duplicated")}
                prev = results.get(name)
                r["wall_times_s"] = (prev["wall_times_s"] if prev else []) + \
                    [r["finetune_wall_time_s"]]
                if prev is None or r["finetune_wall_time_s"] < prev["finetune_wall_time_s"]:
                    results[name] = r
                else:
                    prev["wall_times_s"] = r["wall_times_s"]
    ref = results["in_process"]
    table = {}
    for name, r in results.items():
        row = {"finetune_wall_time_s": r["finetune_wall_time_s"],
               "wall_times_s": r["wall_times_s"],
               "same_weights_as_in_process":
                   r["final_weights_sha256"] == ref["final_weights_sha256"]}
        if name != "in_process":
            row["overhead_pct"] = round(100.0 * (r["finetune_wall_time_s"] /
                                                 max(ref["finetune_wall_time_s"], 1e-9) - 1.0), 1)
            for k in ("bytes_per_sample", "epoch_bytes", "run_bytes", "injected"):
                if k in r:
                    row[k] = r[k]
            h = r.get("health", {})
            row["link"] = {k: h[k] for k in ("retries", "resends", "naks", "nudges", "timeouts",
                                              "crc_errors", "resyncs") if k in h}
        table[name] = row
    doc = {"bench": "transport", "dataset": "synthetic", "arch": "fc2", "profile": "emulator-analog",
           "train_samples": args.train, "batch_size": args.batch, "epochs": 1,
           "repeats": args.repeats, "faults": FAULTS, "unix_time": int(time.time()),
           "rows": table}
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
