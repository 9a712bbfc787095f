"""marginops.heads.MarginHead: drop-in training, parity with the eager head, state_dict, accuracy, bias."""

import pytest
import torch
from helpers import rel_err

import marginops as mo
from marginops import reference


def clone_heads(margin, bias=False, C=200, D=16, **kw):
    torch.manual_seed(0)
    fused = mo.MarginHead(D, C, margin=margin, bias=bias, **kw).double()
    eager = reference.MarginHead(D, C, margin=margin, bias=bias, **kw).double()
    eager.load_state_dict(fused.state_dict())
    return fused, eager


@pytest.mark.parametrize(
    "margin", [mo.ArcFace(s=16.0), mo.SphereFace(), mo.Softmax()], ids=["arcface", "sphereface", "softmax"]
)
def test_training_matches_eager_head(margin):
    fused, eager = clone_heads(margin, bias=isinstance(margin, mo.Softmax), return_accuracy=True)
    torch.manual_seed(1)
    x = torch.randn(128, 16, dtype=torch.float64)
    y = torch.randint(0, 200, (128,))
    opts = [torch.optim.SGD(h.parameters(), lr=0.1, momentum=0.9) for h in (fused, eager)]
    history = []
    for _ in range(10):
        losses = []
        for head, opt in zip((fused, eager), opts):
            opt.zero_grad()
            loss, acc = head(x, y)
            loss.backward()
            opt.step()
            losses.append((float(loss.detach()), float(acc)))
        history.append(losses)
        assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-9)
        assert losses[0][1] == pytest.approx(losses[1][1], abs=1e-12)
    assert history[-1][0][0] < history[0][0][0]
    assert rel_err(fused.weight, eager.weight) < 1e-9


def test_state_dict_round_trip_and_repr():
    head = mo.MarginHead(8, 30, margin=mo.CosFace(), bias=True)
    copy = mo.MarginHead(8, 30, margin=mo.CosFace(), bias=True)
    copy.load_state_dict(head.state_dict())
    assert torch.equal(copy.weight, head.weight) and torch.equal(copy.bias, head.bias)
    assert "num_classes=30" in repr(head) and "CosFace" in repr(head)
    assert head.weight.shape == (30, 8) and float(head.weight.detach().std()) == pytest.approx(0.01, rel=0.3)


def test_head_options_pass_through():
    torch.manual_seed(0)
    head = mo.MarginHead(8, 30, margin=mo.NormFace(s=10.0), reduction="none", ignore_index=3, label_smoothing=0.2)
    x, y = torch.randn(6, 8), torch.tensor([3, 1, 2, 3, 4, 5])
    loss = head(x, y)
    ref = reference.margin_cross_entropy(
        x, head.weight, y, mo.NormFace(s=10.0), reduction="none", ignore_index=3, label_smoothing=0.2
    )
    assert loss.shape == (6,) and float(loss[0].detach()) == 0.0 and float(loss[3].detach()) == 0.0
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
