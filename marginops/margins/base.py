"""The margin-softmax family's shared pieces: constants, the target transform ψ, the op's scalar
configuration (:class:`OpConfig`), the per-row context and terms, the :class:`Margin` base and the
argument checks of the specs. The math, z_ij = a_i·b_j·f(c_ij) + bias_j with f = ψ on the target
column, is in docs/design.md, "The margin-softmax family"."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Union

import torch

# Values of MarginKind and ThetaPolicy in csrc/margin_math.h.
KIND_IDENTITY, KIND_COMBINED, KIND_MULTIPLICATIVE = 0, 1, 2
THETA_POLICIES = {"fallback": 0, "easy": 1, "none": 2, "continuous": 3, "clip": 4}
COS_EPS = 1e-7  # c clamped to [-1 + COS_EPS, 1 - COS_EPS] before acos and sqrt: ψ′ finite (ψ flat beyond)
NORM_EPS = 1e-12  # norms are clamped below, as in F.normalize
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
    """The margin's scalar arguments of the ops, in schema order; the defaults are plain softmax."""

    margin_kind: int = KIND_IDENTITY
    theta_policy: int = 0
    normalize_x: bool = False
    normalize_w: bool = False
    s: float = 1.0
    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.0
    lambda_: float = 0.0
    subcenters: int = 1
    # insightface's interclass_filtering_threshold (0: off): a non-label class whose cosine exceeds
    # it gets logit 0 and no gradient. Needs normalize_x and normalize_w.
    interclass_filter: float = 0.0
    # The target's ∂z/∂c taken as a·b (ψ′ = 1) and no gradient to the margins: insightface's ArcFace.
    straight_through: bool = False


def _combined_config(s, policy: str, **fields) -> OpConfig:
    """The combined kind, target s·(cos(m1·θ + m2) − m3), on normalized features and weights;
    ``fields``: the other OpConfig fields that differ from the defaults."""
    return OpConfig(
        margin_kind=KIND_COMBINED,
        theta_policy=THETA_POLICIES[policy],
        normalize_x=True,
        normalize_w=True,
        s=float(s),
        **fields,
    )


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


def _check_margin(owner: str, name: str, value, check: Callable[..., None], *args) -> None:
    """A margin is a per-row [B] floating tensor, or a number that ``check(owner, name, value, *args)`` accepts."""
    if not isinstance(value, torch.Tensor):
        check(owner, name, value, *args)
    elif value.dim() != 1 or not value.is_floating_point():
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
