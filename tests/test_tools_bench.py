"""`marginops bench` (marginops.tools.bench) in CI-sized configurations: outputs exist, are
well-formed, and marginops' loss matches the float64 reference; failures, budgets and the
largest-C search; the chunked profile's smoke run.

torch's own F.linear_cross_entropy as a peer of the bench: its two rows (reference path, chunked
path) compute marginops.reference's Softmax and NormFace exactly (float64, loss and both
gradients), are "unavailable" on a torch without it, "unsupported" for margins, and appear in a
tiny sweep and in the gpu-check preset."""

import json
import os
import subprocess
import sys

import pytest
import torch

import marginops as mo
from marginops import reference
from marginops.tools.bench import DEFAULTS, PRESETS, case_groups, impls, measure, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "marginops", *args], capture_output=True, text=True, check=True)


def test_bench_quick_writes_well_formed_outputs(tmp_path):
    pytest.importorskip("matplotlib")  # the plots
    proc = run_cli("bench", "--quick", "--impls", "marginops,reference,cce", "--out", str(tmp_path))
    assert "x ref time" in proc.stdout and "unavailable: cut_cross_entropy not installed" in proc.stdout
    data = json.loads((tmp_path / "cpu-bench.json").read_text())
    assert data["environment"]["torch"] == torch.__version__
    by = {(r["impl"], r["case"]["classes"]): r for r in data["results"]}
    for C in (500, 2000):
        mine, ref = by[("marginops", C)], by[("reference", C)]
        assert mine["status"] == "ok" and ref["status"] == "ok"
        assert mine["loss_rel_err"] < 1e-5 and abs(mine["loss"] - ref["loss"]) < 1e-4 * abs(ref["loss"])
        assert mine["time_ms"] > 0 and mine["tflops"] > 0
        assert by[("gemm3", C)]["status"] == "ok"
    assert by[("marginops", 500)]["max_classes"] >= by[("reference", 500)]["max_classes"] > 500
    md = (tmp_path / "cpu-bench.md").read_text()
    assert md.count("| marginops |") == 2 and "TFLOP/s" in md
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
        results = measure.sweep(
            [case], ["broken", "marginops"], torch.device("cpu"), 1, None, False, 100, lambda m: None
        )
    finally:
        del impls.IMPLS["broken"]
    status = {r.impl: r.status for r in results}
    assert status["broken"] == "error: RuntimeError: kernel exploded" and status["marginops"] == "ok"


def test_max_classes_bisects_to_the_budget():
    case = impls.Case(16, 8, 1000, "float32", "arcface")
    limit = measure.max_classes(case, "marginops", torch.device("cpu"), None, 64_000)
    assert limit == 64_000, "without a budget the cap holds"
    calls = []
    real = measure.fits
    measure.fits = lambda c, *a: calls.append(c.classes) or c.classes <= 5000
    try:
        found = measure.max_classes(case, "marginops", torch.device("cpu"), 1, 10**6)
    finally:
        measure.fits = real
    assert 0.95 * 5000 <= found <= 5000 and len(calls) < 15


def test_cpu_inputs_unchanged_by_device_side_drawing():
    """make_inputs seeds a generator on the device; on the CPU the values are those the committed
    CPU results were measured on (float32 draws, W scaled by 0.05, then cast)."""
    case = impls.Case(8, 4, 50, "float32", "arcface")
    x, W, y = measure.make_inputs(case, torch.device("cpu"))
    g = torch.Generator(device="cpu").manual_seed(0)
    assert torch.equal(x, torch.randn(8, 4, generator=g))
    assert torch.equal(W, 0.05 * torch.randn(50, 4, generator=g))
    assert torch.equal(y, torch.randint(0, 50, (8,), generator=g))
    assert x.requires_grad and W.requires_grad and not y.requires_grad
    xb, Wb, _ = measure.make_inputs(impls.Case(8, 4, 50, "bfloat16", "arcface"), torch.device("cpu"))
    assert xb.dtype == Wb.dtype == torch.bfloat16


def test_cuda_backends_are_reported_unsupported_on_the_cpu():
    case = impls.Case(8, 4, 50, "float32", "arcface")
    results = measure.sweep(
        [case], ["chunked", "tiles", "marginops"], torch.device("cpu"), 1, None, False, 100, lambda m: None
    )
    status = {r.impl: r.status for r in results}
    assert status["chunked"].startswith("unsupported: CUDA only") and status["tiles"].startswith(
        "unsupported: CUDA only"
    )
    assert status["marginops"] == "ok" and status["gemm3"] == "ok"


