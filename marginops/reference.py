"""Eager PyTorch implementation of the margin-softmax family: the oracle of every test and the
baseline of every benchmark. It materializes the [B, C] logits, as the heads users run today do
(insightface's CombinedMarginLoss, pytorch-metric-learning's ArcFaceLoss, ...), but computes the
margin with the same clamps and branches as the fused kernels (csrc/margin_math.h)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import nn as _nn
from ._checks import check_head_inputs, check_label_values
from .margins import (
    COS_EPS,
    KIND_COMBINED,
    KIND_IDENTITY,
    KIND_MULTIPLICATIVE,
    NORM_EPS,
    THETA_POLICIES,
    Margin,
    Softmax,
)

_POLICY = {v: k for k, v in THETA_POLICIES.items()}


def _parity_sign(k: torch.Tensor) -> torch.Tensor:
    return 1.0 - 2.0 * torch.remainder(k, 2.0)


def psi(
    kind: int, policy: int, c: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, m3: torch.Tensor, lambda_: float = 0.0
) -> torch.Tensor:
    """The target transform ψ(c), elementwise; autograd gives ψ' and the margin gradients."""
    if kind == KIND_IDENTITY:
        return c
    cc = c.clamp(-1.0 + COS_EPS, 1.0 - COS_EPS)
    sin_t = torch.sqrt(1.0 - cc * cc)
    theta = torch.acos(cc)
    if kind == KIND_MULTIPLICATIVE:
        mt = m1 * theta
        k = torch.floor(mt / math.pi).clamp(min=0.0).minimum(m1 - 1.0).detach()
        return (_parity_sign(k) * torch.cos(mt) - 2.0 * k + lambda_ * c) / (1.0 + lambda_)
    if kind != KIND_COMBINED:
        raise ValueError(f"unknown margin kind {kind}")
    phi = m1 * theta + m2
    # With m1 = 1, cos(θ + m2) = c·cos m2 − sin θ·sin m2 with the unclamped c (exact for CosFace).
    cos_phi = torch.where(m1 == 1.0, c * torch.cos(m2) - sin_t * torch.sin(m2), torch.cos(phi))
    name = _POLICY[policy]
    if name == "fallback":
        return torch.where(phi > math.pi, c - m3 - m2 * torch.sin(m2), cos_phi - m3)
    if name == "easy":
        return torch.where(c > 0, cos_phi - m3, c - m3)
    if name == "continuous":
        k = torch.floor(phi / math.pi).detach()
        return _parity_sign(k) * cos_phi - 2.0 * k - m3
    if name == "clip":
        inner = torch.where(phi > math.pi, -1.0 - m3, cos_phi - m3)
        return torch.where(phi < 0, 1.0 - m3, inner)
    return cos_phi - m3


def _row_margin_columns(margin: Margin, rows: torch.Tensor, batch: int, like: torch.Tensor):
    """(m1, m2, m3) for the given rows of the batch, each a tensor of like's dtype."""
    cfg = margin.config()
    per_row = margin.row_margins(batch, like)
    if per_row is not None:
        per_row = per_row[rows].to(like.dtype)
        return per_row[:, 0], per_row[:, 1], per_row[:, 2]
    full = lambda v: torch.full((rows.numel(),), v, dtype=like.dtype, device=like.device)  # noqa: E731
    return full(cfg.m1), full(cfg.m2), full(cfg.m3)


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
):
    """Eager margin cross-entropy; same signature and semantics as
    :func:`marginops.margin_cross_entropy`."""
    margin = Softmax() if margin is None else margin
    labels = check_head_inputs(x, weight, labels, margin, bias, reduction, label_smoothing)
    check_label_values(labels, weight.shape[0], ignore_index)
    cfg = margin.config()
    x_norm, w_norm = x.norm(dim=1), weight.norm(dim=1)
    x_hat = x / x_norm.clamp_min(NORM_EPS)[:, None]
    w_hat = weight / w_norm.clamp_min(NORM_EPS)[:, None]
    logits = F.linear(x_hat if cfg.normalize_x else x, w_hat if cfg.normalize_w else weight)
    if cfg.normalize_x:
        logits = logits * cfg.s
    plain = logits
    if cfg.margin_kind != KIND_IDENTITY:
        rows = (labels != ignore_index).nonzero().squeeze(1)
        y = labels[rows]
        # ψ on the [B] target cosines in at least float32: the clamp 1 − 1e-7 rounds to 1 in
        # bfloat16/float16, where acos' and sqrt' would be infinite.
        wide = torch.promote_types(logits.dtype, torch.float32)
        cos_t = (x_hat[rows] * w_hat[y]).sum(1).to(wide)
        m1, m2, m3 = _row_margin_columns(margin, rows, x.shape[0], cos_t)
        a = cfg.s if cfg.normalize_x else x_norm[rows].to(wide)
        b = 1.0 if cfg.normalize_w else w_norm[y].to(wide)
        target = a * b * psi(cfg.margin_kind, cfg.theta_policy, cos_t, m1, m2, m3, cfg.lambda_)
        logits = logits.index_put((rows, y), target.to(logits.dtype))
    if bias is not None:
        logits = logits + bias
        plain = plain + bias
    loss = F.cross_entropy(logits, labels, reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing)
    if not return_accuracy:
        return loss
    valid = labels != ignore_index
    correct = (plain.argmax(dim=1) == labels) & valid
    return loss, correct.sum() / valid.sum()


class MarginHead(_nn.MarginHead):
    """:class:`marginops.MarginHead` computed by the eager reference (same parameters)."""

    _loss_fn = staticmethod(margin_cross_entropy)
