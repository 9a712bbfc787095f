"""The chunked CUDA backend (csrc/cuda/chunked/chunk_kernels.cu, chunked_launch.h) built for the CPU
emulation in tests/cuda_emu, with ATen's CPU mm standing in for cuBLAS: losses and gradients
against the eager reference (marginops.reference, which shares no code with the kernels) in
float64, the per-row statistics against the CPU op, chunk boundaries, the workspace budget, the
launch count, and the 16-bit paths against eager PyTorch's error in the same dtype."""

import pytest
import torch
from helpers import (
    EMULATED_MARGINS,
    budget_for,
    check_op_against_eager,
    check_tf32,
    emulated_loss,
    make_inputs,
    rel_err,
)

import marginops as mo
from marginops import reference

f64 = torch.float64
CHUNKED = 1
_cpu = torch.ops.marginops


def chunked_loss(emu, *args, **kw):
    return emulated_loss(emu, CHUNKED, *args, **kw)


def grads_against_reference(emu, x, W, y, margin, bias=None, workspace=0, tol=1e-10, **kw):
    leaves = [t for t in (x, W, bias) if t is not None]
    loss = chunked_loss(emu, x, W, y, margin, bias, workspace=workspace, **kw)
    got = torch.autograd.grad(loss, leaves)
    ref = reference.margin_cross_entropy(x, W, y, margin, bias, **kw)
    want = torch.autograd.grad(ref, leaves)
    assert rel_err(loss, ref) <= tol, f"loss {rel_err(loss, ref):.2e}"
    for name, g, w in zip(("dx", "dW", "dbias"), got, want):
        assert rel_err(g, w) <= tol, f"{name} {rel_err(g, w):.2e}"


MARGINS = {
    k: EMULATED_MARGINS[k] for k in ("softmax", "l2softmax", "sphereface", "cosface", "arcface", "combined_continuous")
}


@pytest.mark.parametrize("name", list(MARGINS))
def test_float64_matches_reference_over_several_chunks(emu, name):
    """C = 90 in chunks of 32, 32 and 26 (backward; the forward's are larger), ignored rows and
    label smoothing; the bias (Softmax) gets its gradient through the GEMM's extra column."""
    B, D, C = 20, 16, 90
    x, W, y, b = make_inputs(B, D, C, bias=name == "softmax", ignore=2)
    ws = budget_for(emu, 32, B, D, C, need_db=b is not None, normalize_w=MARGINS[name].config().normalize_w)
    grads_against_reference(emu, x, W, y, MARGINS[name], b, workspace=ws, label_smoothing=0.1)
    assert emu.last_plan()["chunks"] == 3  # the backward's plan


def test_statistics_match_the_cpu_op(emu):
    """lse, target logit, logit sum, best logit to 1e-12 and the argmax exactly, across chunks."""
    x, W, y, b = make_inputs(20, 16, 90, bias=True, ignore=2, requires_grad=False)
    args = (x, W, y, b, None, None, None, 90, 0, -100, *mo.ArcFace(s=30.0).config())
    got = emu.forward_any(*args, 0.0, CHUNKED, budget_for(emu, 16, 20, 16, 90, backward=False))
    want = _cpu.margin_ce_forward(*args)
    assert emu.last_plan()["chunks"] == 6
    for g, w in zip(got[:4], want[:4]):
        assert rel_err(g, w) <= 1e-12
    assert torch.equal(got[4], want[4])
    check_op_against_eager(got, None, args, None, None, 1e-10)


def test_subcenters_curricular_and_row_margins(emu):
    """Sub-centers (max over K = 3 inside a chunk), CurricularFace's hard negatives, and per-row
    ArcFace margins with their gradient."""
    B, D, C = 16, 12, 40
    x, W, y, _ = make_inputs(B, D, 3 * C, ignore=1)
    y = torch.where(y >= 0, y % C, y)
    ws = budget_for(emu, 16, B, D, C, K=3)
    grads_against_reference(emu, x, W, y, mo.SubCenterArcFace(K=3, s=30.0), workspace=ws)
    x, W, y, _ = make_inputs(B, D, C, ignore=1, seed=1)
    grads_against_reference(emu, x, W, y, mo.CurricularFace(s=30.0), workspace=ws)
    m = torch.linspace(0.1, 0.6, B, dtype=f64, requires_grad=True)
    loss = chunked_loss(emu, x, W, y, mo.ArcFace(s=30.0, m=m), workspace=ws)
    (dm,) = torch.autograd.grad(loss, [m])
    ref = reference.margin_cross_entropy(x, W, y, mo.ArcFace(s=30.0, m=m))
    (want,) = torch.autograd.grad(ref, [m])
    assert rel_err(loss, ref) <= 1e-10 and rel_err(dm, want) <= 1e-10


