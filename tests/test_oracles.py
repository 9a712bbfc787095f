"""Independent oracles: each margin spec, with float and with per-row tensor parameters, against
its formula written out here with torch ops (cos, θ and ψ spelled out, then F.cross_entropy) —
not through Margin.prepare, marginops.reference or anything else the fused op uses — in float64,
loss and gradients. And the sharded head's top-k against the same kind of formula."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err, spawn

import marginops as mo

f64 = torch.float64
B, D, C = 24, 10, 37


def data(seed=0, scale=1.0, aligned=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=f64) * scale
    W = torch.randn(C, D, generator=g, dtype=f64)
    y = torch.randint(0, C, (B,), generator=g)
    x[-3:] = -W[y[-3:]] + 0.1 * x[-3:]  # θ near π: the ArcFace policies differ there
    x[:aligned] = W[y[:aligned]] + 0.3 * x[:aligned]  # θ near 0 (about 0.3)
    return x.requires_grad_(), W.requires_grad_(), y


def logits(x, W, y, target, s=None, normalize_x=True, normalize_w=True, bias=None, K=1, negatives=None):
    """z_ij = a_i·b_j·c_ij (+ bias), the target column replaced by a_i·b_y·target(c_iy, i).
    With K sub-centers (W [C·K, D], class j in rows j·K … j·K + K − 1) c_ij is the largest of
    class j's; ``negatives`` maps the cosines [B, C] of the non-target columns."""
    xn = x / x.norm(dim=1, keepdim=True)
    Wn = W / W.norm(dim=1, keepdim=True)
    cos = (xn @ Wn.T).view(B, C, K).amax(2)
    a = torch.full((B, 1), float(s), dtype=f64) if normalize_x else x.norm(dim=1, keepdim=True)
    b = torch.ones(1, C, dtype=f64) if normalize_w else W.norm(dim=1)[None, :]
    onehot = F.one_hot(y, C).bool()
    psi = target(cos.gather(1, y[:, None]).squeeze(1))
    z = a * b * torch.where(onehot, psi[:, None], cos if negatives is None else negatives(cos))
    return z if bias is None else z + bias


def check(spec, z, x, W, y, extra=(), bias=None, penalty=None, run=None):
    """F.cross_entropy(z, y) (+ the mean of a per-row ``penalty``) against the fused loss (or
    ``run()``'s, e.g. a head's), loss and gradients. Returns the largest relative errors."""
    leaves = [x, W, *([bias] if bias is not None else []), *extra]
    want = F.cross_entropy(z, y) + (0.0 if penalty is None else penalty.mean())
    want_grads = torch.autograd.grad(want, leaves)
    got = mo.margin_cross_entropy(x, W, y, spec, bias=bias) if run is None else run()
    got_grads = torch.autograd.grad(got, leaves)
    assert rel_err(got, want) <= 1e-10, f"loss {rel_err(got, want):.2e}"
    for k, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert rel_err(g, w) <= 1e-9, f"gradient {k}: {rel_err(g, w):.2e}"
    return rel_err(got, want), max(rel_err(g, w) for g, w in zip(got_grads, want_grads))


def arc(c, m):  # cos(θ + m)
    return torch.cos(torch.acos(c) + m)


def angle(c):  # θ, c clamped to [−1 + 1e-7, 1 − 1e-7] first (the specs' COS_EPS)
    return torch.acos(c.clamp(-1 + 1e-7, 1 - 1e-7))


def arc_fallback(c, m):  # ArcFace's "fallback": cos(θ + m), or c − m·sin m where θ + m > π
    m = torch.as_tensor(m, dtype=f64)
    return torch.where(angle(c) + m > math.pi, c - m * torch.sin(m), torch.cos(angle(c) + m))