def test_time_budget_skips_what_is_left():
    case = impls.Case(8, 4, 50, "float32", "arcface")
    results = measure.sweep(
        [case], ["marginops"], torch.device("cpu"), 1, None, True, 100, lambda m: None, deadline=0.0
    )
    assert [(r.impl, r.status) for r in results] == [
        ("marginops", "skipped: time budget"),
        ("gemm3", "skipped: time budget"),
    ]


def test_memory_estimates_skip_what_cannot_fit(monkeypatch):
    big = impls.Case(1024, 512, 3_000_000, "bfloat16", "arcface")
    # the eager reference keeps several [B, C] tensors: GBs at C = 3M; chunked stays near its workspace
    assert impls.IMPLS["reference"].extra_bytes(big) > 20 * 2**30 > impls.IMPLS["chunked"].extra_bytes(big)
    assert impls.IMPLS["chunked"].extra_bytes(big) < 128 * 2**20
    monkeypatch.setattr(measure, "free_device_bytes", lambda device: 8 * 2**30)
    assert measure.fits_estimate(4 * 2**30, torch.device("cuda")) is None
    assert measure.fits_estimate(40 * 2**30, torch.device("cuda")) == "needs ~40.0 GiB, 8.0 GiB free"


def test_largest_c_search_is_bounded_by_device_memory_and_time(monkeypatch):
    case = impls.Case(16, 8, 1000, "float32", "arcface")
    monkeypatch.setattr(measure, "fits", lambda c, *a: True)
    monkeypatch.setattr(measure, "device_class_limit", lambda c, d: 7000)
    assert measure.max_classes(case, "marginops", torch.device("cpu"), None, 10**9) == 7000
    with pytest.raises(measure.SearchCut):
        measure.max_classes(case, "marginops", torch.device("cpu"), None, 10**9, deadline=0.0)


def test_chunked_backend_checks(tmp_path):
    shape = impls.Case(1024, 512, 1_000_000, "bfloat16", "arcface")
    R = measure.Result
    results = [R(shape, "chunked", "ok", 20.0, 60 * 2**20, 320.0), R(shape, "reference", "ok", 50.0, 9 * 2**30, 128.0)]
    found = report.checks(results)
    assert (
        found["memory_64mib"]["passed"] and found["memory_64mib"]["hard"] and found["memory_64mib"]["value_mib"] == 60
    )
    assert found["tflops"]["passed"] and found["time_vs_eager"]["passed"] and found["time_vs_eager"]["value"] == 0.4
    text = report.checks_text(found)
    assert "PASS memory_64mib" in text and "PASS (soft) time_vs_eager" in text and "PASS (soft) tflops" in text
    results[0] = R(shape, "chunked", "ok", 30.0, 65 * 2**20, 213.0)
    found = report.checks(results)
    assert (
        not found["memory_64mib"]["passed"] and not found["tflops"]["passed"] and not found["time_vs_eager"]["passed"]
    )
    assert "FAIL memory_64mib" in report.checks_text(found) and "FAIL (soft) tflops" in report.checks_text(found)
    assert report.checks([R(impls.Case(8, 4, 50, "float32", "arcface"), "chunked", "ok", 1.0, 0, 1.0)]) == {}
    report.write(results, {"torch": torch.__version__}, {}, str(tmp_path), "gpu-", found, plots=False)
    data = json.loads((tmp_path / "gpu-bench.json").read_text())
    assert data["checks"]["memory_64mib"]["passed"] is False
    assert "FAIL memory_64mib" in (tmp_path / "gpu-bench.md").read_text()