def test_chunk_boundaries(emu):
    """One class per chunk; a batch of one row; an empty batch; every row ignored."""
    x, W, y, _ = make_inputs(5, 8, 7)
    grads_against_reference(emu, x, W, y, mo.ArcFace(s=30.0), workspace=budget_for(emu, 1, 5, 8, 7))
    assert emu.last_plan()["classes"] == 1 and emu.last_plan()["chunks"] == 7
    x, W, y, _ = make_inputs(1, 8, 7, seed=2)
    grads_against_reference(emu, x, W, y, mo.CosFace(s=30.0), workspace=budget_for(emu, 3, 1, 8, 7))
    W = torch.randn(7, 8, dtype=f64)
    x0, y0 = torch.zeros(0, 8, dtype=f64), torch.zeros(0, dtype=torch.long)
    args = (x0, W, y0, None, None, None, None, 7, 0, -100, *mo.ArcFace().config())
    lse = emu.forward_any(*args, 0.0, CHUNKED, 0)[0]
    dx, dw, _, _ = emu.backward_any(None, None, None, lse, *args, [True, True, False, False], 0.0, CHUNKED, 0)
    assert lse.shape == (0,) and dx.shape == (0, 8) and float(dw.abs().max()) == 0.0
    x, W, y, _ = make_inputs(6, 8, 7, ignore=6, seed=3)
    loss = chunked_loss(emu, x, W, y, mo.ArcFace(s=30.0), reduction="sum")
    dx, dw = torch.autograd.grad(loss, [x, W])
    assert float(loss) == 0.0 and float(dx.abs().max()) == 0.0 and float(dw.abs().max()) == 0.0


