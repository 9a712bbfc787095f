"""Training aids that work with any head and stay O(B·D + C·D) at millions of classes (no C×C
matrix, no [C, D] temporary)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def _check_weight(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


class RingLoss(nn.Module):
    """Ring loss (Zheng et al. 2018): λ/2 · mean_i (‖x_i‖ − R)², with the target norm R learned.
    R starts at ``radius`` or, when None, at the mean feature norm of the first batch seen."""

    def __init__(self, weight: float = 0.01, radius: Optional[float] = None):
        super().__init__()
        self.weight = _check_weight("weight", weight)
        if radius is not None and (not isinstance(radius, (int, float)) or radius <= 0):
            raise ValueError(f"radius must be positive, got {radius!r}")
        self.radius = nn.Parameter(torch.tensor(-1.0 if radius is None else float(radius)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"x must have shape [B, D], got {tuple(x.shape)}")
        norms = x.norm(dim=1)
        with torch.no_grad():  # lazy start from the data; a no-op once R > 0
            self.radius.copy_(torch.where(self.radius > 0, self.radius, norms.mean().to(self.radius.dtype)))
        return 0.5 * self.weight * ((norms - self.radius) ** 2).mean()


class WeightNormEqualizer(nn.Module):
    """Pulls each class weight's squared norm towards the mean over classes,
    λ · mean_j (‖W_j‖² − mean_k ‖W_k‖²)² — the under-represented-classes term of Guo & Zhang
    (2017): rare classes otherwise end with smaller norms and lose to frequent ones. Pass the
    head's weight (a [C·K, D] sub-center weight counts each row)."""

    def __init__(self, weight: float = 1e-3):
        super().__init__()
        self.weight = _check_weight("weight", weight)

    def forward(self, class_weight: torch.Tensor) -> torch.Tensor:
        if class_weight.dim() != 2:
            raise ValueError(f"class_weight must have shape [C, D], got {tuple(class_weight.shape)}")
        sq = torch.linalg.vector_norm(class_weight, dim=1) ** 2  # [C]: no [C, D] temporary
        return self.weight * ((sq - sq.mean()) ** 2).mean()


class FeatureWhitening(nn.Module):
    """CCL's centralized coordinates: x̃ = (x − μ) / sqrt(σ² + eps) per dimension, with μ, σ²
    running averages of the batch mean and (biased) variance, μ ← ρ·μ + (1 − ρ)·mean(x), updated
    in training before use (ρ = 0.995); the first training batch sets them. The running
    statistics are constants to autograd."""

    def __init__(self, num_features: int, decay: float = 0.995, eps: float = 1e-5):
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay!r}")
        self.decay, self.eps = float(decay), float(eps)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.running_mean.numel():
            raise ValueError(f"x must have shape [B, {self.running_mean.numel()}], got {tuple(x.shape)}")
        if self.training and x.shape[0] > 0:
            with torch.no_grad():
                xd = x.detach().to(self.running_mean.dtype)
                # The first batch sets the statistics; later ones move them by 1 − ρ.
                rate = torch.where(self.num_batches_tracked > 0, 1.0 - self.decay, 1.0).to(xd.dtype)
                self.running_mean.lerp_(xd.mean(0), rate)
                self.running_var.lerp_(xd.var(0, unbiased=False), rate)
                self.num_batches_tracked += 1
        return (x - self.running_mean.to(x.dtype)) / torch.sqrt(self.running_var.to(x.dtype) + self.eps)
