"""`marginops bench` and `marginops demo` in CI-sized configurations: outputs exist, are
well-formed, and the fused loss matches the float64 reference."""

import json
import subprocess
import sys

import pytest
import torch

from marginops.bench import impls, measure

pytest.importorskip("matplotlib")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "marginops", *args], capture_output=True, text=True, check=True)


def test_bench_quick_writes_well_formed_outputs(tmp_path):
    proc = run_cli("bench", "--quick", "--impls", "fused,reference,cce", "--out", str(tmp_path))
    assert "x ref time" in proc.stdout and "unavailable: cut_cross_entropy not installed" in proc.stdout
    data = json.loads((tmp_path / "cpu-bench.json").read_text())
    assert data["environment"]["torch"] == torch.__version__
    by = {(r["impl"], r["case"]["classes"]): r for r in data["results"]}
    for C in (500, 2000):
        fused, ref = by[("fused", C)], by[("reference", C)]
        assert fused["status"] == "ok" and ref["status"] == "ok"
        assert fused["loss_rel_err"] < 1e-5 and abs(fused["loss"] - ref["loss"]) < 1e-4 * abs(ref["loss"])
        assert fused["time_ms"] > 0 and fused["tflops"] > 0
        assert by[("gemm3", C)]["status"] == "ok"
    assert by[("fused", 500)]["max_classes"] >= by[("reference", 500)]["max_classes"] > 500
    md = (tmp_path / "cpu-bench.md").read_text()
    assert md.count("| fused |") == 2 and "TFLOP/s" in md
    for png in ("cpu-time_vs_classes.png", "cpu-memory_vs_classes.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failures_are_reported_and_the_sweep_goes_on():
    case = impls.Case(8, 4, 50, "float32", "arcface")

    class Broken(impls.Impl):
        name = "broken"

        def make(self, case, device):
            def fn(x, W, y):
                raise RuntimeError("kernel exploded")

            return fn

    impls.IMPLS["broken"] = Broken()
    try:
        results = measure.sweep([case], ["broken", "fused"], torch.device("cpu"), 1, None, False, 100, lambda m: None)
    finally:
        del impls.IMPLS["broken"]
    status = {r.impl: r.status for r in results}
    assert status["broken"] == "error: RuntimeError: kernel exploded" and status["fused"] == "ok"


def test_max_classes_bisects_to_the_budget():
    case = impls.Case(16, 8, 1000, "float32", "arcface")
    limit = measure.max_classes(case, "fused", torch.device("cpu"), None, 64_000)
    assert limit == 64_000, "without a budget the cap holds"
    calls = []
    real = measure.fits
    measure.fits = lambda c, *a: calls.append(c.classes) or c.classes <= 5000
    try:
        found = measure.max_classes(case, "fused", torch.device("cpu"), 1, 10**6)
    finally:
        measure.fits = real
    assert 0.95 * 5000 <= found <= 5000 and len(calls) < 15


def test_demo_writes_pictures_and_table(tmp_path):
    proc = run_cli("demo", "--epochs", "2", "--dims", "2,3", "--out", str(tmp_path))
    assert "pair accuracy" in proc.stdout
    for png in ("features_2d.png", "features_3d.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [l for l in (tmp_path / "verification.md").read_text().splitlines() if l.startswith("| 2 ") or l.startswith("| 3 ")]
    assert len(rows) == 10
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(0.0 <= float(c) <= 1.0 for c in cells[2:5]) and cells[5].endswith("°")
