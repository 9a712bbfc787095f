"""The registered ops (schemas in csrc/marginops.cpp, head arguments in csrc/head_params.h): fake
kernels for tracing, autograd, and typed wrappers. ``head_stats`` is the one entry point of the
training ops, ``topk`` the one of margin_topk.

Nothing here lists the ops' arguments: the wrappers pass them by name (the OpConfig fields by
their own names), and the fake kernels and the autograd glue read names and order from the
registered schemas, so a scalar option added to the table in csrc/head_params.h and to OpConfig
reaches the op without a change here."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch._C._functorch import TransformType as _TransformType

from . import _C  # noqa: F401  (loads the library: op schemas and kernels)
from .margins import OpConfig

_ops = torch.ops.marginops


class HeadStats(NamedTuple):
    """Per-row statistics over the computed classes (see margin_ce_forward's schema)."""

    lse: torch.Tensor
    target_logit: torch.Tensor
    logit_sum: torch.Tensor
    best_logit: torch.Tensor
    best_class: torch.Tensor


def acc_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of all arithmetic: float64 when both inputs are float64, else float32."""
    both64 = x.dtype == torch.float64 and weight.dtype == torch.float64
    return torch.float64 if both64 else torch.float32


def _arguments(op) -> list:
    return list(op.default._schema.arguments)


def _names(op) -> tuple[str, ...]:
    return tuple(a.name for a in _arguments(op))


_FORWARD = _names(_ops.margin_ce_forward)
_TOPK_OPTIONS = tuple(a.name for a in _arguments(_ops.margin_topk) if a.name in OpConfig._fields)


def _is_tensor(t) -> bool:
    return isinstance(t, torch.TensorType) or (
        isinstance(t, torch.OptionalType) and isinstance(t.getElementType(), torch.TensorType)
    )


_FORWARD_TENSORS = tuple(a.name for a in _arguments(_ops.margin_ce_forward) if _is_tensor(a.type))
_GRADS = ("grad_lse", "grad_target_logit", "grad_logit_sum")
_DIFFERENTIABLE = ("x", "weight", "bias", "row_margins")  # margin_ce_backward's output_mask, in order


def _bind(op, args: tuple, kwargs: dict) -> dict:
    """An op call's arguments by name, defaults filled in (how fake kernels and autograd read them)."""
    bound = {}
    for i, a in enumerate(_arguments(op)):
        if i < len(args):
            bound[a.name] = args[i]
        elif a.name in kwargs:
            bound[a.name] = kwargs[a.name]
        else:
            bound[a.name] = a.default_value
    return bound


def head_stats(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    row_margins: Optional[torch.Tensor] = None,
    curricular: Optional[torch.Tensor] = None,
    class_index: Optional[torch.Tensor] = None,
    num_classes: int,
    class_offset: int = 0,
    ignore_index: int = -100,
    cfg: OpConfig,
    grad_skip: float = 0.0,
    backend: int = 0,
    workspace_bytes: int = 0,
) -> HeadStats:
    """Per-row statistics of the head over the classes [class_offset, class_offset + C) (a
    shard; with class_index, only those of its classes). Differentiable in x, weight, bias and
    row_margins; ``grad_skip`` > 0 lets the backward skip negligible tiles (see
    margin_ce_backward's schema). ``backend`` and ``workspace_bytes`` are the ops' codes
    (HeadOptions.backend_code, workspace_code). Everything after labels is passed by name.

    First-order gradients only: a backward with ``create_graph=True`` through it raises a
    RuntimeError (see ``_backward``), and so does a call under a ``torch.func`` gradient
    transform (``grad``, ``vjp``, ``jacrev``, ``jvp``, ...), whose backward always builds a graph."""
    _refuse_func_transforms()
    return HeadStats(
        *_ops.margin_ce_forward(
            x,
            weight,
            labels,
            bias=bias,
            row_margins=row_margins,
            curricular=curricular,
            class_index=class_index,
            num_classes=num_classes,
            class_offset=class_offset,
            ignore_index=ignore_index,
            grad_skip=grad_skip,
            backend=backend,
            workspace_bytes=workspace_bytes,
            **cfg._asdict(),
        )
    )


def topk(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    k: int,
    cfg: OpConfig,
    bias: Optional[torch.Tensor] = None,
    class_index: Optional[torch.Tensor] = None,
    class_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest margin-free logits of each row among the computed classes (the classes
    [class_offset, class_offset + C / subcenters), or those of class_index) and their global class
    ids: (values [B, k] float32/float64, classes [B, k] int64), without a [B, C] tensor. Uses cfg's
    normalize_x, normalize_w, s and subcenters. Not differentiable."""
    with torch.no_grad():
        options = {name: getattr(cfg, name) for name in _TOPK_OPTIONS}
        values, classes = _ops.margin_topk(
            x, weight, bias=bias, class_index=class_index, k=k, class_offset=class_offset, **options
        )
    return values, classes


FIRST_ORDER_ONLY = (
    "marginops' fused margin cross-entropy has first-order gradients only: its backward is a fused "
    "kernel without a derivative of its own"
)


def refuse_create_graph(*tensors) -> None:
    """Called at the start of the op's backward with its inputs: a backward with create_graph=True
    runs with grad mode on, and margin_ce_backward has no autograd, so the gradients it returns
    would differentiate as zeros (a gradient penalty or Hessian-vector product silently missing
    this head). Refuse it there, at the first backward."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"{FIRST_ORDER_ONLY}, so a backward with create_graph=True (double backward: gradient "
            "penalties, Hessian-vector products, gradgradcheck) is refused rather than returning "
            "gradients that differentiate as zeros. Compute such terms with the eager "
            "marginops.reference.margin_cross_entropy, or call backward without create_graph"
        )


def _refuse_func_transforms() -> None:
    """torch.func's grad/vjp/jacrev/jvp run the op's autograd under a functorch transform, which
    the autograd registered by torch.library does not support (torch's own message is about an
    autograd.Function's setup_context); and their backward always builds a graph. Say so plainly.
    Under torch.compile Dynamo handles the transforms itself: nothing to check here."""
    if torch.compiler.is_compiling():
        return
    stack = torch._C._functorch.get_interpreter_stack()
    if stack and any(i.key() in (_TransformType.Grad, _TransformType.Jvp) for i in stack):
        raise RuntimeError(
            f"{FIRST_ORDER_ONLY}, and torch.func transforms (grad, vjp, jacrev, jvp, hessian) are not "
            "supported. Take first-order gradients with loss.backward() or torch.autograd.grad; for "
            "higher-order ones use the eager marginops.reference.margin_cross_entropy"
        )


@torch.library.register_fake("marginops::margin_ce_forward")
def _forward_fake(*args, **kwargs):
    a = _bind(_ops.margin_ce_forward, args, kwargs)
    x, weight = a["x"], a["weight"]
    rows = x.new_empty((x.shape[0],), dtype=acc_dtype(x, weight))
    return (
        rows,
        torch.empty_like(rows),
        torch.empty_like(rows),
        torch.empty_like(rows),
        torch.empty_like(rows, dtype=torch.long),
    )


@torch.library.register_fake("marginops::margin_ce_backward")
def _backward_fake(*args, **kwargs):
    a = _bind(_ops.margin_ce_backward, args, kwargs)
    x, weight, bias, row_margins = a["x"], a["weight"], a["bias"], a["row_margins"]
    need_x, need_w, need_b, need_m = a["output_mask"]
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else x.new_empty((0,)),
        torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else weight.new_empty((0,)),
        torch.empty_like(bias) if need_b and bias is not None else x.new_empty((0,)),
        torch.empty_like(row_margins) if need_m and row_margins is not None else x.new_empty((0,)),
    )


@torch.library.register_fake("marginops::margin_topk")
def _topk_fake(*args, **kwargs):
    a = _bind(_ops.margin_topk, args, kwargs)
    x, k = a["x"], a["k"]
    values = x.new_empty((x.shape[0], k), dtype=acc_dtype(x, a["weight"]))
    return values, torch.empty_like(values, dtype=torch.long)


@torch.library.register_fake("marginops::margin_psi")
def _psi_fake(cos, m1, m2, m3, kind, policy, lambda_):
    return tuple(torch.empty_like(cos) for _ in range(5))


def _setup_context(ctx, inputs, output):
    args = dict(zip(_FORWARD, inputs))  # inputs: every argument, defaults filled in
    ctx.save_for_backward(*(args[name] for name in _FORWARD_TENSORS), output[0])
    ctx.scalars = {name: value for name, value in args.items() if name not in _FORWARD_TENSORS}


def _backward(ctx, grad_lse, grad_target, grad_sum, _grad_best, _grad_class):
    *saved, lse = ctx.saved_tensors
    tensors = dict(zip(_FORWARD_TENSORS, saved))
    refuse_create_graph(grad_lse, grad_target, grad_sum, *(t for name, t in tensors.items() if name != "labels"))
    need = dict(zip(_FORWARD, ctx.needs_input_grad))
    mask = [bool(need[name]) and tensors[name] is not None for name in _DIFFERENTIABLE]
    grads = _ops.margin_ce_backward(
        **dict(zip(_GRADS, (grad_lse, grad_target, grad_sum))),
        lse=lse,
        **tensors,
        **ctx.scalars,
        output_mask=mask,
    )
    by_name = {name: g for name, g, asked in zip(_DIFFERENTIABLE, grads, mask) if asked}
    return tuple(by_name.get(name) for name in _FORWARD)


torch.library.register_autograd("marginops::margin_ce_forward", _backward, setup_context=_setup_context)
