"""marginops.margins, the rest of the family (sub-center ArcFace, CurricularFace, AdaFace, MagFace, the adaptive
angular margin) and its training aids: the reference against each method's published formula,
the fused op against the reference, gradcheck, state, and parameter errors."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import make_inputs, rel_err

import marginops as mo
from marginops import reference, regularizers, subcenter

f64 = torch.float64
B, D, C = 300, 16, 600
ZOO = {
    "subcenter": mo.SubCenterArcFace(K=3, s=30.0, m=0.5),
    "curricular": mo.CurricularFace(s=30.0, m=0.5),
    "adaface": mo.AdaFace(s=30.0, m=0.4),
    "magface": mo.MagFace(s=30.0, l_a=1.0, u_a=8.0),
    "adaptive": mo.AdaptiveAngularMargin(),
    "adaptive_scaled": mo.AdaptiveAngularMargin(s=20.0, breakpoints=(0.3, 1.0), slopes=(3.0, 1.5, 1.0)),
}


def zoo_inputs(name, device="cpu", dtype=f64, bias=False, ignore=0, seed=0, rows=B, classes=C, dim=D):
    K = ZOO[name].config().subcenters
    x, W, y, _ = make_inputs(rows, dim, classes * K, dtype=dtype, device=device, ignore=ignore, seed=seed)
    y = torch.where(y >= 0, y % classes, y)
    with torch.no_grad():  # some rows near their class, so margins and hard negatives both occur
        x[ignore : ignore + rows // 4] = (
            W[y[ignore : ignore + rows // 4] * K] * 2 + 0.5 * x[ignore : ignore + rows // 4]
        )
    b = torch.randn(classes, dtype=dtype, device=device, requires_grad=True) if bias else None
    return x, W, y, b


def fresh_state(margin):
    return {k: v.clone() for k, v in margin.state_init().items()} or None


def loss_and_grads(fn, margin, x, W, y, b, state=None, **kw):
    loss = fn(x, W, y, margin, bias=b, margin_state=state, **kw)
    inputs = [x, W] + ([b] if b is not None else [])
    return loss, torch.autograd.grad(loss.sum() if loss.dim() else loss, inputs)


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize(
    "reduction, ignore, smoothing, bias", list(itertools.product(["mean", "none"], [0, 5], [0.0, 0.1], [False, True]))
)
def test_fused_matches_reference(device, name, reduction, ignore, smoothing, bias):
    margin = ZOO[name]
    x, W, y, b = zoo_inputs(name, device, bias=bias, ignore=ignore)
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    s1, s2 = fresh_state(margin), fresh_state(margin)
    loss, grads = loss_and_grads(mo.margin_cross_entropy, margin, x, W, y, b, s1, **kw)
    ref, ref_grads = loss_and_grads(reference.margin_cross_entropy, margin, x, W, y, b, s2, **kw)
    assert rel_err(loss, ref) <= 1e-10
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 1e-10
    if s1 is not None:
        for key in s1:
            torch.testing.assert_close(s1[key], s2[key], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(ZOO))
def test_gradcheck(device, name):
    margin = ZOO[name]
    x, W, y, b = zoo_inputs(name, device, bias=True, rows=6, classes=7, dim=5, seed=3)
    state = fresh_state(margin)

    def f(x, W, b, margin=margin):  # the state is read, not updated: every call sees the same t, μ, σ
        return mo.margin_cross_entropy(x, W, y, margin, bias=b, reduction="sum", margin_state=state, update_state=False)

    if name != "adaface":
        assert torch.autograd.gradcheck(f, (x, W, b))
        return
    # AdaFace detaches the norms its margins come from (as the paper does): check W and bias with
    # x fixed, and x through the same per-row margins held fixed.
    assert torch.autograd.gradcheck(lambda W, b: f(x, W, b), (W, b))
    ctx = mo.margins.RowContext(x, y, y >= 0, False, lambda: None)
    rows = margin.prepare(ctx, state).row_margins.detach()
    fixed = mo.CombinedMargin(s=margin.s, m1=1.0, m2=rows[:, 1], m3=rows[:, 2], policy="clip")
    assert torch.autograd.gradcheck(lambda x: f(x, W, b, fixed), (x,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["subcenter", "curricular", "adaface", "magface"])
def test_low_precision_error_within_twice_eager(device, dtype, name):
    margin = {
        "subcenter": mo.SubCenterArcFace(s=64.0),
        "curricular": mo.CurricularFace(),
        "adaface": mo.AdaFace(),
        "magface": mo.MagFace(l_a=1.0, u_a=30.0),
    }[name]
    x, W, y, _ = zoo_inputs(name, device, rows=128, classes=500, dim=64)
    xl, Wl = (t.detach().to(dtype).requires_grad_() for t in (x, W))
    x64, W64 = (t.detach().double().requires_grad_() for t in (xl, Wl))
    truth, truth_grads = loss_and_grads(reference.margin_cross_entropy, margin, x64, W64, y, None)
    errors = {}
    for impl, fn in (("fused", mo.margin_cross_entropy), ("eager", reference.margin_cross_entropy)):
        loss, grads = loss_and_grads(fn, margin, xl, Wl, y, None)
        errors[impl] = [rel_err(loss, truth)] + [rel_err(g, t) for g, t in zip(grads, truth_grads)]
    for what, f, e in zip(("loss", "dx", "dW"), errors["fused"], errors["eager"]):
        assert f <= 2 * e + 1e-6, f"{what}: fused {f:.2e} vs eager {dtype} {e:.2e}"


# ---- the reference against each paper's formula ----------------------------------------------


def arcface_target(c, m):
    theta = torch.acos(c.clamp(-1, 1))
    return torch.where(theta + m <= math.pi, torch.cos(theta + m), c - m * math.sin(m))


def test_subcenter_reference_is_max_over_subcenters_then_arcface():
    x, W, y, _ = zoo_inputs("subcenter")
    cos = (F.normalize(x, dim=1) @ F.normalize(W, dim=1).T).view(B, C, 3).amax(2)
    rows = torch.arange(B)
    logits = cos.clone()
    logits[rows, y] = arcface_target(cos[rows, y], 0.5)
    expected = F.cross_entropy(30.0 * logits, y)
    torch.testing.assert_close(reference.margin_cross_entropy(x, W, y, ZOO["subcenter"]), expected)


def curricular_official(x, W, y, t, s=30.0, m=0.5):
    """CurricularFace's published forward: t updated first, hard negatives modulated."""
    cos = F.normalize(x, dim=1) @ F.normalize(W, dim=1).T
    rows = torch.arange(len(y))
    target = cos[rows, y][:, None]
    cos_theta_m = target * math.cos(m) - torch.sqrt(1 - target**2) * math.sin(m)
    final_target = torch.where(target > math.cos(math.pi - m), cos_theta_m, target - math.sin(math.pi - m) * m)
    t = target.mean().detach() * 0.01 + 0.99 * t
    mask = cos > cos_theta_m
    logits = torch.where(mask, cos * (t + cos), cos)
    logits = logits.scatter(1, y[:, None], final_target)
    return F.cross_entropy(s * logits, y), t


