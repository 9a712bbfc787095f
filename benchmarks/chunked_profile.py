"""Where the chunked backend's time goes, and how it moves with the chunk size.

One head shape (default: B = 1024, D = 512, C = 1M, bfloat16, ArcFace: the README's GPU shape) timed as
forward + backward for several workspace_bytes (which set the classes per chunk: a chunk's
[B, Cc] float32 logits are most of the workspace, so 16 MiB chunks fit in an H100's 50 MB L2 and
64 MiB ones do not), each with its peak memory above inputs and gradients and 6·B·D·C/time;
the three GEMMs of the head's shape timed in the same run as the reference cost; and at the
default workspace, a profiler breakdown of GPU time into cuBLAS GEMMs, marginops's kernels and
the rest, with the ten costliest kernels. What a GPU session needs to decide the chunk size and
what to trim next.

Then the model beside the measurement: benchmarks/gpu_model.py's prediction
for the same shape on this GPU (its constants picked by torch.cuda.get_device_name()) against
the measured device time per kernel name of one forward and one backward (torch.profiler, each
pass profiled on its own; the four GEMMs as one row per pass), the launch gaps (each pass's
CUDA-event time minus its kernels' time), the step time at every workspace of the sweep, and the
eager reference's step; each with measured / model. Written to DEVICE-model-vs-measured.json
(and a table in the log): what one lent GPU needs to calibrate the model's assumptions.

    python3 benchmarks/chunked_profile.py [--device cuda] [--out DIR] [--model-gpu H100]

On the CPU (a smoke run at small sizes) only backend "auto" exists: one row, no workspace sweep;
the comparison runs against --model-gpu's constants (default H100) and its ratios mean nothing.
"""

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict

import torch

import marginops as mo
from marginops.reference import unchecked_margin_cross_entropy
from marginops.tools.bench.impls import Case
from marginops.tools.bench.measure import environment, gemm_floor, make_inputs
from marginops.tools.bench.measure import peak_extra as _peak_extra
from marginops.tools.bench.measure import step_times as _time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_model  # noqa: E402  (benchmarks/gpu_model.py, beside this file)

MiB = 2**20
DEFAULT_WORKSPACE_MIB = 64  # the op's default workspace_bytes (csrc/head_inputs.h)


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


# ---- the model beside the measurement ----------------------------------------------------------

# marginops' kernels by the name torch.profiler shows ("void marginops::cuda::(anonymous
# namespace)::chunk_softmax_kernel<float, ...>(...)"), as gpu_model.py's rows name them.
KERNEL_ROWS = (
    ("chunk_softmax_kernel", "chunk_softmax"),
    ("chunk_grad_kernel", "chunk_grad"),
    ("chunk_weights_kernel", "chunk_weights"),
    ("chunk_dw_kernel", "chunk_dw"),
    ("chunk_dx_finalize_kernel", "chunk_dx_finalize"),
    ("chunk_scaled_x_kernel", "chunk_scaled_x"),
    ("chunk_row_scale_kernel", "row_prep"),
    ("target_grad_kernel", "row_prep"),
    ("row_prep_kernel", "row_prep"),
    ("merge_kernel", "merge"),
)


def kernel_row(name: str) -> str:
    """The model's row for a measured kernel name: one of ours, "gemm", "sort" or "other"."""
    low = name.lower()
    if "marginops" in low:
        for token, row in KERNEL_ROWS:
            if token in low:
                return row
    if kernel_kind(name) == "gemm":
        return "gemm"
    if "sort" in low:
        return "sort"
    return "other"


def model_rows(res: dict) -> dict:
    """gpu_model's rows by (pass, row), its three GEMM rows per pass as one ("gemm"): the busy time
    (no launch gaps: the profiler's kernel times have none) and the launches."""
    rows = defaultdict(lambda: dict(ms=0.0, launches=0))
    for r in res["rows"]:
        if r["pass_"] == "host":
            continue
        key = (r["pass_"], "gemm" if r["kernel"].startswith("gemm") else r["kernel"])
        rows[key]["ms"] += r["busy_ms"]
        rows[key]["launches"] += r["launches"]
    return dict(rows)


