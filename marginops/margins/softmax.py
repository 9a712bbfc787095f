"""Margins without a target transform: plain, weight-normalized, feature-normalized and cosine softmax."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Margin, OpConfig, _check_scale


@dataclass(frozen=True, eq=False)
class Softmax(Margin):
    """Plain softmax cross-entropy, z = x·W + bias."""

    def config(self) -> OpConfig:
        return OpConfig()


@dataclass(frozen=True, eq=False)
class WeightNormSoftmax(Margin):
    """Softmax over x·Ŵ: class weights normalized, features not."""

    def config(self) -> OpConfig:
        return OpConfig(normalize_w=True)


@dataclass(frozen=True, eq=False)
class L2Softmax(Margin):
    """L2-Softmax / Crystal loss (Ranjan et al. 2017): z = s·x̂·W, features on a sphere of radius s."""

    s: float = 30.0

    def __post_init__(self):
        _check_scale("L2Softmax", self.s)

    def config(self) -> OpConfig:
        return OpConfig(normalize_x=True, s=float(self.s))


@dataclass(frozen=True, eq=False)
class NormFace(Margin):
    """NormFace (Wang et al. 2017): z = s·cos θ."""

    s: float = 30.0

    def __post_init__(self):
        _check_scale("NormFace", self.s)

    def config(self) -> OpConfig:
        return OpConfig(normalize_x=True, normalize_w=True, s=float(self.s))
