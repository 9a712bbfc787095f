"""Helpers shared by the test files: inputs, error measures, the op's semantics written out
eagerly, the CUDA emulation's loss, gloo process spawning and a few oracles used by more than one
file. Fixtures and pytest hooks live in conftest.py."""

import datetime
import faulthandler
import os
import sys
import tempfile
import time
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import marginops as mo
from marginops import distributed as mdist
from marginops import reference
from marginops.functional import loss_from_stats
from marginops.margins import KIND_IDENTITY, OpConfig, RowContext, psi, target_cosines
from marginops.ops import HeadStats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every margin spec of the foundation, with parameters chosen so that a random batch has rows on
# both sides of the θ + m > π boundary for the angular ones.
MARGINS = {
    "softmax": mo.Softmax(),
    "weightnorm": mo.WeightNormSoftmax(),
    "l2softmax": mo.L2Softmax(s=16.0),
    "normface": mo.NormFace(s=20.0),
    "lsoftmax": mo.LSoftmax(m=3, lambda_=0.5),
    "sphereface": mo.SphereFace(m=4),
    "cosface": mo.CosFace(s=30.0, m=0.35),
    "arcface": mo.ArcFace(s=30.0, m=0.5),
    "arcface_easy": mo.ArcFace(s=30.0, m=0.5, policy="easy"),
    "arcface_none": mo.ArcFace(s=30.0, m=0.5, policy="none"),
    "arcface_continuous": mo.ArcFace(s=30.0, m=0.5, policy="continuous"),
    "combined": mo.CombinedMargin(s=30.0, m1=1.0, m2=0.3, m3=0.2),
    "combined_m1": mo.CombinedMargin(s=30.0, m1=1.35, m2=0.25, m3=0.1, policy="continuous"),
}

DEVICES = ["cpu"] + (["cuda"] if mo.cuda_available() else [])


def make_inputs(B, D, C, dtype=torch.float64, device="cpu", bias=False, ignore=0, seed=0, requires_grad=True):
    """Features, class weights, labels (the first `ignore` rows set to -100) and an optional bias.
    A few rows point almost opposite their class so that θ + m > π occurs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    W = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    for i in range(min(3, B)):
        x[B - 1 - i] = -W[y[B - 1 - i]] * (1 + i) + 0.1 * x[B - 1 - i]
    y[:ignore] = -100
    b = torch.randn(C, generator=g, dtype=torch.float64) if bias else None
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
    return to(x), to(W), y.to(device), to(b)


def rel_err(a, b):
    """max |a - b| / max |b| (0 when both vanish)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    scale = b.abs().max() if b.numel() else torch.tensor(0.0)
    diff = (a - b).abs().max() if b.numel() else torch.tensor(0.0)
    return float(diff / scale) if scale > 0 else float(diff)


