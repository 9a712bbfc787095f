"""Margins without a target transform: plain, weight-normalized, feature-normalized and cosine softmax."""

from __future__ import annotations

from dataclasses import dataclass

from .base import KIND_IDENTITY, Margin, OpConfig, _check_scale


@dataclass(frozen=True, eq=False)
class Softmax(Margin):
    """Plain softmax cross-entropy, z = x·W + bias."""

    def config(self) -> OpConfig:
        return OpConfig(KIND_IDENTITY, 0, False, False, 1.0, 1.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True, eq=False)
class WeightNormSoftmax(Margin):
    """Softmax over x·Ŵ: class weights normalized, features not."""

    def config(self) -> OpConfig:
        return OpConfig(KIND_IDENTITY, 0, False, True, 1.0, 1.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True, eq=False)
class L2Softmax(Margin):
    """L2-Softmax / Crystal loss (Ranjan et al. 2017): z = s·x̂·W, features on a sphere of radius s."""

    s: float = 30.0

    def __post_init__(self):
        _check_scale("L2Softmax", self.s)

    def config(self) -> OpConfig:
        return OpConfig(KIND_IDENTITY, 0, True, False, float(self.s), 1.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True, eq=False)
class NormFace(Margin):
    """NormFace (Wang et al. 2017): z = s·cos θ."""

    s: float = 30.0

    def __post_init__(self):
        _check_scale("NormFace", self.s)

    def config(self) -> OpConfig:
        return OpConfig(KIND_IDENTITY, 0, True, True, float(self.s), 1.0, 0.0, 0.0, 0.0)
