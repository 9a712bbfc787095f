"""Drop-in replacements for insightface's ``arcface_torch`` head: in a ``train_v2.py``,
``from marginops.insightface import PartialFC_V2, CombinedMarginLoss`` is the only line to change.
PartialFC_V2 takes insightface's arguments in insightface's order and computes the loss with
marginops.ShardedMarginHead; by default with insightface's numbers (``semantics="insightface"``),
or marginops's own (``semantics="marginops"``). docs/compat.md lists what each means and the
differences that remain."""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..distributed import ShardedMarginHead
from ..margins import ArcFace as _ArcFaceSpec
from ..margins import CombinedMargin as _CombinedSpec
from ..margins import CosFace as _CosFaceSpec
from ..margins import Margin

SEMANTICS = ("insightface", "marginops")

__all__ = ["PartialFC_V2", "CombinedMarginLoss", "ArcFace", "CosFace", "to_margin", "SEMANTICS"]


def _check_semantics(semantics: str) -> None:
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")


def combined_spec(s, m1, m2, m3, threshold=0.0, semantics: str = "insightface") -> Margin:
    """The marginops spec of insightface's CombinedMarginLoss(s, m1, m2, m3, threshold)."""
    _check_semantics(semantics)
    s, m1, m2, m3, threshold = float(s), float(m1), float(m2), float(m3), float(threshold or 0.0)
    if semantics == "marginops":
        return _CombinedSpec(s=s, m1=m1, m2=m2, m3=m3, interclass_filtering_threshold=threshold)
    if m3 > 0:  # insightface's CosFace branch: target c − m3; m1 and m2 unused
        if m1 != 1.0 or m2 != 0.0:
            warnings.warn(
                f"insightface's CombinedMarginLoss ignores m1={m1} and m2={m2} when m3 > 0 (target c - m3); "
                "reproduced. semantics='marginops' honours all three.",
                stacklevel=3,
            )
        m1, m2, policy = 1.0, 0.0, "none"
    else:  # insightface's ArcFace branch (m3 ≤ 0 read as 0); it raises for m1 != 1, marginops's default policy
        m3, policy = 0.0, "none" if m1 == 1.0 else None
    return _CombinedSpec(
        s=s, m1=m1, m2=m2, m3=m3, policy=policy, interclass_filtering_threshold=threshold, straight_through=True
    )


class _MarginModule(torch.nn.Module):
    """An insightface margin module's stand-in: holds the parameters, gives the spec. The fused
    head never builds the logits these modules transform, so calling one is an error."""

    def __init__(self, semantics: str, **params):
        super().__init__()
        _check_semantics(semantics)
        for name, value in params.items():
            setattr(self, name, value)
        self.semantics = semantics
        self.spec()  # parameter errors at construction

    def spec(self, semantics: Optional[str] = None) -> Margin:
        """The marginops spec, in ``semantics`` (default: the module's own)."""
        raise NotImplementedError

    def forward(self, logits, labels):  # pragma: no cover - explicit message only
        raise TypeError(
            f"marginops.insightface.{type(self).__name__} is not applied to logits: pass it to PartialFC_V2, "
            "which computes the margin softmax without materializing them"
        )


class CombinedMarginLoss(_MarginModule):
    """insightface's ``CombinedMarginLoss(s, m1, m2, m3, interclass_filtering_threshold=0)``.
    ``semantics`` (keyword): "insightface" (default) or "marginops" (see the module doc)."""

    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0, *, semantics: str = "insightface"):
        super().__init__(
            semantics, s=s, m1=m1, m2=m2, m3=m3, interclass_filtering_threshold=interclass_filtering_threshold
        )

    def spec(self, semantics: Optional[str] = None) -> Margin:
        return combined_spec(
            self.s, self.m1, self.m2, self.m3, self.interclass_filtering_threshold, semantics or self.semantics
        )


class ArcFace(_MarginModule):
    """insightface's ``ArcFace(s=64.0, margin=0.5)``: cos(θ + margin) with no fallback and a
    straight-through target gradient (``semantics="marginops"``: policy "fallback", true gradient)."""

    def __init__(self, s=64.0, margin=0.5, *, semantics: str = "insightface"):
        super().__init__(semantics, s=s, margin=margin)

    def spec(self, semantics: Optional[str] = None) -> Margin:
        semantics = semantics or self.semantics
        _check_semantics(semantics)
        if semantics == "marginops":
            return _ArcFaceSpec(s=float(self.s), m=float(self.margin))
        return _ArcFaceSpec(s=float(self.s), m=float(self.margin), policy="none", straight_through=True)