def eager_op_outputs(x, W, y, b, rm, cur, ci, num_classes, offset, ignore_index, *cfg):
    """margin_ce_forward's five outputs (lse, target logit, logit sum, best plain logit, its
    class) computed eagerly in float64 from the op's own arguments, differentiable in x, W, b
    and rm: the [B, C] logits materialized with torch ops and marginops.margins.psi (Python; the
    C++ and CUDA sources share no code with it). The semantics written out: column j is local
    class ci[j] (all local classes without ci), global id offset + ci[j]; a class's logit is the
    best of its K sub-centers'; CurricularFace's hard negatives c > τ_i become s·c·(t_i + c);
    interclass filtering zeroes non-target entries whose cosine exceeds t_f; a row's target (its
    label's column, if this shard and index hold it; none for ignored rows) gets a·b·ψ(c) + bias,
    with ψ's value but c's gradient when straight-through; the best logit is the plain one."""
    cfg = OpConfig(*cfg)
    K = cfg.subcenters
    xd, Wd = x.double(), W.double()
    local = Wd.shape[0] // K
    cols = ci if ci is not None else torch.arange(local)
    Wc = Wd.view(local, K, -1)[cols]  # [n, K, D]
    x_norm, w_norm = xd.norm(dim=1), Wc.norm(dim=2)
    cos = torch.einsum("id,jkd->ijk", xd / x_norm.clamp_min(1e-12)[:, None], Wc / w_norm.clamp_min(1e-12)[..., None])
    a = torch.full_like(x_norm, cfg.s) if cfg.normalize_x else x_norm  # [B]
    scale = a[:, None, None] * (w_norm[None] if not cfg.normalize_w else 1.0)
    zk = scale * cos  # [B, n, K]
    z0, sub = zk.max(dim=2)
    bias = b.double()[cols] if b is not None else torch.zeros(len(cols), dtype=torch.float64)
    plain = z0 + bias
    z = plain
    if cur is not None:
        c = z0 / cfg.s
        hard = c > cur[:, :1].double()
        z = torch.where(hard, cfg.s * c * (cur[:, 1:].double() + c) + bias, z)
    valid = y != ignore_index
    glob = offset + cols
    hit = (y[:, None] == glob[None, :]) & valid[:, None]  # [B, n]: the row's target column
    if cfg.interclass_filter > 0:
        z = torch.where((z0 / cfg.s > cfg.interclass_filter) & ~hit, torch.zeros_like(z), z)
    rows, tcol = hit.nonzero(as_tuple=True)
    target = torch.zeros(len(y), dtype=torch.float64)
    if len(rows):
        k = sub[rows, tcol]
        c_t = cos[rows, tcol, k]
        if rm is not None:
            m1, m2, m3 = (rm[rows, j].double() for j in range(3))
        else:
            m1, m2, m3 = (torch.full_like(c_t, v) for v in (cfg.m1, cfg.m2, cfg.m3))
        f = psi(cfg.margin_kind, cfg.theta_policy, c_t, m1, m2, m3, cfg.lambda_)
        if cfg.straight_through:
            f = c_t + (f - c_t).detach()
        b_t = w_norm[tcol, k] if not cfg.normalize_w else 1.0
        t_logit = a[rows] * b_t * f + bias[tcol]
        if cfg.margin_kind != KIND_IDENTITY:
            z = z.index_put((rows, tcol), t_logit)
        target = target.index_put((rows,), z[rows, tcol])
    best, best_j = plain.max(dim=1)
    return torch.logsumexp(z, dim=1), target, z.sum(dim=1), best, glob[best_j]


def check_op_against_eager(fwd, bwd, args, grads, mask, tol):
    """An op's forward outputs and its backward (dx, dW, dbias, dmargins under mask, for the
    incoming gradients `grads` of lse, target logit and logit sum) against eager_op_outputs."""
    x, W, y, b, rm = args[:5]
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, W, b, rm)]
    want = eager_op_outputs(leaves[0], leaves[1], y, leaves[2], leaves[3], *args[5:])
    for name, got, w in zip(("lse", "target logit", "logit sum", "best logit"), fwd[:4], want[:4]):
        assert rel_err(got, w) <= tol, f"forward {name} against eager: {rel_err(got, w):.2e}"
    assert torch.equal(fwd[4], want[4]), "best class against eager"
    if bwd is None:
        return
    loss = sum((g.double() * w).sum() for g, w in zip(grads, want[:3]) if g is not None)
    used = [t for t, m in zip(leaves, mask) if m and t is not None]
    eager_grads = iter(torch.autograd.grad(loss, used, allow_unused=True))
    for name, got, leaf, m in zip(("dx", "dW", "dbias", "dmargins"), bwd, leaves, mask):
        if m and leaf is not None:
            w = next(eager_grads)
            w = torch.zeros_like(leaf) if w is None else w
            if name == "dmargins":  # a per-row m1 is a constant: no gradient is promised for it
                got, w = got[:, 1:], w[:, 1:]
            assert rel_err(got, w) <= tol, f"backward {name} against eager: {rel_err(got, w):.2e}"


