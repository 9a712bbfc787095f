"""The head's training state: weight + gradient + optimizer state per rank, and the time of the
backward and the optimizer, for today's path (weight.grad and a torch.optim optimizer) against
marginops.optim's optimizer in the backward, measured on this machine; then a model (arithmetic,
not a measurement) of the same bytes at C = 10M / 100M on 8 / 64 GPUs.

Measured per path, one head of C classes, D dims, fp32 weights, batch B:
  state     bytes of the weight, its .grad and the optimizer's state after a step (tensor sizes)
  peak      the resident set's peak above the weight and the optimizer state, over forward +
            backward + step (the gradient and every temporary), byte-precise on Linux
  total     weight + state + peak, and its ratio to the fp32 weight ("x shard")
  step      median seconds of forward + backward + optimizer step (timed apart from the memory)
  optimizer seconds in the optimizer's own work: torch's step(), or the head optimizer's row
            updates (and catch-ups) inside the backward
Partial FC (a one-rank ShardedMarginHead, sample_rate 0.1): the optimizer's work against the dense
torch.optim step on the same head.

    python3 benchmarks/head_state.py [--classes 1000000] [--dim 512] [--batch 128] [--out benchmarks/results]
"""

import argparse
import gc
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

import marginops as mo
from marginops import distributed as mdist
from marginops import optim
from marginops.tools.memory import byte_precise_host_memory, peak_rss_above_baseline

MIB, GIB = 1 << 20, 1 << 30


def state_bytes(head, opt) -> dict:
    weight = sum(p.numel() * p.element_size() for p in head.parameters())
    grad = sum(p.grad.numel() * p.grad.element_size() for p in head.parameters() if p.grad is not None)
    tensors = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    return {"weight": weight, "grad": grad, "optimizer": sum(t.numel() * t.element_size() for t in tensors)}


def timed_optimizer(opt):
    """Wraps the optimizer's own work (torch's step, or the head optimizer's row updates) with a clock."""
    spent = [0.0]
    targets = ("_apply", "_prepare") if isinstance(opt, optim._HeadOptimizer) else ("step",)
    for name in targets:
        real = getattr(opt, name)

        def clocked(*args, _real=real, **kwargs):
            t0 = time.perf_counter()
            try:
                return _real(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t0

        setattr(opt, name, clocked)
    return spent


def run(make_head, make_opt, B, steps, seed=0):
    gc.collect()  # the previous path's head and optimizer (a cycle through the clock) are gone
    torch.manual_seed(seed)
    head = make_head()
    opt = make_opt(head)
    spent = timed_optimizer(opt)
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(B, head.embedding_size, generator=g), torch.randint(0, head.num_classes, (B,), generator=g))]

    def step():
        x, y = data[0]
        head(x, y).backward()
        opt.step()

    step()  # the optimizer's state exists from here on
    sizes = state_bytes(head, opt)
    opt.zero_grad()
    times, work = [], []
    for _ in range(steps):  # timed with the usual allocator
        spent[0] = 0.0
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        work.append(spent[0])
        opt.zero_grad()
    with byte_precise_host_memory():  # one more step for the memory: every allocation its own pages
        _, peak = peak_rss_above_baseline(step)
    opt.zero_grad()
    base = sizes["weight"] + sizes["optimizer"]
    total = None if peak is None else base + peak
    return {
        **sizes,
        "peak_above_state": peak,
        "total": total,
        "x_shard": None if total is None else total / sizes["weight"],
        "step_s": statistics.median(times),
        "optimizer_s": statistics.median(work),
    }


PATHS = {
    "today: weight.grad + torch.optim.SGD(momentum)": (
        None,
        lambda h: torch.optim.SGD(h.parameters(), lr=0.1, momentum=0.9),
    ),
    "marginops.optim.SGD(momentum) in the backward": (None, lambda h: optim.SGD(h, lr=0.1, momentum=0.9)),
    "marginops.optim.SGD, bfloat16 momentum": (
        None,
        lambda h: optim.SGD(h, lr=0.1, momentum=0.9, state_dtype=torch.bfloat16),
    ),
    "today: weight.grad + torch.optim.AdamW": (None, lambda h: torch.optim.AdamW(h.parameters(), lr=1e-3)),
    "marginops.optim.AdamW in the backward": (None, lambda h: optim.AdamW(h, lr=1e-3)),
    "marginops.optim.AdamW, bfloat16 moments": (None, lambda h: optim.AdamW(h, lr=1e-3, state_dtype=torch.bfloat16)),
}


