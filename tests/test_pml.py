"""marginops.pml: a MarginHead built from a pytorch-metric-learning loss gives the same loss and
gradients (float64)."""

import pytest
import torch
from helpers import rel_err

import marginops as mo
from marginops import pml

L = pytest.importorskip("pytorch_metric_learning.losses")

C, D, B = 12, 6, 20
CASES = {
    "arcface": lambda: L.ArcFaceLoss(num_classes=C, embedding_size=D, margin=28.6, scale=30),
    "subcenter": lambda: L.SubCenterArcFaceLoss(num_classes=C, embedding_size=D, margin=20.0, scale=16, sub_centers=3),
    "cosface": lambda: L.CosFaceLoss(num_classes=C, embedding_size=D, margin=0.3, scale=20),
    "lsoftmax": lambda: L.LargeMarginSoftmaxLoss(num_classes=C, embedding_size=D, margin=3),
    "sphereface": lambda: L.SphereFaceLoss(num_classes=C, embedding_size=D, margin=4),
    "normalized_softmax": lambda: L.NormalizedSoftmaxLoss(num_classes=C, embedding_size=D, temperature=0.1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_same_loss_and_gradients(name):
    torch.manual_seed(0)
    loss_fn = CASES[name]().double()
    loss_fn.W.data = loss_fn.W.data.double()
    head = pml.from_pml(loss_fn)
    assert head.weight.shape == loss_fn.W.t().shape and torch.equal(head.weight, loss_fn.W.t())
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (B,))
    want = loss_fn(x, y)
    got = head(x, y)
    assert rel_err(got, want) <= 1e-12, f"loss {rel_err(got, want):.1e}"
    gx, gw = torch.autograd.grad(got, [x, head.weight])
    wx, ww = torch.autograd.grad(want, [x, loss_fn.W])
    assert rel_err(gx, wx) <= 1e-12, f"dx {rel_err(gx, wx):.1e}"
    assert rel_err(gw, ww.t()) <= 1e-12, f"dW {rel_err(gw, ww.t()):.1e}"


def test_margin_in_radians_and_round_trip():
    loss_fn = L.ArcFaceLoss(num_classes=C, embedding_size=D, margin=28.6, scale=64)
    spec = pml.margin_from_pml(loss_fn)
    assert isinstance(spec, mo.ArcFace) and abs(spec.m - 0.49916) < 1e-4 and spec.policy == "fallback"
    head = pml.from_pml(loss_fn)
    with torch.no_grad():
        head.weight.mul_(2)
    pml.to_pml(head, loss_fn)
    assert torch.equal(loss_fn.W.t(), head.weight)


def test_unconvertible():
    from pytorch_metric_learning import reducers, regularizers

    with pytest.raises(ValueError, match="scale=1"):
        pml.margin_from_pml(L.SphereFaceLoss(num_classes=C, embedding_size=D, scale=2))
    with pytest.raises(ValueError, match="MeanReducer"):
        pml.margin_from_pml(L.CosFaceLoss(num_classes=C, embedding_size=D, reducer=reducers.SumReducer()))
    with pytest.raises(ValueError, match="weight_regularizer"):
        pml.margin_from_pml(
            L.CosFaceLoss(num_classes=C, embedding_size=D, weight_regularizer=regularizers.LpRegularizer())
        )
    with pytest.raises(ValueError, match="no marginops equivalent"):
        pml.margin_from_pml(L.ProxyAnchorLoss(num_classes=C, embedding_size=D))