def load_emulation():
    """csrc/cuda built for the CPU emulation (tests/cuda_emu), once per machine and source tree
    (torch's extension cache); a process that loads it again reuses the build. The name carries
    a hash of csrc/ and tests/cuda_emu/: torch's own check sees the listed sources, not the
    headers they include, and two checkouts must not share one build."""
    import hashlib

    from torch.utils.cpp_extension import load

    digest = hashlib.sha256()
    for folder in ("csrc", os.path.join("tests", "cuda_emu")):
        for base, _, files in sorted(os.walk(os.path.join(ROOT, folder))):
            for name in sorted(files):
                path = os.path.join(base, name)
                digest.update(os.path.relpath(path, ROOT).encode() + b"\0")
                with open(path, "rb") as fh:
                    digest.update(fh.read())
    return load(
        name=f"marginops_cuda_emu_{digest.hexdigest()[:16]}",
        sources=[
            os.path.join(ROOT, "tests", "cuda_emu", "emu_ext.cpp"),
            os.path.join(ROOT, "csrc", "head_inputs.cpp"),
        ],
        extra_include_paths=[os.path.join(ROOT, "tests", "cuda_emu", "include")],
        extra_cflags=["-O2", "-std=c++20"],  # std::barrier; torch before 2.13 defaults to C++17
    )


class Emulated:
    """csrc/cuda built for the CPU emulation (tests/cuda_emu): the fused backend's ops with the
    schemas' trailing default (grad_skip = 0), the CUDA entry points that pick a backend
    (forward_any, backward_any), and the chunked backend's plan."""

    def __init__(self, ext):
        self.ext = ext

    def forward(self, *args, grad_skip=0.0):
        return self.ext.forward(*args, grad_skip)

    def backward(self, *args, grad_skip=0.0):
        return self.ext.backward(*args, grad_skip)

    def __getattr__(self, name):
        return getattr(self.ext, name)


def check_tf32(errors, eager_float16_errors, taken=(10, 10, 10)):
    """errors() (relative errors against float64 of loss, dx, dW) measured with float32 products
    exact, then with torch.backends.cuda.matmul.allow_tf32: TF32 must be really taken (each error
    more than taken[k] times the exact one) and within twice eager float16's error, which has the
    same 10-bit mantissa."""
    exact = errors()
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        tf32 = errors()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert max(exact) < 1e-5, exact
    assert all(t > f * e for t, e, f in zip(tf32, exact, taken)), f"TF32 {tf32} vs exact {exact}"
    assert all(t <= 2 * e for t, e in zip(tf32, eager_float16_errors)), (
        f"TF32 {tf32} vs eager float16 {eager_float16_errors}"
    )


class _EmulatedOp(torch.autograd.Function):
    """The op pair as the CUDA dispatch runs it (forward_any, backward_any) with a backend, under autograd."""

    @staticmethod
    def forward(ctx, emu, backend, workspace, x, W, y, bias, row_margins, curricular, num_classes, ignore_index, cfg):
        args = (x, W, y, bias, row_margins, curricular, None, num_classes, 0, ignore_index, *cfg)
        stats = emu.forward_any(*args, 0.0, backend, workspace)
        ctx.save_for_backward(x, W, y, bias, row_margins, curricular, stats[0])
        ctx.emu, ctx.backend, ctx.workspace, ctx.rest = emu, backend, workspace, (num_classes, ignore_index, cfg)
        ctx.mark_non_differentiable(stats[3], stats[4])
        return stats

    @staticmethod
    def backward(ctx, gl, gt, gs, _gb, _gc):
        x, W, y, bias, row_margins, curricular, lse = ctx.saved_tensors
        num_classes, ignore_index, cfg = ctx.rest
        need = ctx.needs_input_grad
        mask = [need[3], need[4], need[6] and bias is not None, need[7] and row_margins is not None]
        args = (x, W, y, bias, row_margins, curricular, None, num_classes, 0, ignore_index, *cfg)
        dx, dw, db, dm = ctx.emu.backward_any(gl, gt, gs, lse, *args, mask, 0.0, ctx.backend, ctx.workspace)
        pick = lambda t, m: t if m else None  # noqa: E731
        return (
            None,
            None,
            None,
            pick(dx, mask[0]),
            pick(dw, mask[1]),
            None,
            pick(db, mask[2]),
            pick(dm, mask[3]),
            None,
            None,
            None,
            None,
        )


