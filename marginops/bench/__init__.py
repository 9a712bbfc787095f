"""``marginops bench``: memory and step time of the fused head against the eager reference,
torch.compile of it, and the peers that are installed, across class counts.

Defaults: on the CPU, B = 256, D = 128, C = 10k … 300k, float32, ArcFace (about two minutes on
two cores); on a GPU, the face-recognition shapes B = 1024 (after all-gather), D = 512,
C = 100k … 3M, bfloat16, ArcFace, CosFace and plain softmax (for the peers), and the largest C
that fits for each implementation.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

import torch

from .impls import IMPLS, MARGINS, Case
from .measure import environment, precise_host_memory, sweep
from .report import LEGEND, largest_classes, text_table, write

DEFAULTS = {
    "cpu": dict(batch=256, dim=128, classes="10000,30000,100000,300000", dtype="float32", margins="arcface",
                impls="fused,reference,compiled,pml", repeat=3, max_budget_mib=512, max_limit=4_000_000),
    "cuda": dict(batch=1024, dim=512, classes="100000,300000,1000000,3000000", dtype="bfloat16", margins="arcface,cosface,softmax",
                 impls="fused,reference,compiled,pml,cce,liger", repeat=10, max_budget_mib=None, max_limit=200_000_000),
}
QUICK = dict(batch=32, dim=16, classes="500,2000", margins="arcface", impls="fused,reference", repeat=2, max_budget_mib=64, max_limit=200_000)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, help="rows B (after all-gather, for a sharded head)")
    p.add_argument("--dim", type=int, help="embedding size D")
    p.add_argument("--classes", help="comma-separated class counts C")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--margins", help=f"comma-separated, of {sorted(MARGINS)}")
    p.add_argument("--impls", help=f"comma-separated, of {sorted(IMPLS)} (missing peers are reported, not run)")
    p.add_argument("--repeat", type=int, help="timed repetitions (median)")
    p.add_argument("--no-max-classes", action="store_true", help="skip the search for the largest C that fits")
    p.add_argument("--max-budget-mib", type=int, help="host memory budget for the largest-C search on the CPU")
    p.add_argument("--quick", action="store_true", help="a CI-sized run")
    p.add_argument("--out", default="marginops-bench", help="folder for the JSON, Markdown and PNG outputs")


def _progress():
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    state = {"bar": None, "t0": time.time()}

    def step(msg: str) -> None:
        if tqdm is not None and sys.stderr.isatty():
            if state["bar"] is None:
                state["bar"] = tqdm(desc="bench", unit="run")
            state["bar"].set_postfix_str(msg)
            state["bar"].update(1)
        else:
            print(f"[{time.time() - state['t0']:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].close()

    return step, close


def run(args) -> int:
    device = torch.device(args.device)
    cfg = dict(DEFAULTS["cuda" if device.type == "cuda" else "cpu"])
    if args.quick:
        cfg.update(QUICK)
    for key in ("batch", "dim", "classes", "dtype", "margins", "impls", "repeat", "max_budget_mib"):
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    impls = [i.strip() for i in str(cfg["impls"]).split(",") if i.strip()]
    margins = [m.strip() for m in str(cfg["margins"]).split(",") if m.strip()]
    unknown = [i for i in impls if i not in IMPLS] + [m for m in margins if m not in MARGINS]
    if unknown:
        print(f"marginops bench: unknown implementation or margin {unknown}", file=sys.stderr)
        return 2
    classes = [int(c) for c in str(cfg["classes"]).split(",")]
    cases = [Case(cfg["batch"], cfg["dim"], c, cfg["dtype"], m) for m in margins for c in classes]
    if device.type == "cpu":
        precise_host_memory()
    env = environment(device)
    print(f"marginops bench on {env.get('gpu', env.get('cpu'))} ({device}), torch {env['torch']}: "
          f"{len(cases)} cases x {len(impls)} implementations", flush=True)
    step, close = _progress()
    budget = None if cfg["max_budget_mib"] is None else int(cfg["max_budget_mib"]) * 2**20
    results = sweep(cases, impls, device, int(cfg["repeat"]), budget, not args.no_max_classes, int(cfg["max_limit"]), step)
    close()
    print()
    print(text_table(results))
    print()
    print(LEGEND)
    if not args.no_max_classes:
        print()
        print(largest_classes(results))
        if budget is not None:
            print(f"(on the host: inputs, gradients and peak extra memory within {cfg['max_budget_mib']} MiB)")
    prefix = "gpu-" if device.type == "cuda" else "cpu-"
    files = write(results, env, {k: v for k, v in cfg.items()}, args.out, prefix)
    print("\nwrote " + ", ".join(files))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="marginops bench", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))