def test_curricular_reference_follows_the_paper_and_keeps_t():
    margin = ZOO["curricular"]
    state = fresh_state(margin)
    t = torch.zeros((), dtype=f64)
    for step in range(3):
        x, W, y, _ = zoo_inputs("curricular", seed=step)
        expected, t = curricular_official(x, W, y, t)
        got = reference.margin_cross_entropy(x, W, y, margin, margin_state=state)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(state["t"], t.reshape(1))
    assert float(state["t"]) > 0.005, "t follows the mean target cosine"


def adaface_official(x, W, y, mean, std, s=30.0, m=0.4, h=0.333, t_alpha=0.01, eps=1e-3):
    norms = x.norm(dim=1, keepdim=True).clamp(0.001, 100).detach()
    mean = norms.mean() * t_alpha + (1 - t_alpha) * mean
    std = norms.std() * t_alpha + (1 - t_alpha) * std
    scaler = ((norms - mean) / (std + eps) * h).clamp(-1, 1)
    cos = F.normalize(x, dim=1) @ F.normalize(W, dim=1).T
    one_hot = F.one_hot(y, W.shape[0]).to(x.dtype)
    theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    theta_m = (theta + one_hot * (-m * scaler)).clamp(eps, math.pi - eps)
    logits = torch.where(one_hot.bool(), torch.cos(theta_m), cos) - one_hot * (m + m * scaler)
    return F.cross_entropy(s * logits, y), mean, std


