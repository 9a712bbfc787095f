"""The ops' arguments are declared once (csrc/head_params.h): the registered schemas, OpConfig, the
Python wrappers (ops.head_stats, ops.topk) and the fake kernels must agree on names, order, types
and defaults. And opcheck of margin_topk (the training ops' opcheck is in test_ops.py)."""

import inspect
import typing

import torch

import marginops as mo
from marginops import ops
from marginops.margins import OpConfig

_ops = torch.ops.marginops
TENSORS = ("x", "weight", "labels", "bias", "row_margins", "curricular", "class_index")
SHARD = ("num_classes", "class_offset", "ignore_index")
TAIL = ("grad_skip", "backend", "workspace_bytes")
SCHEMA_TYPE = {int: "int", float: "float", bool: "bool"}


def arguments(op):
    return list(op.default._schema.arguments)


def names(op):
    return [a.name for a in arguments(op)]


def test_forward_schema_is_tensors_shard_opconfig_tail():
    assert names(_ops.margin_ce_forward) == [*TENSORS, *SHARD, *OpConfig._fields, *TAIL]


def test_backward_schema_is_the_forwards_head_arguments():
    head = [*TENSORS, *SHARD, *OpConfig._fields]
    grads = ["grad_lse", "grad_target_logit", "grad_logit_sum", "lse"]
    assert names(_ops.margin_ce_backward) == [*grads, *head, "output_mask", *TAIL]
    # the same types in both
    fwd = {a.name: str(a.type) for a in arguments(_ops.margin_ce_forward)}
    bwd = {a.name: str(a.type) for a in arguments(_ops.margin_ce_backward)}
    assert all(fwd[n] == bwd[n] for n in head + list(TAIL))


def test_opconfig_fields_have_the_schema_types_and_defaults():
    schema = {a.name: a for a in arguments(_ops.margin_ce_forward)}
    hints = typing.get_type_hints(OpConfig)
    for field in OpConfig._fields:
        assert str(schema[field].type) == SCHEMA_TYPE[hints[field]], field
        assert not schema[field].kwarg_only
    # every margin's config fills every field with its schema type
    for margin in (mo.ArcFace(), mo.CosFace(), mo.SphereFace(), mo.Softmax()):
        for field, value in margin.config()._asdict().items():
            assert SCHEMA_TYPE[type(value)] == str(schema[field].type), (margin, field)


def test_head_stats_keywords():
    params = inspect.signature(ops.head_stats).parameters
    assert list(params)[:3] == ["x", "weight", "labels"]
    after = list(params)[3:]
    assert after == [*TENSORS[3:], *SHARD, "cfg", *TAIL]
    defaults = {a.name: a.default_value for a in arguments(_ops.margin_ce_forward)}
    for name in TAIL:
        assert params[name].default == defaults[name], name
    for name in TENSORS[3:]:
        assert params[name].default is None
    assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in after), "called by keyword"


def test_topk_schema_and_wrapper():
    topk = names(_ops.margin_topk)
    assert topk[:5] == ["x", "weight", "bias", "class_index", "k"]
    assert topk[5] == "class_offset" and set(topk[6:]) <= set(OpConfig._fields)
    params = inspect.signature(ops.topk).parameters
    assert set(params) == {"x", "weight", "k", "cfg", "bias", "class_index", "class_offset"}
    assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in params if n not in ("x", "weight"))


def test_head_stats_by_keyword_matches_the_op_and_fakes():
    torch.manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    W = torch.randn(14, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, -100, 6, 1])
    cfg = mo.ArcFace(s=8.0, m=0.3).config()._replace(subcenters=2, interclass_filter=0.9)
    stats = ops.head_stats(x, W, y, num_classes=7, cfg=cfg)
    direct = _ops.margin_ce_forward(x, W, y, None, None, None, None, 7, 0, -100, *cfg)
    for a, b in zip(stats, direct):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    stats.lse.sum().backward()  # the autograd glue, arguments by name
    assert x.grad.shape == x.shape and W.grad.shape == W.shape
    # the fake kernels under FakeTensorMode, called positionally and by keyword
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    fx, fW, fy = (mode.from_tensor(t) for t in (x.detach(), W.detach(), y))
    with mode:
        out = _ops.margin_ce_forward(fx, fW, fy, None, None, None, None, 7, 0, -100, *cfg)
        assert out[0].shape == (5,) and out[4].dtype == torch.long
        g = _ops.margin_ce_backward(
            out[0], None, None, out[0], fx, fW, fy, None, None, None, None, 7, 0, -100, *cfg, [True, True, False, False]
        )
        assert g[0].shape == x.shape and g[1].shape == W.shape
        v, c = _ops.margin_topk(
            fx,
            fW,
            bias=None,
            class_index=None,
            k=3,
            class_offset=0,
            normalize_x=True,
            normalize_w=True,
            s=8.0,
            subcenters=2,
        )
        assert v.shape == (5, 3) and c.dtype == torch.long


def test_opcheck_topk():
    torch.manual_seed(0)
    x, W = torch.randn(6, 5, dtype=torch.float64), torch.randn(12, 5, dtype=torch.float64)
    b = torch.randn(12, dtype=torch.float64)
    idx = torch.tensor([1, 4, 5, 9])
    torch.library.opcheck(_ops.margin_topk, (x, W, b, None, 3, 0, False, False, 1.0, 1))
    torch.library.opcheck(_ops.margin_topk, (x, W, None, idx, 2, 20, True, True, 30.0, 1))
    torch.library.opcheck(_ops.margin_topk, (x, W, None, None, 4, 0, True, True, 30.0, 2))
    cfg = mo.CosFace(s=30.0).config()
    values, classes = ops.topk(x, W, k=2, cfg=cfg, class_index=idx, class_offset=20)
    expected = _ops.margin_topk(x, W, None, idx, 2, 20, cfg.normalize_x, cfg.normalize_w, cfg.s, cfg.subcenters)
    torch.testing.assert_close(values, expected[0], rtol=0, atol=0)
    assert torch.equal(classes, expected[1])
