"""Where the chunked backend's time goes, and how it moves with the chunk size.

One head shape (default: B = 1024, D = 512, C = 1M, bfloat16, ArcFace — issue #10's) timed as
forward + backward for several workspace_bytes (which set the classes per chunk: a chunk's
[B, Cc] float32 logits are most of the workspace, so 16 MiB chunks fit in an H100's 50 MB L2 and
64 MiB ones do not), each with its peak memory above inputs and gradients and 6·B·D·C/time;
the three GEMMs of the head's shape timed in the same run as the reference cost; and at the
default workspace, a profiler breakdown of GPU time into cuBLAS GEMMs, marginops's kernels and
the rest, with the ten costliest kernels. What a GPU session needs to decide the chunk size and
what to trim next.

    python3 benchmarks/chunked_profile.py [--device cuda] [--out DIR]

On the CPU (a smoke run at small sizes) only backend "auto" exists: one row, no workspace sweep.
"""

import argparse
import json
import os
import statistics
from collections import defaultdict

import torch

import marginops as mo
from marginops.bench.impls import Case
from marginops.bench.measure import _peak_extra, _time, environment, gemm_floor, make_inputs

MiB = 2**20


def kernel_kind(name: str) -> str:
    low = name.lower()
    if "chunk_" in low or "marginops" in low:
        return "marginops"
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "sm90_xmma", "sm80_xmma", "cublas")):
        return "gemm"
    return "other"


def profile_step(fn, x, W, y, device):
    """GPU (or CPU) self time per kernel of one forward + backward, after a warm-up step."""
    from torch.profiler import ProfilerActivity, profile

    fn(x, W, y).backward()
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        x.grad = W.grad = None
        fn(x, W, y).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    per_kernel = defaultdict(lambda: [0.0, 0])
    for e in prof.key_averages():
        t = e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
        if t <= 0 or (device.type == "cuda" and e.device_type != torch.autograd.DeviceType.CUDA):
            continue
        per_kernel[e.key][0] += t / 1e3
        per_kernel[e.key][1] += e.count
    by_kind = defaultdict(float)
    for name, (ms, _) in per_kernel.items():
        by_kind[kernel_kind(name)] += ms
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:10]
    return {
        "ms_by_kind": dict(by_kind),
        "launches": sum(n for _, n in per_kernel.values()),
        "top": [{"kernel": k[:160], "ms": ms, "count": n} for k, (ms, n) in top],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if mo.cuda_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default: 1024 on a GPU, 64 on the CPU")
    p.add_argument("--dim", type=int, default=None, help="default: 512 on a GPU, 32 on the CPU")
    p.add_argument("--classes", type=int, default=None, help="default: 1000000 on a GPU, 20000 on the CPU")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--workspaces-mib", default="8,16,32,64,128", help="chunked backend sweep (GPU only) (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=5, help="timed steps per setting (default: %(default)s)")
    p.add_argument("--out", default="chunked-profile", help="directory for JSON and Markdown (default: %(default)s)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    case = Case(a.batch or (1024 if gpu else 64), a.dim or (512 if gpu else 32), a.classes or (1_000_000 if gpu else 20_000),
                a.dtype or ("bfloat16" if gpu else "float32"), "arcface")
    x, W, y = make_inputs(case, device)
    margin = mo.ArcFace()

    rows = []
    settings = [int(v) for v in a.workspaces_mib.split(",")] if gpu else [None]
    for mib in settings:
        kw = {} if mib is None else dict(backend="chunked", workspace_bytes=mib * MiB)
        fn = lambda x, W, y, kw=kw: mo.margin_cross_entropy(x, W, y, margin, **kw)  # noqa: E731
        fn(x, W, y).backward()  # warm-up
        times = _time(fn, x, W, y, device, a.repeat)
        peak = _peak_extra(fn, x, W, y, device)
        ms = 1e3 * statistics.median(times)
        rows.append({"workspace_mib": mib, "time_ms": ms, "tflops": case.flops / (ms / 1e3) / 1e12,
                     "peak_extra_mib": None if peak is None else peak / MiB})
        print(f"workspace {mib or 'auto'} MiB: {ms:.2f} ms, {rows[-1]['tflops']:.1f} TFLOP/s (6BDC), "
              f"peak {rows[-1]['peak_extra_mib'] or float('nan'):.1f} MiB", flush=True)
    gemm = gemm_floor(case, device, a.repeat)
    default_kw = dict(backend="chunked") if gpu else {}
    prof = profile_step(lambda x, W, y: mo.margin_cross_entropy(x, W, y, margin, **default_kw), x, W, y, device)
    total = sum(prof["ms_by_kind"].values())
    print(f"3 GEMMs of the head's shape: {gemm.time_ms:.2f} ms" if gemm.time_ms else f"3 GEMMs: {gemm.status}")
    print(f"one step, default workspace: {total:.2f} ms of kernels, {prof['launches']} launches: "
          + ", ".join(f"{k} {v:.2f} ms ({100 * v / total:.0f}%)" for k, v in sorted(prof["ms_by_kind"].items())))
    for t in prof["top"]:
        print(f"  {t['ms']:8.3f} ms  x{t['count']:<4d} {t['kernel'][:100]}")

    os.makedirs(a.out, exist_ok=True)
    prefix = os.path.join(a.out, f"{device.type}-chunked-profile")
    data = {"environment": environment(device), "case": vars(case) if hasattr(case, "__dict__") else case.__repr__(),
            "sweep": rows, "gemm3_ms": gemm.time_ms, "profile": prof}
    with open(prefix + ".json", "w") as f:
        json.dump(data, f, indent=1, default=str)
    with open(prefix + ".md", "w") as f:
        f.write(f"# chunked backend: B={case.batch} D={case.dim} C={case.classes} {case.dtype} ArcFace, {device.type}\n\n")
        f.write("| workspace MiB | time ms | x 3 GEMMs | TFLOP/s (6BDC) | peak MiB |\n|---|---|---|---|---|\n")
        for r in rows:
            ratio = f"{r['time_ms'] / gemm.time_ms:.2f}" if gemm.time_ms else "-"
            f.write(f"| {r['workspace_mib'] or 'auto'} | {r['time_ms']:.2f} | {ratio} | {r['tflops']:.1f} | "
                    f"{'-' if r['peak_extra_mib'] is None else format(r['peak_extra_mib'], '.1f')} |\n")
        f.write(f"\nKernel time of one step at the default workspace: {total:.2f} ms, {prof['launches']} launches; "
                + ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(prof["ms_by_kind"].items())) + "\n")
    print(f"wrote {prefix}.json and .md")


if __name__ == "__main__":
    main()
