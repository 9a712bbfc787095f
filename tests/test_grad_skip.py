"""Gradient skipping (grad_skip_threshold): exact when off; when on, the gradients equal float64
eager gradients with exactly the negligible tiles' non-label entries of ∂L/∂z dropped, under the
rule of margin_ce_backward's schema and each backend's tile shape."""

from unittest import mock

import pytest
import torch
from conftest import make_inputs, rel_err

import marginops as mo
from marginops import reference


def tiles(device_type, K=1):
    """(rows, classes) of a backward tile, (dx tiling, dW tiling): the CPU's tiles hold 256
    classes; CUDA's 64 (dx) or 32 (dW) weight rows, so K sub-centers divide their classes."""
    return ((256, 256), (256, 256)) if device_type == "cpu" else ((32, 64 // K), (64, 32 // K))


def tile_maxima(P, label, valid, rows, cols):
    """Per tile: its corner and the largest probability of its valid rows' non-label entries."""
    B, C = P.shape
    P = P.masked_fill(label | ~valid[:, None], 0.0)
    return [
        ((i0, j0), float(P[i0 : i0 + rows, j0 : j0 + cols].max()))
        for i0 in range(0, B, rows)
        for j0 in range(0, C, cols)
    ]


def skipped_reference(x, W, y, margin, tiles, threshold=None, ignore_index=-100):
    """Float64 eager (dx, dW) of the mean loss with the skipped tiles' non-label ∂L/∂z zeroed, the
    threshold used (default: the median of the dx tiles' largest probability, so that about half
    of them are skipped) and the fraction of dx tiles skipped."""
    x64, W64 = x.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    seen = {}
    cross_entropy = torch.nn.functional.cross_entropy

    def capture(logits, *args, **kwargs):
        seen["z"] = logits
        return cross_entropy(logits, *args, **kwargs)

    with mock.patch.object(reference.F, "cross_entropy", capture):
        loss = reference.margin_cross_entropy(x64, W64, y, margin, ignore_index=ignore_index)
    z = seen["z"]
    (G,) = torch.autograd.grad(loss, z, retain_graph=True)
    P, valid = torch.softmax(z.detach(), 1), y != ignore_index
    label = torch.zeros_like(P, dtype=torch.bool)
    label[valid.nonzero().squeeze(1), y[valid]] = True
    if threshold is None:
        threshold = float(torch.tensor([m for _, m in tile_maxima(P, label, valid, *tiles[0])]).median())
    grads, fractions = [], []
    for (rows, cols), wrt in zip(tiles, (x64, W64)):
        keep = label.clone()
        stats = tile_maxima(P, label, valid, rows, cols)
        for (i0, j0), m in stats:
            keep[i0 : i0 + rows, j0 : j0 + cols] |= m >= threshold
        grads.append(torch.autograd.grad(z, wrt, G * keep, retain_graph=True)[0])
        fractions.append(sum(m < threshold for _, m in stats) / len(stats))
    return grads[0], grads[1], threshold, fractions[0]


def skip_inputs(device, B, C, D=8, K=1):
    x, W, y, _ = make_inputs(B, D, C * K, device=device, ignore=3, requires_grad=True)
    return x, W, torch.where(y >= 0, y % C, y)


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
