"""``hwloop convert``: a ReLU model file (PyTorch or ONNX) -> its exact TTFS twin, checked."""

from __future__ import annotations

import argparse
import json
import sys

from hwloop.commands import DATASETS


def register(subparsers) -> None:
    # lazy: import-time cost (torch and the library load only when the command runs; `hwloop --help` stays fast)
    from hwloop.ttfs.architectures import ARCHITECTURES

    p = subparsers.add_parser(
        "convert",
        help="convert a ReLU model file (ONNX, torch.export, state dict) to its exact TTFS twin",
        description=(
            "Read a ReLU model, convert it to a B1 TTFS network from its traced graph "
            "(hwloop.convert), print the topology with the fan-in per layer and the equivalence "
            "check on a batch (every stage against the ReLU activations, logits against the "
            "model), and write the network file. MODEL is an .onnx file (needs hwloop[onnx]), a "
            "torch.export program (.pt2), or a weights-only state dict with --arch."),
    )
    p.add_argument("model_file", metavar="MODEL", help="model file: .onnx, .pt2, or a state dict (.pt)")
    p.add_argument("--arch", choices=ARCHITECTURES, default=None, help="architecture of a state dict")
    p.add_argument("--input-shape", default=None,
                   help="per-sample input shape of a state dict's architecture, e.g. 1,28,28 (default)")
    p.add_argument("--classes", type=int, default=None,
                   help="readout size of a state dict's architecture (default: from its weights)")
    p.add_argument("--dataset", default="synthetic", choices=DATASETS,
                   help="inputs for the windows and the check (default synthetic)")
    p.add_argument("--data-dir", default=None, help="directory holding the IDX files")
    p.add_argument("--samples", type=int, default=64, help="batch size of the check (default 64)")
    p.add_argument("--model", choices=("b1", "alpha1"), default="b1", help="neuron model (default b1)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="parameter dtype of the result (default: the model's)")
    p.add_argument("--out", default="net.pt", help="network file to write (default net.pt)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def _fmt_shape(s) -> str:
    return "x".join(str(v) for v in s)


def run(args: argparse.Namespace) -> int:
    import torch

    # lazy: import-time cost (torch and the library load only when the command runs; `hwloop --help` stays fast)
    import hwloop
    from hwloop.errors import ConversionError
    from hwloop.interop.modelfile import load_model, parse_shape, sample_batch
    from hwloop.interop.netfile import save_network
    from hwloop.ttfs.equivalence import equivalence, topology

    model, shape, kind = load_model(args.model_file, args.arch, parse_shape(args.input_shape),
                                    args.classes)
    x = sample_batch(shape, args.samples, args.dataset, args.data_dir)
    params = list(model.parameters())
    dtype = getattr(torch, args.dtype) if args.dtype else (params[0].dtype if params else torch.float32)
    net64 = hwloop.convert(model, x, model=args.model, dtype=torch.float64)  # checked in float64
    rows = topology(net64)
    check = equivalence(net64, model, x)
    net = net64.to(dtype)
    report = {"model_file": str(args.model_file), "kind": kind, "input_shape": list(shape),
              "topology": rows, "check": check, "samples": int(x.shape[0]), "dataset": args.dataset}
    if args.json:
        print(json.dumps(report, indent=2, default=list))
    else:
        print(f"{args.model_file} ({kind}), input {_fmt_shape(shape)}, {args.model} TTFS network:")
        print(f"  {'#':>2}  {'layer':<10} {'in':>12} -> {'out':<12} {'fan-in':>7}  window (tau_c)")
        for r in rows:
            win = f"[{r['window'][0]:.4g}, {r['window'][1]:.4g})" if r["window"] else ""
            kind_s = r["kind"] + ("*" if r["in_shift"] else "")
            print(f"  {r['index']:>2}  {kind_s:<10} {_fmt_shape(r['in_shape']):>12} -> "
                  f"{_fmt_shape(r['out_shape']):<12} {r['fan_in'] or '':>7}  {win}")
        if any(r["in_shift"] for r in rows):
            print("  (* carries a batch-norm shift as an input shift)")
        print(f"equivalence on {x.shape[0]} {args.dataset} inputs (float64):")
        for s in check["stages"]:
            print(f"  stage {s['stage']:>2} {_fmt_shape(s['shape']):>12}: max |TTFS - ReLU| "
                  f"{s['max_abs_diff']:.2e}, silent where ReLU = 0: {'yes' if s['silent_match'] else 'NO'}")
        print(f"  logits: max |TTFS - model| {check['logits_max_abs_diff']:.2e}, "
              f"|twin - model| {check['twin_max_abs_diff']:.2e} -> "
              f"{'exact' if check['exact'] else 'NOT EXACT'}")
    if not check["exact"]:
        raise ConversionError("the equivalence check failed; the network was not written")
    info = {"source": str(args.model_file), "kind": kind, "dataset": args.dataset,
            "logits_max_abs_diff": check["logits_max_abs_diff"]}
    path = save_network(net, args.out, info)
    print(f"wrote {path}", file=sys.stderr)
    return 0
