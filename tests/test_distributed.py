"""The sharded head across gloo processes on CPU: equivalence with the single-process reference
over the full class weight, Partial FC, resharding checkpoints, insightface import, faults."""

import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
from helpers import DIST_D, expect_error, global_batch, rel_err, spawn

import marginops as mo
from marginops import distributed as mdist
from marginops import reference

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


def check_checkpoint(rank, world, C, load_from, save_to, truth):
    margin = mo.SubCenterArcFace(K=2, s=30.0)
    torch.manual_seed(100 + rank)
    head = mdist.ShardedMarginHead(D, C, margin, bias=True)
    if load_from is not None:
        mdist.load_sharded(head, load_from)
        expected = truth["weight"]
        assert torch.equal(head.weight, mdist.split(expected, world, 2)[rank])
        assert torch.equal(head.bias, mdist.split(truth["bias"], world)[rank])
    mdist.save_sharded(head, save_to)


def check_insightface_import(rank, world, C, directory):
    full = mdist.import_insightface(directory)
    head = mdist.ShardedMarginHead(D, C, mo.ArcFace())
    with torch.no_grad():
        head.weight.copy_(mdist.split(full, world)[rank])
    assert torch.equal(head.weight, full[head.class_start : head.class_end])


def test_checkpoints_reshard_4_2_1_3_and_import_insightface(tmp_path):
    C = 4 * 10 + 3
    dirs = [str(tmp_path / name) for name in ("w4", "w2", "w1", "w3")]
    spawn(check_checkpoint, 4, C, None, dirs[0], None)
    truth = mdist.consolidate(dirs[0])
    assert truth["weight"].shape == (2 * C, D) and truth["bias"].shape == (C,)
    spawn(check_checkpoint, 2, C, dirs[0], dirs[1], truth)
    single = mo.MarginHead(D, C, margin=mo.SubCenterArcFace(K=2, s=30.0), bias=True)
    mdist.load_sharded(single, dirs[1])
    assert torch.equal(single.weight, truth["weight"]) and torch.equal(single.bias, truth["bias"])
    mdist.save_sharded(single, dirs[2])
    spawn(check_checkpoint, 3, C, dirs[2], dirs[3], truth)
    assert torch.equal(mdist.consolidate(dirs[3])["weight"], truth["weight"])
    with pytest.raises(ValueError, match="checkpoint does not fit this head: num_classes: checkpoint 43, head 44"):
        mdist.load_sharded(mo.MarginHead(D, C + 1, margin=mo.SubCenterArcFace(K=2), bias=True), dirs[0])
    with pytest.raises(ValueError, match="embedding_size: checkpoint 8, head 9"):
        mdist.load_sharded(mo.MarginHead(D + 1, C, margin=mo.SubCenterArcFace(K=2), bias=True), dirs[0])
    os.remove(os.path.join(dirs[0], "shard-00002-of-00004.pt"))
    with pytest.raises(ValueError, match="missing shard-00002-of-00004.pt of its 4 shards"):
        mdist.consolidate(dirs[0])

    # insightface: checkpoint_gpu_{rank}.pt with the shard under state_dict_softmax_fc, 3 ranks.
    insight = tmp_path / "insightface"
    insight.mkdir()
    full = torch.randn(C, D)
    for r, shard in enumerate(mdist.split(full, 3)):
        torch.save(
            {"epoch": 1, "global_step": 10, "state_dict_softmax_fc": {"weight": shard}},
            insight / f"checkpoint_gpu_{r}.pt",
        )
    assert torch.equal(mdist.import_insightface(str(insight)), full)
    head = mo.MarginHead(D, C, margin=mo.ArcFace())
    with torch.no_grad():
        head.weight.copy_(mdist.import_insightface(str(insight)))
    assert torch.equal(head.weight, full)
    spawn(check_insightface_import, 2, C, str(insight))
    (insight / "checkpoint_gpu_1.pt").unlink()
    with pytest.raises(ValueError, match="must be ranks 0..1"):
        mdist.import_insightface(str(insight))
    torch.save({"state_dict_softmax_fc": {"weight": torch.randn(5, D)}}, insight / "checkpoint_gpu_1.pt")
    with pytest.raises(ValueError, match="do not follow insightface's split"):
        mdist.import_insightface(str(insight))


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