def cos_y(x, W, y, K=1):  # cos θ_iy (the best of y's K sub-centers), detached
    xn = x.detach() / x.detach().norm(dim=1, keepdim=True)
    Wn = W.detach() / W.detach().norm(dim=1, keepdim=True)
    return (xn @ Wn.T).view(B, C, K).amax(2).gather(1, y[:, None]).squeeze(1)


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

    assert bool(
        (
            torch.acos((x / x.norm(dim=1, keepdim=True) * (W / W.norm(dim=1, keepdim=True))[y]).sum(1)) + m > math.pi
        ).any()
    )
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


@pytest.mark.parametrize("m, lam", [(3, 0.5), (2, 0.0)])
def test_lsoftmax(m, lam):
    """ψ(c) = ((−1)^k cos(mθ) − 2k + λc)/(1 + λ) on θ ∈ [kπ/m, (k+1)π/m]; neither features nor
    weights normalized: target z = ‖x‖‖W_y‖ψ(c)."""
    x, W, y = data(8, aligned=4)

    def psi(c):
        theta = angle(c)
        k = torch.floor(m * theta / math.pi).clamp(0, m - 1)
        return ((-1) ** k * torch.cos(m * theta) - 2 * k + lam * c) / (1 + lam)

    pieces = torch.floor(m * angle(cos_y(x, W, y)) / math.pi)
    assert set(pieces.tolist()) == set(map(float, range(m))), f"rows on pieces {sorted(set(pieces.tolist()))}"
    z = logits(x, W, y, psi, normalize_x=False, normalize_w=False)
    check(mo.LSoftmax(m=m, lambda_=lam), z, x, W, y)


def test_subcenter_arcface():
    """A class's cosine is the largest of its K sub-centers' (rows c·K … c·K + K − 1 of W), the
    gradient reaching only that one; ArcFace's margin (fallback past π) on the target."""
    K, m = 3, 0.5
    x, W0, y = data(9)
    g = torch.Generator().manual_seed(90)
    with torch.no_grad():  # sub-centers near a class direction, so that θ + m > π happens for the last rows
        W = (W0[:, None, :] + 0.3 * torch.randn(C, K, D, generator=g, dtype=f64)).reshape(C * K, D)
    W.requires_grad_()
    xn, Wn = F.normalize(x.detach(), dim=1), F.normalize(W.detach(), dim=1)
    best = (xn @ Wn.T).view(B, C, K).argmax(2)
    assert len(set(best.gather(1, y[:, None]).squeeze(1).tolist())) == K, "every sub-center wins some target"
    assert bool((angle(cos_y(x, W, y, K)) + m > math.pi).any()), "no row past the fallback boundary"
    z = logits(x, W, y, lambda c: arc_fallback(c, m), s=30.0, K=K)
    check(mo.SubCenterArcFace(K=K, s=30.0, m=m), z, x, W, y)


def curricular_logits(x, W, y, s, m, t):
    """ArcFace (fallback) on the target; a negative with c_j > τ = cos(θ_y + m) (τ and t
    constants) becomes c_j·(t + c_j)."""
    tau = torch.cos(angle(cos_y(x, W, y)) + m)
    cos = F.normalize(x.detach(), dim=1) @ F.normalize(W.detach(), dim=1).T
    hard = (cos > tau[:, None]) & ~F.one_hot(y, C).bool()
    assert 0 < int(hard.sum()) < hard.numel() - B, "hard negatives all or none"
    return logits(
        x, W, y, lambda c: arc_fallback(c, m), s=s, negatives=lambda c: torch.where(c > tau[:, None], c * (t + c), c)
    )


def curricular_data(seed):
    """The class after the last row's gets nearly its weight: a negative at c ≈ −1 in a row with
    θ_y + m > π, where it stays easy (τ = cos(θ_y + m) there, not the fallback's c − m·sin m)."""
    x, W, y = data(seed, aligned=4)
    with torch.no_grad():
        j = int(y[-1] + 1) % C
        W[j] = W[y[-1]] + 0.05 * W[j]
    return x, W, y