def profile_passes(fn, x, W, y, device) -> dict:
    """Self device time (the CPU's on the CPU) per kernel row and launches, of one forward and of
    one backward, each profiled on its own after a warm-up step."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    fn(x, W, y).backward()
    x.grad = W.grad = None
    out = {}
    loss = None
    for pass_ in ("fwd", "bwd"):
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            if pass_ == "fwd":
                loss = fn(x, W, y)
            else:
                loss.backward()
            if cuda:
                torch.cuda.synchronize(device)
        rows = defaultdict(lambda: dict(ms=0.0, launches=0))
        for e in prof.key_averages():
            t = e.self_device_time_total if cuda else e.self_cpu_time_total
            if t <= 0 or (cuda and e.device_type != torch.autograd.DeviceType.CUDA):
                continue
            r = rows[kernel_row(e.key)]
            r["ms"] += t / 1e3
            r["launches"] += e.count
        out[pass_] = dict(rows)
    return out


def time_passes(fn, x, W, y, device, repeat: int) -> dict:
    """Median wall time of the forward and of the backward (CUDA events on a GPU), in ms."""
    fwd, bwd = [], []
    for _ in range(max(1, repeat)):
        x.grad = W.grad = None
        if device.type == "cuda":
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            ev[0].record()
            loss = fn(x, W, y)
            ev[1].record()
            loss.backward()
            ev[2].record()
            torch.cuda.synchronize(device)
            fwd.append(ev[0].elapsed_time(ev[1]))
            bwd.append(ev[1].elapsed_time(ev[2]))
        else:
            t0 = time.perf_counter()
            loss = fn(x, W, y)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            fwd.append(1e3 * (t1 - t0))
            bwd.append(1e3 * (t2 - t1))
    return dict(fwd=statistics.median(fwd), bwd=statistics.median(bwd))


def _ratio(measured, model):
    return measured / model if measured is not None and model else None


def compare(measured: dict, walls: dict, model: dict) -> dict:
    """Measured per kernel row and pass beside gpu_model's; the launch gaps (wall minus kernels)
    beside the model's launch gaps (and host issue, if it has one)."""
    mod = model_rows(model)
    rows = []
    for pass_ in ("fwd", "bwd"):
        names = [k for (p, k) in mod if p == pass_] + [k for k in measured.get(pass_, {}) if (pass_, k) not in mod]
        for k in names:
            m, g = measured.get(pass_, {}).get(k), mod.get((pass_, k))
            rows.append(
                dict(
                    pass_=pass_,
                    kernel=k,
                    measured_ms=m["ms"] if m else None,
                    model_ms=g["ms"] if g else None,
                    measured_launches=m["launches"] if m else 0,
                    model_launches=g["launches"] if g else 0,
                    ratio=_ratio(m["ms"] if m else None, g["ms"] if g else None),
                )
            )
        kernels = sum(r["ms"] for r in measured.get(pass_, {}).values())
        gaps_model = sum(r["launch_ms"] for r in model["rows"] if r["pass_"] == pass_)
        if pass_ == "bwd":
            gaps_model += sum(r["ms"] for r in model["rows"] if r["pass_"] == "host")
        gaps = walls[pass_] - kernels if walls.get(pass_) is not None else None
        rows.append(
            dict(
                pass_=pass_,
                kernel="launch gaps (wall - kernels)",
                measured_ms=gaps,
                model_ms=gaps_model,
                measured_launches=sum(r["launches"] for r in measured.get(pass_, {}).values()),
                model_launches=sum(r["launches"] for r in model["rows"] if r["pass_"] == pass_),
                ratio=_ratio(gaps, gaps_model),
            )
        )
    return dict(rows=rows)


