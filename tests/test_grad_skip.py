"""Gradient skipping (grad_skip_threshold): exact when off; when on, the gradients equal float64
eager gradients with exactly the negligible tiles' non-label entries of ∂L/∂z dropped, under the
rule of margin_ce_backward's schema and each backend's tile shape."""

import pytest
import torch
from helpers import rel_err, skip_inputs, skipped_reference, tiles

import marginops as mo
from marginops import reference


def test_zero_threshold_is_the_exact_path(device):
    x, W, y = skip_inputs(device, 300, 3000)
    want = torch.autograd.grad(reference.margin_cross_entropy(x, W, y, mo.ArcFace()), [x, W])
    for kwargs in ({}, {"grad_skip_threshold": 0.0}):
        got = torch.autograd.grad(mo.margin_cross_entropy(x, W, y, mo.ArcFace(), **kwargs), [x, W])
        assert rel_err(got[0], want[0]) < 1e-10 and rel_err(got[1], want[1]) < 1e-10, kwargs


SKIP_MARGINS = {
    "arcface": mo.ArcFace(s=30.0),
    "cosface": mo.CosFace(s=30.0),
    "softmax": mo.Softmax(),
    "subcenter": mo.SubCenterArcFace(K=3, s=30.0),
    "curricular": mo.CurricularFace(s=30.0),
}


@pytest.mark.parametrize("name", list(SKIP_MARGINS))
def test_skipped_tiles_are_exactly_the_negligible_ones(device, name):
    """Labels fall in most tiles (C is a few times B): their entries are kept exactly while the
    rest of a negligible tile is dropped."""
    margin = SKIP_MARGINS[name]
    K = margin.config().subcenters
    B, C = (300, 2000) if device.type == "cpu" else (100, 1000)
    x, W, y = skip_inputs(device, B, C, K=K)
    ref_dx, ref_dw, threshold, skipped = skipped_reference(x, W, y, margin, tiles(device.type, K))
    assert 0.2 < skipped < 0.8, f"the test's threshold should skip about half the tiles, skipped {skipped:.2f}"
    loss = mo.margin_cross_entropy(x, W, y, margin, grad_skip_threshold=threshold)
    loss.backward()
    assert rel_err(loss, reference.margin_cross_entropy(x, W, y, margin)) < 1e-12  # the forward is untouched
    assert rel_err(x.grad, ref_dx) < 1e-10 and rel_err(W.grad, ref_dw) < 1e-10
    exact_dx, exact_dw = torch.autograd.grad(reference.margin_cross_entropy(x, W, y, margin), [x, W])
    assert rel_err(x.grad, exact_dx) > 1e-9 and rel_err(W.grad, exact_dw) > 1e-9, "nothing was skipped"


def test_label_smoothing_rows_are_never_skipped(device):
    """Smoothing puts ε/C on every entry of a row, so no tile of it is negligible: a threshold
    that would skip most tiles without smoothing changes nothing."""
    x, W, y = skip_inputs(device, 300, 3000)
    want = torch.autograd.grad(reference.margin_cross_entropy(x, W, y, mo.ArcFace(), label_smoothing=0.1), [x, W])
    for threshold in (0.0, 0.5):
        loss = mo.margin_cross_entropy(x, W, y, mo.ArcFace(), label_smoothing=0.1, grad_skip_threshold=threshold)
        got = torch.autograd.grad(loss, [x, W])
        assert rel_err(got[0], want[0]) < 1e-10 and rel_err(got[1], want[1]) < 1e-10, f"threshold {threshold}"


def test_heads_pass_the_threshold_and_bad_values_raise():
    x, W, y = skip_inputs("cpu", 40, 4000)
    _, skipped_dw, threshold, _ = skipped_reference(x, W, y, mo.ArcFace(), tiles("cpu"))
    head = mo.MarginHead(x.shape[1], 4000, margin=mo.ArcFace(), grad_skip_threshold=threshold).double()
    with torch.no_grad():
        head.weight.copy_(W)
    head(x, y).backward()
    exact_dw = torch.autograd.grad(reference.margin_cross_entropy(x, W, y, mo.ArcFace()), W)[0]
    assert rel_err(head.weight.grad, skipped_dw) < 1e-10 and rel_err(head.weight.grad, exact_dw) > 1e-9
    for bad in (-0.1, 1.0, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="grad_skip_threshold must lie in \\[0, 1\\)"):
            mo.margin_cross_entropy(x, W, y, mo.ArcFace(), grad_skip_threshold=bad)
        with pytest.raises(ValueError, match="grad_skip_threshold"):
            mo.MarginHead(8, 10, grad_skip_threshold=bad)
    lse = torch.zeros(40, dtype=torch.float64)
    args = (x.detach(), W.detach(), y, None, None, None, None, 4000, 0, -100, *mo.ArcFace().config())
    with pytest.raises(ValueError, match="grad_skip must lie in \\[0, 1\\), got 2"):
        torch.ops.marginops.margin_ce_backward(lse, None, None, lse, *args, [True] * 4, 2.0)
