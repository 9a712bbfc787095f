"""Multiplicative angular margins: L-Softmax, SphereFace, and SphereFace's annealing schedule of λ."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .base import KIND_MULTIPLICATIVE, Margin, OpConfig, _check_number


def _check_multiplicative(owner: str, m, lambda_) -> None:
    if isinstance(m, bool) or not isinstance(m, numbers.Real) or m != int(m) or not 1 <= m <= 10:
        raise ValueError(f"{owner}: m must be an integer in [1, 10], got {m!r}")
    _check_number(owner, "lambda_", lambda_, 0.0, math.inf)


@dataclass(frozen=True, eq=False)
class LSoftmax(Margin):
    """L-Softmax (Liu et al. 2016): target z = ‖x‖‖W‖ψ(c), ψ = ((-1)^k cos(mθ) - 2k + λc)/(1+λ),
    θ ∈ [kπ/m, (k+1)π/m]. λ = 0 is the full margin; large λ anneals towards softmax."""

    m: int = 4
    lambda_: float = 0.0

    def __post_init__(self):
        _check_multiplicative(type(self).__name__, self.m, self.lambda_)

    def config(self) -> OpConfig:
        return OpConfig(margin_kind=KIND_MULTIPLICATIVE, m1=float(self.m), lambda_=float(self.lambda_))


@dataclass(frozen=True, eq=False)
class SphereFace(LSoftmax):
    """SphereFace / A-Softmax (Liu et al. 2017): L-Softmax's ψ with normalized class weights,
    target z = ‖x‖ψ(c)."""

    def config(self) -> OpConfig:
        return super().config()._replace(normalize_w=True)


@dataclass(frozen=True)
class LambdaSchedule:
    """SphereFace's annealing of λ for L-Softmax/SphereFace heads:
    λ(iteration) = max(lambda_min, base·(1 + gamma·iteration)^(−power)); the defaults are
    SphereFace's (1000, 0.12, 1, 5). A head given one consults it each training step with the
    iteration counted from 1, as SphereFace does (docs/margins.md): the first step uses λ(1)."""

    base: float = 1000.0
    gamma: float = 0.12
    power: float = 1.0
    lambda_min: float = 5.0

    def __post_init__(self):
        for name in ("base", "gamma", "power", "lambda_min"):
            _check_number("LambdaSchedule", name, getattr(self, name), 0.0, math.inf)

    def __call__(self, iteration: int) -> float:
        return max(self.lambda_min, self.base * (1.0 + self.gamma * iteration) ** (-self.power))
