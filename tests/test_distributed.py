"""marginops.distributed's head and sharding (head.py, sharding.py) across gloo processes on CPU:
equivalence with the single-process reference over the full class weight, reductions and the DDP
gradient scale, Partial FC, faults and timeouts; labels of every integer dtype give the loss of
their int64 values, labels on the meta device and a tensor label_smoothing are clear errors; ranks
that call the head differently raise the same error on every rank instead of hanging; the
process-group timeout is documented for a rank that skips a call. Checkpoints:
test_distributed_checkpoint.py."""

import os
import re
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import DIST_D, ROOT, expect_error, global_batch, rel_err, spawn

import marginops as mo
from marginops import distributed as mdist
from marginops import insightface, reference

f64 = torch.float64
D = DIST_D
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


EQUIVALENCE = [
    ("softmax", lambda: mo.Softmax(), True, 0.1, 1.0),
    ("arcface", lambda: mo.ArcFace(s=30.0), False, 0.0, 1.0),
    ("cosface", lambda: mo.CosFace(s=30.0), True, 0.1, 1.0),
    ("sphereface", lambda: mo.SphereFace(m=4), False, 0.1, 1.0),
    ("subcenter", lambda: mo.SubCenterArcFace(K=2, s=30.0), False, 0.1, 1.0),
    ("curricular", lambda: mo.CurricularFace(s=30.0), False, 0.0, 1.0),
    ("adaface", lambda: mo.AdaFace(s=30.0), False, 0.1, 3.0),
    ("magface", lambda: mo.MagFace(s=30.0, l_a=1.0, u_a=8.0), False, 0.0, 2.0),
]


def check_equivalence(rank, world, C):
    for i, (name, make, bias, smoothing, scale) in enumerate(EQUIVALENCE):
        margin = make()
        K = margin.config().subcenters
        head = mdist.ShardedMarginHead(
            D, C, margin, bias=bias, label_smoothing=smoothing, return_accuracy=True
        ).double()
        s, e = head.class_start, head.class_end
        state = {k: v.clone() for k, v in margin.state_init().items()} or None
        for step in range(2):  # two steps: stateful margins must stay in step with the reference
            W, b, x, y, rows = global_batch(world, C, K, seed=10 * i + step, scale=scale, skip_last_rank=(step == 1))
            with torch.no_grad():
                head.weight.copy_(W[s * K : e * K])
                if bias:
                    head.bias.copy_(b[s:e])
            head.zero_grad()
            x_local = x[rows[rank]].clone().requires_grad_()
            loss, acc = head(x_local, y[rows[rank]])
            loss.backward()
            xr, Wr = x.clone().requires_grad_(), W.clone().requires_grad_()
            br = b.clone().requires_grad_() if bias else None
            ref, ref_acc = reference.margin_cross_entropy(
                xr, Wr, y, margin, bias=br, label_smoothing=smoothing, return_accuracy=True, margin_state=state
            )
            ref.backward()
            where = f"{name} step {step} rank {rank}/{world}"
            assert rel_err(loss, ref) <= 1e-10, where
            assert float(acc) == pytest.approx(float(ref_acc), abs=1e-12), where
            assert rel_err(head.weight.grad, Wr.grad[s * K : e * K]) <= 1e-10, where
            assert rel_err(x_local.grad, xr.grad[rows[rank]]) <= 1e-10, where
            if bias:
                assert rel_err(head.bias.grad, br.grad[s:e]) <= 1e-10, where
            for key, value in (state or {}).items():
                assert rel_err(getattr(head.margin_state, key), value) <= 1e-10, where


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sharded_equals_single_process_reference(world):
    spawn(check_equivalence, world, 4 * 9 + 3)  # C not divisible by the world size


