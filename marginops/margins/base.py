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
from typing import Callable, Dict, NamedTuple, Optional, Union

import torch

# Values of MarginKind and ThetaPolicy in csrc/margin_math.h.
KIND_IDENTITY, KIND_COMBINED, KIND_MULTIPLICATIVE = 0, 1, 2
THETA_POLICIES = {"fallback": 0, "easy": 1, "none": 2, "continuous": 3, "clip": 4}
COS_EPS = 1e-7
NORM_EPS = 1e-12
CLIP_EPS = 1e-3

Scalar = Union[float, torch.Tensor]


_POLICY = {v: k for k, v in THETA_POLICIES.items()}


def _parity_sign(k: torch.Tensor) -> torch.Tensor:
    return 1.0 - 2.0 * torch.remainder(k, 2.0)


def psi(
    kind: int, policy: int, c: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, m3: torch.Tensor, lambda_: float = 0.0
) -> torch.Tensor:
    """The target transform ψ(c), elementwise; autograd gives ψ' and the margin gradients."""
    if kind == KIND_IDENTITY:
        return c
    cc = c.clamp(-1.0 + COS_EPS, 1.0 - COS_EPS)
    sin_t = torch.sqrt(1.0 - cc * cc)
    theta = torch.acos(cc)
    if kind == KIND_MULTIPLICATIVE:
        mt = m1 * theta
        k = torch.floor(mt / math.pi).clamp(min=0.0).minimum(m1 - 1.0).detach()
        return (_parity_sign(k) * torch.cos(mt) - 2.0 * k + lambda_ * c) / (1.0 + lambda_)
    if kind != KIND_COMBINED:
        raise ValueError(f"unknown margin kind {kind}")
    phi = m1 * theta + m2
    # With m1 = 1, cos(θ + m2) = c·cos m2 − sin θ·sin m2 with the unclamped c (exact for CosFace).
    cos_phi = torch.where(m1 == 1.0, c * torch.cos(m2) - sin_t * torch.sin(m2), torch.cos(phi))
    name = _POLICY[policy]
    if name == "fallback":
        return torch.where(phi > math.pi, c - m3 - m2 * torch.sin(m2), cos_phi - m3)
    if name == "easy":
        return torch.where(c > 0, cos_phi - m3, c - m3)
    if name == "continuous":
        k = torch.floor(phi / math.pi).detach()
        return _parity_sign(k) * cos_phi - 2.0 * k - m3
    if name == "clip":
        lo, hi = CLIP_EPS, math.pi - CLIP_EPS
        inner = torch.where(phi > hi, math.cos(hi) - m3, cos_phi - m3)
        return torch.where(phi < lo, math.cos(lo) - m3, inner)
    return cos_phi - m3


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
    subcenters: int = 1
    # insightface's interclass_filtering_threshold (0: off): a non-label class whose cosine exceeds
    # it gets logit 0 and no gradient. Needs normalize_x and normalize_w.
    interclass_filter: float = 0.0
    # The target's ∂z/∂c taken as a·b (ψ′ = 1) and no gradient to the margins: insightface's ArcFace.
    straight_through: bool = False


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


def _check_options(owner: str, threshold, straight_through) -> None:
    _check_number(owner, "interclass_filtering_threshold", threshold, 0.0, 1.0, " (0: off)")
    if not isinstance(straight_through, bool):
        raise ValueError(f"{owner}: straight_through must be a bool, got {straight_through!r}")


def _check_policy(owner: str, policy) -> None:
    if policy not in THETA_POLICIES:
        raise ValueError(f"{owner}: policy must be one of {sorted(THETA_POLICIES)}, got {policy!r}")


@dataclass
class RowContext:
    """What a margin may look at to build its per-row terms. In a sharded head x and labels are
    the global batch (all-gathered), so batch statistics are global."""

    x: torch.Tensor  # [B, D] features
    labels: torch.Tensor  # [B] int64
    valid: torch.Tensor  # [B] bool: rows not equal to ignore_index
    update: bool  # whether stateful margins update their state (training)
    target_cos: Callable[[], torch.Tensor]  # [B] cos θ_iy, detached (0 on ignored rows)


