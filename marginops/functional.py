"""The fused margin cross-entropy: one call from features, class weights and labels to the loss,
without a [B, C] logits tensor."""

from __future__ import annotations

from typing import Optional

import torch

from . import ops
from ._checks import check_head_inputs
from .margins import Margin, Softmax


def loss_from_stats(
    stats: ops.HeadStats,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
) -> torch.Tensor:
    """Cross-entropy from per-row statistics, as torch.nn.functional.cross_entropy defines it:
    loss_i = lse_i − (1 − ε)·z_iy − (ε/C)·Σ_j z_ij, ignored rows excluded (mean over the rest)."""
    loss = stats.lse - (1.0 - label_smoothing) * stats.target_logit
    if label_smoothing > 0:
        loss = loss - (label_smoothing / num_classes) * stats.logit_sum
    valid = labels != ignore_index
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum()


def accuracy_from_stats(stats: ops.HeadStats, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Fraction of non-ignored rows whose margin-free argmax is the label."""
    valid = labels != ignore_index
    return ((stats.best_class == labels) & valid).sum() / valid.sum()


def _check_backend(x: torch.Tensor) -> None:
    if x.device.type not in ("cpu", "meta") and not torch._C._dispatch_has_kernel_for_dispatch_key(
        "marginops::margin_ce_forward", x.device.type.upper()
    ):
        raise RuntimeError(
            f"x is on {x.device}, but marginops was built without kernels for {x.device.type}; "
            "rebuild with CUDA (see README, 'Building with CUDA')"
        )


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
    """Margin-softmax cross-entropy of features ``x [B, D]`` against class weights
    ``weight [C, D]``, with ``labels [B]`` (class ids, or ``ignore_index``).

    ``margin`` is a spec from :mod:`marginops.margins` (default: plain :class:`Softmax`).
    ``reduction``, ``ignore_index`` and ``label_smoothing`` behave as in
    :func:`torch.nn.functional.cross_entropy`. The loss is float32 for float16/bfloat16/float32
    inputs and float64 for float64 ones. With ``return_accuracy=True`` returns
    ``(loss, accuracy)``, the accuracy being the fraction of non-ignored rows whose largest
    margin-free logit is the label, computed in the same pass.
    """
    margin = Softmax() if margin is None else margin
    labels = check_head_inputs(x, weight, labels, margin, bias, reduction, label_smoothing)
    _check_backend(x)
    num_classes = weight.shape[0]
    stats = ops.head_stats(
        x,
        weight,
        labels,
        bias,
        margin.row_margins(x.shape[0], x),
        None,
        num_classes,
        0,
        ignore_index,
        margin.config(),
    )
    loss = loss_from_stats(stats, labels, num_classes, ignore_index, label_smoothing, reduction)
    if return_accuracy:
        return loss, accuracy_from_stats(stats, labels, ignore_index)
    return loss