def _fmt(v, spec: str) -> str:
    width = int(spec.split(".")[0] or 0) if spec[0].isdigit() else 0
    return "-".rjust(width) if v is None else format(v, spec)


def compare_text(cmp: dict) -> str:
    lines = [
        f"  {'pass':4s} {'kernel':30s} {'launches':>13s} {'measured ms':>11s} {'model ms':>9s} {'meas/model':>10s}"
    ]
    fmt = _fmt
    for r in cmp["rows"]:
        lines.append(
            f"  {r['pass_']:4s} {r['kernel']:30s} {r['measured_launches']:>6d}/{r['model_launches']:<6d} "
            f"{fmt(r['measured_ms'], '11.3f')} {fmt(r['model_ms'], '9.3f')} {fmt(r['ratio'], '10.2f')}"
        )
    return "\n".join(lines)


def model_beside_measured(a, case, device, x, W, y, margin, sweep_rows) -> dict:
    """The comparison for this device (see the module docstring); never raises for the model."""
    gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    spec = gpu_model.gpu_for_device_name(name) if gpu else gpu_model.GPUS[a.model_gpu]
    if gpu and a.model_gpu:
        spec = gpu_model.GPUS[a.model_gpu]
    note = None
    if spec is None:
        return dict(device=name, note=f"no model constants for {name} (gpu_model.GPUS: {', '.join(gpu_model.GPUS)})")
    if not gpu:
        note = f"CPU smoke run: measured CPU op time beside the {spec.key} model; the ratios mean nothing"
    elif any(t in name.upper() for t in ("PCIE", "NVL")):
        note = f"{name}: the model's constants are the SXM part's ({spec.name}); this part has lower clocks/bandwidth"
    dtype = gpu_model.ALIASES.get(case.dtype, case.dtype)
    shape = gpu_model.Shape(case.batch, case.dim, case.classes, dtype, case.margin)
    counts = gpu_model.load_counts(a.sass)
    res = gpu_model.model(shape, spec, counts, DEFAULT_WORKSPACE_MIB)
    eager = gpu_model.eager_model(shape, spec, shape.e)

    kw = dict(backend="chunked") if gpu else {}
    fn = lambda x, W, y: mo.margin_cross_entropy(x, W, y, margin, **kw)  # noqa: E731
    measured = profile_passes(fn, x, W, y, device)
    walls = time_passes(fn, x, W, y, device, a.repeat)
    cmp = compare(measured, walls, res)
    chunks = dict(
        fwd=measured["fwd"].get("chunk_softmax", {}).get("launches"),
        bwd=measured["bwd"].get("chunk_grad", {}).get("launches"),
    )
    model_chunks = dict(fwd=res["plan"]["fwd"]["chunks"], bwd=res["plan"]["bwd"]["chunks"])
    step = sum(walls.values())
    sweep = []
    for r in sweep_rows:
        if r["workspace_mib"] is None:
            continue
        m = gpu_model.model(shape, spec, counts, r["workspace_mib"])
        sweep.append(
            dict(
                workspace_mib=r["workspace_mib"],
                measured_ms=r["time_ms"],
                model_ms=m["step_ms"],
                ratio=_ratio(r["time_ms"], m["step_ms"]),
                u_from_l2=m["u_from_l2"],
            )
        )
    eager_ms = None
    if not a.no_eager:
        ref = lambda x, W, y: unchecked_margin_cross_entropy(x, W, y, margin)  # noqa: E731
        try:
            ref(x, W, y).backward()
            eager_ms = 1e3 * statistics.median(_time(ref, x, W, y, device, a.repeat))
        except RuntimeError as e:  # out of memory: the eager [B, C] tensors on a small GPU
            if "out of memory" not in str(e):
                raise
            note = (note + "; " if note else "") + f"eager not measured: {e}".splitlines()[0]
        x.grad = W.grad = None
    ratios = [r["ratio"] for r in cmp["rows"] if r["ratio"] is not None and r["model_ms"] and r["model_ms"] >= 0.05]
    return dict(
        device=name,
        model_gpu=spec.key,
        note=note,
        case=dict(batch=case.batch, dim=case.dim, classes=case.classes, dtype=dtype, margin=case.margin),
        workspace_mib=DEFAULT_WORKSPACE_MIB,
        sass=a.sass,
        assumptions={
            k: getattr(gpu_model, k)
            for k in ("HBM_EFFICIENCY", "GEMM_EFFICIENCY", "L2_EFFECTIVE_FRACTION", "LAUNCH_GAP_S", "ROW_SETUP_INSTR")
        },
        kernels=cmp["rows"],
        chunks_measured=chunks,
        chunks_model=model_chunks,
        step=dict(
            measured_ms=step, model_ms=res["step_ms"], ratio=_ratio(step, res["step_ms"]), passes_measured_ms=walls
        ),
        eager=dict(measured_ms=eager_ms, model_ms=eager["step_ms"], ratio=_ratio(eager_ms, eager["step_ms"])),
        sweep=sweep,
        within_30pct=bool(ratios) and all(0.7 <= q <= 1.3 for q in ratios),
        model_summary=gpu_model.summary_line(
            spec, shape, res["step_ms"], res["tflops"], res["step_ms"] / eager["step_ms"]
        ),
    )


