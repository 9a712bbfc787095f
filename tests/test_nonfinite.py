"""Non-finite values are data (docs/design.md, "Non-finite values"). A NaN or ±Inf in x, in a weight
row that is no row's label, or a −inf bias reaches the loss and the gradients exactly as it does
through eager logits and torch.nn.functional.cross_entropy: the expected values are
marginops.reference on the same inputs (it materializes the logits), compared entry by entry —
the same NaN positions, the same ±Inf positions, the finite entries equal within rounding.

The CPU op runs at sizes that cross its row blocks, class tiles and per-thread chunks (the bad
class lies in the fourth tile of five, so with 2 threads it is in the second chunk) with
torch.set_num_threads 1 and 2: a max that drops a NaN would give loss −inf with one thread (then
log(0)), and a merge that drops a chunk whose sum is NaN a finite loss over the other chunk's
classes with two. Both CUDA backends run the same cases under the CPU emulation
(tests/cuda_emu), the fused one over several class splits, the chunked one over several chunks.
check_finite=True still names the first bad row instead."""

import re

import pytest
import torch
from helpers import emulated_loss, rel_err

import marginops as mo
from marginops import reference

f64 = torch.float64
ROW_BLOCK, CLASS_TILE = 256, 256  # csrc/cpu/margin_ce_cpu.cpp: kRowBlock, kClassTile
B, C, D = 2 * ROW_BLOCK + 37, 4 * CLASS_TILE + 45, 16
BAD = 3 * CLASS_TILE + 10  # a class of the fourth tile, no row's label
NAN, INF = float("nan"), float("inf")


def inputs(B, C, D, bad, dtype=f64, seed=0):
    """x, W, labels (none in [bad − 4, bad + 12), two ignored rows) and a bias; finite, drawn in
    float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=f64)
    W = torch.randn(C, D, generator=g, dtype=f64)
    lo, hi = max(bad - 4, 0), min(bad + 12, C)
    y = torch.randint(0, C - (hi - lo), (B,), generator=g)
    y = torch.where(y >= lo, y + (hi - lo), y)
    y[1] = y[B - 2] = -100
    b = torch.randn(C, generator=g, dtype=f64)
    return x.to(dtype), W.to(dtype), y, b.to(dtype)


def spoil(case, x, W, b, bad):
    """The non-finite values of each case, put in place. Returns whether the bias is used."""
    if case == "nan_weight":  # every logit of class `bad` NaN: every row's loss NaN
        W[bad, 3] = NAN
    elif case == "inf_weight":  # ±inf logits by the sign of x[:, 3]: NaN rows and finite rows
        W[bad, 3] = INF
    elif case == "neg_inf_weight":  # x[:, 3] > 0: class `bad` gets logit −inf in every row (Softmax)
        W[bad, 3] = -INF
        x[:, 3] = x[:, 3].abs() + 0.1
    elif case == "nan_x":
        x[5, 2] = NAN
        x[-1, 0] = NAN
    elif case == "inf_x":
        x[7, 1] = INF
        x[-3, 0] = -INF
    elif case == "neg_inf_bias":  # masked classes: a run of them, the bad one among them
        b[bad - 4 : bad + 12] = -INF
        return True
    return False


def assert_like_reference(got, want, what, tol):
    """Same NaN, +inf and −inf positions as the reference; finite entries within tol (relative to
    the largest)."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, what
    for kind, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        g, w = test(got), test(want)
        assert torch.equal(g, w), (
            f"{what}: {kind} at {int(g.sum())} entries (first {g.nonzero()[:4].tolist()}), "
            f"the reference at {int(w.sum())} (first {w.nonzero()[:4].tolist()})"
        )
    finite = torch.isfinite(want)
    if finite.any():
        assert rel_err(got[finite], want[finite]) <= tol, f"{what}: {rel_err(got[finite], want[finite]):.2e}"


def check_case(loss_fn, case, margin, dtype, B, C, D, bad, tol, expect):
    """Loss (reduction none) and dx, dW (and dbias) of loss_fn against the reference. `expect`
    says what the reference must show, so that each case tests what it says."""
    x, W, y, b = inputs(B, C, D, bad, dtype)
    use_bias = spoil(case, x, W, b, bad)
    b = b if use_bias else None
    leaves = [t.requires_grad_() for t in (x, W, b) if t is not None]
    want = reference.margin_cross_entropy(x, W, y, margin, b, reduction="none")
    want_grads = torch.autograd.grad(want.sum(), leaves)
    got = loss_fn(x, W, y, margin, b)
    got_grads = torch.autograd.grad(got.sum(), leaves)
    rows = int((y != -100).sum())  # ignored rows have loss 0 (but eager's gradient there can be NaN)
    nan_rows = int(want.isnan().sum())
    assert {"all_nan": nan_rows == rows, "some_nan": 0 < nan_rows < rows, "finite": bool(want.isfinite().all())}[
        expect
    ], f"the reference's loss is not {expect} ({nan_rows} NaN rows of {rows})"
    assert_like_reference(got, want, "loss", tol)
    for name, g, w in zip(("dx", "dW", "dbias"), got_grads, want_grads):
        assert_like_reference(g, w, name, tol)


