"""Sub-center ArcFace's cleaning tools (Deng et al. 2020): after training with K sub-centers per
class, each class's dominant sub-center is the one most of its samples are closest to; samples
far from it are likely label noise, and the other sub-centers can be dropped."""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

from .margins import NORM_EPS


def _check(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, K: int) -> int:
    if isinstance(K, bool) or not isinstance(K, int) or K < 1 or weight.shape[0] % K:
        raise ValueError(f"K must be a positive int dividing weight's {weight.shape[0]} rows, got {K!r}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or labels.shape != (x.shape[0],):
        raise ValueError(
            f"expected x [N, D], weight [C·K, D], labels [N]; got {tuple(x.shape)}, {tuple(weight.shape)}, "
            f"{tuple(labels.shape)}"
        )
    C = weight.shape[0] // K
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= C):
        raise ValueError(f"labels must lie in [0, {C}), got values in [{int(labels.min())}, {int(labels.max())}]")
    return C


@torch.no_grad()
def _sub_cosines(x, weight, labels, K, chunk_size):
    """cos θ [N, K] between each sample and its class's sub-centers, chunk_size samples at a time."""
    out = []
    for s in range(0, x.shape[0], chunk_size):
        xs, ys = x[s : s + chunk_size], labels[s : s + chunk_size]
        rows = (ys[:, None] * K + torch.arange(K, device=ys.device)).reshape(-1)
        w = F.normalize(weight[rows].float(), dim=1, eps=NORM_EPS).view(len(ys), K, -1)
        out.append((w @ F.normalize(xs.float(), dim=1, eps=NORM_EPS)[:, :, None]).squeeze(2))
    return torch.cat(out) if out else x.new_zeros((0, K), dtype=torch.float32)


@torch.no_grad()
def dominant_subcenters(
    x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, K: int, chunk_size: int = 4096
) -> torch.Tensor:
    """For each class, the sub-center (0 … K−1) that most of its samples in (x, labels) are
    closest to; -1 for classes with no sample. Ties go to the lower index. O(N·K·D) compute,
    O(chunk·K·D + C·K) memory."""
    C = _check(x, weight, labels, K)
    return _dominant(_sub_cosines(x, weight, labels, K, chunk_size), labels, C, K)


def _dominant(cos: torch.Tensor, labels: torch.Tensor, C: int, K: int) -> torch.Tensor:
    counts = torch.bincount(labels * K + cos.argmax(dim=1), minlength=C * K).view(C, K)
    return torch.where(counts.sum(1) > 0, counts.argmax(dim=1), torch.full((C,), -1, device=counts.device))


@torch.no_grad()
def find_outliers(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    K: int,
    threshold_degrees: float = 75.0,
    chunk_size: int = 4096,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Samples whose angle to their class's dominant sub-center exceeds threshold_degrees (the
    paper's 75°): returns (outlier mask [N], dominant sub-center per class [C])."""
    if not 0.0 <= threshold_degrees <= 180.0:
        raise ValueError(f"threshold_degrees must lie in [0, 180], got {threshold_degrees!r}")
    C = _check(x, weight, labels, K)
    cos = _sub_cosines(x, weight, labels, K, chunk_size)  # [N, K], once for both uses
    dominant = _dominant(cos, labels, C, K)
    to_dominant = cos.gather(1, dominant[labels].clamp_min(0)[:, None]).squeeze(1)
    return to_dominant < math.cos(math.radians(threshold_degrees)), dominant


@torch.no_grad()
def drop_subcenters(weight: torch.Tensor, K: int, dominant: torch.Tensor) -> torch.Tensor:
    """The [C, D] weight that keeps each class's dominant sub-center (sub-center 0 for classes
    marked -1, i.e. never seen); train on with ArcFace from it."""
    if weight.shape[0] % K or dominant.shape != (weight.shape[0] // K,):
        raise ValueError(
            f"dominant must have shape [{weight.shape[0] // max(K, 1)}] for weight {tuple(weight.shape)} and K={K}"
        )
    if dominant.numel() and int(dominant.max()) >= K:
        raise ValueError(f"dominant sub-centers must lie in [-1, {K}), got {int(dominant.max())}")
    C = weight.shape[0] // K
    return weight.view(C, K, -1)[torch.arange(C, device=weight.device), dominant.clamp_min(0)].clone()
