"""Margin specs: each method of the margin-softmax family as a choice of
(normalize x?, normalize W?, scale s, target transform ψ). See DESIGN.md §1.

For row i, class j, with c_ij = cos θ_ij = x_i·W_j / (‖x_i‖ ‖W_j‖):

    z_ij = a_i · b_j · f(c_ij) + bias_j
    a_i  = s if features are normalized, else ‖x_i‖
    b_j  = 1 if weights are normalized,  else ‖W_j‖
    f    = ψ on the target column j = y_i, identity elsewhere

Angles are in radians. Margins given as a ``[B]`` tensor instead of a float apply per row (the
extension point of AdaFace, MagFace and the like); their values are not range-checked, and
gradients flow to them (except to a per-row m1, which must not require grad).

Numerics: c is clamped to [-1 + 1e-7, 1 - 1e-7] before acos and sqrt, so ψ'(c) stays finite
(ψ is flat in c beyond the clamp); norms are clamped below at 1e-12 as in F.normalize.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch

# Values of MarginKind and ThetaPolicy in csrc/margin_math.h.
KIND_IDENTITY, KIND_COMBINED, KIND_MULTIPLICATIVE = 0, 1, 2
THETA_POLICIES = {"fallback": 0, "easy": 1, "none": 2, "continuous": 3, "clip": 4}
COS_EPS = 1e-7
NORM_EPS = 1e-12

Scalar = Union[float, torch.Tensor]


class OpConfig(NamedTuple):
    """The margin's scalar arguments of the ops, in schema order."""

    margin_kind: int
    theta_policy: int
    normalize_x: bool
    normalize_w: bool
    s: float
    m1: float
    m2: float
    m3: float
    lambda_: float


def _check_number(owner: str, name: str, value, lo: float, hi: float, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{owner}: {name} must be a real number, got {value!r}")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ValueError(f"{owner}: {name}={value!r} must lie in [{lo:g}, {hi:g}]{hint}")


def _check_scale(owner: str, s) -> None:
    if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s) or s <= 0:
        raise ValueError(f"{owner}: s must be a positive finite scale, got {s!r}")


def _check_angle(owner: str, name: str, value, hi: float = math.pi / 2) -> None:
    hint = ""
    if isinstance(value, numbers.Real) and value > hi:
        hint = f"; angles are in radians: {value!r} degrees would be {math.radians(value):.4f}"
    _check_number(owner, name, value, 0.0, hi, hint)


def _check_row_tensor(owner: str, name: str, value: torch.Tensor) -> None:
    if value.dim() != 1 or not value.is_floating_point():
        raise ValueError(
            f"{owner}: a per-row {name} must be a 1-D floating tensor [B], got shape "
            f"{tuple(value.shape)} and dtype {value.dtype}"
        )


def _check_policy(owner: str, policy) -> None:
    if policy not in THETA_POLICIES:
        raise ValueError(f"{owner}: policy must be one of {sorted(THETA_POLICIES)}, got {policy!r}")


class Margin:
    """Base of the specs. ``config()`` gives the op's scalars, ``row_margins()`` the per-row
    ``[B, 3]`` tensor (m1, m2, m3) when some margin is a tensor."""

    def config(self) -> OpConfig:
        raise NotImplementedError

    def _combined_margins(self):  # ((name, m1), (name, m2), (name, m3)); values float or [B] tensor
        return None

    def row_margins(self, batch: int, like: torch.Tensor) -> Optional[torch.Tensor]:
        margins = self._combined_margins()
        if margins is None or not any(isinstance(m, torch.Tensor) for _, m in margins):
            return None
        name = type(self).__name__
        cols = []
        for key, m in margins:
            if isinstance(m, torch.Tensor):
                if m.shape != (batch,):
                    raise ValueError(f"{name}: per-row {key} must have shape [{batch}] to match x, got {tuple(m.shape)}")
                if m.device != like.device:
                    raise ValueError(f"{name}: per-row {key} is on {m.device} but x is on {like.device}")
                cols.append(m)
            else:
                cols.append(torch.full((batch,), float(m), device=like.device))
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        return torch.stack([c.to(dtype) for c in cols], dim=1)


def _scalar(m: Scalar, default: float) -> float:
    return default if isinstance(m, torch.Tensor) else float(m)


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
        return OpConfig(KIND_MULTIPLICATIVE, 0, False, False, 1.0, float(self.m), 0.0, 0.0, float(self.lambda_))


@dataclass(frozen=True, eq=False)
class SphereFace(LSoftmax):
    """SphereFace / A-Softmax (Liu et al. 2017): L-Softmax's ψ with normalized class weights,
    target z = ‖x‖ψ(c)."""

    def config(self) -> OpConfig:
        return super().config()._replace(normalize_w=True)