def emulated_loss(
    emu, backend, x, W, y, margin, bias=None, reduction="mean", ignore_index=-100, label_smoothing=0.0, workspace=0
):
    """marginops.margin_cross_entropy's steps with an emulated CUDA backend (1 chunked, 2 fused)
    in place of the CPU op."""
    cfg = margin.config()
    C = W.shape[0] // cfg.subcenters
    valid = y != ignore_index
    ctx = RowContext(x, y, valid, False, lambda: target_cosines(x, W, y, valid, cfg.subcenters))
    terms = margin.prepare(ctx, None)
    stats = _EmulatedOp.apply(
        emu, backend, workspace, x, W, y, bias, terms.row_margins, terms.curricular, C, ignore_index, cfg
    )
    return loss_from_stats(HeadStats(*stats), y, C, ignore_index, label_smoothing, reduction, terms.extra_loss)


# The margins the emulated CUDA backends run (tests/test_cuda_*_emulated.py).
EMULATED_MARGINS = {
    "softmax": mo.Softmax(),
    "normface": mo.NormFace(s=20.0),
    "l2softmax": mo.L2Softmax(s=16.0),
    "lsoftmax": mo.LSoftmax(m=3, lambda_=0.5),
    "sphereface": mo.SphereFace(m=4),
    "cosface": mo.CosFace(s=30.0),
    "arcface": mo.ArcFace(s=30.0),
    "combined_continuous": mo.CombinedMargin(s=30.0, m1=1.35, m2=0.25, m3=0.1, policy="continuous"),
}


# -- the gradient-skip rule written out (tests/test_grad_skip.py, the emulated tiles backend)


def tiles(device_type, K=1):
    """(rows, classes) of a backward tile, (dx tiling, dW tiling): the CPU's tiles hold 256
    classes; CUDA's 64 (dx) or 32 (dW) weight rows, so K sub-centers divide their classes."""
    return ((256, 256), (256, 256)) if device_type == "cpu" else ((32, 64 // K), (64, 32 // K))


def tile_maxima(P, label, valid, rows, cols):
    """Per tile: its corner and the largest probability of its valid rows' non-label entries."""
    B, C = P.shape
    P = P.masked_fill(label | ~valid[:, None], 0.0)
    return [
        ((i0, j0), float(P[i0 : i0 + rows, j0 : j0 + cols].max()))
        for i0 in range(0, B, rows)
        for j0 in range(0, C, cols)
    ]


def skipped_reference(x, W, y, margin, tiles, threshold=None, ignore_index=-100):
    """Float64 eager (dx, dW) of the mean loss with the skipped tiles' non-label ∂L/∂z zeroed, the
    threshold used (default: the median of the dx tiles' largest probability, so that about half
    of them are skipped) and the fraction of dx tiles skipped."""
    x64, W64 = x.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    seen = {}
    cross_entropy = torch.nn.functional.cross_entropy

    def capture(logits, *args, **kwargs):
        seen["z"] = logits
        return cross_entropy(logits, *args, **kwargs)

    with mock.patch.object(reference.F, "cross_entropy", capture):
        loss = reference.margin_cross_entropy(x64, W64, y, margin, ignore_index=ignore_index)
    z = seen["z"]
    (G,) = torch.autograd.grad(loss, z, retain_graph=True)
    P, valid = torch.softmax(z.detach(), 1), y != ignore_index
    label = torch.zeros_like(P, dtype=torch.bool)
    label[valid.nonzero().squeeze(1), y[valid]] = True
    if threshold is None:
        threshold = float(torch.tensor([m for _, m in tile_maxima(P, label, valid, *tiles[0])]).median())
    grads, fractions = [], []
    for (rows, cols), wrt in zip(tiles, (x64, W64)):
        keep = label.clone()
        stats = tile_maxima(P, label, valid, rows, cols)
        for (i0, j0), m in stats:
            keep[i0 : i0 + rows, j0 : j0 + cols] |= m >= threshold
        grads.append(torch.autograd.grad(z, wrt, G * keep, retain_graph=True)[0])
        fractions.append(sum(m < threshold for _, m in stats) / len(stats))
    return grads[0], grads[1], threshold, fractions[0]


def skip_inputs(device, B, C, D=8, K=1):
    x, W, y, _ = make_inputs(B, D, C * K, device=device, ignore=3, requires_grad=True)
    return x, W, torch.where(y >= 0, y % C, y)


# -- gloo processes (the sharded head's tests)

# The embedding size of the sharded-head tests' data (global_batch).
DIST_D = 8


def _entry(rank, world, init_file, timeout, fn, args):
    faulthandler.enable()  # a rank that aborts in C++ prints its Python stack
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout),
    )
    torch.set_num_threads(1)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    # Done: exit without the interpreter's teardown. What the test checks is behind us, and its
    # C++ static destructors are not ours to test (a rank of a passing run once aborted in CI with
    # "terminate called without an active exception", with no Python stack to blame).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, world, *args, timeout=120, deadline=None):
    """Runs fn(rank, world, *args) on `world` gloo processes whose collectives give up after
    `timeout` seconds; a failed assertion in any of them fails the test with its traceback.
    Processes still running after `deadline` seconds (default timeout + 60) are killed and the test
    fails: nothing in CI can hang."""
    deadline = timeout + 60 if deadline is None else deadline
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _entry,
            args=(world, os.path.join(tmp, "init"), timeout, fn, args),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        end = time.monotonic() + deadline
        while not ctx.join(timeout=max(0.1, end - time.monotonic())):
            if time.monotonic() >= end:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                for p in ctx.processes:
                    p.join()
                pytest.fail(f"{fn.__name__} on {world} ranks did not finish within {deadline} s")


