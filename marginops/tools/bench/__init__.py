"""``marginops bench``: memory and step time of marginops' head against the eager reference,
torch.compile of it, and the peers that are installed, across class counts.

Defaults: on the CPU, B = 256, D = 128, C = 10k … 300k, float32, ArcFace (about five minutes on
two cores); on a GPU, the face-recognition shapes B = 1024 (after all-gather), D = 512,
C = 100k … 3M, bfloat16, ArcFace, CosFace and plain softmax (for the peers), and the largest C
that fits for each implementation (bounded by the free device memory). Expected run time on
one H100: about 10 to 20 minutes (an estimate: torch.compile dominates); --time-budget-s (default
1800 on a GPU) caps it: what is left is reported as skipped, a largest-C search as a lower bound.

--preset gpu-check (GPU only, what scripts/gpu-check runs, about 3 to 6 minutes, at most
--time-budget-s = 360): B = 1024, D = 512, bfloat16, ArcFace, C = 100k, 1M, 3M with marginops'
two CUDA backends (chunked, tiles), the eager reference, torch.compile of it and three GEMMs;
then at C = 1M only, plain softmax (for Cut Cross-Entropy, Liger and torch's linear_cross_entropy,
when one is there) and NormFace (for torch's linear_cross_entropy, torch >= 2.13) with chunked, the
eager reference and those peers; no largest-C search; and
the chunked backend's targets at C = 1M: within 64 MiB above inputs and gradients (the run fails
if not), time <= 0.5x eager's and >= 300 TFLOP/s (reported only).

Output: first a headline per device, one line per pair of marginops' implementation and the
eager reference or a peer, at the largest C both ran, e.g. "marginops vs eager at C = 300k: 3.2x
faster, 240x less memory, fits 4.0x more classes"; then the table (time: median of at least
--repeat runs, more while --repeat-time-s lasts, with the min-max spread; memory in B, KiB, MiB
or GiB; "x 3 GEMMs (reference cost)": time relative to three plain GEMMs of the shape, a
yardstick, not a floor), the legend, and JSON, Markdown and PNG files in --out.

Implementations: marginops (its default backend: the tiled path on the CPU, chunked on CUDA;
"fused", its old name, is still accepted for now),
chunked and tiles (CUDA only: backend="chunked" / backend="tiles"), reference (eager),
compiled (torch.compile of it), pml, cce, liger (peers, when installed), torch-lce and
torch-lce-chunked (torch.nn.functional.linear_cross_entropy, torch >= 2.13: its reference path and
its chunked path, options=LinearCrossEntropyOptions(); plain softmax and NormFace, the latter with
x and W normalized outside it). On the CPU: --margins softmax,normface --impls
marginops,reference,torch-lce,torch-lce-chunked.
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import sys
import time
from typing import List, Optional, Tuple

import torch

from ..common import MARGINS, HelpFormatter, plain
from ..memory import precise_host_memory
from .impls import ALIASES, IMPLS, Case, torch_lce_missing
from .measure import environment, sweep
from .report import LEGEND, checks, checks_text, headline_text, largest_classes, text_table, write

DEFAULTS = {
    "cpu": dict(
        batch=256,
        dim=128,
        classes="10000,30000,100000,300000",
        dtype="float32",
        margins="arcface",
        impls="marginops,reference,compiled,pml",
        repeat=5,
        repeat_time_s=2.0,
        max_budget_mib=512,
        max_limit=4_000_000,
        time_budget_s=None,
    ),
    "cuda": dict(
        batch=1024,
        dim=512,
        classes="100000,300000,1000000,3000000",
        dtype="bfloat16",
        margins="arcface,cosface,softmax,normface",
        impls="chunked,tiles,reference,compiled,pml,cce,liger,torch-lce,torch-lce-chunked",
        repeat=10,
        repeat_time_s=1.0,
        max_budget_mib=None,
        max_limit=200_000_000,
        time_budget_s=1800,
    ),
}
SOFTMAX_PEERS = ("cut_cross_entropy", "liger_kernel")
TORCH_LCE = torch_lce_missing() is None  # torch's own F.linear_cross_entropy (torch >= 2.13): softmax and NormFace
PRESETS = {
    # scripts/gpu-check's bench stage: one bounded run. ArcFace at three C first (the chunked
    # backend's targets, report.checks); then, at C = 1M only and with a shorter list of implementations,
    # plain softmax (for the softmax-only peers) and NormFace (for torch's linear_cross_entropy).
    "gpu-check": dict(
        batch=1024,
        dim=512,
        classes="100000,1000000,3000000",
        dtype="bfloat16",
        margins=",".join(
            ["arcface"]
            + (["softmax"] if TORCH_LCE or any(importlib.util.find_spec(p) for p in SOFTMAX_PEERS) else [])
            + (["normface"] if TORCH_LCE else [])
        ),
        impls="chunked,tiles,reference,compiled,cce,liger,torch-lce,torch-lce-chunked",
        repeat=10,
        repeat_time_s=0.5,
        max_budget_mib=None,
        max_limit=200_000_000,
        time_budget_s=360,
        no_max_classes=True,
        hard_checks=True,
        # per margin: its class counts and implementations, where not the preset's
        by_margin={
            m: dict(classes="1000000", impls="chunked,reference,cce,liger,torch-lce,torch-lce-chunked")
            for m in ("softmax", "normface")
        },
    ),
}
QUICK = dict(
    batch=32,
    dim=16,
    classes="500,2000",
    margins="arcface",
    impls="marginops,reference",
    repeat=5,
    repeat_time_s=0.1,
    max_budget_mib=64,
    max_limit=200_000,
)


def _default(key: str) -> str:
    cpu, gpu = DEFAULTS["cpu"][key], DEFAULTS["cuda"][key]
    return f"default: {cpu} on the CPU, {gpu} on a GPU" if cpu != gpu else f"default: {cpu}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device to benchmark on (cuda when a GPU is visible, else cpu)",
    )
    p.add_argument("--batch", type=int, help=f"rows B (after all-gather, for a sharded head) ({_default('batch')})")
    p.add_argument("--dim", type=int, help=f"embedding size D ({_default('dim')})")
    p.add_argument("--classes", help=f"comma-separated class counts C ({_default('classes')})")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help=f"dtype of x and W ({_default('dtype')})"
    )
    p.add_argument("--margins", help=f"comma-separated, of {', '.join(sorted(MARGINS))} ({_default('margins')})")
    p.add_argument(
        "--impls",
        help=f"comma-separated, of {', '.join(sorted(IMPLS))}; missing peers are reported, not run "
        f"({_default('impls')})",
    )
    p.add_argument(
        "--repeat",
        type=int,
        help=f"least number of timed runs per measurement; the median is reported with "
        f"the min-max spread ({_default('repeat')})",
    )
    p.add_argument(
        "--repeat-time-s",
        type=float,
        help="keep timing a measurement while its timed runs total less than this "
        f"many seconds, up to 100 runs ({_default('repeat_time_s')})",
    )
    p.add_argument("--no-max-classes", action="store_true", help="skip the search for the largest C that fits")
    p.add_argument(
        "--max-budget-mib",
        type=int,
        help=f"host memory budget for the largest-C search on the CPU "
        f"(default: {DEFAULTS['cpu']['max_budget_mib']}; on a GPU the device memory)",
    )
    p.add_argument(
        "--quick", action="store_true", help="a CI-sized run (B=32, D=16, C=500 and 2000, marginops and eager)"
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="gpu-check: the bounded GPU sweep scripts/gpu-check runs (see above) (default: none)",
    )
    p.add_argument(
        "--time-budget-s",
        type=float,
        help="stop starting measurements after this many seconds (default: 1800 on a GPU, none on the CPU)",
    )
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


def resolve_aliases(names: List[str]) -> List[str]:
    """Implementation names with the old ones (impls.ALIASES) replaced by the current, each with
    a notice on stderr."""
    out = []
    for name in names:
        if name in ALIASES:
            print(
                f"marginops bench: '{name}' is deprecated and will be removed in the next release; "
                f"use '{ALIASES[name]}'",
                file=sys.stderr,
            )
            name = ALIASES[name]
        out.append(name)
    return out


def case_groups(cfg: dict, margins: List[str], impls: List[str], by_margin: dict) -> List[Tuple[List[Case], List[str]]]:
    """(cases, implementations) to sweep, in order: every margin at cfg's class counts with
    `impls`, except the margins `by_margin` narrows to its own "classes" and "impls" (a preset's,
    when the command line names neither)."""
    groups: List[Tuple[List[Case], List[str]]] = []
    for m in margins:
        sub = by_margin.get(m, {})
        cs = [int(c) for c in str(sub.get("classes", cfg["classes"])).split(",")]
        names = [i.strip() for i in str(sub.get("impls", ",".join(impls))).split(",") if i.strip()]
        cases = [Case(cfg["batch"], cfg["dim"], c, cfg["dtype"], m) for c in cs]
        if groups and groups[-1][1] == names:
            groups[-1][0].extend(cases)
        else:
            groups.append((cases, names))
    return groups


def run(args) -> int:
    device = torch.device(args.device)
    cfg = dict(DEFAULTS["cuda" if device.type == "cuda" else "cpu"])
    preset = getattr(args, "preset", None)
    if preset:
        if device.type != "cuda":
            print(f"marginops bench: --preset {preset} needs a CUDA device (--device cuda)", file=sys.stderr)
            return 2
        cfg.update(PRESETS[preset])
    if args.quick:
        cfg.update(QUICK)
    for key in (
        "batch",
        "dim",
        "classes",
        "dtype",
        "margins",
        "impls",
        "repeat",
        "repeat_time_s",
        "max_budget_mib",
        "time_budget_s",
    ):
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    find_max = not (args.no_max_classes or cfg.get("no_max_classes", False))
    impls = resolve_aliases([i.strip() for i in str(cfg["impls"]).split(",") if i.strip()])
    margins = [m.strip() for m in str(cfg["margins"]).split(",") if m.strip()]
    unknown = [i for i in impls if i not in IMPLS] + [m for m in margins if m not in MARGINS]
    if unknown:
        print(f"marginops bench: unknown implementation or margin {unknown}", file=sys.stderr)
        return 2
    narrowed = {} if args.classes is not None or args.impls is not None else cfg.get("by_margin", {})
    groups = case_groups(cfg, margins, impls, narrowed)
    if device.type == "cpu":
        precise_host_memory()
    env = environment(device)
    print(
        f"marginops bench on {env.get('gpu', env.get('cpu'))} ({device}), torch {env['torch']}: "
        + ", ".join(f"{len(c)} cases x {len(i)} implementations" for c, i in groups),
        flush=True,
    )
    step, close = _progress()
    budget = None if cfg["max_budget_mib"] is None else int(cfg["max_budget_mib"]) * 2**20
    deadline = None if cfg.get("time_budget_s") is None else time.monotonic() + float(cfg["time_budget_s"])
    prefix = "gpu-" if device.type == "cuda" else "cpu-"
    config = {k: v for k, v in cfg.items()}
    config.update(preset=preset, find_max_classes=find_max)
    results: list = []

    def interrupted(signum, frame):  # e.g. `timeout` in scripts/gpu-check: keep what was measured
        found = checks(results)
        write(
            results,
            env,
            config,
            args.out,
            prefix,
            found,
            f"interrupted by signal {signum}: partial results",
            plots=False,
        )
        print(
            f"\nmarginops bench: interrupted (signal {signum}); partial results in {args.out}",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(124)

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        for group_cases, group_impls in groups:
            sweep(
                group_cases,
                group_impls,
                device,
                int(cfg["repeat"]),
                budget,
                find_max,
                int(cfg["max_limit"]),
                step,
                deadline,
                results,
                time_budget_s=cfg.get("repeat_time_s"),
            )
    finally:
        signal.signal(signal.SIGTERM, previous)
    close()
    head = headline_text(results, env)
    if head:
        print()
        print(head)
    print()
    print(text_table(results))
    print()
    print(LEGEND)
    if find_max:
        print()
        print(largest_classes(results))
        if budget is not None:
            print(f"(on the host: inputs, gradients and peak extra memory within {cfg['max_budget_mib']} MiB)")
    found = checks(results)
    if cfg.get("hard_checks") and not found:  # the preset's shape did not run chunked at all
        found = {
            "memory_64mib": dict(
                what="chunked at B=1024 D=512 C=1,000,000 bfloat16 arcface",
                value_mib=None,
                limit_mib=64,
                hard=True,
                passed=False,
                note="not in this run",
            )
        }
    if found:
        print()
        print(checks_text(found))
    files = write(results, env, config, args.out, prefix, found)
    print("\nwrote " + ", ".join(files))
    failed = [k for k, c in found.items() if c["hard"] and not c["passed"]]
    return 1 if failed and cfg.get("hard_checks") else 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="marginops bench", description=plain(__doc__), formatter_class=HelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))