def test_adaface_reference_follows_the_paper_and_keeps_statistics():
    margin = ZOO["adaface"]
    state = fresh_state(margin)
    mean, std = torch.tensor(20.0, dtype=f64), torch.tensor(100.0, dtype=f64)
    for step in range(3):
        x, W, y, _ = zoo_inputs("adaface", seed=step)
        x = (x * torch.linspace(0.5, 30, B, dtype=f64)[:, None]).detach().requires_grad_()  # a spread of norms
        expected, mean, std = adaface_official(x, W, y, mean, std)
        torch.testing.assert_close(reference.margin_cross_entropy(x, W, y, margin, margin_state=state), expected)
        torch.testing.assert_close(state["batch_mean"], mean.reshape(1))
        torch.testing.assert_close(state["batch_std"], std.reshape(1))


def test_magface_reference_follows_the_paper_and_grads_reach_the_norm():
    margin = mo.MagFace(s=30.0, l_a=1.0, u_a=8.0, l_m=0.45, u_m=0.8, lambda_g=35.0)
    x, W, y, _ = zoo_inputs("magface")
    x = (x * torch.linspace(0.5, 10, B, dtype=f64)[:, None]).detach().requires_grad_()
    a = x.norm(dim=1, keepdim=True).clamp(1.0, 8.0)
    ada = (0.8 - 0.45) / (8.0 - 1.0) * (a - 1.0) + 0.45
    cos = F.normalize(x, dim=1) @ F.normalize(W, dim=1).T
    sin = torch.sqrt(1 - cos**2)
    cos_m = cos * torch.cos(ada) - sin * torch.sin(ada)
    cos_m = torch.where(cos > torch.cos(math.pi - ada), cos_m, cos - torch.sin(math.pi - ada) * ada)
    one_hot = F.one_hot(y, C).bool()
    ce = F.cross_entropy(30.0 * torch.where(one_hot, cos_m, cos), y)
    expected = ce + 35.0 * (a / 8.0**2 + 1 / a).mean()
    got = reference.margin_cross_entropy(x, W, y, margin)
    torch.testing.assert_close(got, expected)
    g_expected, g_got = torch.autograd.grad(expected, x)[0], torch.autograd.grad(got, x)[0]
    torch.testing.assert_close(g_got, g_expected)
    fused = torch.autograd.grad(mo.margin_cross_entropy(x, W, y, margin), x)[0]
    assert rel_err(fused, g_expected) < 1e-10


def test_adaptive_margin_pieces_and_continuity():
    margin = mo.AdaptiveAngularMargin()
    assert margin.pieces() == [(0.0, 2.0, 0.0), (0.5, 1.0, 0.5)]
    three = mo.AdaptiveAngularMargin(breakpoints=(0.3, 1.0), slopes=(3.0, 1.5, 1.0))
    phi = lambda theta: next(k * theta + b for start, k, b in reversed(three.pieces()) if theta >= start)  # noqa: E731
    for edge in (0.3, 1.0):
        assert abs(phi(edge - 1e-12) - phi(edge)) < 1e-9
    explicit = mo.AdaptiveAngularMargin(breakpoints=(1.0,), slopes=(2.0, 1.5), intercepts=(0.0, 0.0))
    assert explicit.pieces() == [(0.0, 2.0, 0.0), (1.0, 1.5, 0.0)]
    x, W, y, _ = zoo_inputs("adaptive")
    cos_t = F.cosine_similarity(x, W[y], dim=1)
    theta = torch.acos(cos_t)
    phi = torch.where(theta < 0.5, 2 * theta, theta + 0.5)
    k = torch.floor(phi / math.pi)  # past π, the continuous policy's (−1)^k cos φ − 2k
    target = x.norm(dim=1) * ((-1) ** k * torch.cos(phi) - 2 * k)
    assert (k > 0).any() and (phi < 1.0).any()
    logits = (x @ F.normalize(W, dim=1).T).index_put((torch.arange(B), y), target)
    torch.testing.assert_close(reference.margin_cross_entropy(x, W, y, margin), F.cross_entropy(logits, y))