# case: (margin, what the reference's loss shows)
CASES = {
    "nan_weight-softmax": ("nan_weight", mo.Softmax(), "all_nan"),
    "nan_weight-arcface": ("nan_weight", mo.ArcFace(s=30.0, m=0.5), "all_nan"),
    "inf_weight-softmax": ("inf_weight", mo.Softmax(), "some_nan"),
    "inf_weight-cosface": ("inf_weight", mo.CosFace(s=30.0), "all_nan"),
    "neg_inf_weight-softmax": ("neg_inf_weight", mo.Softmax(), "finite"),
    "neg_inf_weight-l2softmax": ("neg_inf_weight", mo.L2Softmax(s=16.0), "finite"),
    "nan_x-arcface": ("nan_x", mo.ArcFace(s=30.0, m=0.5), "some_nan"),
    "inf_x-softmax": ("inf_x", mo.Softmax(), "some_nan"),
    "neg_inf_bias-softmax": ("neg_inf_bias", mo.Softmax(), "finite"),
    "neg_inf_bias-cosface": ("neg_inf_bias", mo.CosFace(s=30.0), "finite"),
}


def cpu_loss(x, W, y, margin, b):
    return mo.margin_cross_entropy(x, W, y, margin, b, reduction="none")


@pytest.mark.parametrize("dtype", [f64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(CASES))
def test_cpu_op_propagates_like_eager_logits(name, dtype, threads):
    case, margin, expect = CASES[name]
    check_case(cpu_loss, case, margin, dtype, B, C, D, BAD, 1e-10 if dtype == f64 else 2e-5, expect)


def test_a_nan_class_in_every_chunk_position(threads):
    """The NaN class first, last, and on each side of the chunk boundary: always NaN, as eager."""
    for bad in (0, CLASS_TILE - 1, 2 * CLASS_TILE, 2 * CLASS_TILE - 1, C - 1):
        x, W, y, _ = inputs(B, C, D, bad, torch.float32)
        W[bad, 0] = NAN
        loss = mo.margin_cross_entropy(x, W, y, mo.ArcFace())
        assert loss.isnan(), f"class {bad}: {loss}"
        W[bad, 0] = -INF  # normalized: Ŵ = NaN there, as eager's W / ‖W‖
        assert mo.margin_cross_entropy(x, W, y, mo.ArcFace()).isnan()


def test_sharded_style_empty_classes_stay_neutral():
    """No classes at all (a shard without any): lse is −inf, the identity of the log-sum-exp
    merge, not NaN — the NaN rules above must not turn "nothing" into NaN."""
    x, W = torch.randn(6, 8, dtype=f64), torch.randn(0, 8, dtype=f64)
    args = (x, W, torch.full((6,), -100), None, None, None, None, 4, 0, -100, *mo.ArcFace().config())
    lse = torch.ops.marginops.margin_ce_forward(*args)[0]
    assert torch.isneginf(lse).all(), lse


def test_check_finite_still_names_the_first_bad_row():
    x, W, y, b = inputs(B, C, D, BAD, torch.float32)
    W[BAD, 3] = NAN
    W[C - 1, 0] = INF
    with pytest.raises(ValueError, match=re.escape(f"weight[{BAD}] holds NaN/Inf (first bad class)")):
        mo.margin_cross_entropy(x, W, y, mo.ArcFace(), check_finite=True)
    x[300, 1] = -INF
    with pytest.raises(ValueError, match=re.escape("x[300] holds NaN/Inf (first bad row)")):
        mo.margin_cross_entropy(x, W, y, mo.ArcFace(), check_finite=True)
    assert mo.margin_cross_entropy(x, W, y, mo.ArcFace()).isnan()  # without it: NaN, as eager


# -- the CUDA backends under the emulation: a few cases, small --------------------------------------

EB, EC, ED, EBAD = 12, 150, 16, 131  # fused: 3 class tiles of 64 in 3 splits; chunked: chunks of 32
EMULATED = [
    "nan_weight-softmax",
    "inf_weight-softmax",
    "neg_inf_weight-softmax",
    "nan_x-arcface",
    "neg_inf_bias-softmax",
]


@pytest.mark.parametrize("backend", ["chunked", "fused"])
@pytest.mark.parametrize("name", EMULATED)
def test_cuda_backends_emulated_propagate_like_eager_logits(emu, backend, name):
    case, margin, expect = CASES[name]
    code = {"chunked": 1, "fused": 2}[backend]
    if backend == "chunked":
        from helpers import budget_for

        cfg = margin.config()
        workspace = budget_for(emu, 32, EB, ED, EC, need_db=case == "neg_inf_bias", normalize_w=cfg.normalize_w)
    else:
        workspace = 0

    def loss_fn(x, W, y, margin, b):
        return emulated_loss(emu, code, x, W, y, margin, b, reduction="none", workspace=workspace)

    check_case(loss_fn, case, margin, f64, EB, EC, ED, EBAD, 1e-10, expect)
    if backend == "chunked":
        assert emu.last_plan()["chunks"] >= 4


# -- ShardedMarginHead: 2 gloo ranks ---------------------------------------------------------------


def check_sharded(rank, world, C):
    from helpers import DIST_D as SD
    from helpers import global_batch

    from marginops import distributed as mdist

    W0, b0, x0, y0, rows = global_batch(world, C)
    first = mdist.class_range(C, world, 1)[0]  # rank 1's first class
    y0 = torch.where((y0 == 2) | (y0 == first + 1) | ((y0 >= 4) & (y0 < 7)), torch.full_like(y0, 3), y0)
    cases = [  # (what is spoiled, margin, bias)
        ("W[2] NaN (rank 0's shard)", mo.ArcFace(s=30.0), False),
        ("W[first + 1] NaN (rank 1's shard)", mo.Softmax(), True),
        ("W[2] +inf", mo.Softmax(), False),
        ("W[first + 1] -inf, x[:, 0] > 0", mo.Softmax(), False),
        ("x[row of rank 1] NaN", mo.CosFace(s=30.0), False),
        ("bias[4:7] -inf", mo.Softmax(), True),
    ]
    for what, margin, bias in cases:
        W, b, x = W0.clone(), b0.clone(), x0.clone()
        if what.startswith("W[2]"):
            W[2, 1] = NAN if "NaN" in what else INF
        elif what.startswith("W[first"):
            W[first + 1, 1] = NAN if "NaN" in what else -INF
            if "-inf" in what:
                x[:, 0] = x[:, 0].abs() + 0.1
                x[:, 1] = x[:, 1].abs() + 0.1
        elif what.startswith("x["):
            x[rows[1].start + 1, 3] = NAN  # not an ignored row (every 7th is)
        else:
            b[4:7] = -INF
        head = mdist.ShardedMarginHead(SD, C, margin, bias=bias, reduction="none").double()
        s, e = head.class_start, head.class_end
        with torch.no_grad():
            head.weight.copy_(W[s:e])
            if bias:
                head.bias.copy_(b[s:e])
        x_local = x[rows[rank]].clone().requires_grad_()
        loss = head(x_local, y0[rows[rank]])
        loss.sum().backward()
        xr, Wr = x.clone().requires_grad_(), W.clone().requires_grad_()
        br = b.clone().requires_grad_() if bias else None
        ref = reference.margin_cross_entropy(xr, Wr, y0, margin, bias=br, reduction="none")
        ref.sum().backward()
        assert not ref.isfinite().all() or what.startswith(("bias", "W[first + 1] -inf")), (
            what
        )  # each case tests what it says
        where = f"{what}, rank {rank}"
        assert_like_reference(loss, ref[rows[rank]], f"{where}: loss", 1e-10)
        assert_like_reference(x_local.grad, xr.grad[rows[rank]], f"{where}: dx", 1e-10)
        assert_like_reference(head.weight.grad, Wr.grad[s:e], f"{where}: dW", 1e-10)
        if bias:
            assert_like_reference(head.bias.grad, br.grad[s:e], f"{where}: dbias", 1e-10)


def test_sharded_head_propagates_like_eager_logits_on_every_rank():
    """Two gloo ranks: the non-finite class on the rank that holds it and seen from the other,
    a NaN feature row of one rank, −inf bias entries; every rank's loss rows and gradients against
    the single-process reference (the per-rank statistics' merge is a logsumexp that keeps NaN)."""
    from helpers import spawn

    spawn(check_sharded, 2, 4 * 9 + 3, timeout=60)
