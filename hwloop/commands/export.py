"""``hwloop export``: the ReLU twin of a converted network as ONNX, checked with onnxruntime."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hwloop.commands import DATASETS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export the ReLU twin of a converted network (ONNX), checked with onnxruntime",
        description=(
            "Write the exact ReLU twin (TTFSNetwork.to_relu, pooling padding kept) of a network "
            "file from `hwloop convert --out` as ONNX (float32, opset 17) and check it with "
            "onnxruntime against the twin on a batch (max |difference| <= 1e-5 relative to the "
            "logits). Needs hwloop[onnx]. There is no NIR export: see docs/model.md."),
    )
    p.add_argument("net", metavar="NET", help="network file written by `hwloop convert --out`")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="output format (onnx)")
    p.add_argument("--out", default=None, help="output file (default: NET with suffix .onnx)")
    p.add_argument("--dataset", default="synthetic", choices=DATASETS, help="inputs of the check")
    p.add_argument("--data-dir", default=None, help="directory holding the IDX files")
    p.add_argument("--samples", type=int, default=64, help="batch size of the check (default 64)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: import-time cost (torch and the library load only when the command runs; `hwloop --help` stays fast)
    from hwloop.interop.modelfile import sample_batch
    from hwloop.interop.netfile import load_network
    from hwloop.interop.onnx_export import export_onnx

    net = load_network(args.net)
    out = args.out or str(Path(args.net).with_suffix(".onnx"))
    x = None if args.no_check else sample_batch(net.input_shape, args.samples, args.dataset, args.data_dir)
    result = export_onnx(net, out, x)
    result.update(format=args.format, samples=None if x is None else int(x.shape[0]))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        diff = result["max_abs_diff"]
        check = "not checked" if diff is None else f"onnxruntime vs twin max |diff| {diff:.2e} on {x.shape[0]} inputs"
        print(f"{out}: ReLU twin, {result['nodes']} ONNX nodes, input (batch, "
              f"{', '.join(map(str, net.input_shape))}); {check}")
    print(f"wrote {out}", file=sys.stderr)
    return 0