def print_comparison(c: dict) -> None:
    if "kernels" not in c:
        print(f"model beside measured: {c['note']}")
        return
    print(
        f"\nmodel (benchmarks/gpu_model.py, {c['model_gpu']} constants) beside measured on {c['device']}, workspace "
        f"{c['workspace_mib']} MiB" + (f" [{c['note']}]" if c["note"] else "")
    )
    print(compare_text(dict(rows=c["kernels"])))
    if c["chunks_measured"]["fwd"] is not None and c["chunks_measured"] != c["chunks_model"]:
        print(
            f"  chunks measured {c['chunks_measured']} differ from the model's plan {c['chunks_model']}: "
            "gpu_model.plan_chunks no longer matches the op's"
        )
    st, ea = c["step"], c["eager"]
    fmt = _fmt
    print(
        f"  step (wall: CUDA events on a GPU; fwd + bwd): measured {st['measured_ms']:.3f} ms, model "
        f"{st['model_ms']:.3f} ms, "
        f"measured/model {fmt(st['ratio'], '.2f')}"
    )
    print(
        f"  eager reference step: measured {fmt(ea['measured_ms'], '.3f')} ms, model {ea['model_ms']:.3f} ms, "
        f"measured/model {fmt(ea['ratio'], '.2f')}"
    )
    for r in c["sweep"]:
        print(
            f"  workspace {r['workspace_mib']} MiB: measured {r['measured_ms']:.3f} ms, "
            f"model {r['model_ms']:.3f} ms, measured/model {fmt(r['ratio'], '.2f')}"
        )
    print(f"  every kernel row of >= 0.05 ms within 30% of the model: {c['within_30pct']}; model: {c['model_summary']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if mo.cuda_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default: 1024 on a GPU, 64 on the CPU")
    p.add_argument("--dim", type=int, default=None, help="default: 512 on a GPU, 32 on the CPU")
    p.add_argument("--classes", type=int, default=None, help="default: 1000000 on a GPU, 20000 on the CPU")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument(
        "--workspaces-mib", default="8,16,32,64,128", help="chunked backend sweep (GPU only) (default: %(default)s)"
    )
    p.add_argument("--repeat", type=int, default=5, help="timed steps per setting (default: %(default)s)")
    p.add_argument("--out", default="chunked-profile", help="directory for JSON and Markdown (default: %(default)s)")
    p.add_argument(
        "--model-gpu",
        choices=sorted(gpu_model.GPUS),
        default=None,
        help="the model's GPU constants (default: from torch.cuda.get_device_name(); H100 on the CPU)",
    )
    p.add_argument(
        "--sass", default=gpu_model.DEFAULT_SASS, help="per-logit counts for the model (default: %(default)s)"
    )
    p.add_argument("--no-eager", action="store_true", help="do not time the eager reference for the comparison")
    a = p.parse_args(argv)
    if a.device == "cpu" and a.model_gpu is None:
        a.model_gpu = "H100"
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    case = Case(
        a.batch or (1024 if gpu else 64),
        a.dim or (512 if gpu else 32),
        a.classes or (1_000_000 if gpu else 20_000),
        a.dtype or ("bfloat16" if gpu else "float32"),
        "arcface",
    )
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
        rows.append(
            {
                "workspace_mib": mib,
                "time_ms": ms,
                "tflops": case.flops / (ms / 1e3) / 1e12,
                "peak_extra_mib": None if peak is None else peak / MiB,
            }
        )
        print(
            f"workspace {mib or 'auto'} MiB: {ms:.2f} ms, {rows[-1]['tflops']:.1f} TFLOP/s (6BDC), "
            f"peak {rows[-1]['peak_extra_mib'] or float('nan'):.1f} MiB",
            flush=True,
        )
    gemm = gemm_floor(case, device, a.repeat)
    default_kw = dict(backend="chunked") if gpu else {}
    prof = profile_step(lambda x, W, y: mo.margin_cross_entropy(x, W, y, margin, **default_kw), x, W, y, device)
    total = sum(prof["ms_by_kind"].values())
    print(f"3 GEMMs of the head's shape: {gemm.time_ms:.2f} ms" if gemm.time_ms else f"3 GEMMs: {gemm.status}")
    print(
        f"one step, default workspace: {total:.2f} ms of kernels, {prof['launches']} launches: "
        + ", ".join(f"{k} {v:.2f} ms ({100 * v / total:.0f}%)" for k, v in sorted(prof["ms_by_kind"].items()))
    )
    for t in prof["top"]:
        print(f"  {t['ms']:8.3f} ms  x{t['count']:<4d} {t['kernel'][:100]}")

    try:
        comparison = model_beside_measured(a, case, device, x, W, y, margin, rows)
    except Exception as e:  # the model is a side product: never lose the measurement to it
        comparison = dict(device=str(device), note=f"model comparison failed: {type(e).__name__}: {e}")
    print_comparison(comparison)

    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"{device.type}-model-vs-measured.json"), "w") as f:
        json.dump(comparison, f, indent=1, default=str)
    prefix = os.path.join(a.out, f"{device.type}-chunked-profile")
    data = {
        "environment": environment(device),
        "case": vars(case) if hasattr(case, "__dict__") else case.__repr__(),
        "sweep": rows,
        "gemm3_ms": gemm.time_ms,
        "profile": prof,
    }
    with open(prefix + ".json", "w") as f:
        json.dump(data, f, indent=1, default=str)
    with open(prefix + ".md", "w") as f:
        f.write(
            f"# chunked backend: B={case.batch} D={case.dim} C={case.classes} {case.dtype} ArcFace, {device.type}\n\n"
        )
        f.write("| workspace MiB | time ms | x 3 GEMMs | TFLOP/s (6BDC) | peak MiB |\n|---|---|---|---|---|\n")
        for r in rows:
            ratio = f"{r['time_ms'] / gemm.time_ms:.2f}" if gemm.time_ms else "-"
            f.write(
                f"| {r['workspace_mib'] or 'auto'} | {r['time_ms']:.2f} | {ratio} | {r['tflops']:.1f} | "
                f"{'-' if r['peak_extra_mib'] is None else format(r['peak_extra_mib'], '.1f')} |\n"
            )
        f.write(
            f"\nKernel time of one step at the default workspace: {total:.2f} ms, {prof['launches']} launches; "
            + ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(prof["ms_by_kind"].items()))
            + "\n"
        )
    print(f"wrote {prefix}.json and .md, {device.type}-model-vs-measured.json")


if __name__ == "__main__":
    main()