def check_reductions_and_grad_scale(rank, world, C):
    W, b, x, y, rows = global_batch(world, C)
    for reduction in ("mean", "sum", "none"):
        head = mdist.ShardedMarginHead(
            D, C, mo.ArcFace(s=30.0), reduction=reduction, scale_grad_by_world_size=True
        ).double()
        with torch.no_grad():
            head.weight.copy_(W[head.class_start : head.class_end])
        x_local = x[rows[rank]].clone().requires_grad_()
        loss = head(x_local, y[rows[rank]])
        xr = x.clone().requires_grad_()
        ref = reference.margin_cross_entropy(xr, W, y, mo.ArcFace(s=30.0), reduction=reduction)
        assert rel_err(loss, ref[rows[rank]] if reduction == "none" else ref) <= 1e-10
        loss.sum().backward()
        (ref.sum() if reduction == "none" else ref).backward()
        # "none": this rank's rows of a global per-row loss; summing it on every rank sums the global loss
        assert rel_err(x_local.grad, world * xr.grad[rows[rank]]) <= 1e-10
    # under autocast, float32 features are cast before the all-gather; the float32 weight is not
    head = mdist.ShardedMarginHead(D, C, mo.ArcFace(s=30.0))
    with torch.no_grad():
        head.weight.copy_(W[head.class_start : head.class_end])
    xf = x[rows[rank]].float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_loss = head(xf, y[rows[rank]])
    assert torch.equal(autocast_loss, head(xf.bfloat16(), y[rows[rank]]))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_reductions_and_ddp_grad_scale(world):
    spawn(check_reductions_and_grad_scale, world, 21)


def check_partial_fc(rank, world, C):
    W, b, x, y, rows = global_batch(world, C, seed=3)
    margin = mo.CosFace(s=30.0)
    full = mdist.ShardedMarginHead(D, C, margin, sample_rate=1.0, label_smoothing=0.1).double()
    head = mdist.ShardedMarginHead(D, C, margin, sample_rate=0.1, seed=7, label_smoothing=0.1).double()
    for h in (full, head):
        with torch.no_grad():
            h.weight.copy_(W[h.class_start : h.class_end])
    xl = x[rows[rank]].clone().requires_grad_()
    loss = head(xl, y[rows[rank]])
    loss.backward()
    sample = head.last_sample
    budget = int(0.1 * head.local_classes)
    mine = y[(y >= head.class_start) & (y < head.class_end)] - head.class_start
    assert set(mine.tolist()) <= set(sample.tolist()), "every positive of the global batch is sampled"
    assert sample.numel() == max(budget, len(set(mine.tolist())))
    assert torch.equal(sample, sample.sort().values)
    samples = [None] * world
    dist.all_gather_object(samples, (head.class_start, sample.tolist()))
    G = torch.tensor([start + j for start, idx in samples for j in idx])
    pos = {int(c): i for i, c in enumerate(G)}
    y_sub = torch.tensor([pos[int(c)] if c >= 0 else -100 for c in y])
    xr, Wr = x.clone().requires_grad_(), W[G].clone().requires_grad_()
    ref = reference.margin_cross_entropy(xr, Wr, y_sub, margin, label_smoothing=0.1)
    ref.backward()
    assert rel_err(loss, ref) <= 1e-10
    assert rel_err(xl.grad, xr.grad[rows[rank]]) <= 1e-10
    offset = sum(len(idx) for _, idx in samples[:rank])
    assert rel_err(head.weight.grad[sample], Wr.grad[offset : offset + sample.numel()]) <= 1e-10
    unsampled = torch.ones(head.local_classes, dtype=torch.bool)
    unsampled[sample] = False
    assert float(head.weight.grad[unsampled].abs().max()) == 0.0
    # The same seed draws the same sample, step by step; sample_rate = 1 is the unsampled head.
    twin = mdist.ShardedMarginHead(D, C, margin, sample_rate=0.1, seed=7).double()
    twin(xl.detach(), y[rows[rank]])
    assert torch.equal(twin.last_sample, sample)
    twin(xl.detach(), y[rows[rank]])
    assert not torch.equal(twin.last_sample, sample), "a new step draws a new sample"
    assert full.last_sample is None
    full_loss = full(x[rows[rank]], y[rows[rank]])
    assert rel_err(full_loss, reference.margin_cross_entropy(x, W, y, margin, label_smoothing=0.1)) <= 1e-10
    head.eval()
    head(x[rows[rank]], y[rows[rank]])
    assert head.last_sample is None, "evaluation uses every class"


