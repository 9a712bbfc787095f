"""benchmarks/gpu_model.py, the roofline model of one chunked-backend step: it runs on the committed
SASS counts, prints one summary line per GPU and configuration in a fixed format (SUMMARY), its
rows add up to the step, the pre-specialization counts give a slower step, and a few terms match
hand arithmetic. Its copy of plan_chunks() is checked against the C++ one (the CPU
emulation build of csrc/cuda)."""

import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SASS = os.path.join(ROOT, "benchmarks", "results", "sass-cost.json")


def load_model():
    spec = importlib.util.spec_from_file_location("gpu_model", os.path.join(ROOT, "benchmarks", "gpu_model.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_model"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


gm = load_model()
SUMMARY = re.compile(
    r"^(H100|H200|A100) B=1024 D=512 C=1M bf16 arcface: step \d+\.\d ms, \d+ TFLOP/s, \d+\.\d\dx eager \(model\)$"
)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`python3 benchmarks/gpu_model.py --json PATH`, once: (its JSON, what it printed)."""
    out = tmp_path_factory.mktemp("gpu_model") / "model.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert gm.main(["--json", str(out)]) == 0
    data = json.loads(out.read_text())
    data["printed"] = printed.getvalue()
    return data


def test_prints_model_not_measured_and_one_summary_line_per_gpu_and_configuration(default_run):
    text = default_run["printed"]
    assert "model, not measured" in text
    summary = text[text.index("Summary (model, not measured):") :].splitlines()
    lines = [l for l in summary if SUMMARY.match(l)]
    assert len(lines) == 3 * len(gm.CONFIGS)  # H100, H200, A100 for each configuration
    assert [l.split()[0] for l in lines[:3]] == ["H100", "H200", "A100"]
    assert "the largest term is" in text and "what each change does to the model" in text


def test_times_are_positive_and_the_kernels_add_up_to_the_step(default_run):
    assert set(default_run["gpus"]) == {"H100", "H200", "A100"}
    for key, g in default_run["gpus"].items():
        for name, r in list(g["configs"].items()) + [("eager", g["eager"]), ("eager_fp32", g["eager_fp32"])]:
            assert r is not None, (key, name)
            assert r["step_ms"] > 0 and all(row["ms"] > 0 for row in r["rows"]), (key, name)
            assert sum(row["ms"] for row in r["rows"]) == pytest.approx(r["step_ms"], rel=1e-12), (key, name)
            for row in r["rows"]:
                if row["pass_"] != "host":  # a kernel's time: its slowest term plus its launch gaps
                    terms = max(row["memory_ms"], row["flops_ms"], row["instructions_ms"])
                    assert row["ms"] >= terms + row["launch_ms"] - 1e-9
        cur = g["configs"]["current"]
        assert cur["tflops"] == pytest.approx(6 * 1024 * 512 * 10**6 / (cur["step_ms"] / 1e3) / 1e12)
        assert cur["eager_ratio"] == pytest.approx(cur["step_ms"] / g["eager"]["step_ms"])
        # the model's launches are the plan's (chunk_launches) plus the sort of the row keys
        assert cur["launches"] == cur["plan_launches"] + gm.SORT_LAUNCHES


def test_pre_specialization_counts_give_a_slower_step(default_run):
    for key, g in default_run["gpus"].items():
        pre, cur = g["configs"]["pre_specialization"], g["configs"]["current"]
        assert pre["step_ms"] > cur["step_ms"], key
        by = {(r["pass_"], r["kernel"]): r for r in pre["rows"]}
        assert by[("bwd", "chunk_grad")]["bound"] == "instructions"  # 264 per logit: above the memory floor
        assert pre["counts"]["chunk_grad"]["instr_per_logit"] == 264.0


def test_current_counts_come_from_the_sass_json():
    counts = gm.load_counts(SASS)
    entry = next(
        k
        for k in counts
        if k["kernel"] == "chunk_softmax"
        and k["arch"] == "sm_90a"
        and k["acc"] == "float"
        and k["config"] == {"K": 1, "normalize_w": True, "bias": False, "hard_negatives": False}
    )
    assert gm.per_logit(counts, "chunk_softmax", "sm_90a", "bf16", 1, True, False, False)[0] == entry["instr_per_logit"]
    with pytest.raises(ValueError):  # a run-time K variant has no count
        gm.per_logit(counts, "chunk_grad", "sm_90a", "bf16", 0, True, False, False)


def test_one_kernel_by_hand():
    """chunk_softmax over one cold chunk of u (B = 1024, Cc = 16192, float32) on an H100: its
    memory time is bytes / (0.9 · 3.35 TB/s); its instruction time 11.25 per logit over
    132 SMs · 4 schedulers · 32 lanes · 1.7 GHz; a GEMM u of the same chunk: 2·B·D·Cc flops at
    0.75 · 989.4 TFLOP/s."""
    h100 = gm.GPUS["H100"]
    u_bytes = 4 * 1024 * 16192  # 66,322,432
    softmax = gm.Launch("fwd", "chunk_softmax", reads=[("u", u_bytes, u_bytes)], instr=11.25 * 1024 * 16192)
    gemm = gm.Launch("fwd", "gemm_u", flops=2.0 * 1024 * 512 * 16192, tensor=True)
    res = gm.simulate([softmax, gemm], h100, graph=False)
    rows = {r["kernel"]: r for r in res["rows"]}
    assert softmax.hbm == u_bytes  # nothing of u was resident: every byte from HBM
    assert rows["chunk_softmax"]["memory_ms"] == pytest.approx(1e3 * 66_322_432 / (0.9 * 3.35e12))  # 0.0220 ms
    assert rows["chunk_softmax"]["instructions_ms"] == pytest.approx(
        1e3 * 11.25 * 1024 * 16192 / (132 * 4 * 32 * 1.7e9)
    )
    assert rows["chunk_softmax"]["ms"] == pytest.approx(0.0219975 + 0.002, abs=1e-6)  # memory-bound, plus a 2 µs gap
    assert rows["gemm_u"]["ms"] == pytest.approx(1e3 * 2 * 1024 * 512 * 16192 / (0.75 * 989.4e12) + 0.002)
    assert res["step_ms"] == pytest.approx(rows["chunk_softmax"]["ms"] + rows["gemm_u"]["ms"])


def test_l2_model_by_hand():
    """A buffer that fits the modelled L2 (25 MB of an H100's 50 MB) written by one kernel and
    read by the next never touches HBM until the end of the step (written back once); one larger
    than it is written back and read back in full."""
    for size, read_hbm, total in ((20e6, 0.0, 20e6), (40e6, 40e6, 80e6)):
        w = gm.Launch("fwd", "gemm_u", writes=[("u", size, size)])
        r = gm.Launch("fwd", "chunk_softmax", reads=[("u", size, size)])
        cache = gm.L2(0.5 * 50e6)
        cache.run(w)
        cache.run(r)
        assert r.hbm == pytest.approx(read_hbm)
        cache.flush()
        assert w.hbm + r.hbm == pytest.approx(total)


def test_l2_resident_configuration_serves_u_from_l2_and_the_graph_cuts_launch_time(default_run):
    g = default_run["gpus"]["H100"]["configs"]
    l2, graph, cur = g["l2"], g["l2_graph"], g["current"]
    assert l2["workspace_mib"] < 64 and min(l2["u_from_l2"].values()) >= gm.L2_HIT_GOAL
    assert max(cur["u_from_l2"].values()) < 0.05  # 63 MiB (fwd) and 40 + 20 MiB (bwd) chunks do not fit
    assert l2["plan"]["fwd"]["u_mib"] <= 24.0
    assert graph["step_ms"] < l2["step_ms"]
    assert sum(r["launch_ms"] for r in graph["rows"]) == pytest.approx(0.5 * sum(r["launch_ms"] for r in l2["rows"]))


def test_summary_line_format():
    s = gm.Shape(1024, 512, 1_000_000, "bf16", "arcface")
    line = gm.summary_line(gm.GPUS["H100"], s, 12.8, 251.4, 0.6412)
    assert line == "H100 B=1024 D=512 C=1M bf16 arcface: step 12.8 ms, 251 TFLOP/s, 0.64x eager (model)"
    assert [gm.fmt_classes(c) for c in (100_000, 1_500_000, 3_000_000, 1234)] == ["100k", "1.5M", "3M", "1234"]


def test_device_names_pick_the_constants():
    assert gm.gpu_for_device_name("NVIDIA H100 80GB HBM3").key == "H100"
    assert gm.gpu_for_device_name("NVIDIA H200").key == "H200"
    assert gm.gpu_for_device_name("NVIDIA A100-SXM4-80GB").key == "A100"
    assert gm.gpu_for_device_name("NVIDIA GeForce RTX 4090") is None


PLAN_CASES = [
    # B, D, C, K, x dtype, W dtype, normalize_w, class_index, backward, need_db, budget
    (1024, 512, 1_000_000, 1, torch.bfloat16, torch.bfloat16, True, False, False, False, 0),
    (1024, 512, 1_000_000, 1, torch.bfloat16, torch.bfloat16, True, False, True, False, 0),
    (1024, 512, 1_000_000, 1, torch.bfloat16, torch.bfloat16, True, False, True, False, 20 << 20),
    (256, 128, 50_000, 3, torch.float16, torch.float16, True, False, True, True, 8 << 20),
    (64, 96, 5000, 1, torch.float32, torch.float32, False, False, False, False, 1 << 20),
    (64, 96, 5000, 1, torch.bfloat16, torch.float32, True, True, True, False, 3 << 20),
    (300, 64, 777, 1, torch.float16, torch.float16, False, False, True, True, 1 << 16),
]
NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@pytest.mark.parametrize("case", PLAN_CASES)
def test_plan_matches_the_cpp_plan_chunks(emu, case):
    B, D, C, K, xt, wt, nw, ci, bw, db, budget = case
    want = emu.plan(B, D, C, K, xt, wt, nw, ci, bw, db, budget, True, True)
    got = gm.plan_chunks(B, D, C, K, NAMES[xt], nw, bw, db, budget or 64 * gm.MiB, class_index=ci, w_dtype=NAMES[wt])
    for key in ("classes", "chunks", "segments", "ldx", "copy_w", "prescale_w"):
        assert got[key] == want[key], (key, got[key], want[key])
    # the workspace: exact but for sizeof(RowInfo), which the model copies (B rows of it)
    assert abs(got["total"] - want["total"]) <= 32 * B + 256, (got["total"], want["total"])
    assert gm.chunk_launches(got, nw, bw) == want["launches"]


# ---- benchmarks/chunked_profile.py: the model beside the measurement ------------------


def load_profile():
    spec = importlib.util.spec_from_file_location(
        "chunked_profile", os.path.join(ROOT, "benchmarks", "chunked_profile.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_profiler_kernel_names_map_to_the_model_rows():
    cp = load_profile()
    ours = (
        "void marginops::cuda::(anonymous namespace)::{}<float, marginops::cuda::Variant<1, true, false, false> >"
        "(marginops::cuda::HeadParams, marginops::cuda::ChunkParams)"
    )
    for kernel, row in (
        ("chunk_softmax_kernel", "chunk_softmax"),
        ("chunk_grad_kernel", "chunk_grad"),
        ("chunk_weights_kernel", "chunk_weights"),
        ("chunk_dw_kernel", "chunk_dw"),
        ("chunk_row_scale_kernel", "row_prep"),
        ("target_grad_kernel", "row_prep"),
        ("row_prep_kernel", "row_prep"),
        ("merge_kernel", "merge"),
        ("chunk_dx_finalize_kernel", "chunk_dx_finalize"),
        ("chunk_scaled_x_kernel", "chunk_scaled_x"),
    ):
        assert cp.kernel_row(ours.format(kernel)) == row, kernel
    assert cp.kernel_row("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTT") == "gemm"
    assert cp.kernel_row("sm90_xmma_gemm_bf16f32_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1") == "gemm"
    assert cp.kernel_row("void at::native::bitonicSortKVInPlace<2, -1, 16, 16, long, long>(...)") == "sort"
    assert (
        cp.kernel_row("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float> >(...)")
        == "other"
    )
    # every row the model has is a row a measured kernel can land in
    res = gm.model(gm.Shape(1024, 512, 10**6), gm.GPUS["H100"], gm.load_counts(SASS))
    rows = {k for _, k in cp.model_rows(res)}
    assert rows <= {r for _, r in cp.KERNEL_ROWS} | {"gemm", "sort"}


def test_comparison_of_a_synthetic_measurement():
    """A measurement 1.2x the model in every kernel and 1.5x in the launch gaps reads as such."""
    cp = load_profile()
    res = gm.model(gm.Shape(1024, 512, 10**6), gm.GPUS["H100"], gm.load_counts(SASS))
    mod = cp.model_rows(res)
    measured = {
        p: {k: dict(ms=1.2 * v["ms"], launches=v["launches"]) for (q, k), v in mod.items() if q == p}
        for p in ("fwd", "bwd")
    }
    walls = {}
    for p in ("fwd", "bwd"):
        gaps = sum(r["launch_ms"] for r in res["rows"] if r["pass_"] == p)
        walls[p] = sum(v["ms"] for v in measured[p].values()) + 1.5 * gaps
    cmp = cp.compare(measured, walls, res)
    by = {(r["pass_"], r["kernel"]): r for r in cmp["rows"]}
    assert by[("bwd", "chunk_grad")]["ratio"] == pytest.approx(1.2)
    fwd_chunks = gm.plan_chunks(1024, 512, 10**6, 1, "bf16", True, False)["chunks"]
    bwd_chunks = gm.plan_chunks(1024, 512, 10**6, 1, "bf16", True, True)["chunks"]
    assert by[("fwd", "gemm")]["ratio"] == pytest.approx(1.2) and by[("fwd", "gemm")]["model_launches"] == fwd_chunks
    assert by[("bwd", "gemm")]["model_launches"] == 3 * bwd_chunks  # recompute, dx, dW per chunk
    assert by[("bwd", "launch gaps (wall - kernels)")]["ratio"] == pytest.approx(1.5)
    assert "chunk_softmax" in cp.compare_text(cmp)


def test_chunked_profile_cpu_smoke_writes_the_model_beside_the_measurement(tmp_path):
    """What scripts/gpu-check's profile and acceptance stages run, at a CPU size: the comparison's
    code path end to end (against the H100 constants; on the CPU its ratios mean nothing)."""
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/chunked_profile.py",
            "--device",
            "cpu",
            "--batch",
            "32",
            "--classes",
            "2000",
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
    assert "model (benchmarks/gpu_model.py, H100 constants) beside measured on cpu" in proc.stdout
    c = json.loads((tmp_path / "cpu-model-vs-measured.json").read_text())
    assert c["model_gpu"] == "H100" and "CPU smoke" in c["note"]
    assert c["step"]["measured_ms"] > 0 and c["step"]["model_ms"] > 0 and c["eager"]["measured_ms"] > 0
    assert {r["kernel"] for r in c["kernels"]} >= {
        "chunk_softmax",
        "chunk_grad",
        "gemm",
        "launch gaps (wall - kernels)",
    }
    assert c["model_summary"].startswith("H100 B=32 D=32 C=2k fp32 arcface: step ")