def global_batch(world, C, K=1, seed=0, scale=1.0, skip_last_rank=False):
    """The same data on every rank: full weight [C·K, D], bias [C], a batch of different sizes per
    rank with some ignored rows, and which rows are whose."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(C * K, DIST_D, generator=g, dtype=torch.float64)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    counts = [5 + 3 * r for r in range(world)]
    x = torch.randn(sum(counts), DIST_D, generator=g, dtype=torch.float64) * scale
    top = mdist.class_range(C, world, world - 1)[0] if skip_last_rank else C
    y = torch.randint(0, top, (sum(counts),), generator=g)
    y[::7] = -100
    x[1::5] = W[y[1::5].clamp_min(0) * K] * 2 + 0.3 * x[1::5]  # rows near their class
    starts = [sum(counts[:r]) for r in range(world)]
    return W, b, x, y, [slice(s, s + n) for s, n in zip(starts, counts)]


def expect_error(fn, message, exc=ValueError):
    try:
        fn()
    except exc as e:
        assert message in str(e), f"{message!r} not in {e}"
        return
    raise AssertionError(f"no {exc.__name__} raised; expected {message!r}")


# -- the chunked backend's plan (emulated)


def budget_for(
    emu,
    classes,
    B,
    D,
    C,
    K=1,
    dtype=torch.float64,
    wdtype=torch.float64,
    backward=True,
    need_db=False,
    normalize_w=True,
):
    """The smallest workspace_bytes whose (backward) plan puts `classes` classes in a chunk."""
    plan = lambda budget: emu.plan(B, D, C, K, dtype, wdtype, normalize_w, False, backward, need_db, budget, True, True)  # noqa: E731
    lo, hi = 1, 1 << 30
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if plan(mid)["classes"] < classes else (lo, mid)
    assert plan(lo)["classes"] == classes
    return lo


# -- insightface's head as its code computes it


def insightface_formula(x, W, y, s, m1, m2, m3, t_f):
    """insightface's arcface_torch head (PartialFC_V2 at world size 1 + CombinedMarginLoss), as
    its code computes it: normalized product, filtering under no_grad, then either the angular
    margin applied in place under no_grad (m1 = 1, m3 = 0) or the cosine margin (m3 > 0)."""
    logits = F.linear(F.normalize(x), F.normalize(W)).clamp(-1, 1)
    rows = torch.arange(len(y))
    if t_f > 0:
        with torch.no_grad():
            keep = 1.0 - (logits > t_f).to(logits.dtype)
            keep[rows, y] = 1.0
        logits = keep * logits
    if m1 == 1.0 and m3 == 0.0:
        with torch.no_grad():
            angle = logits.arccos()
            angle[rows, y] += m2
            shift = angle.cos() - logits
        logits = logits + shift  # the value of cos(θ + m2) on the target, gradient through c
    else:
        assert m1 == 1.0 and m2 == 0.0
        logits = logits - m3 * F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return F.cross_entropy(s * logits, y)