def test_partial_fc():
    spawn(check_partial_fc, 3, 3 * 100 + 2)


def check_faults(rank, world):
    expect_error(lambda: mdist.ShardedMarginHead(D, 10 + rank, mo.ArcFace()), "arguments differ between ranks")
    expect_error(lambda: mdist.ShardedMarginHead(D + rank, 10, mo.ArcFace()), "rank 1: embedding_size=9")
    expect_error(
        lambda: mdist.ShardedMarginHead(D, 10, mo.ArcFace(m=0.5 - 0.1 * rank)), 'rank 1: margin="ArcFace(s=64.0, m=0.4'
    )
    head = mdist.ShardedMarginHead(D, 10, mo.ArcFace())
    labels = torch.tensor([1, 2, 99 if rank == 1 else 3])
    expect_error(lambda: head(torch.randn(3, D), labels), "rank 1: labels[2] = 99 is out of range")
    x = torch.randn(3, D + (1 if rank == 0 else 0))
    expect_error(lambda: head(x, torch.tensor([1, 2, 3])), "rank 0: x must have shape [B, 8], got (3, 9)")
    expect_error(
        lambda: head(torch.randn(3, D, dtype=torch.bfloat16 if rank else torch.float32), torch.tensor([1, 2, 3])),
        "different dtypes",
    )
    expect_error(
        lambda: head(torch.randn(3, D, dtype=torch.float64 if rank else torch.float32), torch.tensor([1, 2, 3])),
        "rank 1: x is float64 but weight is float32: use equal dtypes, or float32 weight with float16/bfloat16 x",
    )
    expect_error(lambda: head.topk(torch.randn(3, D + rank), k=2), "rank 1: x must have shape [B, 8], got (3, 9)")
    loss = head(torch.randn(3, D), torch.tensor([1, 2, 3]))
    assert torch.isfinite(loss), "the head still works after the errors"


def test_faults_raise_on_every_rank():
    spawn(check_faults, 2)


def check_timeout(rank, world):
    head = mdist.ShardedMarginHead(D, 10, mo.ArcFace())
    if rank == 1:
        time.sleep(8)  # never joins the forward
        return
    start = time.time()
    try:
        head(torch.randn(3, D), torch.tensor([1, 2, 3]))
    except RuntimeError as e:
        assert "timed out" in str(e).lower() or "timeout" in str(e).lower(), f"not a timeout: {e}"
    else:
        raise AssertionError("no RuntimeError raised by a forward without the other rank")
    assert time.time() - start < 30


def test_a_missing_rank_times_out_instead_of_hanging():
    spawn(check_timeout, 2, timeout=3)


def test_needs_an_initialized_process_group():
    with pytest.raises(ValueError, match="needs torch.distributed initialized"):
        mdist.ShardedMarginHead(D, 10)