@dataclass(frozen=True, eq=False)
class CosFace(Margin):
    """CosFace / AM-Softmax (Wang et al. 2018): target z = s·(cos θ - m)."""

    s: float = 64.0
    m: Scalar = 0.35

    def __post_init__(self):
        _check_scale("CosFace", self.s)
        if isinstance(self.m, torch.Tensor):
            _check_row_tensor("CosFace", "m", self.m)
        else:
            _check_number("CosFace", "m", self.m, 0.0, 1.0)

    def _combined_margins(self):
        return (("m1", 1.0), ("m2", 0.0), ("m", self.m))

    def config(self) -> OpConfig:
        return OpConfig(KIND_COMBINED, THETA_POLICIES["none"], True, True, float(self.s), 1.0, 0.0, _scalar(self.m, 0.0), 0.0)


@dataclass(frozen=True, eq=False)
class CombinedMargin(Margin):
    """Combined margin (insightface): target z = s·(cos(m1·θ + m2) - m3), all three honoured.

    ``policy`` says what happens where m1·θ + m2 > π, past which cos stops decreasing in θ:
      - "fallback" (default, insightface and pytorch-metric-learning): z = s·(c - m3 - m2·sin m2)
        there; the loss jumps at the boundary (by 0.12·s at m2 = 0.5). Defined for m1 = 1 only.
      - "easy": the margin applies only where c > 0; elsewhere z = s·(c - m3) (insightface's easy_margin).
      - "none": cos(m1·θ + m2) everywhere; not monotonic in θ past the boundary.
      - "continuous": (-1)^k cos(φ) - 2k - m3 with k = ⌊φ/π⌋ (SphereFace's extension), continuous
        and monotonic everywhere.
      - "clip": φ clamped to [0, π] (AdaFace).
    """

    s: float = 64.0
    m1: Scalar = 1.0
    m2: Scalar = 0.5
    m3: Scalar = 0.0
    policy: str = "fallback"

    def __post_init__(self):
        owner = type(self).__name__
        _check_scale(owner, self.s)
        _check_policy(owner, self.policy)
        for name, value, check in (
            ("m1", self.m1, lambda v: _check_number(owner, "m1", v, 1.0, 10.0)),
            ("m2", self.m2, lambda v: _check_angle(owner, "m2", v)),
            ("m3", self.m3, lambda v: _check_number(owner, "m3", v, 0.0, 1.0)),
        ):
            if isinstance(value, torch.Tensor):
                _check_row_tensor(owner, name, value)
            else:
                check(value)
        if isinstance(self.m1, torch.Tensor) and self.m1.requires_grad:
            raise ValueError(f"{owner}: a per-row m1 is a constant; pass m1.detach()")
        if self.policy == "fallback" and (isinstance(self.m1, torch.Tensor) or self.m1 != 1.0):
            raise ValueError(
                f"{owner}: policy='fallback' (c - m3 - m2·sin m2 past φ = π) is defined for m1 = 1, "
                f"got m1={self.m1!r}; use policy='continuous' or 'none'"
            )

    def _combined_margins(self):
        return (("m1", self.m1), ("m2", self.m2), ("m3", self.m3))

    def config(self) -> OpConfig:
        return OpConfig(
            KIND_COMBINED,
            THETA_POLICIES[self.policy],
            True,
            True,
            float(self.s),
            _scalar(self.m1, 1.0),
            _scalar(self.m2, 0.0),
            _scalar(self.m3, 0.0),
            0.0,
        )


@dataclass(frozen=True, eq=False)
class ArcFace(Margin):
    """ArcFace / additive angular margin (Deng et al. 2019): target z = s·cos(θ + m).

    ``policy`` for θ + m > π as in :class:`CombinedMargin` ("fallback" by default:
    z = s·(cos θ - m·sin m) there, as insightface and pytorch-metric-learning do)."""

    s: float = 64.0
    m: Scalar = 0.5
    policy: str = "fallback"

    def __post_init__(self):
        _check_scale("ArcFace", self.s)
        _check_policy("ArcFace", self.policy)
        if isinstance(self.m, torch.Tensor):
            _check_row_tensor("ArcFace", "m", self.m)
        else:
            _check_angle("ArcFace", "m", self.m)

    def _combined_margins(self):
        return (("m1", 1.0), ("m", self.m), ("m3", 0.0))

    def config(self) -> OpConfig:
        return OpConfig(KIND_COMBINED, THETA_POLICIES[self.policy], True, True, float(self.s), 1.0, _scalar(self.m, 0.0), 0.0, 0.0)


__all__ = [
    "Margin",
    "OpConfig",
    "Softmax",
    "WeightNormSoftmax",
    "L2Softmax",
    "NormFace",
    "LSoftmax",
    "SphereFace",
    "CosFace",
    "ArcFace",
    "CombinedMargin",
]
