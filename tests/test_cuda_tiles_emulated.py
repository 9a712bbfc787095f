"""The CUDA kernels' source (csrc/cuda/tiles/tile_kernels.cu) and launcher (tiles/tile_launch.h), built for
the CPU emulation in tests/cuda_emu and compared with the CPU op and with the op's semantics
written out eagerly (helpers.eager_op_outputs, which shares no code with csrc: the CPU op and
the kernels share csrc/margin_math.h, so agreeing with each other is not enough), and with the
eager reference through autograd. This checks their indexing,
tiling, class splits, reductions, epilogues and backward formulas on machines without a GPU;
what it cannot check (timing, shared-memory limits, real tensor-core rounding) needs the device:
tests/test_cuda.py and scripts/gpu-check."""

import pytest
import torch
from helpers import (
    EMULATED_MARGINS,
    check_op_against_eager,
    check_tf32,
    emulated_loss,
    make_inputs,
    rel_err,
    skip_inputs,
    skipped_reference,
    tiles,
)

import marginops as mo
from marginops import ops, reference

f64 = torch.float64
_cpu = torch.ops.marginops


def op_args(x, W, y, b, margin, rm=None, cur=None, ci=None, num_classes=None, offset=0):
    return (
        x,
        W,
        y,
        b,
        rm,
        cur,
        ci,
        num_classes or W.shape[0] // margin.config().subcenters,
        offset,
        -100,
        *margin.config(),
    )


