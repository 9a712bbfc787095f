"""Benchmark output: a terminal table with ratios to the eager reference, JSON, Markdown, and PNG
plots of time and memory against the class count."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

from .measure import Result

KiB, MiB, GiB = 2**10, 2**20, 2**30


def is_ok(r: Result) -> bool:
    """Measured (the status may carry a note on the largest-C search)."""
    return r.status == "ok" or r.status.startswith("ok ")


def _ref(results: List[Result], r: Result, impl: str = "reference") -> Optional[Result]:
    for o in results:
        if o.case == r.case and o.impl == impl and is_ok(o):
            return o
    return None


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def fmt_bytes(n: Optional[float]) -> str:
    """Bytes as a person reads them, never rounded to zero: 0 B, 900 B, 12.5 KiB, 3.2 MiB, 1.50 GiB."""
    if n is None:
        return "-"
    if n < KiB:
        return f"{n:.0f} B"
    if n < MiB:
        return f"{n / KiB:.1f} KiB"
    if n < GiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / GiB:.2f} GiB"


def _spread(r: Result) -> str:
    if r.time_ms_min is None or r.time_ms_max is None:
        return "-"

    def ms(v: float) -> str:
        return f"{v:.1f}" if v >= 10 else f"{v:.3g}"

    return f"{ms(r.time_ms_min)}-{ms(r.time_ms_max)} (n={r.repeats})"


GEMM_COLUMN = "x 3 GEMMs (reference cost)"


def rows(results: List[Result]) -> List[Dict[str, str]]:
    out = []
    for r in results:
        ref, floor, comp = _ref(results, r), _ref(results, r, "gemm3"), _ref(results, r, "compiled")
        ok = is_ok(r)
        time_ratio = r.time_ms / ref.time_ms if ok and ref and r.time_ms else None
        comp_ratio = r.time_ms / comp.time_ms if ok and comp and r.time_ms else None
        mem_ratio = (
            r.peak_extra_bytes / ref.peak_extra_bytes
            if ok and ref and r.peak_extra_bytes is not None and ref.peak_extra_bytes
            else None
        )
        gemm_ratio = r.time_ms / floor.time_ms if ok and floor and r.time_ms and r.impl != "gemm3" else None
        out.append(
            {
                "case": f"{r.case.batch}x{r.case.dim}x{r.case.classes:,} {r.case.dtype} {r.case.margin}",
                "impl": r.impl,
                "ms": _fmt(r.time_ms, ".1f"),
                "ms min-max": _spread(r),
                "x ref time": _fmt(time_ratio, ".2f"),
                "x compiled": _fmt(comp_ratio, ".2f"),
                GEMM_COLUMN: _fmt(gemm_ratio, ".2f"),
                "TFLOP/s": _fmt(r.tflops, ".3g"),
                "peak extra": fmt_bytes(r.peak_extra_bytes),
                "x ref mem": _fmt(mem_ratio, ".3g"),
                "loss err": _fmt(r.loss_rel_err, ".1e"),
                "max C": "-" if r.max_classes is None else f"{r.max_classes:,}",
                "status": r.status,
            }
        )
    return out


COLUMNS = [
    "case",
    "impl",
    "ms",
    "ms min-max",
    "x ref time",
    "x compiled",
    GEMM_COLUMN,
    "TFLOP/s",
    "peak extra",
    "x ref mem",
    "loss err",
    "max C",
    "status",
]
OURS = ("marginops", "chunked", "tiles")  # marginops' implementations
DISPLAY = {
    "reference": "eager",
    "compiled": "torch.compile(eager)",
    "torch-lce": "torch F.linear_cross_entropy",
    "torch-lce-chunked": "torch F.linear_cross_entropy (chunked)",
}


def _count(c: int) -> str:
    if c >= 1_000_000 and c % 100_000 == 0:
        return f"{c / 1e6:g}M"
    if c >= 1000 and c % 100 == 0:
        return f"{c / 1e3:g}k"
    return f"{c:,}"


def _ratio(v: float, more: str, less: str) -> str:
    return f"{v:.3g}x {more}" if v >= 1 else f"{1 / v:.3g}x {less}"


def headline(results: List[Result]) -> List[dict]:
    """For each of marginops' implementations against the eager reference and each peer that ran,
    per (dtype, margin, B, D): speed, memory and largest-C ratios at the largest C both ran."""
    groups: Dict[Tuple, List[Result]] = {}
    for r in results:
        if is_ok(r) and r.impl != "gemm3":
            groups.setdefault((r.case.dtype, r.case.margin, r.case.batch, r.case.dim), []).append(r)
    out = []
    for (dtype, margin, b, d), rs in groups.items():
        impls = list(dict.fromkeys(r.impl for r in rs))
        for mine in (i for i in impls if i in OURS):
            for other in (i for i in impls if i not in OURS):
                by_c = {}
                for r in rs:
                    if r.impl in (mine, other):
                        by_c.setdefault(r.case.classes, {})[r.impl] = r
                both = [c for c, v in by_c.items() if len(v) == 2]
                if not both:
                    continue
                C = max(both)
                a, o = by_c[C][mine], by_c[C][other]
                line = dict(
                    impl=mine,
                    against=other,
                    classes=C,
                    dtype=dtype,
                    margin=margin,
                    batch=b,
                    dim=d,
                    speedup=o.time_ms / a.time_ms if a.time_ms and o.time_ms else None,
                    memory_ratio=(
                        o.peak_extra_bytes / a.peak_extra_bytes
                        if a.peak_extra_bytes and o.peak_extra_bytes is not None
                        else None
                    ),
                )
                firsts = [r for r in rs if r.max_classes]
                ma = next((r.max_classes for r in firsts if r.impl == mine), None)
                mo_ = next((r.max_classes for r in firsts if r.impl == other), None)
                line["max_classes_ratio"] = ma / mo_ if ma and mo_ else None
                parts = []
                if line["speedup"]:
                    parts.append(_ratio(line["speedup"], "faster", "slower"))
                if line["memory_ratio"]:
                    parts.append(_ratio(line["memory_ratio"], "less memory", "more memory"))
                if line["max_classes_ratio"]:
                    parts.append(
                        f"fits {line['max_classes_ratio']:.3g}x "
                        + ("more classes" if line["max_classes_ratio"] >= 1 else "the classes")
                    )
                name = DISPLAY.get(other, other)
                line["text"] = (
                    f"{mine} vs {name} at C = {_count(C)} ({margin}, {dtype}, B={b}, D={d}): " + ", ".join(parts)
                    if parts
                    else f"{mine} vs {name} at C = {_count(C)}: no ratio measured"
                )
                out.append(line)
    return out


def headline_text(results: List[Result], env: Optional[Dict[str, str]] = None) -> str:
    lines = headline(results)
    if not lines:
        return ""
    where = ""
    if env:
        where = f" on {env.get('gpu', env.get('cpu', ''))} ({env.get('device', '')}"
        where += f", {env['threads']} threads)" if env.get("device") == "cpu" and env.get("threads") else ")"
    return f"Headline{where}:\n" + "\n".join("  " + l["text"] for l in lines)


def text_table(results: List[Result]) -> str:
    table = rows(results)
    widths = {c: max(len(c), *(len(r[c]) for r in table)) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS), "  ".join("-" * widths[c] for c in COLUMNS)]
    last = None
    for r in table:
        if last is not None and r["case"] != last:
            lines.append("")
        last = r["case"]
        lines.append("  ".join(r[c].ljust(widths[c]) for c in COLUMNS))
    return "\n".join(lines)


def markdown_table(results: List[Result]) -> str:
    table = rows(results)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r[c] for c in COLUMNS) + " |" for r in table]
    return "\n".join(lines)


def largest_classes(results: List[Result]) -> str:
    """One line per (dtype, margin, B, D): the largest C each implementation fits."""
    lines = []
    groups: Dict[Tuple, List[Result]] = {}
    for r in results:
        if r.max_classes is not None:
            groups.setdefault((r.case.dtype, r.case.margin, r.case.batch, r.case.dim), []).append(r)
    for (dtype, margin, b, d), rs in groups.items():
        best = max(r.max_classes for r in rs)
        parts = [
            f"{r.impl} {r.max_classes:,}" + (f" ({r.max_classes / best:.2f}x)" if r.max_classes != best else "")
            for r in rs
        ]
        lines.append(f"largest C that fits, {margin} {dtype} B={b} D={d}: " + ", ".join(parts))
    return "\n".join(lines)


LEGEND = (
    "ms: median forward+backward time of at least 5 timed runs (more while the time budget per "
    "measurement lasts), warm-up excluded; ms min-max: the fastest and slowest of them (n runs); "
    "x ref: ratio to the eager reference in the same run; "
    "x compiled: ratio to torch.compile of the reference in the same run; "
    "x 3 GEMMs (reference cost): ratio to three plain GEMMs of the head's shape in the same run "
    "(x·Wᵀ, G·W, Gᵀ·x with a [B, C] G in memory) — a yardstick for the matmul work of a step, "
    "not a floor: a fused design can beat it (it never writes or reads a [B, C] matrix), and "
    "every design adds the margin softmax on top; TFLOP/s: 6·B·D·C / time; peak extra: peak "
    "memory above the inputs and their gradients (GPU: the caching allocator's counters; host: "
    "the resident set's high-water mark with every allocation of a page or more mapped on its "
    "own, to within a few hundred KiB); loss err: relative difference to the float64 loss; max C: the "
    "largest class count one step fits in (device memory on a GPU, the stated budget on the host)."
)


# The chunked CUDA backend's targets at the face-recognition shape (docs/design.md: the memory contract).
CHECK_SHAPE = dict(batch=1024, dim=512, classes=1_000_000, dtype="bfloat16", margin="arcface")
MEMORY_LIMIT_MIB = 64  # hard: fails the run
SPEED_TARGETS = dict(max_time_vs_eager=0.5, min_tflops=300.0)  # reported, never fail


def checks(results: List[Result], impl: str = "chunked") -> Dict[str, dict]:
    """The "64 MB check" (hard) and the speed acceptance (soft) of `impl` at CHECK_SHAPE: {} when
    the run did not include that shape; a criterion whose measurement is missing fails."""

    def at(name):
        for r in results:
            c = r.case
            if r.impl == name and (c.batch, c.dim, c.classes, c.dtype, c.margin) == tuple(CHECK_SHAPE.values()):
                return r
        return None

    mine, eager = at(impl), at("reference")
    if mine is None:
        return {}
    ok = is_ok(mine)
    why = None if ok else f"{impl}: {mine.status}"
    shape = "B={batch} D={dim} C={classes:,} {dtype} {margin}".format(**CHECK_SHAPE)
    out: Dict[str, dict] = {}
    mib = None if not ok or mine.peak_extra_bytes is None else mine.peak_extra_bytes / MiB
    out["memory_64mib"] = dict(
        what=f"{impl} forward+backward at {shape}: peak above inputs and gradients <= {MEMORY_LIMIT_MIB} MiB",
        value_mib=mib,
        limit_mib=MEMORY_LIMIT_MIB,
        hard=True,
        passed=mib is not None and mib <= MEMORY_LIMIT_MIB,
        note=why or (None if mib is not None else "not measured"),
    )
    eager_ok = eager is not None and is_ok(eager) and eager.time_ms
    ratio = mine.time_ms / eager.time_ms if ok and eager_ok and mine.time_ms else None
    out["time_vs_eager"] = dict(
        what=f"{impl} time <= {SPEED_TARGETS['max_time_vs_eager']} x eager reference's at {shape}",
        value=ratio,
        limit=SPEED_TARGETS["max_time_vs_eager"],
        hard=False,
        passed=ratio is not None and ratio <= SPEED_TARGETS["max_time_vs_eager"],
        note=why or (None if eager_ok else "eager reference: " + (eager.status if eager else "not run")),
    )
    tflops = mine.tflops if ok else None
    out["tflops"] = dict(
        what=f"{impl} >= {SPEED_TARGETS['min_tflops']:g} algorithmic TFLOP/s (6·B·D·C / time) at {shape}",
        value=tflops,
        limit=SPEED_TARGETS["min_tflops"],
        hard=False,
        passed=tflops is not None and tflops >= SPEED_TARGETS["min_tflops"],
        note=why,
    )
    return out


def checks_text(found: Dict[str, dict]) -> str:
    lines = []
    for key, c in found.items():
        value = c.get("value_mib", c.get("value"))
        shown = "-" if value is None else f"{value:.3g}"
        tag = ("PASS" if c["passed"] else "FAIL") + ("" if c["hard"] else " (soft)")
        lines.append(f"{tag} {key}: {c['what']}: measured {shown}" + (f" ({c['note']})" if c.get("note") else ""))
    return "\n".join(lines)


def plot(results: List[Result], path_prefix: str, env: Optional[Dict[str, str]] = None) -> List[str]:
    """time_vs_classes.png and memory_vs_classes.png, one line per implementation, one panel per
    (dtype, margin, batch, dim) group with more than one class count. Returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    groups: Dict[Tuple, List[Result]] = {}
    for r in results:
        if is_ok(r):
            groups.setdefault((r.case.dtype, r.case.margin, r.case.batch, r.case.dim), []).append(r)
    groups = {k: v for k, v in groups.items() if len({r.case.classes for r in v}) > 1}
    if not groups:
        return []
    written = []
    env = env or {}
    device = env.get("gpu") or env.get("cpu") or ""
    if env.get("device"):
        threads = f", {env['threads']} threads" if env["device"] == "cpu" and env.get("threads") else ""
        device = f"{device} ({env['device']}{threads})"
    labels = {"gemm3": "3 GEMMs (reference cost, not a floor)", "reference": "eager reference"}
    for metric, label, scale, name in (
        ("time_ms", "forward+backward time (ms), median; bars: min-max", 1.0, "time_vs_classes.png"),
        ("peak_extra_bytes", "peak memory above inputs+grads (MiB)", 1.0 / MiB, "memory_vs_classes.png"),
    ):
        fig, axes = plt.subplots(1, len(groups), figsize=(6.0 * len(groups), 4.6), squeeze=False)
        for ax, (key, rs) in zip(axes[0], sorted(groups.items())):
            for impl in dict.fromkeys(r.impl for r in rs):
                pts = sorted(
                    (
                        (r.case.classes, getattr(r, metric) * scale, r)
                        for r in rs
                        if r.impl == impl and getattr(r, metric)
                    ),  # a log axis cannot show 0
                    key=lambda p: p[0],
                )
                if not pts:
                    continue
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                if metric == "time_ms" and all(p[2].time_ms_min is not None for p in pts):
                    err = [
                        [y - p[2].time_ms_min for y, p in zip(ys, pts)],
                        [p[2].time_ms_max - y for y, p in zip(ys, pts)],
                    ]
                    ax.errorbar(
                        xs,
                        ys,
                        yerr=err,
                        marker="o",
                        capsize=3,
                        label=labels.get(impl, impl),
                        ls="--" if impl == "gemm3" else "-",
                    )
                else:
                    ax.plot(xs, ys, marker="o", label=labels.get(impl, impl), ls="--" if impl == "gemm3" else "-")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("classes C")
            ax.set_ylabel(label)
            ax.set_title(f"{device}\n{key[1]}, {key[0]}, B={key[2]}, D={key[3]}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        if metric == "time_ms" and any(r.impl == "gemm3" for rs in groups.values() for r in rs):
            fig.text(
                0.01,
                0.005,
                "3 GEMMs: x·Wᵀ, G·W, Gᵀ·x of the shape:\na reference cost, not a lower bound",
                fontsize=7,
                color="0.35",
            )
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        out = f"{path_prefix}{name}"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


def write(
    results: List[Result],
    env: Dict[str, str],
    config: dict,
    out_dir: str,
    prefix: str,
    found_checks: Optional[Dict[str, dict]] = None,
    note: Optional[str] = None,
    plots: bool = True,
) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, prefix)
    doc = {
        "environment": env,
        "config": config,
        "results": [r.to_json() for r in results],
        "headline": headline(results),
    }
    if found_checks:
        doc["checks"] = found_checks
    if note:
        doc["note"] = note
    with open(base + "bench.json", "w") as f:
        json.dump(doc, f, indent=2)
    env_line = ", ".join(f"{k} {v}" for k, v in env.items())
    largest = largest_classes(results)
    with open(base + "bench.md", "w") as f:
        f.write(f"# marginops bench ({env.get('gpu', env.get('cpu', ''))})\n\n{env_line}\n\n")
        if note:
            f.write(f"**{note}**\n\n")
        if found_checks:
            f.write(
                "Checks (the chunked backend's targets at C = 1M):\n\n"
                + "".join(f"- {line}\n" for line in checks_text(found_checks).splitlines())
                + "\n"
            )
        head = headline_text(results, env)
        if head:
            f.write(
                "".join(f"- {line.strip()}\n" if line.startswith("  ") else f"{line}\n\n" for line in head.splitlines())
                + "\n"
            )
        f.write(f"{markdown_table(results)}\n\n{LEGEND}\n")
        if largest:
            f.write("\n" + largest.replace("\n", "\n\n") + "\n")
    return [base + "bench.json", base + "bench.md"] + (plot(results, base, env) if plots else [])