# ---- state, heads and schedules ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["curricular", "adaface"])
def test_head_state_updates_in_training_only_and_survives_state_dict(name):
    margin = ZOO[name]
    torch.manual_seed(0)
    head = mo.MarginHead(D, C, margin=margin).double()
    x, _, y, _ = zoo_inputs(name)
    before = {k: v.clone() for k, v in head.state_dict().items() if k.startswith("margin_state.")}
    assert before, "stateful margins keep buffers"
    head(x, y).backward()
    after = {k: v.clone() for k, v in head.state_dict().items() if k.startswith("margin_state.")}
    assert any(not torch.equal(before[k], after[k]) for k in before)
    head.eval()
    head(x, y)
    assert all(torch.equal(after[k], head.state_dict()[k]) for k in after), "eval does not update"
    copy = mo.MarginHead(D, C, margin=margin).double()
    copy.load_state_dict(head.state_dict())
    copy.eval()
    torch.testing.assert_close(copy(x, y), head(x, y))


def test_lambda_schedule_anneals_sphereface():
    schedule = mo.LambdaSchedule()
    assert schedule(0) == 1000.0 and schedule(10) == pytest.approx(1000 / 2.2) and schedule(10**6) == 5.0
    torch.manual_seed(0)
    head = mo.MarginHead(
        D, C, margin=mo.SphereFace(m=4), lambda_schedule=mo.LambdaSchedule(base=100.0, gamma=0.5, lambda_min=2.0)
    ).double()
    x, _, y, _ = zoo_inputs("adaptive")
    for it in range(1, 4):  # SphereFace's Caffe layer counts the iteration from 1 at the first step
        expected = reference.margin_cross_entropy(
            x, head.weight, y, mo.SphereFace(m=4, lambda_=max(2.0, 100.0 / (1 + 0.5 * it)))
        )
        torch.testing.assert_close(head(x, y), expected)
    assert int(head.lambda_iteration) == 3
    head.eval()
    head(x, y)
    assert int(head.lambda_iteration) == 3
    copy = mo.MarginHead(D, C, margin=mo.SphereFace(m=4), lambda_schedule=mo.LambdaSchedule()).double()
    copy.load_state_dict(head.state_dict())
    assert int(copy.lambda_iteration) == 3
    with pytest.raises(ValueError, match="lambda_schedule anneals LSoftmax/SphereFace"):
        mo.MarginHead(D, C, margin=mo.ArcFace(), lambda_schedule=mo.LambdaSchedule())


def test_weighted_head_is_the_weighted_sum_ccl_style():
    torch.manual_seed(0)
    whiten = regularizers.FeatureWhitening(D).double()
    head = mo.WeightedMarginHead(D, C, terms=[(mo.AdaptiveAngularMargin(), 1.0), (mo.SphereFace(m=4), 0.5)]).double()
    x, _, y, _ = zoo_inputs("adaptive")
    feats = whiten(x)
    loss = head(feats, y)
    expected = reference.margin_cross_entropy(
        feats, head.weight, y, mo.AdaptiveAngularMargin()
    ) + 0.5 * reference.margin_cross_entropy(feats, head.weight, y, mo.SphereFace(m=4))
    torch.testing.assert_close(loss, expected)
    got = torch.autograd.grad(loss, [head.weight, x], retain_graph=True)
    want = torch.autograd.grad(expected, [head.weight, x])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    with pytest.raises(ValueError, match="has sub-centers or state"):
        mo.WeightedMarginHead(D, C, terms=[(mo.CurricularFace(), 1.0)])


