"""The two margin options insightface's heads have: interclass filtering (a non-target class whose
cosine exceeds t_f gets logit 0 and no gradient) and the straight-through target gradient
(insightface's ArcFace applies the margin under no_grad). Checked in float64 against insightface's
formula written out here, and the CPU op against the eager reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import insightface_formula, make_inputs, rel_err

import marginops as mo
from marginops import reference

TOL = 1e-12


def grads(loss, leaves):
    return torch.autograd.grad(loss, leaves)


CASES = {
    "arcface": dict(m1=1.0, m2=0.5, m3=0.0, t_f=0.0),
    "arcface_filtered": dict(m1=1.0, m2=0.5, m3=0.0, t_f=0.2),
    "cosface_filtered": dict(m1=1.0, m2=0.0, m3=0.35, t_f=0.25),
}


@pytest.mark.parametrize("name", list(CASES))
def test_op_matches_insightface_formula(name):
    p = CASES[name]
    x, W, y, _ = make_inputs(48, 8, 60)
    if p["t_f"] > 0:
        with torch.no_grad():
            cos = F.normalize(x) @ F.normalize(W).T
            cos[torch.arange(48), y] = -1
            assert (cos > p["t_f"]).sum() > 100, "the batch must exercise the filter"
    margin = mo.CombinedMargin(
        s=30.0,
        m1=p["m1"],
        m2=p["m2"],
        m3=p["m3"],
        policy="none",
        straight_through=True,
        interclass_filtering_threshold=p["t_f"],
    )
    want = insightface_formula(x, W, y, 30.0, p["m1"], p["m2"], p["m3"], p["t_f"])
    want_grads = grads(want, [x, W])
    for fn in (mo.margin_cross_entropy, reference.margin_cross_entropy):
        got = fn(x, W, y, margin)
        assert rel_err(got, want) <= TOL, f"{fn.__module__} loss {rel_err(got, want):.2e}"
        for label, g, w in zip(("dx", "dW"), grads(got, [x, W]), want_grads):
            assert rel_err(g, w) <= TOL, f"{fn.__module__} {label} {rel_err(g, w):.2e}"


def test_straight_through_differs_from_the_true_gradient():
    """Same loss, different gradient: the option is not a no-op."""
    x, W, y, _ = make_inputs(16, 8, 20)
    a = mo.margin_cross_entropy(x, W, y, mo.ArcFace(s=30.0, policy="none"))
    b = mo.margin_cross_entropy(x, W, y, mo.ArcFace(s=30.0, policy="none", straight_through=True))
    assert rel_err(a, b) <= TOL
    assert rel_err(grads(a, [x])[0], grads(b, [x])[0]) > 1e-3


@pytest.mark.parametrize(
    "margin",
    [
        mo.ArcFace(s=20.0, m=0.4, straight_through=True, interclass_filtering_threshold=0.15),
        mo.ArcFace(s=20.0, m=0.4, interclass_filtering_threshold=0.15),
        mo.CombinedMargin(s=20.0, m1=1.2, m2=0.3, m3=0.1, straight_through=True, interclass_filtering_threshold=0.3),
        mo.CosFace(s=20.0, m=0.3, interclass_filtering_threshold=0.1),
        mo.SubCenterArcFace(K=1, s=20.0, m=0.4),  # options off: unchanged
    ],
    ids=["arc_st_filter", "arc_filter", "combined_st_filter", "cosface_filter", "plain"],
)
def test_op_matches_reference(margin):
    """Bias, ignored rows and label smoothing with the options (the reference implements them
    independently, on the materialized logits)."""
    x, W, y, b = make_inputs(40, 8, 50, bias=True, ignore=3)
    kw = dict(label_smoothing=0.1)
    got = mo.margin_cross_entropy(x, W, y, margin, b, **kw)
    want = reference.margin_cross_entropy(x, W, y, margin, b, **kw)
    assert rel_err(got, want) <= TOL
    for label, g, w in zip(("dx", "dW", "db"), grads(got, [x, W, b]), grads(want, [x, W, b])):
        assert rel_err(g, w) <= TOL, f"{label} {rel_err(g, w):.2e}"


def test_straight_through_gives_per_row_margins_no_gradient():
    x, W, y, _ = make_inputs(12, 8, 15)
    m = torch.linspace(0.2, 0.6, 12, dtype=torch.float64, requires_grad=True)
    loss = mo.margin_cross_entropy(x, W, y, mo.ArcFace(s=16.0, m=m, straight_through=True))
    (dm,) = torch.autograd.grad(loss, [m], allow_unused=True)
    assert dm is None or dm.abs().max() == 0
    ref = reference.margin_cross_entropy(x, W, y, mo.ArcFace(s=16.0, m=m, straight_through=True))
    assert rel_err(loss, ref) <= TOL


def test_filtered_logit_is_zero():
    """One row, two classes: the negative's cosine above t_f leaves exactly exp(0) in the sum."""
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    W = torch.tensor([[1.0, 1.0], [1.0, 0.1]], dtype=torch.float64)  # label 0 at 45°, class 1 near x
    y = torch.tensor([0])
    loss = mo.margin_cross_entropy(x, W, y, mo.CosFace(s=10.0, m=0.0, interclass_filtering_threshold=0.5))
    z_t = 10.0 * math.cos(math.pi / 4)
    want = math.log(math.exp(z_t) + 1.0) - z_t
    assert abs(float(loss) - want) <= 1e-14


def test_option_errors():
    with pytest.raises(ValueError, match="interclass_filtering_threshold=1.5 must lie in"):
        mo.ArcFace(interclass_filtering_threshold=1.5)
    with pytest.raises(ValueError, match="straight_through must be a bool"):
        mo.CosFace(straight_through=1)
    cfg = mo.NormFace(s=10.0).config()._replace(normalize_x=False, interclass_filter=0.3)
    x, W, y, _ = make_inputs(4, 3, 5, requires_grad=False)
    with pytest.raises(ValueError, match="interclass_filter needs normalized"):
        torch.ops.marginops.margin_ce_forward(x, W, y, None, None, None, None, 5, 0, -100, *cfg)
