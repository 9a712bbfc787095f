"""Confident rows. Without a margin (Softmax, WeightNormSoftmax, L2Softmax, NormFace: ψ(c) = c)
the target logit is an ordinary logit, α_i β_y (x_i · W_y) + bias_y, and must be the very entry
the log-sum-exp saw. Rebuilt as ‖x‖‖W‖·(u / (‖x‖‖W‖)) it would round differently: a confident
row's loss lse − z_iy would come out negative (down to −1e-4 in float32, growing with the
logits), and a weight row whose float32 norm overflows (‖W_y‖² past 3.4e38 while every product
x·W_y is finite) would give NaN where the reference is finite.

The loss of every row is ≥ 0 and within float32 rounding of the float64 reference
(marginops.reference on the same float32 inputs, widened), rows whose target logit lies 1e4
above all others included (loss exactly 0, as in float64): the CPU op at sizes crossing its row
blocks, class tiles and chunks with 1 and 2 threads, and both CUDA backends under the emulation
(tests/cuda_emu)."""

import pytest
import torch
from helpers import emulated_loss, rel_err

import marginops as mo
from marginops import reference

f64, f32 = torch.float64, torch.float32
EPS32 = torch.finfo(f32).eps
ROW_BLOCK, CLASS_TILE = 256, 256  # csrc/cpu/margin_ce_cpu.cpp: kRowBlock, kClassTile


def confident_inputs(B, C, D, seed=0, top_gap=1e4):
    """float32 x, W and labels whose target logit (Softmax) lies gap_i above every other logit of
    row i, gap_i spread log-uniformly over [1e-2, top_gap] (the last rows exactly top_gap), so the
    loss runs from ~0.7 down to exactly 0."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(C, D, generator=g, dtype=f64)
    direction = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=f64), dim=1)
    z = direction @ W.T
    top2 = z.topk(2, dim=1).values
    y = z.argmax(dim=1)  # each row's label: the class its direction points at most
    gap = torch.logspace(-2, torch.log10(torch.tensor(top_gap)).item(), B, dtype=f64)
    x = direction * (gap / (top2[:, 0] - top2[:, 1]))[:, None]
    return x.to(f32), W.to(f32), y


def check_confident(loss_fn, margin, x, W, y):
    """Every row's float32 loss ≥ 0 and within float32 rounding of the float64 reference: half an
    ulp of the row's lse (the loss is lse − z_iy, both float32), the logits' rounding (a few ulps
    of the row's largest Σ_d |x_d W_d|, scaled by the probability mass off the target, which is
    what the loss measures) and the log's."""
    got = loss_fn(x, W, y, margin).detach()
    assert got.dtype == f32
    want = reference.margin_cross_entropy(x.double(), W.double(), y, margin, reduction="none").detach()
    assert bool((got >= 0).all()), (
        f"negative losses: {got[got < 0][:6].tolist()} (rows {(got < 0).nonzero()[:6].flatten().tolist()})"
    )
    cfg = margin.config()
    xs = cfg.s * torch.nn.functional.normalize(x.double(), dim=1) if cfg.normalize_x else x.double()
    Ws = torch.nn.functional.normalize(W.double(), dim=1) if cfg.normalize_w else W.double()
    scale = xs.abs() @ Ws.abs().T  # Σ_d |x_d W_d|: what bounds a float32 product's rounding
    zmax = (xs @ Ws.T).max(dim=1).values.abs()  # |lse| within log C of it
    bound = EPS32 * (zmax + 8) + 8 * EPS32 * scale.max(dim=1).values * torch.clamp(want, max=1.0) + 4 * EPS32 * want
    err = (got.double() - want).abs()
    assert bool((err <= bound).all()), (
        f"worst row {int((err / bound).argmax())}: {float((err / bound).max()):.1f}× the rounding bound"
    )
    return got, want


MARGINS = {
    "softmax": mo.Softmax(),
    "weightnorm": mo.WeightNormSoftmax(),
    "l2softmax": mo.L2Softmax(s=64.0),
    "normface": mo.NormFace(s=64.0),
}


def cpu_loss(x, W, y, margin):
    return mo.margin_cross_entropy(x, W, y, margin, reduction="none")


@pytest.mark.parametrize("name", list(MARGINS))
def test_cpu_op_confident_rows_never_negative(name, threads):
    B, C, D = 2 * ROW_BLOCK + 37, 4 * CLASS_TILE + 45, 16
    x, W, y = confident_inputs(B, C, D)
    got, want = check_confident(cpu_loss, MARGINS[name], x, W, y)
    if name == "softmax":  # the rows 1e4 above the rest: exactly 0, as in float64
        assert float(want[-1]) == 0.0 and float(got[-1]) == 0.0


