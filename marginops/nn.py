"""nn.Module heads that own the class weights and return the loss: drop-in for the eager heads."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import functional
from ._checks import REDUCTIONS
from .margins import Margin, Softmax


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class MarginHead(nn.Module):
    """Classification head with a margin-softmax loss.

    Owns ``weight [num_classes, embedding_size]`` (and ``bias [num_classes]`` with ``bias=True``);
    ``forward(x, labels)`` returns the loss (and the training accuracy with
    ``return_accuracy=True``). Any torch optimizer trains it with the backbone.
    """

    _loss_fn = staticmethod(functional.margin_cross_entropy)

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margin: Optional[Margin] = None,
        bias: bool = False,
        reduction: str = "mean",
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        return_accuracy: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.embedding_size = _check_size("embedding_size", embedding_size)
        self.num_classes = _check_size("num_classes", num_classes)
        self.margin = Softmax() if margin is None else margin
        if not isinstance(self.margin, Margin):
            raise ValueError(f"margin must be a marginops margin spec, got {margin!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.return_accuracy = return_accuracy
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size, **factory))
        self.bias = nn.Parameter(torch.empty(num_classes, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.01)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, labels: torch.Tensor):
        if x.dim() != 2 or x.shape[1] != self.embedding_size:
            raise ValueError(f"x must have shape [B, {self.embedding_size}], got {tuple(x.shape)}")
        return self._loss_fn(
            x,
            self.weight,
            labels,
            margin=self.margin,
            bias=self.bias,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            return_accuracy=self.return_accuracy,
        )

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"margin={self.margin!r}, bias={self.bias is not None}"
        )