def target_cosines(
    x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, subcenters: int = 1
) -> torch.Tensor:
    """cos θ between each row and its class (the best of its sub-centers), detached; 0 on
    ignored rows. O(B·K·D)."""
    wide = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    with torch.no_grad():
        # clamped: on CUDA a bad label is reported by the kernels (check_errors), not by an
        # out-of-bounds gather's device-side assert here
        y = torch.where(valid, labels, torch.zeros_like(labels)).clamp(0, max(weight.shape[0] // subcenters - 1, 0))
        rows = (y[:, None] * subcenters + torch.arange(subcenters, device=y.device)).reshape(-1)
        w_hat = torch.nn.functional.normalize(weight[rows].to(wide), dim=1, eps=NORM_EPS).view(len(y), subcenters, -1)
        x_hat = torch.nn.functional.normalize(x.to(wide), dim=1, eps=NORM_EPS)
        cos = (w_hat * x_hat[:, None, :]).sum(2).amax(1)
        return torch.where(valid, cos, torch.zeros_like(cos))


class RowTerms(NamedTuple):
    """Per-row inputs of the op that a margin computes from the batch."""

    row_margins: Optional[torch.Tensor] = None  # [B, 3] (m1, m2, m3)
    curricular: Optional[torch.Tensor] = None  # [B, 2] (threshold τ_i, t)
    extra_loss: Optional[torch.Tensor] = None  # [B] added to each row's loss (regularizers)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values[mask]; 0 when the mask is empty."""
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


class Margin:
    """Base of the specs. ``config()`` gives the op's scalars; ``prepare()`` the per-row terms of
    a batch. Stateful margins (CurricularFace, AdaFace) describe their state in ``state_init()``:
    heads keep it as buffers and pass it in; without state they use the batch's statistics."""

    def config(self) -> OpConfig:
        raise NotImplementedError

    def state_init(self) -> Dict[str, torch.Tensor]:
        # Shape [1], not 0-d: torch.compile drops in-place updates of 0-d float64 buffers
        # (seen with torch 2.13, every backend).
        return {}

    def prepare(self, ctx: RowContext, state: Optional[Dict[str, torch.Tensor]] = None) -> RowTerms:
        return RowTerms(row_margins=self.row_margins(ctx.x.shape[0], ctx.x))

    def _combined_margins(self):  # ((name, m1), (name, m2), (name, m3)); values float or [B] tensor
        return None

    def row_margins(self, batch: int, like: torch.Tensor) -> Optional[torch.Tensor]:
        margins = self._combined_margins()
        if margins is None or not any(isinstance(m, torch.Tensor) for _, m in margins):
            return None
        name = type(self).__name__
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        cols = []
        for key, m in margins:
            if isinstance(m, torch.Tensor):
                if m.shape != (batch,):
                    raise ValueError(
                        f"{name}: per-row {key} must have shape [{batch}] to match x, got {tuple(m.shape)}"
                    )
                if m.device != like.device:
                    raise ValueError(f"{name}: per-row {key} is on {m.device} but x is on {like.device}")
                cols.append(m)
            else:
                cols.append(torch.full((batch,), float(m), device=like.device, dtype=dtype))  # not via float32
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
    """CosFace / AM-Softmax (Wang et al. 2018): target z = s·(cos θ - m).

    ``interclass_filtering_threshold`` t_f (insightface's; 0 = off): a non-target class whose
    cosine exceeds t_f gets logit 0 and no gradient. ``straight_through``: the target's gradient
    passes as if ψ(c) were c (∂z/∂c = s, not s·ψ′(c)) and the margins get none, as insightface's
    ArcFace does (it applies the margin under no_grad)."""

    s: float = 64.0
    m: Scalar = 0.35
    interclass_filtering_threshold: float = 0.0
    straight_through: bool = False

    def __post_init__(self):
        _check_scale("CosFace", self.s)
        _check_options("CosFace", self.interclass_filtering_threshold, self.straight_through)
        if isinstance(self.m, torch.Tensor):
            _check_row_tensor("CosFace", "m", self.m)
        else:
            _check_number("CosFace", "m", self.m, 0.0, 1.0)

    def _combined_margins(self):
        return (("m1", 1.0), ("m2", 0.0), ("m", self.m))

    def config(self) -> OpConfig:
        return OpConfig(
            KIND_COMBINED,
            THETA_POLICIES["none"],
            True,
            True,
            float(self.s),
            1.0,
            0.0,
            _scalar(self.m, 0.0),
            0.0,
            1,
            float(self.interclass_filtering_threshold),
            self.straight_through,
        )


@dataclass(frozen=True, eq=False)
class CombinedMargin(Margin):
    """Combined margin (insightface): target z = s·(cos(m1·θ + m2) - m3), all three honoured.

    ``policy`` says what happens where m1·θ + m2 > π, past which cos stops decreasing in θ. The
    default (None) is "fallback" when m1 = 1 and "continuous" otherwise, so every valid
    (m1, m2, m3) works with default arguments; both equal cos(m1·θ + m2) − m3 where m1·θ + m2 ≤ π.
      - "fallback" (pytorch-metric-learning, insightface before Dec 2022): z = s·(c - m3 - m2·sin m2)
        there; the loss jumps at the boundary (by 0.12·s at m2 = 0.5). Defined for m1 = 1 only.
      - "easy": the margin applies only where c > 0; elsewhere z = s·(c - m3) (insightface's easy_margin).
      - "none": cos(m1·θ + m2) everywhere; not monotonic in θ past the boundary.
      - "continuous": (-1)^k cos(φ) - 2k - m3 with k = ⌊φ/π⌋ (SphereFace's extension), continuous
        and monotonic everywhere.
      - "clip": φ clamped to [1e-3, π - 1e-3] (AdaFace).
    insightface's current CombinedMarginLoss is policy="none" with straight_through=True.

    ``interclass_filtering_threshold`` t_f (insightface's; 0 = off): a non-target class whose
    cosine exceeds t_f gets logit 0 and no gradient. ``straight_through``: the target's gradient
    passes as if ψ(c) were c (∂z/∂c = s, not s·ψ′(c)) and the margins get none, as insightface's
    ArcFace does (it applies the margin under no_grad).
    """

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
        if self.policy is None:
            unit = not isinstance(self.m1, torch.Tensor) and self.m1 == 1.0
            object.__setattr__(self, "policy", "fallback" if unit else "continuous")
        _check_policy(owner, self.policy)
        _check_options(owner, self.interclass_filtering_threshold, self.straight_through)
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
            1,
            float(self.interclass_filtering_threshold),
            self.straight_through,
        )


@dataclass(frozen=True, eq=False)
class ArcFace(Margin):
    """ArcFace / additive angular margin (Deng et al. 2019): target z = s·cos(θ + m).

    ``policy`` for θ + m > π as in :class:`CombinedMargin` ("fallback" by default:
    z = s·(cos θ - m·sin m) there, as pytorch-metric-learning and insightface before Dec 2022 do;
    insightface's current ArcFace is policy="none", straight_through=True).

    ``interclass_filtering_threshold`` t_f (insightface's; 0 = off): a non-target class whose
    cosine exceeds t_f gets logit 0 and no gradient. ``straight_through``: the target's gradient
    passes as if ψ(c) were c (∂z/∂c = s, not s·ψ′(c)) and the margins get none, as insightface's
    ArcFace does (it applies the margin under no_grad)."""

    s: float = 64.0
    m: Scalar = 0.5
    policy: str = "fallback"
    interclass_filtering_threshold: float = 0.0
    straight_through: bool = False

    def __post_init__(self):
        _check_scale("ArcFace", self.s)
        _check_policy("ArcFace", self.policy)
        _check_options("ArcFace", self.interclass_filtering_threshold, self.straight_through)
        if isinstance(self.m, torch.Tensor):
            _check_row_tensor("ArcFace", "m", self.m)
        else:
            _check_angle("ArcFace", "m", self.m)

    def _combined_margins(self):
        return (("m1", 1.0), ("m", self.m), ("m3", 0.0))

    def config(self) -> OpConfig:
        return OpConfig(
            KIND_COMBINED,
            THETA_POLICIES[self.policy],
            True,
            True,
            float(self.s),
            1.0,
            _scalar(self.m, 0.0),
            0.0,
            0.0,
            1,
            float(self.interclass_filtering_threshold),
            self.straight_through,
        )


def _angular_target(owner: str, s, m, policy) -> None:
    _check_scale(owner, s)
    _check_policy(owner, policy)
    _check_angle(owner, "m", m)


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
        _angular_target("SubCenterArcFace", self.s, self.m, self.policy)

    def config(self) -> OpConfig:
        return OpConfig(
            KIND_COMBINED, THETA_POLICIES[self.policy], True, True, float(self.s), 1.0, float(self.m), 0.0, 0.0, self.K
        )


@dataclass(frozen=True, eq=False)
class CurricularFace(Margin):
    """CurricularFace (Huang et al. 2020): ArcFace's margin on the target (fallback past π);
    a negative harder than the target's margin cosine, c_j > cos(θ_y + m), becomes c_j·(t + c_j).
    t is an EMA of the batch's mean target cosine: t ← momentum·mean(cos θ_y) + (1 − momentum)·t,
    updated before use, starting from 0; heads keep it as a buffer (in a sharded head, over the
    global batch)."""

    s: float = 64.0
    m: float = 0.5
    momentum: float = 0.01

    def __post_init__(self):
        _angular_target("CurricularFace", self.s, self.m, "fallback")
        _check_number("CurricularFace", "momentum", self.momentum, 0.0, 1.0)

    def config(self) -> OpConfig:
        return OpConfig(
            KIND_COMBINED, THETA_POLICIES["fallback"], True, True, float(self.s), 1.0, float(self.m), 0.0, 0.0
        )

    def state_init(self) -> Dict[str, torch.Tensor]:
        return {"t": torch.zeros(1, dtype=torch.float64)}

    def prepare(self, ctx: RowContext, state=None) -> RowTerms:
        cos = ctx.target_cos()
        mean = masked_mean(cos, ctx.valid)
        if state is None:
            t = mean
        else:
            if ctx.update:
                ema = self.momentum * mean + (1.0 - self.momentum) * state["t"]
                state["t"].copy_(torch.where(ctx.valid.any(), ema, state["t"]))
            t = state["t"].to(cos.dtype)
        one = torch.ones_like(cos)
        tau = psi(KIND_COMBINED, THETA_POLICIES["none"], cos, one, one * self.m, one * 0.0)  # cos(θ_y + m)
        tau = torch.where(ctx.valid, tau, torch.full_like(tau, math.inf))
        return RowTerms(curricular=torch.stack([tau, t.expand_as(tau)], dim=1))


@dataclass(frozen=True, eq=False)
class AdaFace(Margin):
    """AdaFace (Kim et al. 2022): margins from the feature norm. With ĝ = clip(h·(‖x‖ − μ)/(σ + ε),
    −1, 1), ‖x‖ clipped to [0.001, 100] and detached, the target becomes
    cos(clip(θ − m·ĝ, ε, π − ε)) − (m + m·ĝ), ε = 1e-3. μ, σ are EMAs of the batch's norm mean
    and std with rate t_alpha (the paper's 0.01), starting at 20 and 100 as in the paper's code.
    Not reproduced: AdaFace's clamp of every cosine to [−1 + 1e-3, 1 − 1e-3]."""

    s: float = 64.0
    m: float = 0.4
    h: float = 0.333
    t_alpha: float = 0.01

    def __post_init__(self):
        _check_scale("AdaFace", self.s)
        _check_number("AdaFace", "m", self.m, 0.0, 1.0)
        _check_number("AdaFace", "h", self.h, 0.0, 10.0)
        _check_number("AdaFace", "t_alpha", self.t_alpha, 0.0, 1.0)

    def config(self) -> OpConfig:
        return OpConfig(KIND_COMBINED, THETA_POLICIES["clip"], True, True, float(self.s), 1.0, 0.0, float(self.m), 0.0)

    def state_init(self) -> Dict[str, torch.Tensor]:
        return {
            "batch_mean": torch.full((1,), 20.0, dtype=torch.float64),
            "batch_std": torch.full((1,), 100.0, dtype=torch.float64),
        }

    def prepare(self, ctx: RowContext, state=None) -> RowTerms:
        norms = ctx.x.detach().norm(dim=1).clamp(0.001, 100.0)
        norms = norms.to(torch.promote_types(norms.dtype, torch.float32))
        count = ctx.valid.sum()
        mean = masked_mean(norms, ctx.valid)
        std = (masked_mean((norms - mean) ** 2, ctx.valid) * count / (count - 1).clamp_min(1)).sqrt()  # unbiased
        if state is not None:
            if ctx.update:
                for key, value in (("batch_mean", mean), ("batch_std", std)):
                    ema = self.t_alpha * value + (1.0 - self.t_alpha) * state[key]
                    state[key].copy_(torch.where(count > 1, ema, state[key]))
            mean, std = state["batch_mean"].to(norms.dtype), state["batch_std"].to(norms.dtype)
        g = ((norms - mean) / (std + 1e-3) * self.h).clamp(-1.0, 1.0)
        rows = torch.stack([torch.ones_like(g), -self.m * g, self.m + self.m * g], dim=1)
        return RowTerms(row_margins=rows)


@dataclass(frozen=True, eq=False)
class MagFace(Margin):
    """MagFace (Meng et al. 2021): ArcFace with a per-row margin from the feature magnitude
    a = clamp(‖x‖, l_a, u_a): m(a) = (u_m − l_m)/(u_a − l_a)·(a − l_a) + l_m, plus the regularizer
    λ_g·g(a), g(a) = a/u_a² + 1/a, added to each row's loss. Gradients flow through m(a) and g(a)
    to the features, as in MagFace's code. ``policy`` as in :class:`ArcFace`."""

    s: float = 64.0
    l_a: float = 10.0
    u_a: float = 110.0
    l_m: float = 0.45
    u_m: float = 0.8
    lambda_g: float = 35.0
    policy: str = "fallback"

    def __post_init__(self):
        _check_scale("MagFace", self.s)
        _check_policy("MagFace", self.policy)
        _check_number("MagFace", "l_a", self.l_a, 1e-6, math.inf)
        _check_number("MagFace", "u_a", self.u_a, self.l_a + 1e-6, math.inf, f" (above l_a={self.l_a})")
        _check_angle("MagFace", "l_m", self.l_m)
        _check_angle("MagFace", "u_m", self.u_m)
        _check_number("MagFace", "lambda_g", self.lambda_g, 0.0, math.inf)

    def config(self) -> OpConfig:
        return OpConfig(KIND_COMBINED, THETA_POLICIES[self.policy], True, True, float(self.s), 1.0, 0.0, 0.0, 0.0)

    def prepare(self, ctx: RowContext, state=None) -> RowTerms:
        x = ctx.x.to(torch.promote_types(ctx.x.dtype, torch.float32))
        a = x.norm(dim=1).clamp(self.l_a, self.u_a)
        m = (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m
        rows = torch.stack([torch.ones_like(m), m, torch.zeros_like(m)], dim=1)
        return RowTerms(row_margins=rows, extra_loss=self.lambda_g * (a / self.u_a**2 + 1.0 / a))


@dataclass(frozen=True, eq=False)
class AdaptiveAngularMargin(Margin):
    """An angular margin piecewise in the target angle θ, after CCL (Qi & Zhang 2018): the target
    logit is a·cos(φ(θ)) with φ(θ) = slope_k·θ + intercept_k on the k-th piece of [0, π] cut at
    ``breakpoints`` — a multiplicative margin η(θ) = φ(θ)/θ that adapts to the row's angle.
    Intercepts default to the ones that make φ continuous with φ(0) = 0; give them explicitly
    (e.g. all zero, for a piecewise-constant η) to reproduce another schedule.

    The default, φ = 2θ up to θ = 0.5 and θ + 0.5 beyond, is marginops's choice: multiplicative
    (SphereFace m = 2) for small angles, ArcFace's 0.5 past them, continuous in θ. CCL's paper
    text was not available when this was written, so its published constants are not
    reproduced here. ``s=None`` keeps the feature norm as the scale (CCL trains on whitened,
    unnormalized features; see :class:`marginops.regularizers.FeatureWhitening`); weights are
    normalized. ``policy`` handles φ > π ("continuous" by default)."""

    breakpoints: tuple = (0.5,)
    slopes: tuple = (2.0, 1.0)
    intercepts: Optional[tuple] = None
    s: Optional[float] = None
    policy: str = "continuous"

    def __post_init__(self):
        owner = "AdaptiveAngularMargin"
        b, k = tuple(self.breakpoints), tuple(self.slopes)
        if len(k) != len(b) + 1:
            raise ValueError(f"{owner}: slopes needs one entry per piece ({len(b) + 1}), got {len(k)}")
        if any(not 0 < v < math.pi for v in b) or list(b) != sorted(set(b)):
            raise ValueError(f"{owner}: breakpoints must increase strictly inside (0, π), got {b!r}")
        for v in k:
            _check_number(owner, "slopes", v, 1.0, 10.0)
        if self.intercepts is not None:
            if len(self.intercepts) != len(k):
                raise ValueError(
                    f"{owner}: intercepts needs one entry per piece ({len(k)}), got {len(self.intercepts)}"
                )
            for v in self.intercepts:
                _check_number(owner, "intercepts", v, -math.pi, math.pi)
        if self.s is not None:
            _check_scale(owner, self.s)
        _check_policy(owner, self.policy)
        if self.policy == "fallback":
            raise ValueError(f"{owner}: policy='fallback' needs m1 = 1; use 'continuous', 'none' or 'clip'")

    def pieces(self):
        """(start angle, slope, intercept) of each piece."""
        starts = (0.0,) + tuple(self.breakpoints)
        if self.intercepts is not None:
            return list(zip(starts, self.slopes, self.intercepts))
        out, phi = [], 0.0
        for i, (start, slope) in enumerate(zip(starts, self.slopes)):
            out.append((start, slope, phi - slope * start))
            if i + 1 < len(starts):
                phi += slope * (starts[i + 1] - start)
        return out

    def config(self) -> OpConfig:
        normalized = self.s is not None
        return OpConfig(
            KIND_COMBINED, THETA_POLICIES[self.policy], normalized, True, float(self.s or 1.0), 1.0, 0.0, 0.0, 0.0
        )

    def prepare(self, ctx: RowContext, state=None) -> RowTerms:
        theta = torch.acos(ctx.target_cos().clamp(-1.0 + COS_EPS, 1.0 - COS_EPS))
        slope = torch.zeros_like(theta)
        intercept = torch.zeros_like(theta)
        for start, k, b0 in self.pieces():
            inside = theta >= start
            slope = torch.where(inside, k, slope)
            intercept = torch.where(inside, b0, intercept)
        return RowTerms(row_margins=torch.stack([slope, intercept, torch.zeros_like(slope)], dim=1))


@dataclass(frozen=True)
class LambdaSchedule:
    """SphereFace's annealing of λ for L-Softmax/SphereFace heads:
    λ(iteration) = max(lambda_min, base·(1 + gamma·iteration)^(−power)); the defaults are
    SphereFace's (1000, 0.12, 1, 5). A head given one consults it each training step with the
    iteration counted from 1 (SphereFace's Caffe layer increments its counter before computing
    λ), so the first step uses λ(1) = max(lambda_min, base·(1 + gamma)^(−power)), not base."""

    base: float = 1000.0
    gamma: float = 0.12
    power: float = 1.0
    lambda_min: float = 5.0

    def __post_init__(self):
        for name in ("base", "gamma", "power", "lambda_min"):
            _check_number("LambdaSchedule", name, getattr(self, name), 0.0, math.inf)

    def __call__(self, iteration: int) -> float:
        return max(self.lambda_min, self.base * (1.0 + self.gamma * iteration) ** (-self.power))


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
    "SubCenterArcFace",
    "CurricularFace",
    "AdaFace",
    "MagFace",
    "AdaptiveAngularMargin",
    "LambdaSchedule",
    "RowContext",
    "RowTerms",
    "psi",
]
