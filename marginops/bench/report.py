"""Benchmark output: a terminal table with ratios to the eager reference, JSON, Markdown, and PNG
plots of time and memory against the class count."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

from .measure import Result

MiB = 2**20


def _ref(results: List[Result], r: Result, impl: str = "reference") -> Optional[Result]:
    for o in results:
        if o.case == r.case and o.impl == impl and o.status == "ok":
            return o
    return None


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def rows(results: List[Result]) -> List[Dict[str, str]]:
    out = []
    for r in results:
        ref, floor = _ref(results, r), _ref(results, r, "gemm3")
        ok = r.status == "ok" or r.status.startswith("ok ")
        time_ratio = r.time_ms / ref.time_ms if ok and ref and r.time_ms else None
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
                "x ref time": _fmt(time_ratio, ".2f"),
                "x 3 GEMMs": _fmt(gemm_ratio, ".2f"),
                "TFLOP/s": _fmt(r.tflops, ".3g"),
                "peak MiB": _fmt(None if r.peak_extra_bytes is None else r.peak_extra_bytes / MiB, ".2f"),
                "x ref mem": _fmt(mem_ratio, ".3f"),
                "loss err": _fmt(r.loss_rel_err, ".1e"),
                "max C": "-" if r.max_classes is None else f"{r.max_classes:,}",
                "status": r.status,
            }
        )
    return out


COLUMNS = ["case", "impl", "ms", "x ref time", "x 3 GEMMs", "TFLOP/s", "peak MiB", "x ref mem", "loss err", "max C", "status"]


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
        parts = [f"{r.impl} {r.max_classes:,}" + (f" ({r.max_classes / best:.2f}x)" if r.max_classes != best else "") for r in rs]
        lines.append(f"largest C that fits, {margin} {dtype} B={b} D={d}: " + ", ".join(parts))
    return "\n".join(lines)


LEGEND = (
    "ms: median forward+backward time; x ref: ratio to the eager reference in the same run; "
    "x 3 GEMMs: ratio to three GEMMs of the head's shape (the floor of any design that "
    "materializes logits); TFLOP/s: 6·B·D·C / time; peak MiB: peak memory above the inputs "
    "and their gradients; loss err: relative difference to the float64 loss; max C: the largest "
    "class count one step fits in (device memory on a GPU, the stated budget on the host)."
)


def plot(results: List[Result], path_prefix: str) -> List[str]:
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
        if r.status == "ok" or r.status.startswith("ok "):
            groups.setdefault((r.case.dtype, r.case.margin, r.case.batch, r.case.dim), []).append(r)
    groups = {k: v for k, v in groups.items() if len({r.case.classes for r in v}) > 1}
    if not groups:
        return []
    written = []
    for metric, label, scale, name in (
        ("time_ms", "forward+backward time (ms)", 1.0, "time_vs_classes.png"),
        ("peak_extra_bytes", "peak memory above inputs+grads (MiB)", 1.0 / MiB, "memory_vs_classes.png"),
    ):
        fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
        floor = 0.05 if metric == "peak_extra_bytes" else 0.0  # MiB: below the host measurement's resolution
        for ax, (key, rs) in zip(axes[0], sorted(groups.items())):
            for impl in dict.fromkeys(r.impl for r in rs):
                pts = sorted(
                    (r.case.classes, max(getattr(r, metric) * scale, floor))
                    for r in rs
                    if r.impl == impl and getattr(r, metric) is not None and (floor or getattr(r, metric))
                )
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=impl)
            if floor:
                ax.axhline(floor, color="0.6", lw=0.8, ls="--")
                ax.text(ax.get_xlim()[0], floor * 1.15, f" values below {floor} MiB drawn at {floor}", fontsize=7, color="0.4")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("classes C")
            ax.set_ylabel(label)
            ax.set_title(f"{key[1]}, {key[0]}, B={key[2]}, D={key[3]}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.tight_layout()
        out = f"{path_prefix}{name}"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


def write(results: List[Result], env: Dict[str, str], config: dict, out_dir: str, prefix: str) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, prefix)
    with open(base + "bench.json", "w") as f:
        json.dump({"environment": env, "config": config, "results": [r.to_json() for r in results]}, f, indent=2)
    env_line = ", ".join(f"{k} {v}" for k, v in env.items())
    largest = largest_classes(results)
    with open(base + "bench.md", "w") as f:
        f.write(f"# marginops bench ({env.get('gpu', env.get('cpu', ''))})\n\n{env_line}\n\n{markdown_table(results)}\n\n{LEGEND}\n")
        if largest:
            f.write("\n" + largest.replace("\n", "\n\n") + "\n")
    return [base + "bench.json", base + "bench.md"] + plot(results, base)
