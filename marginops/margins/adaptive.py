"""Margins computed from the batch: CurricularFace, AdaFace, MagFace (feature norm or target cosine)
and the piecewise AdaptiveAngularMargin. Stateful ones keep EMAs that heads hold as buffers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .base import (
    COS_EPS,
    KIND_COMBINED,
    THETA_POLICIES,
    Margin,
    OpConfig,
    RowContext,
    RowTerms,
    _check_angle,
    _check_number,
    _check_policy,
    _check_scale,
    _combined_config,
    masked_mean,
    psi,
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
        _check_scale("CurricularFace", self.s)
        _check_angle("CurricularFace", "m", self.m)
        _check_number("CurricularFace", "momentum", self.momentum, 0.0, 1.0)

    def config(self) -> OpConfig:
        return _combined_config(self.s, "fallback", m2=float(self.m))

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
        return _combined_config(self.s, "clip", m3=float(self.m))

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
        return _combined_config(self.s, self.policy)

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
    Intercepts default to the ones that make φ continuous with φ(0) = 0. The default schedule is
    marginops's own, not CCL's (docs/margins.md). ``s=None`` keeps the feature norm as the scale;
    weights are normalized. ``policy`` handles φ > π ("continuous" by default)."""

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
        return OpConfig(
            margin_kind=KIND_COMBINED,
            theta_policy=THETA_POLICIES[self.policy],
            normalize_x=self.s is not None,
            normalize_w=True,
            s=float(self.s or 1.0),
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
