"""Eager PyTorch implementation of the margin-softmax family: the oracle of every test and the
baseline of every benchmark. It materializes the [B, C] logits, as the heads users run today do
(insightface's CombinedMarginLoss, pytorch-metric-learning's ArcFaceLoss, ...), but computes the
margin with the same clamps and branches as the compiled kernels (csrc/margin_math.h). Importing it
needs no compiled extension: ``MarginHead`` (which subclasses marginops.heads.MarginHead) is built on first use."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import check_call
from .margins import KIND_IDENTITY, NORM_EPS, Margin, RowContext, psi, target_cosines
from .options import HeadOptions


def margin_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    margin: Optional[Margin] = None,
    bias: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    return_accuracy: bool = False,
    margin_state: Optional[dict] = None,
    update_state: bool = True,
    grad_skip_threshold: float = 0.0,
    backend: str = "auto",
    workspace_bytes: Optional[int] = None,
    check_finite: bool = False,
):
    """Eager margin cross-entropy; same signature and semantics as
    :func:`marginops.margin_cross_entropy`. ``grad_skip_threshold`` permits skipping negligible
    gradients, it does not require it: the reference always computes every one. ``backend`` and
    ``workspace_bytes`` are checked as the fused call checks them, and otherwise unused."""
    options = HeadOptions(
        margin, reduction, ignore_index, label_smoothing, return_accuracy, grad_skip_threshold, backend,
        workspace_bytes, check_finite,
    )  # fmt: skip
    labels = check_call(options, x, weight, labels, bias)
    names = ("reduction", "ignore_index", "label_smoothing", "return_accuracy")
    loss_options = {name: getattr(options, name) for name in names}
    state = {"margin_state": margin_state, "update_state": update_state}
    return unchecked_margin_cross_entropy(x, weight, labels, options.margin, bias, **loss_options, **state)


def unchecked_margin_cross_entropy(
    x,
    weight,
    labels,
    margin,
    bias=None,
    reduction="mean",
    ignore_index=-100,
    label_smoothing=0.0,
    return_accuracy=False,
    margin_state=None,
    update_state=True,
):
    """:func:`margin_cross_entropy` without the argument checks (int64 labels expected): what
    torch.compile of the eager head traces without a graph break."""
    if x.dtype != weight.dtype:  # mixed precision (float16/bfloat16 x, float32 W): compute in float32
        x = x.to(weight.dtype)
    cfg = margin.config()
    K = cfg.subcenters
    num_classes = weight.shape[0] // K
    valid = labels != ignore_index
    B = x.shape[0]
    ctx = RowContext(
        x, labels, valid, margin_state is not None and update_state, lambda: target_cosines(x, weight, labels, valid, K)
    )
    terms = margin.prepare(ctx, margin_state)

    x_norm, w_norm = x.norm(dim=1), weight.norm(dim=1)
    x_hat = x / x_norm.clamp_min(NORM_EPS)[:, None]
    w_hat = weight / w_norm.clamp_min(NORM_EPS)[:, None]
    logits = F.linear(x_hat if cfg.normalize_x else x, w_hat if cfg.normalize_w else weight)
    if cfg.normalize_x:
        logits = logits * cfg.s
    if K > 1:  # a class's logit is the best of its sub-centers'
        logits, best_sub = logits.view(B, num_classes, K).max(dim=2)
    plain = logits
    plain_cos = logits.detach()  # s·c before margins and bias (normalized heads)
    if terms.curricular is not None:  # CurricularFace: hard negatives c > τ become c·(t + c)
        tau, t = terms.curricular[:, :1].to(logits.dtype), terms.curricular[:, 1:].to(logits.dtype)
        c = logits / cfg.s
        logits = torch.where(c > tau, cfg.s * c * (t + c), logits)
    if cfg.margin_kind != KIND_IDENTITY:
        rows = valid.nonzero().squeeze(1)
        y = labels[rows]
        w_row = y * K + (best_sub[rows, y] if K > 1 else 0)
        # ψ on the [B] target cosines in at least float32: the clamp 1 − 1e-7 rounds to 1 in
        # bfloat16/float16, where acos' and sqrt' would be infinite.
        wide = torch.promote_types(logits.dtype, torch.float32)
        cos_t = (x_hat[rows] * w_hat[w_row]).sum(1).to(wide)
        m = terms.row_margins
        m1, m2, m3 = (
            (m[rows, k].to(wide) for k in range(3))
            if m is not None
            else (torch.full_like(cos_t, v) for v in (cfg.m1, cfg.m2, cfg.m3))
        )
        a = cfg.s if cfg.normalize_x else x_norm[rows].to(wide)
        b = 1.0 if cfg.normalize_w else w_norm[w_row].to(wide)
        if cfg.straight_through:  # value ψ(c), gradient as if ψ(c) = c; no gradient to the margins
            with torch.no_grad():
                shift = psi(cfg.margin_kind, cfg.theta_policy, cos_t, m1, m2, m3, cfg.lambda_) - cos_t
            f = cos_t + shift
        else:
            f = psi(cfg.margin_kind, cfg.theta_policy, cos_t, m1, m2, m3, cfg.lambda_)
        target = a * b * f
        logits = logits.index_put((rows, y), target.to(logits.dtype))
    if bias is not None:
        logits = logits + bias
        plain = plain + bias
    if cfg.interclass_filter > 0:  # insightface: non-label cosines above t_f become logit 0, no gradient
        with torch.no_grad():
            cos = plain_cos / cfg.s
            dirty = cos > cfg.interclass_filter
            dirty[valid.nonzero().squeeze(1), labels[valid]] = False
        logits = torch.where(dirty, torch.zeros_like(logits), logits)
    if terms.extra_loss is None:
        loss = F.cross_entropy(
            logits, labels, reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing
        )
    else:
        per_row = F.cross_entropy(
            logits, labels, reduction="none", ignore_index=ignore_index, label_smoothing=label_smoothing
        )
        per_row = per_row + torch.where(valid, terms.extra_loss, torch.zeros_like(terms.extra_loss))
        loss = {"none": per_row, "sum": per_row.sum(), "mean": per_row.sum() / valid.sum()}[reduction]
    if not return_accuracy:
        return loss
    correct = (plain.argmax(dim=1) == labels) & valid
    return loss, correct.sum() / valid.sum()


_MARGIN_HEAD = None


def __getattr__(name: str):
    """``MarginHead``: :class:`marginops.MarginHead` computed by the eager reference (same
    parameters). Defined on first use, so that importing this module needs no compiled extension
    (marginops.heads loads it)."""
    global _MARGIN_HEAD
    if name != "MarginHead":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _MARGIN_HEAD is None:
        from . import heads as _heads

        class MarginHead(_heads.MarginHead):
            """:class:`marginops.MarginHead` computed by the eager reference (same parameters)."""

            _loss_fn = staticmethod(margin_cross_entropy)

        MarginHead.__module__, MarginHead.__qualname__ = __name__, "MarginHead"  # pickles by name
        _MARGIN_HEAD = MarginHead
    return _MARGIN_HEAD
