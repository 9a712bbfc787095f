"""Margin specs: parameter validation, the op configuration they produce, and ψ itself — the C++
definition (margin_psi op) against the eager one (margins.psi) and closed forms."""

import math

import pytest
import torch
from helpers import make_inputs, rel_err

import marginops as mo
from marginops.margins import KIND_COMBINED, KIND_MULTIPLICATIVE, THETA_POLICIES, psi

f64 = torch.float64


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: mo.ArcFace(s=0.0), "s must be a positive finite scale"),
        (lambda: mo.ArcFace(s=-64.0), "s must be a positive finite scale"),
        (lambda: mo.CosFace(s=float("inf")), "s must be a positive finite scale"),
        (lambda: mo.NormFace(s=True), "s must be a positive finite scale"),
        (lambda: mo.ArcFace(m=-0.1), r"m=-0.1 must lie in \[0, 1.5708\]"),
        (lambda: mo.ArcFace(m=28.6), r"28.6 degrees would be 0.4992"),
        (lambda: mo.CosFace(m=1.5), r"m=1.5 must lie in \[0, 1\]"),
        (lambda: mo.CosFace(m=-0.35), r"must lie in \[0, 1\]"),
        (lambda: mo.CosFace(m="0.35"), "must be a real number"),
        (lambda: mo.SphereFace(m=2.5), "m must be an integer in"),
        (lambda: mo.SphereFace(m=0), "m must be an integer in"),
        (lambda: mo.LSoftmax(m=4, lambda_=-1.0), r"lambda_=-1.0 must lie in"),
        (lambda: mo.ArcFace(policy="insightface"), "policy must be one of"),
        (lambda: mo.CombinedMargin(m1=2.0, m2=0.1, policy="fallback"), "policy='fallback'.*defined for m1 = 1"),
        (lambda: mo.CombinedMargin(m1=0.5), r"m1=0.5 must lie in \[1, 10\]"),
        (lambda: mo.CombinedMargin(m3=-0.2), r"m3=-0.2 must lie in \[0, 1\]"),
        (lambda: mo.ArcFace(m=torch.zeros(3, 2)), "per-row m must be a 1-D floating tensor"),
        (lambda: mo.ArcFace(m=torch.zeros(3, dtype=torch.long)), "per-row m must be a 1-D floating tensor"),
        (
            lambda: mo.CombinedMargin(m1=torch.ones(3, requires_grad=True), policy="none"),
            "per-row m1 is a constant",
        ),
    ],
)
def test_bad_parameters(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_configs_of_the_family():
    arc = mo.ArcFace(s=64.0, m=0.5).config()
    assert arc == mo.CombinedMargin(s=64.0, m1=1.0, m2=0.5, m3=0.0).config()
    cos = mo.CosFace(s=64.0, m=0.35).config()
    assert (cos.margin_kind, cos.m1, cos.m2, cos.m3) == (KIND_COMBINED, 1.0, 0.0, 0.35)
    sphere = mo.SphereFace(m=4).config()
    assert (sphere.margin_kind, sphere.normalize_x, sphere.normalize_w, sphere.m1) == (
        KIND_MULTIPLICATIVE,
        False,
        True,
        4.0,
    )
    assert mo.LSoftmax(m=4).config().normalize_w is False
    assert mo.ArcFace(policy="easy").config().theta_policy == THETA_POLICIES["easy"]
    assert (mo.NormFace(s=10).config().normalize_x, mo.L2Softmax().config().normalize_w) == (True, False)


def test_row_margins_stack_per_row_values():
    m = torch.tensor([0.1, 0.2, 0.3])
    rows = mo.ArcFace(m=m).row_margins(3, torch.zeros(3, 4))
    assert torch.equal(rows, torch.tensor([[1.0, 0.1, 0.0], [1.0, 0.2, 0.0], [1.0, 0.3, 0.0]]))
    assert mo.ArcFace().row_margins(3, torch.zeros(3, 4)) is None
    with pytest.raises(ValueError, match=r"per-row m must have shape \[5\]"):
        mo.ArcFace(m=m).row_margins(5, torch.zeros(5, 4))


def _grid():
    """Cosines over [-1, 1] with the clamp edges, ±1 and policy boundaries for m = 0.5."""
    c = torch.linspace(-1, 1, 401, dtype=f64)
    edges = [1.0, -1.0, 1 - 1e-8, -1 + 1e-8, 1 - 1e-6, 0.0, 1e-9, -math.cos(0.5) + 1e-6, -math.cos(0.5) - 1e-6]
    return torch.cat([c, torch.tensor(edges, dtype=f64)])


PSI_CASES = [
    (KIND_COMBINED, policy, m1, m2, m3)
    for policy in THETA_POLICIES
    for (m1, m2, m3) in [
        (1.0, 0.5, 0.0),
        (1.0, 0.0, 0.35),
        (1.0, 0.3, 0.2),
        (1.0, -0.2, 0.1),
        (1.35, 0.25, 0.1),
        (2.0, 0.0, 0.0),
    ]
    if not (policy == "fallback" and m1 != 1.0)
]
PSI_CASES = [case + (0.0,) for case in PSI_CASES] + [
    (KIND_MULTIPLICATIVE, "none", m, 0.0, 0.0, lambda_) for m in (1.0, 2.0, 3.0, 4.0) for lambda_ in (0.0, 0.7)
]


@pytest.mark.parametrize("kind, policy, m1, m2, m3, lambda_", PSI_CASES)
def test_cpp_psi_matches_reference_and_autograd(kind, policy, m1, m2, m3, lambda_):
    c = _grid().requires_grad_()
    n = c.numel()
    ms = [torch.full((n,), v, dtype=f64, requires_grad=True) for v in (m1, m2, m3)]
    pol = THETA_POLICIES[policy]
    value = psi(kind, pol, c, *ms, lambda_)
    d_c, _, d_m2, d_m3 = torch.autograd.grad(value.sum(), [c] + ms, allow_unused=True, materialize_grads=True)
    out = torch.ops.marginops.margin_psi(c.detach(), *[m.detach() for m in ms], kind, pol, lambda_)
    torch.testing.assert_close(out[0], value.detach(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out[1], d_c, rtol=1e-12, atol=1e-12)
    if kind == KIND_COMBINED:
        torch.testing.assert_close(out[3], d_m2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out[4], d_m3, rtol=0, atol=0)
    assert torch.isfinite(out[1]).all()


def _theta(c):
    return torch.acos(c.clamp(-1 + 1e-7, 1 - 1e-7))


def _psi(margin, c):
    cfg = margin.config()
    full = lambda v: torch.full_like(c, v)  # noqa: E731
    return torch.ops.marginops.margin_psi(
        c, full(cfg.m1), full(cfg.m2), full(cfg.m3), cfg.margin_kind, cfg.theta_policy, cfg.lambda_
    )[0]


def test_psi_closed_forms():
    c = torch.linspace(-0.999, 0.999, 999, dtype=f64)
    theta = _theta(c)
    m = 0.5
    arc = _psi(mo.ArcFace(m=m), c)
    inside = theta + m <= math.pi
    torch.testing.assert_close(arc[inside], torch.cos(theta + m)[inside])
    torch.testing.assert_close(arc[~inside], (c - m * math.sin(m))[~inside])  # insightface's fallback
    torch.testing.assert_close(_psi(mo.CosFace(m=0.35), c), c - 0.35)
    easy = _psi(mo.ArcFace(m=m, policy="easy"), c)
    torch.testing.assert_close(easy, torch.where(c > 0, torch.cos(theta + m), c))
    torch.testing.assert_close(_psi(mo.ArcFace(m=m, policy="none"), c), torch.cos(theta + m))
    comb = _psi(mo.CombinedMargin(m1=1.0, m2=0.3, m3=0.2), c)
    inside = theta + 0.3 <= math.pi
    torch.testing.assert_close(comb[inside], (torch.cos(theta + 0.3) - 0.2)[inside])
    # SphereFace m = 4: Chebyshev cos 4θ = 8c⁴ − 8c² + 1 with k from the quarter-angles.
    k = torch.floor(theta * 4 / math.pi)
    cheb = 8 * c**4 - 8 * c**2 + 1
    torch.testing.assert_close(_psi(mo.SphereFace(m=4), c), (-1) ** k * cheb - 2 * k)
    torch.testing.assert_close(_psi(mo.LSoftmax(m=1), c), c)


def test_policies_shape_the_curve():
    c = torch.linspace(-1 + 1e-6, 1 - 1e-6, 20001, dtype=f64)
    boundary = torch.tensor([-math.cos(0.5) - 1e-10, -math.cos(0.5) + 1e-10], dtype=f64)  # θ + m = π
    jump = lambda margin: float(_psi(margin, boundary).diff().abs())  # noqa: E731
    cont = _psi(mo.ArcFace(m=0.5, policy="continuous"), c)
    assert (cont.diff() > 0).all(), "continuous policy must be increasing in c"
    assert jump(mo.ArcFace(m=0.5, policy="continuous")) < 1e-8
    assert abs(jump(mo.ArcFace(m=0.5)) - (math.cos(0.5) + 0.5 * math.sin(0.5) - 1)) < 1e-8, "insightface's jump"
    assert (_psi(mo.ArcFace(m=0.5, policy="none"), c).diff() < 0).any(), "cos(θ + m) turns back past π"
    sphere = _psi(mo.SphereFace(m=4), c)
    assert (sphere.diff() > 0).all(), "SphereFace's ψ is monotonic"
    quarter = torch.tensor([math.cos(math.pi / 4) - 1e-10, math.cos(math.pi / 4) + 1e-10], dtype=f64)
    assert float(_psi(mo.SphereFace(m=4), quarter).diff().abs()) < 1e-8, "and continuous at θ = π/4"


def test_combined_margin_default_policy_works_for_every_m1():
    """policy=None: "fallback" for m1 = 1, "continuous" otherwise; both are cos(m1·θ + m2) − m3
    where m1·θ + m2 ≤ π."""
    assert mo.CombinedMargin(s=64.0, m1=1.0, m2=0.5).policy == "fallback"
    margin = mo.CombinedMargin(s=64.0, m1=1.1, m2=0.3, m3=0.2)
    assert margin.policy == "continuous"
    x, W, y, _ = make_inputs(40, 8, 30)
    loss = mo.margin_cross_entropy(x, W, y, margin)
    c = (torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(W).T).detach()
    z = 64.0 * c
    theta = c[torch.arange(40), y].clamp(-1 + 1e-7, 1 - 1e-7).acos()
    phi = 1.1 * theta + 0.3
    inside = phi <= math.pi
    assert inside.sum() > 30 and (~inside).any()
    z[torch.arange(40), y] = 64.0 * (torch.cos(phi) - 0.2)
    per_row = torch.nn.functional.cross_entropy(z, y, reduction="none")
    got = mo.margin_cross_entropy(x, W, y, margin, reduction="none").detach()
    assert rel_err(got[inside], per_row[inside]) <= 1e-12
    assert torch.isfinite(loss)
