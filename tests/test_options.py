"""HeadOptions: every option checked once, with a message naming it; every entry point builds one
and runs the one pipeline."""

import dataclasses
import warnings

import pytest
import torch

import marginops as mo
from marginops import _pipeline, reference
from marginops.options import FIELDS, HeadOptions

f64 = torch.float64


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("margin", "arcface", "margin must be a marginops margin spec"),
        ("reduction", "avg", r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
        ("ignore_index", 1.5, "ignore_index must be an int, got 1.5"),
        ("ignore_index", True, "ignore_index must be an int, got True"),
        ("label_smoothing", 1.5, r"label_smoothing must lie in \[0, 1\], got 1.5"),
        ("label_smoothing", torch.tensor(0.1), "label_smoothing must be a float in"),
        ("grad_skip_threshold", 1.0, r"grad_skip_threshold must lie in \[0, 1\), got 1.0"),
        ("grad_skip_threshold", -0.1, r"grad_skip_threshold must lie in \[0, 1\), got -0.1"),
        ("backend", "cuda", r"backend must be one of \('auto', 'chunked', 'tiles'\), got 'cuda'"),
        ("workspace_bytes", 0, "workspace_bytes must be a positive int"),
        ("workspace_bytes", 1.5e6, "workspace_bytes must be a positive int"),
    ],
)
def test_each_bad_option_is_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        HeadOptions(**{field: value})
    with pytest.raises(ValueError, match=message):
        HeadOptions().replace(**{field: value})


def test_defaults_and_normalized_values():
    opts = HeadOptions()
    assert isinstance(opts.margin, mo.Softmax)
    assert (opts.reduction, opts.ignore_index, opts.label_smoothing) == ("mean", -100, 0.0)
    assert (opts.backend, opts.backend_code, opts.workspace_code) == ("auto", 0, 0)
    opts = HeadOptions(label_smoothing=1, grad_skip_threshold=0, workspace_bytes=1 << 20, backend="chunked")
    assert type(opts.label_smoothing) is float and type(opts.grad_skip_threshold) is float
    assert (opts.backend_code, opts.workspace_code) == (1, 1 << 20)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.reduction = "sum"


def test_fused_is_the_deprecated_name_of_tiles():
    with pytest.warns(DeprecationWarning, match='backend="fused" is now called "tiles"'):
        opts = HeadOptions(backend="fused")
    assert (opts.backend, opts.backend_code) == ("tiles", 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert HeadOptions(backend="tiles").backend_code == 2
    with pytest.raises(ValueError, match="backend='tiles' runs on CUDA only, but x is on cpu"):
        mo.margin_cross_entropy(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1]), backend="tiles")


def test_a_head_option_is_an_attribute_checked_when_set():
    head = mo.MarginHead(4, 10, mo.ArcFace(), label_smoothing=0.1)
    assert repr(head.options) == repr(HeadOptions(mo.ArcFace(), label_smoothing=0.1))
    assert all(getattr(head, name) is getattr(head.options, name) for name in FIELDS)
    head.reduction = "sum"
    assert head.options.reduction == "sum"
    with pytest.raises(ValueError, match="reduction must be one of"):
        head.reduction = "avg"
    assert head.reduction == "sum", "a refused value leaves the option as it was"
    with pytest.raises(ValueError, match="margin must be a marginops margin spec"):
        mo.MarginHead(4, 10, margin="arcface")
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        mo.WeightedMarginHead(4, 10, [(mo.ArcFace(), 1.0)], label_smoothing=2.0)


def test_every_entry_point_runs_the_one_pipeline(monkeypatch):
    """margin_cross_entropy, MarginHead and WeightedMarginHead hand one HeadOptions to
    _pipeline.head_loss (ShardedMarginHead too: tests/test_distributed.py runs it); the eager
    reference checks the same options and the same inputs."""
    seen = []
    real = _pipeline.head_loss

    def spy(opts, *args, **kwargs):
        seen.append(opts)
        return real(opts, *args, **kwargs)

    monkeypatch.setattr(_pipeline, "head_loss", spy)
    monkeypatch.setattr(mo.functional, "head_loss", spy)
    torch.manual_seed(0)
    x, y = torch.randn(6, 4, dtype=f64), torch.randint(0, 10, (6,))
    head = mo.MarginHead(4, 10, mo.CosFace(), label_smoothing=0.1, dtype=f64)
    weighted = mo.WeightedMarginHead(4, 10, [(mo.CosFace(), 1.0)], label_smoothing=0.1, dtype=f64)
    weighted.weight.data.copy_(head.weight)
    want = reference.margin_cross_entropy(x, head.weight, y, mo.CosFace(), label_smoothing=0.1)
    for got in (
        mo.margin_cross_entropy(x, head.weight, y, mo.CosFace(), label_smoothing=0.1),
        head(x, y),
        weighted(x, y),
    ):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert [repr(o) for o in seen] == [
        repr(HeadOptions(mo.CosFace(), label_smoothing=0.1))
    ] * 3  # specs compare by repr


@pytest.mark.parametrize("fn", [mo.margin_cross_entropy, reference.margin_cross_entropy], ids=["fused", "reference"])
def test_the_one_input_check_names_the_argument(fn):
    """The messages of the one check (marginops._checks), from the fused call and the reference."""
    x, W, y = torch.randn(8, 4), torch.randn(10, 4), torch.randint(0, 10, (8,))
    cases = [
        ((x.numpy(), W, y), "x must be a tensor, got ndarray"),
        ((x, W, y, None, [0.0] * 10), "bias must be a tensor, got list"),
        ((x[None], W, y), r"x must have shape \[B, D\], got \(1, 8, 4\)"),
        ((x, W.double(), y), "x is float32 but weight is float64"),
        (
            (x, W, y, None, torch.zeros(10, 1)),
            r"bias must have shape \[10\] \(one per class\) to match weight, got \(10, 1\)",
        ),
        ((x, W, y, None, torch.zeros(10, dtype=torch.long)), "bias must be a floating tensor, got torch.int64"),
        ((x, W, y, None, torch.zeros(10, device="meta")), "bias is on meta but x is on cpu"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            fn(*args)
    with pytest.raises(ValueError, match=r"weight has 10 rows: SubCenterArcFace needs num_classes·3"):
        fn(x, W, y, mo.SubCenterArcFace(K=3))