def test_feature_whitening_running_statistics():
    torch.manual_seed(0)
    w = regularizers.FeatureWhitening(4, decay=0.9)
    a, b = torch.randn(64, 4) * 3 + 1, torch.randn(64, 4) * 2 - 1
    out = w(a)
    torch.testing.assert_close(w.running_mean, a.mean(0))  # the first batch sets the statistics
    torch.testing.assert_close(out, (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + 1e-5))
    w(b)
    torch.testing.assert_close(w.running_mean, 0.9 * a.mean(0) + 0.1 * b.mean(0))
    torch.testing.assert_close(w.running_var, 0.9 * a.var(0, unbiased=False) + 0.1 * b.var(0, unbiased=False))
    w.eval()
    stats = w.running_mean.clone()
    w(torch.randn(8, 4) + 10)
    assert torch.equal(stats, w.running_mean)
    copy = regularizers.FeatureWhitening(4, decay=0.9)
    copy.load_state_dict(w.state_dict())
    assert torch.equal(copy.running_var, w.running_var) and int(copy.num_batches_tracked) == 2


def test_ring_loss_and_weight_norm_equalizer():
    torch.manual_seed(0)
    x = (torch.randn(32, 8) * torch.linspace(0.5, 3, 32)[:, None]).requires_grad_()
    ring = regularizers.RingLoss(weight=0.1)
    loss = ring(x)
    r0 = x.norm(dim=1).mean().detach()
    torch.testing.assert_close(ring.radius.detach(), r0)
    torch.testing.assert_close(loss, 0.05 * ((x.norm(dim=1) - r0) ** 2).mean())
    loss.backward()
    norms = x.detach().norm(dim=1)  # λ/2 · mean (‖x‖ − R)²: ∂/∂x = λ/B (‖x‖ − R) x/‖x‖, ∂/∂R = −λ mean (‖x‖ − R)
    torch.testing.assert_close(x.grad, 0.1 / 32 * ((norms - r0) / norms)[:, None] * x.detach())
    torch.testing.assert_close(ring.radius.grad.reshape(()), -0.1 * (norms - r0).mean())
    W = (torch.randn(100, 8) * torch.linspace(0.1, 2, 100)[:, None]).requires_grad_()
    eq = regularizers.WeightNormEqualizer(weight=0.5)
    sq = (W**2).sum(1)
    torch.testing.assert_close(eq(W), 0.5 * ((sq - sq.mean()) ** 2).mean())
    opt = torch.optim.SGD([W], lr=0.5)
    spread = float(W.detach().norm(dim=1).std())
    for _ in range(100):
        opt.zero_grad()
        eq(W).backward()
        opt.step()
    assert float(W.detach().norm(dim=1).std()) < 0.01 * spread, "norms are pulled together"


# ---- sub-center tools and inference helpers -----------------------------------------------------


def test_subcenter_tools_find_noise_and_drop_subcenters():
    torch.manual_seed(0)
    Cs, K, Dd = 20, 3, 256  # random directions in 256-D sit at 90° ± 4°
    W = torch.randn(Cs * K, Dd)
    y = torch.arange(Cs).repeat_interleave(10)
    dominant_true = torch.randint(0, K, (Cs,))
    x = W[y * K + dominant_true[y]] + 0.1 * torch.randn(len(y), Dd)
    noisy = torch.zeros(len(y), dtype=torch.bool)
    noisy[::10] = True  # one sample per class sits near another class's sub-center
    x[noisy] = W[((y[noisy] + 1) % Cs) * K] + 0.1 * torch.randn(int(noisy.sum()), Dd)
    outliers, dominant = subcenter.find_outliers(x, W, y, K, threshold_degrees=75)
    assert torch.equal(dominant, dominant_true)
    assert torch.equal(outliers, noisy)
    W1 = subcenter.drop_subcenters(W, K, dominant)
    assert W1.shape == (Cs, Dd) and torch.equal(W1, W.view(Cs, K, Dd)[torch.arange(Cs), dominant_true])
    unseen = subcenter.dominant_subcenters(x[:10], W, y[:10], K)
    assert int(unseen[0]) == int(dominant_true[0]) and bool((unseen[1:] == -1).all())
    with pytest.raises(ValueError, match="labels must lie in"):
        subcenter.dominant_subcenters(x, W, y + 100, K)


