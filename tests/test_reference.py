"""The eager reference against independent formulations of each method (as the papers and
insightface / pytorch-metric-learning write them), so the oracle itself is checked."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_inputs

import marginops as mo
from marginops import reference

f64 = torch.float64


def cos_matrix(x, W):
    return F.normalize(x, dim=1) @ F.normalize(W, dim=1).T


def with_target(logits, y, target):
    out = logits.clone()
    out[torch.arange(len(y)), y] = target
    return out


def test_softmax_is_plain_cross_entropy():
    x, W, y, b = make_inputs(16, 8, 30, bias=True, requires_grad=False)
    expected = F.cross_entropy(x @ W.T + b, y, label_smoothing=0.1)
    torch.testing.assert_close(
        reference.margin_cross_entropy(x, W, y, mo.Softmax(), bias=b, label_smoothing=0.1), expected
    )


def test_arcface_is_insightface_formula():
    x, W, y, _ = make_inputs(64, 8, 30, requires_grad=False)
    s, m = 64.0, 0.5
    cos = cos_matrix(x, W)
    c = cos[torch.arange(64), y]
    sin = torch.sqrt(1 - c**2)
    phi = c * math.cos(m) - sin * math.sin(m)
    phi = torch.where(c > math.cos(math.pi - m), phi, c - math.sin(math.pi - m) * m)
    expected = F.cross_entropy(s * with_target(cos, y, phi), y)
    assert (c <= math.cos(math.pi - m)).any(), "the batch must reach the fallback region"
    torch.testing.assert_close(reference.margin_cross_entropy(x, W, y, mo.ArcFace(s=s, m=m)), expected)
    easy = torch.where(c > 0, c * math.cos(m) - sin * math.sin(m), c)
    expected_easy = F.cross_entropy(s * with_target(cos, y, easy), y)
    torch.testing.assert_close(
        reference.margin_cross_entropy(x, W, y, mo.ArcFace(s=s, m=m, policy="easy")), expected_easy
    )


def test_cosface_and_combined_honour_every_margin():
    x, W, y, _ = make_inputs(32, 8, 30, requires_grad=False)
    cos = cos_matrix(x, W)
    c = cos[torch.arange(32), y]
    expected = F.cross_entropy(30.0 * with_target(cos, y, c - 0.35), y)
    torch.testing.assert_close(reference.margin_cross_entropy(x, W, y, mo.CosFace(s=30.0, m=0.35)), expected)
    # insightface drops m1 and m2 when m3 > 0; marginops keeps all three.
    theta = torch.acos(c)
    combined = torch.where(theta + 0.3 <= math.pi, torch.cos(theta + 0.3) - 0.2, c - 0.2 - 0.3 * math.sin(0.3))
    expected = F.cross_entropy(30.0 * with_target(cos, y, combined), y)
    got = reference.margin_cross_entropy(x, W, y, mo.CombinedMargin(s=30.0, m1=1.0, m2=0.3, m3=0.2))
    torch.testing.assert_close(got, expected)


def test_sphereface_and_lsoftmax_use_feature_norms():
    x, W, y, _ = make_inputs(32, 8, 30, requires_grad=False)
    rows = torch.arange(32)
    for margin, w_used in ((mo.SphereFace(m=4), F.normalize(W, dim=1)), (mo.LSoftmax(m=4), W)):
        logits = x @ w_used.T
        c = cos_matrix(x, W)[rows, y]
        k = torch.floor(torch.acos(c) * 4 / math.pi)
        psi = (-1) ** k * (8 * c**4 - 8 * c**2 + 1) - 2 * k
        target = x.norm(dim=1) * w_used[y].norm(dim=1) * psi
        expected = F.cross_entropy(with_target(logits, y, target), y)
        torch.testing.assert_close(reference.margin_cross_entropy(x, W, y, margin), expected)


def test_normalized_softmaxes():
    x, W, y, _ = make_inputs(16, 8, 30, requires_grad=False)
    torch.testing.assert_close(
        reference.margin_cross_entropy(x, W, y, mo.NormFace(s=20.0)), F.cross_entropy(20.0 * cos_matrix(x, W), y)
    )
    torch.testing.assert_close(
        reference.margin_cross_entropy(x, W, y, mo.L2Softmax(s=16.0)),
        F.cross_entropy(16.0 * F.normalize(x, dim=1) @ W.T, y),
    )
    torch.testing.assert_close(
        reference.margin_cross_entropy(x, W, y, mo.WeightNormSoftmax()), F.cross_entropy(x @ F.normalize(W, dim=1).T, y)
    )


def test_lsoftmax_lambda_anneals_to_softmax():
    x, W, y, _ = make_inputs(16, 8, 30, requires_grad=False)
    soft = reference.margin_cross_entropy(x, W, y, mo.Softmax())
    gaps = [
        float((reference.margin_cross_entropy(x, W, y, mo.LSoftmax(m=4, lambda_=lam)) - soft).abs())
        for lam in (0.0, 10.0, 1e4)
    ]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-2


def test_per_row_margins_match_scalar_margins():
    x, W, y, _ = make_inputs(16, 8, 30, requires_grad=False)
    m = torch.full((16,), 0.4, dtype=f64)
    torch.testing.assert_close(
        reference.margin_cross_entropy(x, W, y, mo.ArcFace(m=m)),
        reference.margin_cross_entropy(x, W, y, mo.ArcFace(m=0.4)),
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignore_index_and_accuracy(reduction):
    x, W, y, _ = make_inputs(16, 8, 30, ignore=4, requires_grad=False)
    logits = 30.0 * cos_matrix(x, W)
    loss, acc = reference.margin_cross_entropy(x, W, y, mo.NormFace(s=30.0), reduction=reduction, return_accuracy=True)
    torch.testing.assert_close(loss, F.cross_entropy(logits, y, reduction=reduction))
    valid = y != -100
    assert float(acc) == pytest.approx(float((logits.argmax(1) == y)[valid].double().mean()))
