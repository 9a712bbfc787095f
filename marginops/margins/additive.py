"""Additive margins on the target cosine or angle: CosFace, ArcFace, the combined margin and
sub-center ArcFace.

CosFace, ArcFace and CombinedMargin take insightface's two options:
``interclass_filtering_threshold`` t_f (0 = off): a non-target class whose cosine exceeds t_f gets
logit 0 and no gradient. ``straight_through``: the target's gradient passes as if ψ(c) were c
(∂z/∂c = s, not s·ψ′(c)) and the margins get none, as insightface's ArcFace does (it applies the
margin under no_grad)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .base import (
    Margin,
    OpConfig,
    Scalar,
    _check_angle,
    _check_margin,
    _check_number,
    _check_options,
    _check_policy,
    _check_scale,
    _combined_config,
    _scalar,
)


@dataclass(frozen=True, eq=False)
class CosFace(Margin):
    """CosFace / AM-Softmax (Wang et al. 2018): target z = s·(cos θ - m).
    ``interclass_filtering_threshold``, ``straight_through``: insightface's options (module doc)."""

    s: float = 64.0
    m: Scalar = 0.35
    interclass_filtering_threshold: float = 0.0
    straight_through: bool = False

    def __post_init__(self):
        _check_scale("CosFace", self.s)
        _check_options("CosFace", self.interclass_filtering_threshold, self.straight_through)
        _check_margin("CosFace", "m", self.m, _check_number, 0.0, 1.0)

    def _combined_margins(self):
        return (("m1", 1.0), ("m2", 0.0), ("m", self.m))

    def config(self) -> OpConfig:
        return _combined_config(
            self.s,
            "none",
            m3=_scalar(self.m, 0.0),
            interclass_filter=float(self.interclass_filtering_threshold),
            straight_through=self.straight_through,
        )


@dataclass(frozen=True, eq=False)
class CombinedMargin(Margin):
    """Combined margin (insightface): target z = s·(cos(m1·θ + m2) - m3), all three honoured.

    ``policy`` says what happens where m1·θ + m2 > π, past which cos stops decreasing in θ:
    "fallback" (m1 = 1 only), "easy", "none", "continuous" or "clip" (docs/margins.md). The default
    (None) is "fallback" when m1 = 1 and "continuous" otherwise, so every valid (m1, m2, m3) works
    with default arguments; both equal cos(m1·θ + m2) − m3 where m1·θ + m2 ≤ π.
    ``interclass_filtering_threshold``, ``straight_through``: insightface's options (module doc);
    insightface's current CombinedMarginLoss is policy="none" with straight_through=True."""

    s: float = 64.0
    m1: Scalar = 1.0
    m2: Scalar = 0.5
    m3: Scalar = 0.0
    policy: Optional[str] = None
    interclass_filtering_threshold: float = 0.0
    straight_through: bool = False

    def __post_init__(self):
        owner = type(self).__name__
        _check_scale(owner, self.s)
        unit_m1 = not isinstance(self.m1, torch.Tensor) and self.m1 == 1.0
        if self.policy is None:
            object.__setattr__(self, "policy", "fallback" if unit_m1 else "continuous")
        _check_policy(owner, self.policy)
        _check_options(owner, self.interclass_filtering_threshold, self.straight_through)
        _check_margin(owner, "m1", self.m1, _check_number, 1.0, 10.0)
        _check_margin(owner, "m2", self.m2, _check_angle)
        _check_margin(owner, "m3", self.m3, _check_number, 0.0, 1.0)
        if isinstance(self.m1, torch.Tensor) and self.m1.requires_grad:
            raise ValueError(f"{owner}: a per-row m1 is a constant; pass m1.detach()")
        if self.policy == "fallback" and not unit_m1:
            raise ValueError(
                f"{owner}: policy='fallback' (c - m3 - m2·sin m2 past φ = π) is defined for m1 = 1, "
                f"got m1={self.m1!r}; use policy='continuous' or 'none'"
            )

    def _combined_margins(self):
        return (("m1", self.m1), ("m2", self.m2), ("m3", self.m3))

    def config(self) -> OpConfig:
        return _combined_config(
            self.s,
            self.policy,
            m1=_scalar(self.m1, 1.0),
            m2=_scalar(self.m2, 0.0),
            m3=_scalar(self.m3, 0.0),
            interclass_filter=float(self.interclass_filtering_threshold),
            straight_through=self.straight_through,
        )


@dataclass(frozen=True, eq=False)
class ArcFace(Margin):
    """ArcFace / additive angular margin (Deng et al. 2019): target z = s·cos(θ + m).

    ``policy`` for θ + m > π as in :class:`CombinedMargin` ("fallback" by default:
    z = s·(cos θ - m·sin m) there, as pytorch-metric-learning and insightface before Dec 2022 do;
    insightface's current ArcFace is policy="none", straight_through=True).
    ``interclass_filtering_threshold``, ``straight_through``: insightface's options (module doc)."""

    s: float = 64.0
    m: Scalar = 0.5
    policy: str = "fallback"
    interclass_filtering_threshold: float = 0.0
    straight_through: bool = False

    def __post_init__(self):
        _check_scale("ArcFace", self.s)
        _check_policy("ArcFace", self.policy)
        _check_options("ArcFace", self.interclass_filtering_threshold, self.straight_through)
        _check_margin("ArcFace", "m", self.m, _check_angle)

    def _combined_margins(self):
        return (("m1", 1.0), ("m", self.m), ("m3", 0.0))

    def config(self) -> OpConfig:
        return _combined_config(
            self.s,
            self.policy,
            m2=_scalar(self.m, 0.0),
            interclass_filter=float(self.interclass_filtering_threshold),
            straight_through=self.straight_through,
        )


@dataclass(frozen=True, eq=False)
class SubCenterArcFace(Margin):
    """Sub-center ArcFace (Deng et al. 2020): K sub-centers per class, weight ``[C·K, D]`` with
    class c in rows c·K … c·K + K − 1; a class's cosine is the largest of its sub-centers', then
    ArcFace's margin on the target. See :mod:`marginops.subcenter` for finding noisy samples and
    dropping the non-dominant sub-centers after training."""

    K: int = 3
    s: float = 64.0
    m: float = 0.5
    policy: str = "fallback"

    def __post_init__(self):
        if isinstance(self.K, bool) or not isinstance(self.K, int) or not 1 <= self.K <= 64:
            raise ValueError(f"SubCenterArcFace: K must be an int in [1, 64], got {self.K!r}")
        _check_scale("SubCenterArcFace", self.s)
        _check_policy("SubCenterArcFace", self.policy)
        _check_angle("SubCenterArcFace", "m", self.m)

    def config(self) -> OpConfig:
        return _combined_config(self.s, self.policy, m2=float(self.m), subcenters=self.K)
