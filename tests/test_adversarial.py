"""Nothing silently wrong: requests marginops cannot honour must fail loudly, and documented
conventions must hold exactly.

- second-order gradients. The backward op has no derivative of its own, so a backward with
  create_graph=True would return gradients that differentiate as zeros. It is refused at
  the first backward with a RuntimeError saying "first-order gradients only", from the functional
  API and from MarginHead; torch.func's gradient transforms are refused with the same words
  (first and second order), while first-order backward stays exact.
- MarginHead's lambda_schedule counts the iteration from 1 at the first training step,
  as SphereFace's Caffe layer (margin_inner_product: iter_ += 1 before λ is computed) does.

Expected values: the eager reference (marginops.reference) or a formula written here."""

import pytest
import torch
from helpers import make_inputs, rel_err

import marginops as mo
from marginops import reference

f64 = torch.float64
FIRST_ORDER = "first-order gradients only"


def per_row_arcface(B):
    """ArcFace with a per-row additive angular margin that requires grad (its gradient is one of
    the op's outputs too)."""
    m = torch.linspace(0.2, 0.5, B, dtype=f64).requires_grad_()
    return mo.ArcFace(s=30.0, m=m), m


CASES = {
    "softmax_bias": lambda B: (mo.Softmax(), None),
    "arcface": lambda B: (mo.ArcFace(s=30.0, m=0.5), None),
    "arcface_per_row": per_row_arcface,
    "sphereface": lambda B: (mo.SphereFace(m=4), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_double_backward_is_refused_functional(case):
    B, D, C = 10, 6, 23
    x, W, y, b = make_inputs(B, D, C, bias=case == "softmax_bias", ignore=1)
    margin, m = CASES[case](B)
    inputs = [t for t in (x, W, b, m) if t is not None]
    # First order: exact against the eager reference (plain backward, and create_graph=False).
    got = torch.autograd.grad(mo.margin_cross_entropy(x, W, y, margin, bias=b), inputs, create_graph=False)
    want = torch.autograd.grad(reference.margin_cross_entropy(x, W, y, margin, bias=b), inputs)
    for g, r in zip(got, want):
        assert rel_err(g, r) <= 1e-10
    # Second order: refused at the first backward, whichever input is asked for.
    for wrt in [inputs, [x], [W]]:
        loss = mo.margin_cross_entropy(x, W, y, margin, bias=b)
        with pytest.raises(RuntimeError, match=FIRST_ORDER):
            torch.autograd.grad(loss, wrt, create_graph=True)
    loss = mo.margin_cross_entropy(x, W, y, margin, bias=b, reduction="none")
    with pytest.raises(RuntimeError, match=FIRST_ORDER):
        loss.backward(torch.rand(B, dtype=f64), create_graph=True)
    # Only the weight requires grad (a frozen backbone): still refused.
    loss = mo.margin_cross_entropy(x.detach(), W, y, margin, bias=None if b is None else b.detach())
    with pytest.raises(RuntimeError, match=FIRST_ORDER):
        torch.autograd.grad(loss, W, create_graph=True)


def test_double_backward_is_refused_head_and_a_gradient_penalty_elsewhere_is_not():
    torch.manual_seed(0)
    B, D, C = 9, 5, 17
    head = mo.MarginHead(D, C, margin=mo.CosFace(s=16.0, m=0.3), bias=True, dtype=f64)
    ref = reference.MarginHead(D, C, margin=mo.CosFace(s=16.0, m=0.3), bias=True, dtype=f64)
    ref.load_state_dict(head.state_dict())
    x = torch.randn(B, D, dtype=f64, requires_grad=True)
    y = torch.randint(0, C, (B,))
    params = [x, head.weight, head.bias]
    got = torch.autograd.grad(head(x, y), params)
    want = torch.autograd.grad(ref(x, y), [x, ref.weight, ref.bias])
    for g, r in zip(got, want):
        assert rel_err(g, r) <= 1e-10
    with pytest.raises(RuntimeError, match=FIRST_ORDER):
        torch.autograd.grad(head(x, y), params, create_graph=True)
    with pytest.raises(RuntimeError, match=FIRST_ORDER):
        head(x, y).backward(create_graph=True)
    # A gradient penalty on another branch (R1-style, on a backbone parameter the head does not
    # depend on) never runs the head's backward: create_graph=True is fine there, and the
    # penalty's own second-order gradient is the closed form 2·a·‖v‖⁴.
    a = torch.tensor(1.5, dtype=f64, requires_grad=True)
    v = torch.randn(4, dtype=f64)
    total = head(x.detach(), y) + (a * v).square().sum() / 2
    (ga,) = torch.autograd.grad(total, a, create_graph=True)
    (gga,) = torch.autograd.grad(ga.square(), a)
    assert rel_err(gga, 2 * a.detach() * v.square().sum() ** 2) <= 1e-12


def test_torch_func_grad_double_backward_is_refused_with_a_clear_message():
    B, D, C = 8, 5, 13
    x, W, y, _ = make_inputs(B, D, C, requires_grad=False)

    def loss(x, W):
        return mo.margin_cross_entropy(x, W, y, mo.ArcFace(s=30.0, m=0.5))

    # First order under torch.func is refused too (its backward always builds a graph), naming
    # what to use instead; never torch's message about an autograd.Function's setup_context.
    for call in (
        lambda: torch.func.grad(loss)(x, W),
        lambda: torch.func.grad(loss, argnums=1)(x, W),
        lambda: torch.func.vjp(lambda x: loss(x, W), x),
        lambda: torch.func.grad(lambda x: torch.func.grad(loss)(x, W).sum())(x),
        lambda: torch.func.hessian(loss)(x, W),
    ):
        with pytest.raises(RuntimeError, match=f"{FIRST_ORDER}.*torch.func") as info:
            call()
        assert "setup_context" not in str(info.value) and "torch.autograd.grad" in str(info.value)
    # The head through torch.func.functional_call, as torch.func users train modules.
    head = mo.MarginHead(D, C, margin=mo.ArcFace(s=30.0, m=0.5), dtype=f64)
    params = {"weight": W.clone()}
    with pytest.raises(RuntimeError, match=FIRST_ORDER):
        torch.func.grad(lambda p: torch.func.functional_call(head, p, (x, y)))(params)
    with pytest.raises(RuntimeError, match=FIRST_ORDER):
        torch.func.grad(
            lambda p: torch.func.grad(lambda q: torch.func.functional_call(head, q, (x, y)))(p)["weight"].sum()
        )(params)
    # Outside torch.func nothing changed: the same loss and gradient as the eager reference.
    xg, Wg = x.clone().requires_grad_(), W.clone().requires_grad_()
    got = torch.autograd.grad(loss(xg, Wg), [xg, Wg])
    want = torch.autograd.grad(reference.margin_cross_entropy(xg, Wg, y, mo.ArcFace(s=30.0, m=0.5)), [xg, Wg])
    for g, r in zip(got, want):
        assert rel_err(g, r) <= 1e-10


def sphereface_lambda(base, gamma, power, lambda_min, iteration):
    """SphereFace's λ at one iteration, as its Caffe layer computes it (written out here)."""
    return max(lambda_min, base * (1.0 + gamma * iteration) ** (-power))


def test_lambda_schedule_first_training_step_uses_iteration_one():
    """SphereFace's margin_inner_product layer runs iter_ += 1 before computing λ, so training
    step n (n = 1, 2, ...) uses λ(n): the first step λ(1), not base."""
    base, gamma, power, lambda_min = 100.0, 0.5, 1.0, 2.0
    torch.manual_seed(3)
    D, C, B = 6, 11, 12
    schedule = mo.LambdaSchedule(base=base, gamma=gamma, power=power, lambda_min=lambda_min)
    head = mo.MarginHead(D, C, margin=mo.SphereFace(m=4), lambda_schedule=schedule, dtype=f64)
    x = torch.randn(B, D, dtype=f64)
    y = torch.randint(0, C, (B,))
    for n in range(1, 5):
        lam = sphereface_lambda(base, gamma, power, lambda_min, n)
        assert head.current_margin().lambda_ == pytest.approx(lam, rel=1e-15), f"the λ step {n} will use"
        want = reference.margin_cross_entropy(x, head.weight, y, mo.SphereFace(m=4, lambda_=lam))
        got = head(x, y)
        assert rel_err(got, want) <= 1e-10, f"step {n}: λ({n}) = {lam}"
        other = reference.margin_cross_entropy(
            x, head.weight, y, mo.SphereFace(m=4, lambda_=sphereface_lambda(base, gamma, power, lambda_min, n - 1))
        )
        assert rel_err(got, other) > 1e-6, "λ(n) and λ(n − 1) give different losses here"
        assert int(head.lambda_iteration) == n, "lambda_iteration counts the training steps taken"
    # Evaluation neither advances the counter nor uses another λ than the next training step's.
    head.eval()
    lam5 = sphereface_lambda(base, gamma, power, lambda_min, 5)
    assert (
        rel_err(head(x, y), reference.margin_cross_entropy(x, head.weight, y, mo.SphereFace(m=4, lambda_=lam5)))
        <= 1e-10
    )
    assert int(head.lambda_iteration) == 4
    # A head resumed from the state_dict continues with λ(5).
    resumed = mo.MarginHead(D, C, margin=mo.SphereFace(m=4), lambda_schedule=schedule, dtype=f64)
    resumed.load_state_dict(head.state_dict())
    assert (
        rel_err(resumed(x, y), reference.margin_cross_entropy(x, head.weight, y, mo.SphereFace(m=4, lambda_=lam5)))
        <= 1e-10
    )
    # SphereFace's defaults: the first step's λ is 1000 / 1.12, the floor 5 reached later.
    fresh = mo.MarginHead(D, C, margin=mo.SphereFace(m=4), lambda_schedule=mo.LambdaSchedule(), dtype=f64)
    assert fresh.current_margin().lambda_ == pytest.approx(1000.0 / 1.12, rel=1e-15)
    fresh.lambda_iteration.fill_(10**6)
    assert fresh.current_margin().lambda_ == 5.0