@pytest.mark.parametrize(
    "margin",
    [mo.Softmax(), mo.ArcFace(s=30.0), mo.SubCenterArcFace(K=2, s=30.0), mo.SphereFace()],
    ids=["softmax", "arcface", "subcenter", "sphereface"],
)
def test_inference_helpers(device, margin):
    torch.manual_seed(0)
    head = mo.MarginHead(D, C, margin=margin, bias=isinstance(margin, mo.Softmax)).double().to(device)
    with torch.no_grad():
        head.weight.normal_()
        if head.bias is not None:
            head.bias.normal_()
    x = torch.randn(70, D, dtype=f64, device=device)
    cfg, K = margin.config(), margin.config().subcenters
    xs = cfg.s * F.normalize(x, dim=1) if cfg.normalize_x else x
    ws = F.normalize(head.weight, dim=1) if cfg.normalize_w else head.weight
    plain = (xs @ ws.T).view(70, C, K).amax(2) + (head.bias if head.bias is not None else 0)
    torch.testing.assert_close(head.logits(x, chunk_size=97), plain)
    cos = (F.normalize(x, dim=1) @ F.normalize(head.weight, dim=1).T).view(70, C, K).amax(2)
    torch.testing.assert_close(head.cosine(x, chunk_size=101), cos)
    values, classes = head.topk(x, k=5, kind="logit")
    ref_values, ref_classes = plain.topk(5, dim=1)
    torch.testing.assert_close(values, ref_values)
    assert torch.equal(classes, ref_classes)
    values, classes = head.topk(x, k=5)  # kind="cosine", the default
    ref_values, ref_classes = cos.topk(5, dim=1)
    torch.testing.assert_close(values, ref_values)
    assert torch.equal(classes, ref_classes)
    with pytest.raises(ValueError, match=r"k = 601 must lie in \[1, 600\]"):
        head.topk(x, k=601)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: mo.SubCenterArcFace(K=0), "K must be an int in"),
        (lambda: mo.SubCenterArcFace(K=2.5), "K must be an int in"),
        (lambda: mo.SubCenterArcFace(m=30.0), "degrees would be"),
        (lambda: mo.CurricularFace(momentum=1.5), r"momentum=1.5 must lie in \[0, 1\]"),
        (lambda: mo.AdaFace(h=-1.0), r"h=-1.0 must lie in"),
        (lambda: mo.AdaFace(s=0.0), "s must be a positive finite scale"),
        (lambda: mo.MagFace(u_a=5.0, l_a=10.0), "above l_a=10.0"),
        (lambda: mo.MagFace(u_m=2.0), "u_m=2.0 must lie in"),
        (lambda: mo.AdaptiveAngularMargin(slopes=(2.0,)), "slopes needs one entry per piece"),
        (lambda: mo.AdaptiveAngularMargin(breakpoints=(4.0,)), "breakpoints must increase strictly inside"),
        (lambda: mo.AdaptiveAngularMargin(slopes=(0.5, 1.0)), r"slopes=0.5 must lie in \[1, 10\]"),
        (lambda: mo.AdaptiveAngularMargin(policy="fallback"), "policy='fallback' needs m1 = 1"),
        (lambda: mo.LambdaSchedule(gamma=-1.0), "gamma=-1.0 must lie in"),
        (lambda: regularizers.RingLoss(weight=-1.0), "weight must be a non-negative number"),
        (lambda: regularizers.FeatureWhitening(4, decay=1.0), r"decay must lie in \[0, 1\)"),
    ],
)
def test_bad_parameters(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_subcenter_weight_shape_errors():
    x, W, y, _ = make_inputs(8, 4, 10)
    with pytest.raises(ValueError, match="weight has 10 rows: SubCenterArcFace needs num_classes·3"):
        mo.margin_cross_entropy(x, W, y, mo.SubCenterArcFace(K=3))
    head = mo.MarginHead(4, 10, margin=mo.SubCenterArcFace(K=3))
    assert head.weight.shape == (30, 4)