def test_gpu_check_preset_needs_cuda():
    proc = subprocess.run(
        [sys.executable, "-m", "marginops", "bench", "--device", "cpu", "--preset", "gpu-check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr


def test_chunked_profile_smoke_run_on_the_cpu(tmp_path):
    """benchmarks/chunked_profile.py (what scripts/gpu-check's profile stage runs) at a CPU size:
    it times, profiles and writes its JSON with kernel time split by kind."""
    subprocess.run(
        [
            sys.executable,
            "benchmarks/chunked_profile.py",
            "--device",
            "cpu",
            "--classes",
            "3000",
            "--repeat",
            "1",
            "--out",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    data = json.loads((tmp_path / "cpu-chunked-profile.json").read_text())
    assert len(data["sweep"]) == 1 and data["sweep"][0]["time_ms"] > 0 and data["gemm3_ms"] > 0
    assert sum(data["profile"]["ms_by_kind"].values()) > 0 and data["profile"]["top"]
    assert "| auto |" in (tmp_path / "cpu-chunked-profile.md").read_text()


# ---- torch's F.linear_cross_entropy rows ----------------------------------------------------------

LCE = ("torch-lce", "torch-lce-chunked")
needs_lce = pytest.mark.skipif(impls.torch_lce_missing() is not None, reason="torch < 2.13: no F.linear_cross_entropy")


@needs_lce
@pytest.mark.parametrize("name", LCE)
@pytest.mark.parametrize("margin", ["softmax", "normface"])
def test_loss_and_gradients_equal_the_reference_in_float64(name, margin):
    g = torch.Generator().manual_seed(3)
    B, D, C = 7, 5, 13
    x0 = torch.randn(B, D, generator=g, dtype=torch.float64)
    W0 = torch.randn(C, D, generator=g, dtype=torch.float64) * 0.3
    y = torch.randint(0, C, (B,), generator=g)
    spec = impls.MARGINS[margin]()
    assert isinstance(spec, mo.NormFace if margin == "normface" else mo.Softmax)

    x, W = x0.clone().requires_grad_(), W0.clone().requires_grad_()
    ref = reference.margin_cross_entropy(x, W, y, spec)
    ref.backward()
    fn = impls.IMPLS[name].make(impls.Case(B, D, C, "float64", margin), torch.device("cpu"))
    xl, Wl = x0.clone().requires_grad_(), W0.clone().requires_grad_()
    loss = fn(xl, Wl, y)
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(xl.grad, x.grad, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(Wl.grad, W.grad, rtol=1e-11, atol=1e-13)


def test_unavailable_on_a_torch_without_it(monkeypatch):
    monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy", raising=False)
    for name in LCE:
        reason = impls.IMPLS[name].unavailable()
        assert reason and "torch >= 2.13" in reason
        r = measure.measure(impls.Case(4, 3, 10, "float32", "softmax"), name, torch.device("cpu"), 1, None)
        assert r.status.startswith("unavailable: ") and "linear_cross_entropy" in r.status


def test_margins_are_unsupported():
    for name in LCE:
        assert "no margin" in impls.IMPLS[name].unsupported(
            impls.Case(4, 3, 10, "float32", "arcface"), torch.device("cpu")
        )
        assert impls.IMPLS[name].unsupported(impls.Case(4, 3, 10, "float32", "normface"), torch.device("cpu")) is None


def test_in_the_gpu_defaults_and_the_gpu_check_preset():
    assert set(LCE) <= set(DEFAULTS["cuda"]["impls"].split(",")) and "normface" in DEFAULTS["cuda"]["margins"]
    cfg = dict(DEFAULTS["cuda"], **PRESETS["gpu-check"])
    assert set(LCE) <= set(cfg["impls"].split(","))
    groups = case_groups(cfg, cfg["margins"].split(","), cfg["impls"].split(","), cfg["by_margin"])
    first_cases, _ = groups[0]
    assert [c.margin for c in first_cases] == ["arcface"] * 3  # the chunked backend's checks' cases come first
    if impls.torch_lce_missing() is None:
        rest = {c.margin: (c.classes, names) for cases, names in groups[1:] for c in cases}
        assert rest["softmax"][0] == rest["normface"][0] == 1_000_000
        assert set(LCE) | {"chunked", "reference"} <= set(rest["normface"][1])


@needs_lce
def test_tiny_sweep_lists_the_rows(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "marginops",
            "bench",
            "--batch",
            "16",
            "--dim",
            "8",
            "--classes",
            "300",
            "--margins",
            "softmax,normface",
            "--impls",
            "marginops,torch-lce,torch-lce-chunked",
            "--repeat",
            "1",
            "--repeat-time-s",
            "0",
            "--no-max-classes",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "torch F.linear_cross_entropy" in proc.stdout  # the headline's name for the peer
    data = json.loads((tmp_path / "cpu-bench.json").read_text())
    by = {(r["impl"], r["case"]["margin"]): r for r in data["results"]}
    for name in LCE:
        for margin in ("softmax", "normface"):
            r = by[(name, margin)]
            assert r["status"] == "ok" and r["loss_rel_err"] < 1e-5, (name, margin, r["status"])
    md = (tmp_path / "cpu-bench.md").read_text()
    assert "| torch-lce |" in md and "| torch-lce-chunked |" in md