def test_curricularface_without_state():
    """Without state t is the batch's mean target cosine."""
    m = 0.5
    x, W, y = curricular_data(10)
    cy = cos_y(x, W, y)
    c_last = float(F.normalize(x.detach()[-1], dim=0) @ F.normalize(W.detach()[int(y[-1] + 1) % C], dim=0))
    theta_last = float(angle(cy[-1]))
    assert theta_last + m > math.pi and float(cy[-1]) - m * math.sin(m) < c_last <= math.cos(theta_last + m)
    t = cy.mean()
    check(mo.CurricularFace(s=30.0, m=m), curricular_logits(x, W, y, 30.0, m, t), x, W, y)


def test_curricularface_head_state():
    """A head's t: t ← momentum·mean(cos θ_y) + (1 − momentum)·t from 0, updated before use."""
    spec = mo.CurricularFace(s=30.0, m=0.5, momentum=0.3)
    x0, W0, y = curricular_data(11)
    head = mo.MarginHead(D, C, spec, dtype=f64)
    with torch.no_grad():
        head.weight.copy_(W0)
    g = torch.Generator().manual_seed(110)
    t = torch.zeros((), dtype=f64)
    for step in range(2):
        x = (x0.detach() + 0.5 * step * torch.randn(B, D, generator=g, dtype=f64)).requires_grad_()
        t = 0.3 * cos_y(x, head.weight, y).mean() + 0.7 * t
        z = curricular_logits(x, head.weight, y, 30.0, 0.5, t)
        check(spec, z, x, head.weight, y, run=lambda x=x, y=y: head(x, y))
        assert rel_err(head.margin_state.t, t) <= 1e-12, f"step {step}: t {float(head.margin_state.t)} vs {float(t)}"


def adaface_target(x, m, h, mean, std):
    """cos(clip(θ − m·g, ε, π − ε)) − (m + m·g), g = clip(h·(‖x‖ − μ)/(σ + ε), −1, 1) with ‖x‖
    clipped to [0.001, 100] and detached, ε = 1e-3."""
    g = (h * (x.detach().norm(dim=1).clamp(0.001, 100.0) - mean) / (std + 1e-3)).clamp(-1.0, 1.0)
    return lambda c: torch.cos((angle(c) - m * g).clamp(1e-3, math.pi - 1e-3)) - (m + m * g)


def adaface_data(seed):
    """Norms from about 160 down to 0.3, the largest rows near their class and the smallest near
    the opposite: g reaches ±1 and θ − m·g leaves [ε, π − ε] on both sides."""
    x, W, y = data(seed, aligned=3)
    with torch.no_grad():
        x.mul_(torch.logspace(math.log10(50.0), -1.0, B, dtype=f64)[:, None])
    return x, W, y


def test_adaface_without_state():
    """Without state μ and σ are the batch's mean and (unbiased) std of the clipped norms."""
    m, h = 0.4, 2.0
    x, W, y = adaface_data(12)
    norms = x.detach().norm(dim=1).clamp(0.001, 100.0)
    mean, std = norms.mean(), norms.std()
    g = (h * (norms - mean) / (std + 1e-3)).clamp(-1.0, 1.0)
    phi = angle(cos_y(x, W, y)) - m * g
    assert bool((x.detach().norm(dim=1) > 100).any()) and bool(
        (g == 1).any() and (g == -1).any() and (g.abs() < 1).any()
    )
    assert bool((phi < 1e-3).any() and (phi > math.pi - 1e-3).any()), "θ − m·g never clipped on both sides"
    check(mo.AdaFace(s=30.0, m=m, h=h), logits(x, W, y, adaface_target(x, m, h, mean, std), s=30.0), x, W, y)