def compare(emu, args, tol, grads=True):
    fwd_e, fwd_c = emu.forward(*args), _cpu.margin_ce_forward(*args)
    for name, e, c in zip(("lse", "target_logit", "logit_sum", "best_logit"), fwd_e[:4], fwd_c[:4]):
        assert rel_err(e, c) <= tol, f"forward {name}: {rel_err(e, c):.2e}"
    assert torch.equal(fwd_e[4], fwd_c[4]), "best class"
    if not grads:
        check_op_against_eager(fwd_e, None, args, None, None, max(tol, 1e-10))
        return
    B = args[0].shape[0]
    acc = ops.acc_dtype(args[0], args[1])
    g = [torch.randn(B, dtype=acc, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    mask = [True, True, args[3] is not None, args[4] is not None]
    bwd_e = emu.backward(*g, fwd_c[0], *args, mask)
    bwd_c = _cpu.margin_ce_backward(*g, fwd_c[0], *args, mask)
    for name, e, c, used in zip(("dx", "dW", "dbias", "dmargins"), bwd_e, bwd_c, mask):
        if used:
            assert e.dtype == c.dtype and e.shape == c.shape, name
            assert rel_err(e, c) <= tol, f"backward {name}: {rel_err(e, c):.2e}"
    # and both against the op's semantics written out eagerly (no code shared with csrc)
    check_op_against_eager(fwd_e, bwd_e, args, g, mask, max(tol, 1e-10))


MARGINS = EMULATED_MARGINS


@pytest.mark.parametrize("name", list(MARGINS))
def test_float64_matches_cpu(emu, name):
    x, W, y, b = make_inputs(70, 40, 150, bias=True, ignore=3, requires_grad=False)
    compare(emu, op_args(x, W, y, b, MARGINS[name]), 1e-12)


@pytest.mark.parametrize("name", ["softmax", "sphereface", "arcface", "combined_continuous"])
def test_float64_matches_reference(emu, name):
    """Loss and gradients of the fused backend against the eager reference (which shares no code
    with the kernels), with a bias, ignored rows and label smoothing."""
    x, W, y, b = make_inputs(37, 24, 150, bias=True, ignore=3)
    margin = MARGINS[name]
    loss = emulated_loss(emu, 2, x, W, y, margin, b, label_smoothing=0.1)
    got = torch.autograd.grad(loss, [x, W, b])
    ref = reference.margin_cross_entropy(x, W, y, margin, b, label_smoothing=0.1)
    want = torch.autograd.grad(ref, [x, W, b])
    assert rel_err(loss, ref) <= 1e-10
    for what, g, w in zip(("dx", "dW", "dbias"), got, want):
        assert rel_err(g, w) <= 1e-10, f"{what}: {rel_err(g, w):.2e}"


@pytest.mark.parametrize("sms", [1, 3, 50])
def test_class_splits_and_d_slabs(emu, sms):
    """Split counts from 1 to many (the SM count sets them); D = 600 spans two dx/dW slabs."""
    emu.set_sm_count(sms)
    try:
        x, W, y, b = make_inputs(37, 600, 300, bias=True, ignore=2, requires_grad=False)
        compare(emu, op_args(x, W, y, b, mo.ArcFace(s=30.0)), 1e-12)
    finally:
        emu.set_sm_count(4)


def test_subcenters_curricular_and_row_margins(emu):
    x, W, y, _ = make_inputs(40, 24, 3 * 50, ignore=2, requires_grad=False)
    y = torch.where(y >= 0, y % 50, y)
    compare(emu, op_args(x, W, y, None, mo.SubCenterArcFace(K=3, s=30.0)), 1e-12)
    x, W, y, b = make_inputs(40, 24, 90, bias=True, ignore=2, requires_grad=False)
    cur = torch.stack([torch.linspace(-0.6, 0.6, 40, dtype=f64), torch.full((40,), 0.2, dtype=f64)], 1)
    compare(emu, op_args(x, W, y, b, mo.CurricularFace(s=30.0), cur=cur), 1e-12)
    rm = torch.stack([torch.ones(40), torch.linspace(-0.2, 0.6, 40), torch.linspace(0, 0.3, 40)], 1).double()
    compare(emu, op_args(x, W, y, b, mo.CombinedMargin(s=30.0, m2=0.1, policy="clip"), rm=rm), 1e-12)


def test_shards_and_class_index(emu):
    x, W, y, b = make_inputs(33, 16, 80, bias=True, ignore=4, requires_grad=False)
    y = torch.where(y >= 0, y + 100, y)  # classes [100, 180) of 300
    compare(emu, op_args(x, W, y, b, mo.ArcFace(s=30.0), num_classes=300, offset=100), 1e-12)
    idx = torch.tensor(sorted(set(range(0, 80, 3)) | set((y[y >= 0] - 100).tolist())))
    compare(emu, op_args(x, W, y, b, mo.CosFace(s=30.0), ci=idx, num_classes=300, offset=100), 1e-12)


def test_float32_runs_exact_on_cuda_cores(emu):
    x, W, y, b = make_inputs(50, 48, 130, dtype=torch.float32, bias=True, ignore=1, requires_grad=False)
    compare(emu, op_args(x, W, y, b, mo.ArcFace(s=30.0)), 2e-5)


@pytest.mark.parametrize(
    "margin",
    [mo.ArcFace(s=30.0), mo.Softmax(), mo.SubCenterArcFace(K=3, s=30.0)],
    ids=["arcface", "softmax", "subcenter"],
)
def test_grad_skip_drops_exactly_the_negligible_tiles(emu, margin):
    """The kernels' block vote and sparse label updates against float64 eager with the negligible
    tiles' non-label ∂L/∂z zeroed (dx tiles 32 × 64, dW tiles 64 × 32 weight rows), at a
    threshold that skips about half of them."""
    K = margin.config().subcenters
    x, W, y = skip_inputs("cpu", 70, 600, K=K)
    ref_dx, ref_dw, threshold, skipped = skipped_reference(x, W, y, margin, tiles("cuda", K))
    assert 0.2 < skipped < 0.8
    args = op_args(x.detach(), W.detach(), y, None, margin)
    lse = emu.forward(*args)[0]
    valid = (y >= 0).double()
    gl = valid / valid.sum()
    dx, dw, _, _ = emu.backward(gl, -gl, None, lse, *args, [True, True, False, False], grad_skip=threshold)
    assert rel_err(dx, ref_dx) < 1e-10 and rel_err(dw, ref_dw) < 1e-10
    exact = emu.backward(gl, -gl, None, lse, *args, [True, True, False, False])
    assert rel_err(dx, exact[0]) > 1e-9 and rel_err(dw, exact[1]) > 1e-9, "nothing was skipped"


def test_float32_runs_as_tf32_only_when_torch_allows_it(emu):
    """With torch.backends.cuda.matmul.allow_tf32 the float32 products take the (emulated) TF32
    tensor-core path: rounded (worse than exact float32) but within twice eager float16's error,
    which has the same 10-bit mantissa."""
    x, W, y, _ = make_inputs(64, 64, 200, dtype=torch.float32, requires_grad=False)
    args = op_args(x, W, y, None, mo.ArcFace(s=30.0))
    x64, W64 = x.double().requires_grad_(), W.double().requires_grad_()
    truth = reference.margin_cross_entropy(x64, W64, y, mo.ArcFace(s=30.0), reduction="sum")
    tdx, tdw = torch.autograd.grad(truth, [x64, W64])
    xh, Wh = x.half().requires_grad_(), W.half().requires_grad_()
    eager = reference.margin_cross_entropy(xh, Wh, y, mo.ArcFace(s=30.0), reduction="sum")
    edx, edw = torch.autograd.grad(eager, [xh, Wh])
    eager_errs = [rel_err(eager, truth), rel_err(edx, tdx), rel_err(edw, tdw)]

    def errors():
        lse, zt, _, _, _ = emu.forward(*args)
        g = torch.ones(64)
        dx, dw, _, _ = emu.backward(g, -g, None, lse, *args, [True, True, False, False])
        return [rel_err((lse - zt)[y >= 0].sum(), truth), rel_err(dx, tdx), rel_err(dw, tdw)]

    check_tf32(errors, eager_errs)


@pytest.mark.parametrize(
    "dtype, wdtype",
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
)
@pytest.mark.parametrize("name", ["softmax", "arcface", "sphereface"])
def test_tensor_core_paths_within_twice_eager(emu, dtype, wdtype, name):
    """16-bit features run their products on (emulated) tensor cores, G in 16 bits as P·V in
    flash-attention: the error against float64 stays within twice eager PyTorch's in the dtype."""
    margin = {"arcface": mo.ArcFace(s=64.0), "softmax": mo.Softmax(), "sphereface": mo.SphereFace()}[name]
    x, W, y, _ = make_inputs(64, 64, 200, requires_grad=False)
    if name != "arcface":
        W = W * 0.05
    xl, Wl = x.to(dtype), W.to(wdtype)
    args = op_args(xl, Wl, y, None, margin)
    lse, zt, zsum, _, _ = emu.forward(*args)
    loss_e = (lse - zt).mean()
    g = torch.full((64,), 1.0 / 64)
    dx_e, dw_e, _, _ = emu.backward(g, -g, None, lse, *args, [True, True, False, False])
    assert dx_e.dtype == dtype and dw_e.dtype == wdtype
    x64, W64 = xl.double().requires_grad_(), Wl.double().requires_grad_()
    truth = reference.margin_cross_entropy(x64, W64, y, margin)
    tdx, tdw = torch.autograd.grad(truth, [x64, W64])
    xe, We = xl.clone().requires_grad_(), Wl.to(dtype).clone().requires_grad_()
    eager = reference.margin_cross_entropy(xe, We, y, margin)
    edx, edw = torch.autograd.grad(eager, [xe, We])
    for what, f, e in (
        ("loss", rel_err(loss_e, truth), rel_err(eager, truth)),
        ("dx", rel_err(dx_e, tdx), rel_err(edx, tdx)),
        ("dW", rel_err(dw_e, tdw), rel_err(edw, tdw)),
    ):
        assert f <= 2 * e + 1e-6, f"{what}: emulated CUDA {f:.2e} vs eager {dtype} {e:.2e}"


def test_edge_cases(emu):
    W = torch.randn(20, 8, dtype=f64)
    empty = emu.forward(*op_args(torch.zeros(0, 8, dtype=f64), W, torch.zeros(0, dtype=torch.long), None, mo.ArcFace()))
    assert empty[0].shape == (0,)
    lse = empty[0]
    dx, dw, _, _ = emu.backward(
        None,
        None,
        None,
        lse,
        *op_args(torch.zeros(0, 8, dtype=f64), W, torch.zeros(0, dtype=torch.long), None, mo.ArcFace()),
        [True, True, False, False],
    )
    assert dx.shape == (0, 8) and float(dw.abs().max()) == 0.0
    x, W, y, _ = make_inputs(9, 8, 20, ignore=9, requires_grad=False)  # every row ignored
    compare(emu, op_args(x, W, y, None, mo.ArcFace(s=30.0)), 1e-12)
    # a bad label: checked by the kernels, raised by the next call or check_errors
    # (tests/test_cuda_device_checks_emulated.py)
    emu.forward(*op_args(x, W, torch.full((9,), 25), None, mo.ArcFace()))
    with pytest.raises(ValueError, match=r"labels\[\d\] = 25 is out of range"):  # one of the nine
        emu.check_errors()
    with pytest.raises(ValueError, match="x is float32 but weight is bfloat16: use equal dtypes"):
        emu.forward(*op_args(x.float(), W.to(torch.bfloat16), y, None, mo.ArcFace()))


def test_psi_and_topk(emu):
    c = torch.linspace(-1, 1, 301, dtype=f64)
    ones = torch.ones_like(c)
    for kind, policy in ((1, 0), (1, 3), (1, 4), (2, 2)):
        m1 = ones * (4.0 if kind == 2 else 1.0)
        out_e = emu.psi(c, m1, ones * 0.5, ones * 0.1, kind, policy, 0.3)
        out_c = _cpu.margin_psi(c, m1, ones * 0.5, ones * 0.1, kind, policy, 0.3)
        for e, r in zip(out_e, out_c):
            assert torch.equal(e, r)
    # and ψ written out, inside the clamp: cos(θ + m2) − m3 (policy none), and the fallback
    # c − m3 − m2·sin m2 past π
    c = torch.linspace(-0.999, 0.999, 301, dtype=f64)
    theta = torch.acos(c)
    none = emu.psi(c, ones, ones * 0.5, ones * 0.1, 1, 2, 0.0)[0]
    assert rel_err(none, torch.cos(theta + 0.5) - 0.1) <= 1e-12
    fallback = emu.psi(c, ones, ones * 0.5, ones * 0.1, 1, 0, 0.0)[0]
    want = torch.where(
        theta + 0.5 > torch.pi, c - 0.1 - 0.5 * torch.sin(torch.tensor(0.5, dtype=f64)), torch.cos(theta + 0.5) - 0.1
    )
    assert rel_err(fallback, want) <= 1e-12
    x, W, _, b = make_inputs(30, 16, 2 * 100, bias=False, requires_grad=False)
    bias = torch.randn(100, dtype=f64)
    ve, ce = emu.topk(x, W, bias, None, 7, 0, True, True, 30.0, 2)
    vc, cc = _cpu.margin_topk(x, W, bias, None, 7, 0, True, True, 30.0, 2)
    assert rel_err(ve, vc) <= 1e-12 and torch.equal(ce, cc)
    # written out: 30·cos of the best of each class's 2 sub-centers, plus the bias, top 7
    cos = (x / x.norm(dim=1, keepdim=True)) @ (W / W.norm(dim=1, keepdim=True)).T
    want = (30.0 * cos.view(30, 100, 2).amax(2) + bias).topk(7, dim=1)
    assert rel_err(ve, want.values) <= 1e-12 and torch.equal(ce, want.indices)


def test_interclass_filter_and_straight_through(emu):
    """insightface's options in the fused kernels' entry() and target terms."""
    x, W, y, b = make_inputs(50, 8, 120, bias=True, ignore=2, requires_grad=False)
    margin = mo.CombinedMargin(s=30.0, m2=0.4, policy="none", straight_through=True, interclass_filtering_threshold=0.2)
    compare(emu, op_args(x, W, y, b, margin), 1e-12)
