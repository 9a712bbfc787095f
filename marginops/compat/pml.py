"""pytorch-metric-learning's classification losses as marginops heads:
``head = marginops.pml.from_pml(loss_func)`` (ArcFaceLoss, CosFaceLoss, SphereFaceLoss, ...) gives
the same loss without the [B, C] logits; :func:`to_pml` copies the weight back. docs/compat.md
has the conversion table and what is refused."""

from __future__ import annotations

import torch

from ..heads import MarginHead
from ..margins import ArcFace, CosFace, LSoftmax, Margin, NormFace, SphereFace, SubCenterArcFace

__all__ = ["margin_from_pml", "from_pml", "to_pml"]


def _check_plain(loss) -> None:
    from pytorch_metric_learning import distances, reducers

    name = type(loss).__name__
    if getattr(loss, "weight_regularizer", None) is not None:
        raise ValueError(f"{name} has a weight_regularizer: not converted (add it to the loss yourself)")
    if type(loss.reducer) is not reducers.MeanReducer:
        raise ValueError(
            f"{name} uses {type(loss.reducer).__name__}: only the default MeanReducer converts (reduction='mean')"
        )
    dist = loss.distance
    want = distances.DotProductSimilarity if name == "NormalizedSoftmaxLoss" else distances.CosineSimilarity
    if type(dist) is not want or not dist.normalize_embeddings or dist.p != 2 or dist.power != 1:
        raise ValueError(f"{name} uses {dist!r}: only its default distance {want.__name__}() converts")


def margin_from_pml(loss) -> Margin:
    """The marginops margin spec of a pytorch-metric-learning loss object."""
    from pytorch_metric_learning import losses as L

    name = type(loss).__name__
    known = (L.ArcFaceLoss, L.CosFaceLoss, L.LargeMarginSoftmaxLoss, L.NormalizedSoftmaxLoss)
    if not isinstance(loss, known):
        raise ValueError(f"no marginops equivalent of {name}")
    _check_plain(loss)
    if isinstance(loss, L.SubCenterArcFaceLoss):  # before ArcFaceLoss: a subclass of it
        return SubCenterArcFace(K=int(loss.sub_centers), s=float(loss.scale), m=float(loss.margin))
    if isinstance(loss, L.ArcFaceLoss):  # loss.margin is already in radians (init_margin)
        return ArcFace(s=float(loss.scale), m=float(loss.margin), policy="fallback")
    if isinstance(loss, L.CosFaceLoss):
        return CosFace(s=float(loss.scale), m=float(loss.margin))
    if isinstance(loss, L.NormalizedSoftmaxLoss):
        return NormFace(s=1.0 / float(loss.temperature))
    # what remains of known: LargeMarginSoftmaxLoss and its SphereFaceLoss
    if float(loss.scale) != 1.0:
        raise ValueError(
            f"{name}(scale={loss.scale}): marginops's L-Softmax/SphereFace have no extra scale; use scale=1"
        )
    spec = SphereFace if isinstance(loss, L.SphereFaceLoss) else LSoftmax
    return spec(m=int(loss.margin))


def from_pml(loss, **head_kwargs) -> MarginHead:
    """A :class:`marginops.MarginHead` computing ``loss(embeddings, labels)`` of a
    pytorch-metric-learning loss object, with a copy of its weight (transposed to ``[C·K, D]``)
    in the weight's dtype and device. ``head_kwargs`` go to MarginHead (``backend``, ...)."""
    margin = margin_from_pml(loss)
    W = loss.W.detach()
    D, rows = W.shape
    K = margin.config().subcenters
    head = MarginHead(D, rows // K, margin=margin, device=W.device, dtype=W.dtype, **head_kwargs)
    with torch.no_grad():
        head.weight.copy_(W.t())
    return head


def to_pml(head: MarginHead, loss) -> None:
    """Copies a head's weight back into a pytorch-metric-learning loss object's ``W [D, C]``."""
    with torch.no_grad():
        loss.W.copy_(head.weight.t())
