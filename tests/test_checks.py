"""The one input check (marginops._checks): bad input gives a ValueError that names the argument
and the value, from the functional API, the head, the reference and the raw op alike; never a
crash or a silent loss."""

import pytest
import torch

import marginops as mo
from marginops import reference

f64 = torch.float64
LOSSES = [mo.margin_cross_entropy, reference.margin_cross_entropy]


def inputs(B=8, D=4, C=10):
    torch.manual_seed(0)
    return torch.randn(B, D), torch.randn(C, D), torch.randint(0, C, (B,))


@pytest.mark.parametrize("fn", LOSSES, ids=["fused", "reference"])
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, W, y: (x, W, y.float()), "labels must hold integer class ids, got dtype torch.float32"),
        (lambda x, W, y: (x, W, y.bool()), "labels must hold integer class ids"),
        (
            lambda x, W, y: (x, W, y.index_fill(0, torch.tensor([5]), 10)),
            r"labels\[5\] = 10 is out of range: class ids must lie in \[0, 10\)",
        ),
        (
            lambda x, W, y: (x, W, y.index_fill(0, torch.tensor([2]), -1)),
            r"labels\[2\] = -1 is out of range.*ignore_index = -100",
        ),
        (lambda x, W, y: (x, W, y[:5]), r"labels must have shape \[8\] to match x \(8, 4\), got \(5,\)"),
        (lambda x, W, y: (x, W, y[:, None]), r"labels must have shape \[8\]"),
        (lambda x, W, y: (x[0], W, y), r"x must have shape \[B, D\], got \(4,\)"),
        (lambda x, W, y: (x, W[:, :3], y), r"weight must have shape \[C, 4\] to match x \(8, 4\), got \(10, 3\)"),
        (lambda x, W, y: (x, W[:0], y), "weight must have at least one class"),
        (lambda x, W, y: (x.long(), W, y), "x must be float16, bfloat16, float32 or float64, got torch.int64"),
        (lambda x, W, y: (x, W.to(torch.complex64), y), "weight must be float16, bfloat16, float32 or float64"),
        (lambda x, W, y: (x, W.to("meta"), y), "weight is on meta but x is on cpu"),
        (lambda x, W, y: (x, W, y.to("meta")), "labels is on meta but x is on cpu"),
    ],
)
def test_bad_tensors(fn, change, message):
    x, W, y = change(*inputs())
    with pytest.raises(ValueError, match=message):
        fn(x, W, y, mo.ArcFace())


@pytest.mark.parametrize("fn", LOSSES, ids=["fused", "reference"])
def test_bad_options(fn):
    x, W, y = inputs()
    with pytest.raises(ValueError, match=r"bias must have shape \[10\] \(one per class\) to match weight, got \(9,\)"):
        fn(x, W, y, mo.Softmax(), bias=torch.zeros(9))
    with pytest.raises(ValueError, match="bias must be a floating tensor"):
        fn(x, W, y, mo.Softmax(), bias=torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction must be one of"):
        fn(x, W, y, mo.ArcFace(), reduction="avg")
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\], got 1.5"):
        fn(x, W, y, mo.ArcFace(), label_smoothing=1.5)
    with pytest.raises(ValueError, match="margin must be a marginops margin spec"):
        fn(x, W, y, "arcface")
    with pytest.raises(ValueError, match=r"per-row m must have shape \[8\] to match x, got \(3,\)"):
        fn(x, W, y, mo.ArcFace(m=torch.zeros(3)))


def test_ignore_index_is_not_out_of_range():
    x, W, y = inputs()
    y[3] = 77
    loss = mo.margin_cross_entropy(x, W, y, mo.ArcFace(), ignore_index=77)
    ref = reference.margin_cross_entropy(x, W, y, mo.ArcFace(), ignore_index=77)
    torch.testing.assert_close(loss, ref)


def test_head_arguments():
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        mo.MarginHead(8, 0)
    with pytest.raises(ValueError, match="embedding_size must be a positive int, got 2.5"):
        mo.MarginHead(2.5, 10)
    with pytest.raises(ValueError, match="margin must be a marginops margin spec"):
        mo.MarginHead(8, 10, margin=0.5)
    head = mo.MarginHead(8, 10, margin=mo.ArcFace())
    with pytest.raises(ValueError, match=r"x must have shape \[B, 8\], got \(4, 6\)"):
        head(torch.randn(4, 6), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels\[1\] = 10 is out of range"):
        head(torch.randn(2, 8), torch.tensor([0, 10]))
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        head.load_state_dict({"weight": torch.randn(11, 8)})


def raw_args(**over):
    x, W, y = inputs()
    args = dict(
        x=x,
        weight=W,
        labels=y,
        bias=None,
        row_margins=None,
        curricular=None,
        class_index=None,
        num_classes=10,
        class_offset=0,
        ignore_index=-100,
    )
    args.update(zip(mo.ArcFace().config()._fields, mo.ArcFace().config()))
    args.update(over)
    return list(args.values())


@pytest.mark.parametrize(
    "over, message",
    [
        (dict(labels=torch.randint(0, 10, (8,), dtype=torch.int32)), "labels must be int64, got Int"),
        (dict(labels=torch.full((8,), 12)), r"labels\[0\] = 12 is out of range"),
        (dict(num_classes=0), "num_classes must be positive, got 0"),
        (dict(class_offset=5), "class_offset = 5 with 10 weight rows does not fit in num_classes = 10"),
        (
            dict(class_index=torch.tensor([3, 1])),
            r"class_index must be strictly increasing: class_index\[0\] = 3, class_index\[1\] = 1",
        ),
        (dict(class_index=torch.tensor([0, 10])), r"class_index\[1\] = 10 is not a class of weight \(10 classes\)"),
        (dict(subcenters=3), "weight has 10 rows, not a multiple of subcenters = 3"),
        (dict(curricular=torch.zeros(8, 3)), r"curricular must have shape \[8, 2\]"),
        (dict(curricular=torch.zeros(8, 2), normalize_x=False), "curricular needs normalized features and weights"),
        (dict(row_margins=torch.zeros(8, 2)), r"row_margins must have shape \[8, 3\]"),
        (
            dict(row_margins=torch.zeros(8, 3), margin_kind=2, m1=4.0),
            "row_margins are supported by the combined margin",
        ),
        (dict(margin_kind=7), "margin_kind must be 0, 1 or 2, got 7"),
        (dict(theta_policy=9), r"theta_policy must be in \[0, 4\], got 9"),
        (dict(s=-1.0), "s must be a positive finite scale, got -1"),
        (dict(margin_kind=2, m1=2.5), "the multiplicative margin m must be a positive integer, got 2.5"),
        (
            dict(bias=torch.zeros(3)),
            r"bias must have shape \[10\] \(one per class\) to match weight \[10, 4\], got \[3\]",
        ),
    ],
)
def test_raw_op_checks(over, message):
    with pytest.raises(ValueError, match=message):
        torch.ops.marginops.margin_ce_forward(*raw_args(**over))


def test_raw_backward_checks():
    args = raw_args()
    lse = torch.ops.marginops.margin_ce_forward(*args)[0]
    with pytest.raises(ValueError, match=r"grad_lse must have shape \[8\], got \[3\]"):
        torch.ops.marginops.margin_ce_backward(torch.zeros(3), None, None, lse, *args, [True] * 4)
    with pytest.raises(ValueError, match=r"lse must have shape \[8\], got \[2\]"):
        torch.ops.marginops.margin_ce_backward(None, None, None, lse[:2], *args, [True] * 4)