def test_class_range_is_insightfaces_split():
    assert [mdist.class_range(10, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert [w.shape[0] for w in mdist.split(torch.zeros(20, 2), 4, subcenters=2)] == [6, 6, 4, 4]


def check_nccl_world_one(rank, world):
    head = mdist.ShardedMarginHead(D, 50, mo.ArcFace(s=30.0), dtype=torch.float64).cuda()
    x = torch.randn(16, D, device="cuda", dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (16,), device="cuda")
    loss = head(x, y)
    dx, dw = torch.autograd.grad(loss, [x, head.weight])
    W = head.weight.detach().clone().requires_grad_()
    ref = reference.margin_cross_entropy(x, W, y, mo.ArcFace(s=30.0))
    rdx, rdw = torch.autograd.grad(ref, [x, W])
    assert rel_err(loss, ref) < 1e-10 and rel_err(dx, rdx) < 1e-10 and rel_err(dw, rdw) < 1e-10


@pytest.mark.cuda
@pytest.mark.skipif(not mo.cuda_available(), reason="needs the CUDA kernels and a GPU")
def test_nccl_world_size_one_matches_unsharded_head():
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init")

        def entry(rank, world):
            dist.init_process_group("nccl", init_method=f"file://{init}", rank=rank, world_size=world)
            try:
                check_nccl_world_one(rank, world)
            finally:
                dist.destroy_process_group()

        entry(0, 1)


# ---- label dtypes, meta labels, label_smoothing ----------------------------------------------------

BIG = 70_000  # past int16's range: a Python int compared with int16 labels would wrap
LABELS = {
    torch.uint8: [200, 156, 3, 255, 0, 17, 128],  # 156 is -100 mod 256: a class here, not ignored
    torch.int8: [100, 127, 0, -100, 5, 64, 1],
    torch.int16: [30_000, 20_000, 1, -100, 32_767, 300, 9],
    torch.int32: [69_999, 40_000, 2, -100, 50_000, 123, 65_536],
}


def test_every_integer_label_dtype_gives_the_int64_loss(one_rank):
    g = torch.Generator().manual_seed(5)
    W = torch.randn(BIG, 4, generator=g, dtype=f64)
    x = torch.randn(7, 4, generator=g, dtype=f64)
    head = mdist.ShardedMarginHead(4, BIG, mo.Softmax(), dtype=f64)
    pfc = insightface.PartialFC_V2(mo.Softmax(), 4, BIG).double()
    for h in (head, pfc):
        with torch.no_grad():
            h.weight.copy_(W)
    for dtype, values in LABELS.items():
        y = torch.tensor(values, dtype=dtype)
        want = F.cross_entropy(x @ W.T, y.long(), ignore_index=-100)  # Softmax: logits x·Wᵀ
        torch.testing.assert_close(head(x, y), want, rtol=1e-12, atol=0, msg=str(dtype))
        torch.testing.assert_close(pfc(x, y[:, None]), want, rtol=1e-12, atol=0, msg=str(dtype))  # insightface's [B, 1]
    small = mdist.ShardedMarginHead(4, 150, mo.Softmax(), dtype=f64)  # uint8 156 is a class id, not ignore_index -100
    with pytest.raises(
        ValueError, match=re.escape("rank 0: labels[1] = 156 is out of range: class ids must lie in [0, 150)")
    ):
        small(x, torch.tensor([3, 156, 0, 1, 2, 4, 5], dtype=torch.uint8))
    with pytest.raises(ValueError, match=re.escape("rank 0: labels is on meta but x is on cpu")):
        head(x, torch.tensor(LABELS[torch.int32]).to("meta"))
    with pytest.raises(ValueError, match=re.escape("rank 0: labels is on meta but x is on cpu")):
        pfc(x, torch.tensor(LABELS[torch.int32]).to("meta"))
    with pytest.raises(
        ValueError, match=re.escape("rank 0: labels must hold integer class ids, got dtype torch.complex64")
    ):
        head(x, torch.tensor(LABELS[torch.int32]).to(torch.complex64))
    with pytest.raises(
        ValueError, match=re.escape("label_smoothing must be a float in [0, 1], got a Tensor tensor(0.1000)")
    ):
        mdist.ShardedMarginHead(4, 10, label_smoothing=torch.tensor(0.1))


def test_a_tensor_label_smoothing_must_be_a_float():
    x, W, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"label_smoothing must be a float in \[0, 1\], got a Tensor tensor\(0.1000\)"):
        mo.margin_cross_entropy(x, W, y, mo.ArcFace(), label_smoothing=torch.tensor(0.1))
    with pytest.raises(ValueError, match="label_smoothing must be a float"):  # checked once, by the constructor
        mo.MarginHead(4, 5, mo.ArcFace(), label_smoothing=torch.tensor(0.1))
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\], got 1.5"):
        mo.margin_cross_entropy(x, W, y, mo.ArcFace(), label_smoothing=1.5)


# ---- ranks that call the head differently ----------------------------------------------------------

PREFIX = "ShardedMarginHead is called differently across ranks: "


