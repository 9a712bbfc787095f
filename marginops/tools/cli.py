"""The ``marginops`` command.

marginops bench   memory and step time of marginops' head against the eager reference,
                  torch.compile of it and the installed peers, across class counts
marginops demo    the feature distributions of each margin on handwritten digits, as PNGs,
                  with held-out verification accuracy
marginops train   a short training run of a margin head on synthetic data, marginops against
                  the eager reference: loss, step time, throughput and peak memory of each
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional

import torch

from .. import reference
from ..heads import MarginHead
from . import bench, demo
from .common import MARGINS, HelpFormatter, plain
from .memory import peak_bytes


def _persistent_bytes(params, opt) -> int:
    """Gradients and optimizer state: memory a first step allocates for good."""
    grads = sum(p.grad.nbytes for p in params if p.grad is not None)
    state = sum(t.nbytes for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor))
    return grads + state


def _train(impl: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    """Trains backbone + head on a fixed synthetic data set (args.samples points around random
    class centers), visiting it in the same shuffled order for both implementations."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    centers = torch.randn(args.classes, args.input_dim, generator=gen)
    labels = torch.randint(0, args.classes, (args.samples,), generator=gen)
    inputs = (centers[labels] + 0.5 * torch.randn(args.samples, args.input_dim, generator=gen)).to(device)
    labels = labels.to(device)
    order = torch.cat(
        [torch.randperm(args.samples, generator=gen) for _ in range(-(-args.steps * args.batch // args.samples))]
    )

    backbone = torch.nn.Sequential(torch.nn.Linear(args.input_dim, args.dim), torch.nn.BatchNorm1d(args.dim)).to(device)
    head_cls = MarginHead if impl == "marginops" else reference.MarginHead  # impl: "marginops" or "eager"
    head = head_cls(args.dim, args.classes, margin=MARGINS[args.margin](), return_accuracy=True, device=device)
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9)

    def step(i):
        idx = order[i * args.batch : (i + 1) * args.batch].to(device)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            feats = backbone(inputs[idx])
        loss, acc = head(feats, labels[idx])
        loss.backward()
        opt.step()
        return float(loss.detach()), float(acc)

    (first, peak) = peak_bytes(device, lambda: step(0))
    if peak is not None:
        peak -= _persistent_bytes(params, opt)
    losses, accs, times = [first[0]], [first[1]], []
    for i in range(1, args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss, acc = step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        accs.append(acc)
    median = sorted(times)[len(times) // 2] if times else float("nan")
    return {
        "impl": impl,
        "losses": losses,
        "accuracies": accs,
        "step_ms": 1e3 * median,
        "samples_per_s": args.batch / median,
        "peak_bytes": peak,
    }


def cmd_train(args) -> int:
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    margin = MARGINS[args.margin]()
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(
        f"marginops train: {margin!r} head, batch {args.batch}, embedding {args.dim}, "
        f"{args.classes:,} classes, {args.dtype}, {device}{threads}, {args.steps} steps"
    )
    impls = ["marginops"] if args.skip_eager else ["marginops", "eager"]
    results = {}
    for impl in impls:  # marginops first: the eager run's freed memory cannot flatter it
        results[impl] = _train(impl, args, device, dtype)
    epoch = args.samples / args.batch
    print(f"\n{'step':>4} {'epoch':>6}" + "".join(f"{impl + ' loss':>13}{'acc':>7}" for impl in impls))
    for i in sorted({0, args.steps // 4, args.steps // 2, 3 * args.steps // 4, args.steps - 1}):
        row = "".join(f"{results[impl]['losses'][i]:>13.4f}{results[impl]['accuracies'][i]:>7.3f}" for impl in impls)
        print(f"{i + 1:>4} {(i + 1) / epoch:>6.2f}{row}")
    print(f"\n{'impl':<10}{'step ms':>10}{'samples/s':>12}{'peak MiB':>11}")
    for impl in impls:
        r = results[impl]
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
        print(f"{impl:<10}{r['step_ms']:>10.1f}{r['samples_per_s']:>12.0f}{peak:>11}")
    print("(step ms: median; peak MiB: what one step adds above parameters, gradients and optimizer state)")
    if "eager" in results:
        f, e = results["marginops"], results["eager"]
        line = f"\nmarginops / eager: step time {f['step_ms'] / e['step_ms']:.2f}x"
        if f["peak_bytes"] and e["peak_bytes"]:
            line += f", peak memory {f['peak_bytes'] / e['peak_bytes']:.3f}x"
        print(line)
        drift = max(abs(a - b) for a, b in zip(f["losses"], e["losses"]))
        print(f"largest loss difference between the two runs: {drift:.2e}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"config": {k: v for k, v in vars(args).items() if k != "func"}, "results": results}, fh, indent=2
            )
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="marginops", description=plain(__doc__), formatter_class=HelpFormatter)
    sub = p.add_subparsers(
        dest="command", required=True, metavar="{bench,demo,train}", help="what to run (each has its own --help)"
    )
    t = sub.add_parser(
        "train",
        help="train a head on synthetic data, marginops vs eager",
        formatter_class=HelpFormatter,
        description="A short training run of backbone + margin head on synthetic data, marginops' head against the "
        "eager reference\nfrom one seed: loss, accuracy, step time, throughput and peak memory.",
    )
    t.add_argument("--classes", type=int, default=100_000, help="number of classes C of the head")
    t.add_argument("--batch", type=int, default=256, help="rows per step")
    t.add_argument("--dim", type=int, default=128, help="embedding size")
    t.add_argument("--input-dim", type=int, default=64, help="dimension of the synthetic inputs fed to the backbone")
    t.add_argument("--steps", type=int, default=24, help="training steps per implementation")
    t.add_argument("--samples", type=int, default=2048, help="size of the synthetic data set, visited in epochs")
    t.add_argument("--margin", choices=sorted(MARGINS), default="arcface", help="margin of the head")
    t.add_argument("--lr", type=float, default=0.1, help="learning rate of SGD (momentum 0.9)")
    t.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="autocast dtype of the backbone"
    )
    t.add_argument("--device", default="cpu", help="torch device to train on, e.g. cpu or cuda")
    t.add_argument("--seed", type=int, default=0, help="seed of the data, the initialization and the batch order")
    t.add_argument("--skip-eager", action="store_true", help="run marginops' head only")
    t.add_argument("--json", help="also write the results to this file (default: none)")
    t.set_defaults(func=cmd_train)

    b = sub.add_parser(
        "bench",
        help="benchmark the head against the reference and peers",
        description=plain(bench.__doc__),
        formatter_class=HelpFormatter,
    )

    bench.add_arguments(b)
    b.set_defaults(func=bench.run)

    d = sub.add_parser(
        "demo",
        help="draw the feature distributions of the margin family on digits",
        description=plain(demo.__doc__),
        formatter_class=HelpFormatter,
    )
    demo.add_arguments(d)
    d.set_defaults(func=demo.run)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