def test_adaface_head_state():
    """A head's μ, σ: EMAs with rate t_alpha from 20 and 100, updated before use."""
    m, h, alpha = 0.4, 2.0, 0.3
    spec = mo.AdaFace(s=30.0, m=m, h=h, t_alpha=alpha)
    head = mo.MarginHead(D, C, spec, dtype=f64)
    mean, std = torch.tensor(20.0, dtype=f64), torch.tensor(100.0, dtype=f64)
    for step in range(2):
        x, W, y = adaface_data(13 + step)
        with torch.no_grad():
            head.weight.copy_(W)
        norms = x.detach().norm(dim=1).clamp(0.001, 100.0)
        mean, std = alpha * norms.mean() + (1 - alpha) * mean, alpha * norms.std() + (1 - alpha) * std
        z = logits(x, head.weight, y, adaface_target(x, m, h, mean, std), s=30.0)
        check(spec, z, x, head.weight, y, run=lambda x=x, y=y: head(x, y))
        assert (
            rel_err(head.margin_state.batch_mean, mean) <= 1e-12 and rel_err(head.margin_state.batch_std, std) <= 1e-12
        )


def test_magface():
    """ArcFace (fallback) with m(a) = (u_m − l_m)/(u_a − l_a)·(a − l_a) + l_m, a = clamp(‖x‖, l_a, u_a)
    differentiable, plus λ_g·(a/u_a² + 1/a) on each row's loss."""
    s, l_a, u_a, l_m, u_m, lam = 30.0, 10.0, 110.0, 0.45, 0.8, 35.0
    x, W, y = data(15, scale=torch.logspace(math.log10(50.0), 0.0, B, dtype=f64)[:, None])
    a = x.norm(dim=1).clamp(l_a, u_a)
    margin = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m
    norms = x.detach().norm(dim=1)
    assert bool((norms < l_a).any() and (norms > u_a).any() and ((norms > l_a) & (norms < u_a)).any())
    assert bool((angle(cos_y(x, W, y)) + margin.detach() > math.pi).any()), "no row past the fallback boundary"
    z = logits(x, W, y, lambda c: arc_fallback(c, margin), s=s)
    spec = mo.MagFace(s=s, l_a=l_a, u_a=u_a, l_m=l_m, u_m=u_m, lambda_g=lam)
    check(spec, z, x, W, y, penalty=lam * (a / u_a**2 + 1 / a))


@pytest.mark.parametrize("s", [None, 30.0])
@pytest.mark.parametrize("intercepts", [None, (0.0, 0.1, 0.5)])
def test_adaptive_angular_margin(s, intercepts):
    """Target a·cos φ(θ), φ piecewise linear in θ (the piece picked by θ, no gradient through the
    choice), continued past π as (−1)^k cos φ − 2k, k = ⌊φ/π⌋; a = s, or ‖x‖ with s=None."""
    if intercepts is None:  # the default: φ = 2θ up to 0.5, then θ + 0.5 (continuous, φ(0) = 0)
        spec = mo.AdaptiveAngularMargin(s=s)
        cuts = (0.5,)

        def phi(theta):
            return torch.where(theta < 0.5, 2 * theta, theta + 0.5)
    else:
        spec = mo.AdaptiveAngularMargin(breakpoints=(0.4, 1.2), slopes=(3.0, 1.5, 1.0), intercepts=intercepts, s=s)
        cuts = (0.4, 1.2)
        b0, b1, b2 = intercepts

        def phi(theta):
            return torch.where(theta < 0.4, 3 * theta + b0, torch.where(theta < 1.2, 1.5 * theta + b1, theta + b2))

    def psi(c):
        p = phi(angle(c))
        k = torch.floor(p / math.pi)
        return (-1) ** k * torch.cos(p) - 2 * k

    x, W, y = data(16, aligned=4)
    theta = angle(cos_y(x, W, y))
    piece = sum((theta >= cut).long() for cut in cuts)
    assert set(piece.tolist()) == set(range(len(cuts) + 1)), "a piece without rows"
    assert bool((phi(theta) > math.pi).any()), "no row with φ > π"
    check(spec, logits(x, W, y, psi, s=s, normalize_x=s is not None), x, W, y)


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