class CosFace(_MarginModule):
    """insightface's ``CosFace(s=64.0, m=0.40)``: target c − m."""

    def __init__(self, s=64.0, m=0.40, *, semantics: str = "insightface"):
        super().__init__(semantics, s=s, m=m)

    def spec(self, semantics: Optional[str] = None) -> Margin:
        semantics = semantics or self.semantics
        _check_semantics(semantics)
        return _CosFaceSpec(s=float(self.s), m=float(self.m), straight_through=semantics == "insightface")


def to_margin(margin_loss, semantics: Optional[str] = None) -> Margin:
    """A marginops spec from: a marginops spec (returned as is), one of this module's margin
    modules, or an insightface margin module read by its attributes (``s``, ``m1``, ``m2``, ``m3``,
    ``interclass_filtering_threshold`` of CombinedMarginLoss; ``s``, ``margin`` of ArcFace; ``s``,
    ``m`` of CosFace). ``semantics``: default the module's own, "insightface" for a foreign one."""
    if isinstance(margin_loss, Margin):
        return margin_loss
    if semantics is not None:
        _check_semantics(semantics)
    if isinstance(margin_loss, _MarginModule):
        return margin_loss.spec(semantics)
    semantics = semantics or "insightface"
    has = lambda *names: all(hasattr(margin_loss, n) for n in names)  # noqa: E731
    if has("s", "m1", "m2", "m3"):
        threshold = getattr(margin_loss, "interclass_filtering_threshold", 0.0)
        return combined_spec(margin_loss.s, margin_loss.m1, margin_loss.m2, margin_loss.m3, threshold, semantics)
    if has("s", "margin"):
        return ArcFace(margin_loss.s, margin_loss.margin, semantics=semantics).spec()
    if has("s", "m"):
        return CosFace(margin_loss.s, margin_loss.m, semantics=semantics).spec()
    raise ValueError(
        f"cannot read a margin from {type(margin_loss).__name__}: expected a marginops margin spec or an insightface "
        "margin module with attributes (s, m1, m2, m3[, interclass_filtering_threshold]), (s, margin) or (s, m)"
    )


class PartialFC_V2(ShardedMarginHead):
    """insightface's ``PartialFC_V2(margin_loss, embedding_size, num_classes, sample_rate=1.0,
    fp16=False)`` on :class:`marginops.ShardedMarginHead` (see the module doc). ``forward(
    local_embeddings, local_labels)`` takes labels ``[B]`` or ``[B, 1]`` of any integer dtype and
    returns the mean loss of the global batch. Keywords after insightface's arguments:
    ``semantics``, ``process_group``, ``seed``, ``backend``, ``workspace_bytes``."""

    def __init__(
        self,
        margin_loss,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        fp16: bool = False,
        *,
        semantics: Optional[str] = None,
        process_group=None,
        seed: int = 0,
        backend: str = "auto",
        workspace_bytes: Optional[int] = None,
    ):
        if semantics is None:  # a marginops spec is used as it is
            semantics = (
                "marginops" if isinstance(margin_loss, Margin) else getattr(margin_loss, "semantics", "insightface")
            )
        _check_semantics(semantics)
        if not isinstance(fp16, bool):
            raise ValueError(f"fp16 must be a bool, got {fp16!r}")
        margin = to_margin(margin_loss, semantics)
        super().__init__(
            embedding_size,
            num_classes,
            margin,
            process_group=process_group,
            sample_rate=sample_rate,
            scale_grad_by_world_size=True,
            seed=seed,
            backend=backend,
            workspace_bytes=workspace_bytes,
        )
        self.fp16 = fp16
        self.semantics = semantics
        self.margin_softmax = margin_loss if isinstance(margin_loss, torch.nn.Module) else None
        # insightface's state_dict is {"weight"}: the sampling step is not saved (as insightface's).
        self._non_persistent_buffers_set.add("sample_step")

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        step = state_dict.pop(prefix + "sample_step", None)  # a ShardedMarginHead's state
        if step is not None:
            self.sample_step.copy_(step)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor):
        x = local_embeddings
        if self.fp16 and x.is_cuda and x.dtype == torch.float32:
            x = x.half()  # insightface: the product under CUDA autocast; W stays float32
        return super().forward(x, local_labels)

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, sample_rate={self.sample_rate}, "
            f"fp16={self.fp16}, semantics={self.semantics!r}, margin={self.margin!r}, world_size={self.world_size}"
        )