def test_partial_fc_index_and_shard_offset(emu):
    """A shard's classes [offset, offset + C) with a sampled class_index: the gathered chunk copy
    against the CPU op, dW zero on the unsampled rows."""
    x, W, y, _ = make_inputs(12, 16, 60, ignore=1, requires_grad=False)
    index = torch.tensor(sorted(set(range(0, 60, 3)) | {int(v) % 60 for v in y if v >= 0}))
    y = torch.where(y >= 0, y + 100, y)
    args = (x, W, y, None, None, None, index, 400, 100, -100, *mo.ArcFace(s=30.0).config())
    got = emu.forward_any(*args, 0.0, CHUNKED, budget_for(emu, 8, 12, 16, index.numel(), backward=False))
    assert emu.last_plan()["copy_w"]
    want = _cpu.margin_ce_forward(*args)
    assert all(rel_err(g, w) <= 1e-12 for g, w in zip(got[:4], want[:4])) and torch.equal(got[4], want[4])
    g = [torch.randn(12, dtype=f64, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    ws = budget_for(emu, 8, 12, 16, index.numel())
    dx, dw, _, _ = emu.backward_any(*g, want[0], *args, [True, True, False, False], 0.0, CHUNKED, ws)
    rdx, rdw, _, _ = _cpu.margin_ce_backward(*g, want[0], *args, [True, True, False, False])
    assert rel_err(dx, rdx) <= 1e-12 and rel_err(dw, rdw) <= 1e-12
    check_op_against_eager(got, (dx, dw, None, None), args, g, [True, True, False, False], 1e-10)
    unsampled = torch.ones(60, dtype=torch.bool)
    unsampled[index] = False
    assert float(dw[unsampled].abs().max()) == 0.0


@pytest.mark.parametrize(
    "dtype, wdtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float16, torch.float32)]
)
def test_16_bit_within_twice_eager(emu, dtype, wdtype):
    """16-bit products accumulate in float32, G is 16-bit (scaled for float16), the target's
    gradient exact: error against float64 within twice eager PyTorch's in the dtype."""
    margin = mo.ArcFace(s=64.0)
    x, W, y, _ = make_inputs(32, 32, 200, requires_grad=False)
    xl, Wl = x.to(dtype).requires_grad_(), W.to(wdtype).requires_grad_()
    loss = chunked_loss(emu, xl, Wl, y, margin, workspace=budget_for(emu, 64, 32, 32, 200, dtype=dtype, wdtype=wdtype))
    dx, dw = torch.autograd.grad(loss, [xl, Wl])
    assert dx.dtype == dtype and dw.dtype == wdtype
    x64, W64 = xl.detach().double().requires_grad_(), Wl.detach().double().requires_grad_()
    truth = reference.margin_cross_entropy(x64, W64, y, margin)
    tdx, tdw = torch.autograd.grad(truth, [x64, W64])
    xe, We = xl.detach().clone().requires_grad_(), Wl.detach().to(dtype).requires_grad_()
    eager = reference.margin_cross_entropy(xe, We, y, margin)
    edx, edw = torch.autograd.grad(eager, [xe, We])
    for what, f, e in (
        ("loss", rel_err(loss, truth), rel_err(eager, truth)),
        ("dx", rel_err(dx, tdx), rel_err(edx, tdx)),
        ("dW", rel_err(dw, tdw), rel_err(edw, tdw)),
    ):
        assert f <= 2 * e + 1e-6, f"{what}: chunked {f:.2e} vs eager {dtype} {e:.2e}"


def test_float16_gradients_not_flushed_at_large_c(emu):
    """float16 features with float32 weights (insightface's fp16 training), mean reduction, at a C
    where most non-target gradients p/B lie below float16's smallest normal (6.1e-5) and many
    below its smallest subnormal: dW of every class row that float32 eager gives a gradient within
    1% of float64 (per row), where a G holding p/B in float16 would lose them."""
    B, D, C = 4, 16, 3000
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g, dtype=f64)
    W = torch.randn(C, D, generator=g, dtype=f64)
    y = torch.randint(0, C, (B,), generator=g)
    margin = mo.CosFace(s=16.0)
    xh, Wf = x.half().requires_grad_(), W.float().requires_grad_()
    _, dw = torch.autograd.grad(chunked_loss(emu, xh, Wf, y, margin), [xh, Wf])
    x64, W64 = xh.detach().double().requires_grad_(), Wf.detach().double().requires_grad_()
    (tdw,) = torch.autograd.grad(reference.margin_cross_entropy(x64, W64, y, margin), [W64])
    x32, W32 = xh.detach().float().requires_grad_(), Wf.detach().clone().requires_grad_()
    (edw,) = torch.autograd.grad(reference.margin_cross_entropy(x32, W32, y, margin), [W32])
    live = edw.abs().amax(dim=1) > 0
    tiny = tdw.abs().amax(dim=1) < 6.1e-5 / 16
    assert int((live & tiny).sum()) > C // 8  # the case is really the small-gradient one
    per_row = (dw.double() - tdw).norm(dim=1) / tdw.norm(dim=1)
    assert float(per_row[live].max()) < 1e-2, float(per_row[live].max())


def test_workspace_budget_and_launch_count(emu):
    """The plan stays within the budget; at B = 1024, D = 512, C = 1M, bfloat16, ArcFace the
    default 64 MiB gives chunks of thousands of classes and at most 1,000 launches for a forward
    and backward; the launch formula matches what an emulated run issues."""
    MiB = 1 << 20
    for backward in (False, True):
        for budget in (4 * MiB, 64 * MiB):
            plan = emu.plan(
                1024,
                512,
                1_000_000,
                1,
                torch.bfloat16,
                torch.bfloat16,
                True,
                False,
                backward,
                False,
                budget,
                True,
                True,
            )
            assert plan["total"] + (2 * 1024 * 8 if backward else 0) <= budget, plan
    fwd = emu.plan(1024, 512, 1_000_000, 1, torch.bfloat16, torch.bfloat16, True, False, False, False, 0, True, True)
    bwd = emu.plan(1024, 512, 1_000_000, 1, torch.bfloat16, torch.bfloat16, True, False, True, False, 0, True, True)
    assert fwd["classes"] >= 8192 and bwd["classes"] >= 8192 and fwd["classes"] % 64 == 0
    assert fwd["launches"] + bwd["launches"] <= 1000, (fwd, bwd)
    mixed = emu.plan(1024, 512, 1_000_000, 1, torch.bfloat16, torch.float32, True, False, True, False, 0, True, True)
    assert mixed["copy_w"] and mixed["total"] + 2 * 1024 * 8 <= 64 * MiB
    x, W, y, _ = make_inputs(10, 8, 50, requires_grad=False)
    args = (x, W, y, None, None, None, None, 50, 0, -100, *mo.ArcFace(s=30.0).config())
    ws = budget_for(emu, 16, 10, 8, 50)
    before = emu.launches()
    lse = emu.forward_any(*args, 0.0, CHUNKED, ws)[0]
    mid = emu.launches()
    emu.backward_any(torch.ones(10, dtype=f64), None, None, lse, *args, [True, True, False, False], 0.0, CHUNKED, ws)
    after = emu.launches()
    assert mid - before == emu.plan(10, 8, 50, 1, f64, f64, True, False, False, False, ws, True, True)["launches"]
    assert after - mid == emu.plan(10, 8, 50, 1, f64, f64, True, False, True, False, ws, True, True)["launches"]


def test_grad_skip_is_exact_in_the_chunked_backend(emu):
    x, W, y, _ = make_inputs(8, 8, 30, requires_grad=False)
    args = (x, W, y, None, None, None, None, 30, 0, -100, *mo.ArcFace(s=30.0).config())
    lse = emu.forward_any(*args, 0.0, CHUNKED, 0)[0]
    g = torch.ones(8, dtype=f64)
    exact = emu.backward_any(g, -g, None, lse, *args, [True, True, False, False], 0.0, CHUNKED, 0)
    skip = emu.backward_any(g, -g, None, lse, *args, [True, True, False, False], 0.5, CHUNKED, 0)
    assert torch.equal(exact[0], skip[0]) and torch.equal(exact[1], skip[1])


def test_backend_argument_on_the_cpu():
    x, W, y, _ = make_inputs(4, 8, 10)
    assert mo.backends()["cpu"] == "tiled"
    for backend in ("chunked", "tiles"):
        with pytest.raises(ValueError, match=f"backend='{backend}' runs on CUDA only, but x is on cpu"):
            mo.margin_cross_entropy(x, W, y, mo.ArcFace(), backend=backend)
        with pytest.raises(ValueError, match=f"the {backend} backend runs on CUDA only"):
            _cpu.margin_ce_forward(
                x,
                W,
                y,
                None,
                None,
                None,
                None,
                10,
                0,
                -100,
                *mo.ArcFace().config(),
                0.0,
                mo.options.BACKENDS[backend],
                0,
            )
    with pytest.raises(ValueError, match="backend must be one of"):
        mo.margin_cross_entropy(x, W, y, mo.ArcFace(), backend="cublas")
    with pytest.raises(ValueError, match="workspace_bytes must be a positive int"):
        mo.MarginHead(8, 10, mo.ArcFace(), workspace_bytes=-1)
    auto = mo.margin_cross_entropy(x, W, y, mo.ArcFace(), backend="auto", workspace_bytes=1 << 20)
    assert rel_err(auto, reference.margin_cross_entropy(x, W, y, mo.ArcFace())) <= 1e-12


def test_tf32_only_when_torch_allows_it(emu):
    """float32 products are exact unless torch.backends.cuda.matmul.allow_tf32 is set (the switch
    cuBLAS reads); then TF32 (emulated as cvt.rna rounding of the GEMM operands): worse than exact
    but within twice eager float16's error, which has the same 10-bit mantissa."""
    margin = mo.ArcFace(s=30.0)
    x, W, y, _ = make_inputs(32, 32, 120, dtype=torch.float32)
    x64, W64 = x.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    truth = reference.margin_cross_entropy(x64, W64, y, margin)
    tdx, tdw = torch.autograd.grad(truth, [x64, W64])
    xh, Wh = x.detach().half().requires_grad_(), W.detach().half().requires_grad_()
    eager = reference.margin_cross_entropy(xh, Wh, y, margin)
    eager_errs = [rel_err(eager, truth)] + [
        rel_err(g, t) for g, t in zip(torch.autograd.grad(eager, [xh, Wh]), (tdx, tdw))
    ]

    def errors():
        loss = chunked_loss(emu, x, W, y, margin)
        dx, dw = torch.autograd.grad(loss, [x, W])
        return [rel_err(loss, truth), rel_err(dx, tdx), rel_err(dw, tdw)]

    # the target logit is computed exactly in float32 whatever the GEMMs do: the loss moves less
    # (8.7x here) than the gradients (over 1000x)
    check_tf32(errors, eager_errs, taken=(5, 10, 10))


def test_interclass_filter_and_straight_through(emu):
    """insightface's options in the chunked kernels' entry() and target terms."""
    x, W, y, b = make_inputs(40, 8, 90, bias=True, ignore=2)
    margin = mo.ArcFace(s=30.0, m=0.45, policy="none", straight_through=True, interclass_filtering_threshold=0.25)
    grads_against_reference(emu, x, W, y, margin, b, tol=1e-12)