@pytest.mark.parametrize("D", [16, 400], ids=["norm1e18", "norm_overflows"])
def test_huge_target_row_gives_the_reference_finite_result(D, threads):
    """‖W_y‖ = 1e18 (D = 16), and W_y = 1e18 in each of D = 400 components, whose float32 norm
    overflows to inf while every product x·W_y stays finite: loss and gradients as the float64
    reference, finite, in float32 (Softmax; rows on both sides of the huge class)."""
    B, C = 2 * ROW_BLOCK + 5, 2 * CLASS_TILE + 40
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, D, generator=g, dtype=f64)
    W = torch.randn(C, D, generator=g, dtype=f64)
    y = torch.randint(0, C, (B,), generator=g)
    big = CLASS_TILE + 3
    W[big] = torch.sign(torch.randn(D, generator=g, dtype=f64)) * (1e18 / D**0.5 if D == 16 else 1e18)
    y[::3] = big  # a third of the rows take the huge class: z_iy = ±1e19 or so
    x32, W32 = x.float().requires_grad_(), W.float().requires_grad_()
    got = mo.margin_cross_entropy(x32, W32, y, mo.Softmax(), reduction="none")
    gx, gw = torch.autograd.grad(got.sum(), [x32, W32])
    x64, W64 = x32.detach().double().requires_grad_(), W32.detach().double().requires_grad_()
    want = reference.margin_cross_entropy(x64, W64, y, mo.Softmax(), reduction="none")
    wx, ww = torch.autograd.grad(want.sum(), [x64, W64])
    assert bool(want.isfinite().all()) and bool(wx.isfinite().all()) and bool(ww.isfinite().all())
    assert bool(got.isfinite().all()) and bool((got >= 0).all())
    assert rel_err(got, want) <= 1e-6
    for name, a, b in (("dx", gx, wx), ("dW", gw, ww)):
        assert bool(a.isfinite().all()), name
        assert rel_err(a, b) <= 1e-5, f"{name}: {rel_err(a, b):.2e}"
    rows = y == big
    assert rel_err(gx[rows], wx[rows]) <= 1e-5


# -- the CUDA backends under the emulation ---------------------------------------------------------


@pytest.mark.parametrize("backend", ["chunked", "fused"])
def test_cuda_backends_emulated_confident_rows(emu, backend):
    """Softmax and NormFace (s = 64) rows up to 1e4 above the rest, over several chunks (chunked)
    or class splits (fused); then the overflowing-norm class, loss and gradients finite as the
    reference."""
    from helpers import budget_for

    code = {"chunked": 1, "fused": 2}[backend]
    B, C, D = 24, 150, 16
    x, W, y = confident_inputs(B, C, D)
    for margin in (mo.Softmax(), mo.NormFace(s=64.0)):
        ws = (
            budget_for(emu, 32, B, D, C, dtype=f32, wdtype=f32, normalize_w=margin.config().normalize_w)
            if code == 1
            else 0
        )

        def loss_fn(x, W, y, margin, ws=ws):
            return emulated_loss(emu, code, x, W, y, margin, reduction="none", workspace=ws)

        got, want = check_confident(loss_fn, margin, x, W, y)
        if code == 1:
            assert emu.last_plan()["chunks"] >= 2

    D = 400
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, D, generator=g, dtype=f64)
    W = torch.randn(C, D, generator=g, dtype=f64)
    y = torch.randint(0, C, (B,), generator=g)
    W[70] = torch.sign(torch.randn(D, generator=g, dtype=f64)) * 1e18
    y[::3] = 70
    x32, W32 = x.float().requires_grad_(), W.float().requires_grad_()
    ws = budget_for(emu, 32, B, D, C, dtype=f32, wdtype=f32, normalize_w=False) if code == 1 else 0
    got = emulated_loss(emu, code, x32, W32, y, mo.Softmax(), reduction="none", workspace=ws)
    gx, gw = torch.autograd.grad(got.sum(), [x32, W32])
    x64, W64 = x32.detach().double().requires_grad_(), W32.detach().double().requires_grad_()
    want = reference.margin_cross_entropy(x64, W64, y, mo.Softmax(), reduction="none")
    wx, ww = torch.autograd.grad(want.sum(), [x64, W64])
    assert bool(got.isfinite().all()) and bool((got >= 0).all()), got
    assert rel_err(got, want) <= 1e-6
    for name, a, b in (("dx", gx, wx), ("dW", gw, ww)):
        assert bool(a.isfinite().all()), name
        assert rel_err(a, b) <= 1e-5, f"{name}: {rel_err(a, b):.2e}"