def _mismatches(rank, world):
    g = torch.Generator().manual_seed(9)
    W = torch.randn(12, 5, generator=g)
    x = torch.randn(6, 5, generator=g)
    y = torch.tensor([0, 11, 5, 6, -100, 3])
    rows = [slice(0, 2), slice(2, 6)][rank]
    xl, yl = x[rows], y[rows]
    head = mdist.ShardedMarginHead(5, 12, mo.Softmax())
    with torch.no_grad():
        head.weight.copy_(W[head.class_start : head.class_end])

    yi = torch.tensor([1, 2])
    expect_error(lambda: head(xl[:2], yi.to("meta") if rank == 0 else yi), "rank 0: labels is on meta but x is on cpu")

    def still_works():  # the ranks are still in step: forward, backward, values
        xr = xl.clone().requires_grad_()
        loss = head(xr, yl)
        loss.backward()
        xw = x.clone().requires_grad_()
        want = F.cross_entropy(xw @ W.T, y)
        want.backward()
        torch.testing.assert_close(loss, want.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(xr.grad, xw.grad[rows], rtol=1e-5, atol=1e-7)
        head.zero_grad()

    expect_error(
        lambda: head(xl.clone().requires_grad_(rank == 0), yl),
        PREFIX + "rank 1 has x.requires_grad=False but rank 0 has x.requires_grad=True",
    )
    still_works()

    def no_grad_on_rank_1():
        with torch.set_grad_enabled(rank == 0):
            head(xl.clone().requires_grad_(), yl)

    expect_error(no_grad_on_rank_1, "rank 1 has x.requires_grad=False")
    still_works()
    head.train(rank == 0)
    expect_error(lambda: head(xl, yl), PREFIX + "rank 1 has training=False but rank 0 has training=True")
    head.train()
    still_works()
    head.weight.requires_grad_(rank == 1)
    expect_error(
        lambda: head(xl, yl), PREFIX + "rank 1 has weight.requires_grad=True but rank 0 has weight.requires_grad=False"
    )
    head.weight.requires_grad_(True)
    still_works()
    head.grad_scale = 2.0 if rank == 1 else 1.0
    expect_error(
        lambda: head(xl, yl),
        PREFIX + "rank 1 has scale_grad_by_world_size=True but rank 0 has scale_grad_by_world_size=False",
    )
    head.grad_scale = 1.0
    expect_error(
        lambda: mdist.ShardedMarginHead(5, 12, scale_grad_by_world_size=rank == 1),
        "rank 1: scale_grad_by_world_size=True",
    )
    still_works()
    head.margin = mo.Softmax() if rank == 0 else mo.NormFace(s=4.0)
    expect_error(lambda: head(xl, yl), PREFIX + "rank 1 has margin=NormFace(s=4.0) but rank 0 has margin=Softmax()")
    head.margin = mo.Softmax()
    still_works()
    expect_error(
        lambda: head(xl.to(torch.bfloat16 if rank else torch.float32), yl),
        PREFIX + "x has different dtypes across ranks: rank 1 has x.dtype=bfloat16 but rank 0 has x.dtype=float32",
    )
    head.to(torch.bfloat16 if rank else torch.float32)
    expect_error(
        lambda: head(xl.bfloat16(), yl),
        PREFIX
        + "weight has different dtypes across ranks: "
        + "rank 1 has weight.dtype=bfloat16 but rank 0 has weight.dtype=float32",
    )
    head.float()
    with torch.no_grad():
        head.weight.copy_(W[head.class_start : head.class_end])
    still_works()


def test_ranks_that_call_the_head_differently_raise_on_every_rank():
    # The header carries these fields: without them x.requires_grad on one rank only would pass the
    # forward and the other rank would wait in the backward's reduce-scatter until the
    # process-group timeout. A short process-group timeout and deadline: nothing can hang.
    spawn(_mismatches, 2, timeout=5, deadline=90)


# ---- a rank that skips a call ----------------------------------------------------------------------


def test_the_process_group_timeout_is_documented_for_a_skipped_call():
    doc = " ".join(mdist.ShardedMarginHead.__doc__.split())
    assert "does not call the head" in doc and "init_process_group(timeout=" in doc
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("## Sharding across GPUs") :]
    section = " ".join(section[: section.index("\n## ", 1)].split())
    assert "skips a call" in section and "init_process_group(timeout=" in section
