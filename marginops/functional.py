"""The fused margin cross-entropy: one call from features, class weights and labels to the loss,
without a [B, C] logits tensor; and the inference helpers."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ._pipeline import (  # noqa: F401  (public helpers of the pipeline)
    TOPK_KINDS,
    accuracy_from_stats,
    autocast_features,
    class_logits,
    cosine_margin,
    head_loss,
    loss_from_stats,
    topk,
)
from .margins import Margin, Softmax
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
    margin_state: Optional[Dict[str, torch.Tensor]] = None,
    update_state: bool = True,
    grad_skip_threshold: float = 0.0,
    backend: str = "auto",
    workspace_bytes: Optional[int] = None,
    check_finite: bool = False,
):
    """Margin-softmax cross-entropy of features ``x [B, D]`` against class weights
    ``weight [C·K, D]`` (K = 1 but for sub-center margins) with ``labels [B]`` (class ids, or
    ``ignore_index``); ``bias [C]`` optional. Returns the loss (float32, or float64 for float64
    inputs), and ``(loss, accuracy)`` with ``return_accuracy=True``.

    ``margin`` is a spec from :mod:`marginops.margins` (default: plain Softmax); ``reduction``,
    ``ignore_index`` and ``label_smoothing`` behave as in torch.nn.functional.cross_entropy.
    Stateful margins read and update ``margin_state`` (from ``margin.state_init()``) when
    ``update_state``. The other options — ``grad_skip_threshold``, ``backend`` ("auto",
    "chunked", "tiles"), ``workspace_bytes``, ``check_finite`` — and the dtype rule (x like
    weight, or float16/bfloat16 x with a float32 weight) are described in the README and
    docs/design.md. First-order gradients only."""
    options = HeadOptions(
        margin, reduction, ignore_index, label_smoothing, return_accuracy, grad_skip_threshold, backend,
        workspace_bytes, check_finite,
    )  # fmt: skip
    return head_loss(options, x, weight, labels, bias, margin_state=margin_state, update_state=update_state)


def topk_classes(
    x: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    margin: Optional[Margin] = None,
    bias: Optional[torch.Tensor] = None,
    kind: str = "logit",
):
    """The k best classes of each row, without a [B, C] tensor: (values [B, k], classes [B, k]).
    ``kind="logit"``: the margin-free logits of ``margin`` (s·cos θ + bias); ``kind="cosine"``:
    cos θ in [-1, 1], no bias. A class's value is its best sub-center's. Not differentiable."""
    return topk(x, weight, k, Softmax() if margin is None else margin, bias, kind)
