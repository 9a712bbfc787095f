"""Independent oracles: each margin spec, with float and with per-row tensor parameters, against
its formula written out here with torch ops (cos, θ and ψ spelled out, then F.cross_entropy) —
not through Margin.prepare, marginops.reference or anything else the fused op uses — in float64,
loss and gradients. And the sharded head's top-k against the same kind of formula."""

import math

import pytest
import torch
import torch.nn.functional as F

import marginops as mo

from conftest import rel_err
from test_distributed import spawn

f64 = torch.float64
B, D, C = 24, 10, 37


def data(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=f64) * scale
    W = torch.randn(C, D, generator=g, dtype=f64)
    y = torch.randint(0, C, (B,), generator=g)
    x[-3:] = -W[y[-3:]] + 0.1 * x[-3:]  # θ near π: the ArcFace policies differ there
    return x.requires_grad_(), W.requires_grad_(), y


def logits(x, W, y, target, s=None, normalize_x=True, normalize_w=True, bias=None):
    """z_ij = a_i·b_j·c_ij (+ bias), the target column replaced by a_i·b_y·target(c_iy, i)."""
    xn = x / x.norm(dim=1, keepdim=True)
    Wn = W / W.norm(dim=1, keepdim=True)
    cos = xn @ Wn.T
    a = torch.full((B, 1), float(s), dtype=f64) if normalize_x else x.norm(dim=1, keepdim=True)
    b = torch.ones(1, C, dtype=f64) if normalize_w else W.norm(dim=1)[None, :]
    onehot = F.one_hot(y, C).bool()
    psi = target(cos.gather(1, y[:, None]).squeeze(1))
    z = a * b * torch.where(onehot, psi[:, None], cos)
    return z if bias is None else z + bias


def check(spec, z, x, W, y, extra=(), bias=None):
    leaves = [x, W, *([bias] if bias is not None else []), *extra]
    want = F.cross_entropy(z, y)
    want_grads = torch.autograd.grad(want, leaves)
    got = mo.margin_cross_entropy(x, W, y, spec, bias=bias)
    got_grads = torch.autograd.grad(got, leaves)
    assert rel_err(got, want) <= 1e-10, f"loss {rel_err(got, want):.2e}"
    for k, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert rel_err(g, w) <= 1e-9, f"gradient {k}: {rel_err(g, w):.2e}"


def arc(c, m):  # cos(θ + m)
    return torch.cos(torch.acos(c) + m)


def test_softmax_with_bias_and_weight_normalized():
    x, W, y = data()
    bias = torch.randn(C, dtype=f64, requires_grad=True)
    check(mo.Softmax(), x @ W.T + bias, x, W, y, bias=bias)
    check(mo.WeightNormSoftmax(), x @ (W / W.norm(dim=1, keepdim=True)).T, x, W, y)


def test_normface_and_l2softmax():
    x, W, y = data(1)
    check(mo.NormFace(s=20.0), 20.0 * (x / x.norm(dim=1, keepdim=True)) @ (W / W.norm(dim=1, keepdim=True)).T, x, W, y)
    check(mo.L2Softmax(s=16.0), 16.0 * (x / x.norm(dim=1, keepdim=True)) @ W.T, x, W, y)


@pytest.mark.parametrize("per_row", [False, True])
def test_cosface(per_row):
    x, W, y = data(2)
    m = torch.linspace(0.1, 0.5, B, dtype=f64, requires_grad=True) if per_row else 0.35
    z = logits(x, W, y, lambda c: c - m, s=30.0)
    check(mo.CosFace(s=30.0, m=m), z, x, W, y, extra=(m,) if per_row else ())


@pytest.mark.parametrize("per_row", [False, True])
def test_arcface_without_fallback(per_row):
    x, W, y = data(3)
    m = torch.linspace(0.2, 0.6, B, dtype=f64, requires_grad=True) if per_row else 0.5
    z = logits(x, W, y, lambda c: arc(c, m), s=30.0)
    check(mo.ArcFace(s=30.0, m=m, policy="none"), z, x, W, y, extra=(m,) if per_row else ())


def test_arcface_fallback_and_easy_margin():
    x, W, y = data(4)
    m = 0.5

    def fallback(c):  # c − m·sin m where θ + m > π
        return torch.where(torch.acos(c) + m > math.pi, c - m * math.sin(m), arc(c, m))

    def easy(c):  # the margin only where c > 0
        return torch.where(c > 0, arc(c, m), c)

    assert bool((torch.acos((x / x.norm(dim=1, keepdim=True) * (W / W.norm(dim=1, keepdim=True))[y]).sum(1)) + m > math.pi).any())
    check(mo.ArcFace(s=30.0, m=m), logits(x, W, y, fallback, s=30.0), x, W, y)
    check(mo.ArcFace(s=30.0, m=m, policy="easy"), logits(x, W, y, easy, s=30.0), x, W, y)


@pytest.mark.parametrize("per_row", [False, True])
def test_combined_margin(per_row):
    x, W, y = data(5)
    m2 = torch.linspace(0.1, 0.4, B, dtype=f64, requires_grad=True) if per_row else 0.3
    m3 = torch.linspace(0.0, 0.3, B, dtype=f64, requires_grad=True) if per_row else 0.2
    z = logits(x, W, y, lambda c: torch.cos(1.2 * torch.acos(c) + m2) - m3, s=30.0)
    spec = mo.CombinedMargin(s=30.0, m1=1.2, m2=m2, m3=m3, policy="none")
    check(spec, z, x, W, y, extra=(m2, m3) if per_row else ())


def test_sphereface():
    """ψ(θ) = (−1)^k cos(mθ) − 2k on θ ∈ [kπ/m, (k+1)π/m], weights normalized, features not."""
    x, W, y = data(6)
    m = 4

    def psi(c):
        theta = torch.acos(c)
        k = torch.floor(m * theta / math.pi).clamp(0, m - 1)
        return (-1) ** k * torch.cos(m * theta) - 2 * k

    check(mo.SphereFace(m=m), logits(x, W, y, psi, normalize_x=False), x, W, y)


def _sharded_topk(rank, world, x, W, k, want_classes):
    head = mo.ShardedMarginHead(D, C, mo.NormFace(s=10.0), dtype=f64)
    start, end = mo.distributed.class_range(C, world, rank)
    with torch.no_grad():
        head.weight.copy_(W[start:end])
    rows = x[rank::world]
    _, classes = head.topk(rows, k)
    assert torch.equal(classes, want_classes[rank::world]), f"rank {rank}: {classes} vs {want_classes[rank::world]}"


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_topk_finds_the_global_classes(world):
    """Each rank owns a slice of the classes; the top-k are global class ids."""
    x, W, _ = data(7)
    cos = F.normalize(x.detach(), dim=1) @ F.normalize(W.detach(), dim=1).T
    want = cos.topk(4, dim=1).indices
    spawn(_sharded_topk, world, x.detach(), W.detach(), 4, want)
