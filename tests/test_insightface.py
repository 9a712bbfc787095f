"""marginops.insightface: PartialFC_V2 with insightface's arguments reproduces insightface's loss
and gradients (its formula written out in helpers.insightface_formula) on gloo ranks, loads
insightface's per-rank state, and ShardedMarginHead's input handling ([B, 1] labels, messages,
loss dtype)."""

import pytest
import torch
import torch.distributed as dist
from helpers import insightface_formula, rel_err, spawn

import marginops as mo
from marginops import distributed as mdist
from marginops import insightface as mi

f64 = torch.float64
D, C = 8, 23
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


class ForeignCombinedMarginLoss(torch.nn.Module):
    """Stands for insightface's own CombinedMarginLoss: read by its attributes only."""

    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
        super().__init__()
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold


def data(world):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(C, D, generator=g, dtype=f64)
    x = torch.randn(6 * world, D, generator=g, dtype=f64)
    y = torch.randint(0, C, (6 * world,), generator=g)
    return W, x, y


MARGINS = [  # (margin module, its insightface parameters)
    (lambda: mi.CombinedMarginLoss(64, 1.0, 0.5, 0.0), (64.0, 1.0, 0.5, 0.0, 0.0)),
    (lambda: ForeignCombinedMarginLoss(64, 1.0, 0.0, 0.4, 0.2), (64.0, 1.0, 0.0, 0.4, 0.2)),
    (lambda: mi.ArcFace(s=32.0, margin=0.45), (32.0, 1.0, 0.45, 0.0, 0.0)),
    (lambda: mi.CosFace(s=32.0, m=0.35), (32.0, 1.0, 0.0, 0.35, 0.0)),
]


def check_against_insightface(rank, world):
    W, x, y = data(world)
    s0, e0 = mdist.class_range(C, world, rank)
    mine = slice(6 * rank, 6 * rank + 6)
    for make, (s, m1, m2, m3, t) in MARGINS:
        head = mi.PartialFC_V2(make(), D, C, 1.0, False).double()  # insightface's positional order
        assert list(head.state_dict()) == ["weight"]
        head.load_state_dict({"weight": W[s0:e0].clone()})  # an insightface per-rank shard
        xl = x[mine].clone().requires_grad_(True)
        labels = y[mine].to(torch.int32).view(-1, 1)  # insightface passes [B, 1]
        loss = head(xl, labels)
        loss.backward()
        Wf = W.clone().requires_grad_(True)
        xf = x.clone().requires_grad_(True)
        want = insightface_formula(xf, Wf, y, s, m1, m2, m3, t)
        want.backward()
        assert rel_err(loss, want) <= 1e-12, f"loss {rel_err(loss, want):.1e}"
        assert rel_err(head.weight.grad, Wf.grad[s0:e0]) <= 1e-12, "dW"
        # insightface's all-gather scales the features' gradient by the world size
        assert rel_err(xl.grad, world * xf.grad[mine]) <= 1e-12, f"dx {rel_err(xl.grad, world * xf.grad[mine]):.1e}"
    # ShardedMarginHead: [B, 1] labels, real messages, MarginHead's loss dtype
    head = mdist.ShardedMarginHead(D, C, mo.ArcFace(s=16.0))
    x32 = x[mine].float()
    assert head(x32, y[mine].view(-1, 1)).dtype == torch.float32
    assert head.double()(x[mine], y[mine]).dtype == f64
    with pytest.raises(
        ValueError, match=r"rank 0: labels must have shape \[\d+\] to match x \(\d+, \d+\), got \(\d+, 2\)"
    ):
        head(x[mine], y[mine].view(-1, 2))
    with pytest.raises(ValueError, match=r"labels must have shape \[6\] to match x \(6, \d+\), got \(5,\)"):
        head(x[mine], y[mine][:5])


@pytest.mark.parametrize("world", [1, 2])
def test_partial_fc_v2_matches_insightface(world):
    spawn(check_against_insightface, world)


def check_fp16_and_semantics(rank, world):
    head = mi.PartialFC_V2(mi.CombinedMarginLoss(64, 1.0, 0.5, 0.0), D, C, fp16=True)
    assert head.weight.dtype == torch.float32 and head.fp16
    x = torch.randn(4, D)
    loss = head(x, torch.tensor([1, 2, 3, 4], dtype=torch.uint8))  # any integer dtype
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    spec = mi.PartialFC_V2(mi.CombinedMarginLoss(64, 1.0, 0.5, 0.0, semantics="marginops"), D, C).margin
    assert spec.policy == "fallback" and not spec.straight_through
    spec = mi.PartialFC_V2(mi.ArcFace(s=8.0), D, C, semantics="marginops").margin  # the head's keyword wins
    assert spec.policy == "fallback" and not spec.straight_through
    spec = mi.PartialFC_V2(mo.ArcFace(s=8.0), D, C).margin  # a marginops spec as is
    assert spec.policy == "fallback" and spec.s == 8.0
    # a ShardedMarginHead's state (with sample_step) loads too
    sharded = mdist.ShardedMarginHead(D, C, mo.ArcFace())
    head.load_state_dict(sharded.state_dict())
    assert torch.equal(head.weight, sharded.weight)


def test_fp16_semantics_and_state():
    spawn(check_fp16_and_semantics, 1)


def test_margin_modules_map_to_specs():
    spec = mi.CombinedMarginLoss(64, 1.0, 0.5, 0.0, 0.4).spec()
    assert (spec.policy, spec.straight_through, spec.interclass_filtering_threshold) == ("none", True, 0.4)
    assert mi.to_margin(ForeignCombinedMarginLoss(64, 1.0, 0.0, 0.35)).config().m3 == 0.35
    with pytest.warns(UserWarning, match="ignores m1"):
        assert mi.CombinedMarginLoss(64, 1.0, 0.3, 0.2).spec().m2 == 0.0
    both = mi.CombinedMarginLoss(64, 1.0, 0.3, 0.2, semantics="marginops").spec()
    assert (both.m2, both.m3, both.straight_through) == (0.3, 0.2, False)
    assert mi.CombinedMarginLoss(64, 1.1, 0.3, 0.0).spec().policy == "continuous"  # insightface raises
    with pytest.raises(ValueError, match="cannot read a margin"):
        mi.to_margin(torch.nn.Identity())
    for module in (mi.ArcFace(), mi.CosFace(), mi.CombinedMarginLoss(64, 1.0, 0.5, 0.0)):
        with pytest.raises(ValueError, match=r"semantics must be one of .*, got 'bogus'"):
            module.spec("bogus")
    with pytest.raises(TypeError, match="pass it to PartialFC_V2"):
        mi.ArcFace()(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="needs torch.distributed initialized"):
        mi.PartialFC_V2(mi.ArcFace(), D, C)