def model_rows(D=512, workspace=64 * MIB):
    """Per-rank bytes at C = 10M / 100M on 8 / 64 GPUs (model: arithmetic from the shapes)."""
    rows = []
    for C, W in ((10_000_000, 8), (10_000_000, 64), (100_000_000, 8), (100_000_000, 64)):
        shard = -(-C // W) * D * 4
        rows.append(
            {
                "classes": C,
                "gpus": W,
                "fp32_shard_gib": shard / GIB,
                "today_sgd_gib": 3 * shard / GIB,
                "in_backward_sgd_gib": (2 * shard + workspace) / GIB,
                "in_backward_sgd_bf16_gib": (1.5 * shard + workspace) / GIB,
                "today_adam_gib": 4 * shard / GIB,
                "in_backward_adam_gib": (3 * shard + workspace) / GIB,
                "in_backward_adam_bf16_gib": (2 * shard + workspace) / GIB,
            }
        )
    return rows


def partial_fc(C, D, B, steps, rate=0.1):
    """One-rank ShardedMarginHead with Partial FC: the optimizer's work, row-sparse vs dense."""
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=0, world_size=1)
        try:

            def head():
                return mdist.ShardedMarginHead(D, C, mo.ArcFace(), sample_rate=rate)

            out = {}
            for name, make_opt in (
                (
                    "today: torch.optim.SGD over every row",
                    lambda h: torch.optim.SGD(h.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
                ),
                ("lazy: the sampled rows", lambda h: optim.SGD(h, lr=0.1, momentum=0.9, weight_decay=5e-4)),
                (
                    "exact: the sampled rows, caught up",
                    lambda h: optim.SGD(h, lr=0.1, momentum=0.9, weight_decay=5e-4, sparse="exact"),
                ),
            ):
                out[name] = run(head, make_opt, B, steps)
            return out
        finally:
            dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default=None, help="folder for head-state.{json,md}")
    args = p.parse_args(argv)
    C, D, B = args.classes, args.dim, args.batch
    measured = {}
    for name, (_, make_opt) in PATHS.items():
        measured[name] = run(lambda: mo.MarginHead(D, C, mo.ArcFace()), make_opt, B, args.steps)
        print(name, json.dumps({k: v for k, v in measured[name].items()}), flush=True)
    sparse = partial_fc(C, D, B, args.steps)
    dense_work = sparse["today: torch.optim.SGD over every row"]["optimizer_s"]
    for name, r in sparse.items():
        r["optimizer_vs_dense"] = r["optimizer_s"] / dense_work
        print("partial fc 0.1:", name, json.dumps(r), flush=True)
    result = {
        "machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "shape": {"classes": C, "dim": D, "batch": B, "dtype": "float32 weights and features"},
        "measured": measured,
        "partial_fc_0.1": sparse,
        "model": model_rows(D),
    }
    lines = [
        f"# Head training state (measured on this CPU: C = {C:,}, D = {D}, B = {B}, fp32)",
        "",
        "| path | weight | .grad | optimizer state | peak above them | total | x fp32 shard | step (s) "
        "| optimizer (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda b: "n/a" if b is None else f"{b / MIB:,.0f} MiB"  # noqa: E731
    for name, r in measured.items():
        x = "n/a" if r["x_shard"] is None else f"{r['x_shard']:.3f}"
        lines.append(
            f"| {name} | {fmt(r['weight'])} | {fmt(r['grad'])} | {fmt(r['optimizer'])} | "
            f"{fmt(r['peak_above_state'])} | {fmt(r['total'])} | {x} | {r['step_s']:.2f} | {r['optimizer_s']:.3f} |"
        )
    lines += ["", "Partial FC, sample_rate 0.1 (one-rank ShardedMarginHead, SGD momentum 0.9, weight decay 5e-4):", ""]
    lines += ["| optimizer | optimizer work (s) | vs the dense step's | step (s) |", "|---|---|---|---|"]
    for name, r in sparse.items():
        lines.append(f"| {name} | {r['optimizer_s']:.3f} | {r['optimizer_vs_dense']:.3f} | {r['step_s']:.2f} |")
    lines += ["", f"Model (arithmetic, not measured): per-rank GiB at D = {D}, fp32 weights, 64 MiB workspace", ""]
    lines += [
        "| C | GPUs | fp32 shard | today: + grad + SGD momentum | in backward: SGD | SGD, bf16 momentum "
        "| today: Adam | in backward: Adam | Adam, bf16 moments |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["model"]:
        lines.append(
            f"| {r['classes'] // 1_000_000}M | {r['gpus']} | {r['fp32_shard_gib']:.2f} | {r['today_sgd_gib']:.2f} | "
            f"{r['in_backward_sgd_gib']:.2f} | {r['in_backward_sgd_bf16_gib']:.2f} | {r['today_adam_gib']:.2f} | "
            f"{r['in_backward_adam_gib']:.2f} | {r['in_backward_adam_bf16_gib']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "head-state.json"), "w") as f:
            json.dump(result, f, indent=2)
        with open(os.path.join(args.out, "head-state.md"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
