"""Benchmark output: a terminal table with ratios to the eager reference, JSON, Markdown, and PNG
plots of time and memory against the class count."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

from .measure import Result

MiB = 2**20


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
                "x ref time": _fmt(time_ratio, ".2f"),
                "x compiled": _fmt(comp_ratio, ".2f"),
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


COLUMNS = ["case", "impl", "ms", "x ref time", "x compiled", "x 3 GEMMs", "TFLOP/s", "peak MiB", "x ref mem", "loss err", "max C", "status"]


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
    "x compiled: ratio to torch.compile of the reference in the same run; "
    "x 3 GEMMs: ratio to three GEMMs of the head's shape (the floor of any design that "
    "materializes logits); TFLOP/s: 6·B·D·C / time; peak MiB: peak memory above the inputs "
    "and their gradients; loss err: relative difference to the float64 loss; max C: the largest "
    "class count one step fits in (device memory on a GPU, the stated budget on the host)."
)


# Issue #10's targets for the chunked CUDA backend, at the face-recognition shape.
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
        value_mib=mib, limit_mib=MEMORY_LIMIT_MIB, hard=True,
        passed=mib is not None and mib <= MEMORY_LIMIT_MIB, note=why or (None if mib is not None else "not measured"),
    )
    eager_ok = eager is not None and is_ok(eager) and eager.time_ms
    ratio = mine.time_ms / eager.time_ms if ok and eager_ok and mine.time_ms else None
    out["time_vs_eager"] = dict(
        what=f"{impl} time <= {SPEED_TARGETS['max_time_vs_eager']} x eager reference's at {shape}",
        value=ratio, limit=SPEED_TARGETS["max_time_vs_eager"], hard=False,
        passed=ratio is not None and ratio <= SPEED_TARGETS["max_time_vs_eager"],
        note=why or (None if eager_ok else "eager reference: " + (eager.status if eager else "not run")),
    )
    tflops = mine.tflops if ok else None
    out["tflops"] = dict(
        what=f"{impl} >= {SPEED_TARGETS['min_tflops']:g} algorithmic TFLOP/s (6·B·D·C / time) at {shape}",
        value=tflops, limit=SPEED_TARGETS["min_tflops"], hard=False,
        passed=tflops is not None and tflops >= SPEED_TARGETS["min_tflops"], note=why,
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
        if is_ok(r):
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


def write(
    results: List[Result], env: Dict[str, str], config: dict, out_dir: str, prefix: str,
    found_checks: Optional[Dict[str, dict]] = None, note: Optional[str] = None, plots: bool = True,
) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, prefix)
    doc = {"environment": env, "config": config, "results": [r.to_json() for r in results]}
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
            f.write("Checks (issue #10):\n\n" + "".join(f"- {line}\n" for line in checks_text(found_checks).splitlines()) + "\n")
        f.write(f"{markdown_table(results)}\n\n{LEGEND}\n")
        if largest:
            f.write("\n" + largest.replace("\n", "\n\n") + "\n")
    return [base + "bench.json", base + "bench.md"] + (plot(results, base) if plots else [])
