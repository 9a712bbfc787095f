"""marginops: fused margin-softmax cross-entropy heads that never materialize logits."""

from . import distributed, insightface, margins, ops, optim, pml, reference, regularizers, subcenter  # noqa: F401  (ops loads the library)
from .distributed import ShardedMarginHead
from .functional import margin_cross_entropy
from .heads import MarginHead, WeightedMarginHead
from .margins import (
    AdaFace,
    AdaptiveAngularMargin,
    ArcFace,
    CombinedMargin,
    CosFace,
    CurricularFace,
    L2Softmax,
    LambdaSchedule,
    LSoftmax,
    MagFace,
    Margin,
    NormFace,
    Softmax,
    SphereFace,
    SubCenterArcFace,
    WeightNormSoftmax,
)

__version__ = "0.1.0"


def backends() -> dict:
    """What ``backend="auto"`` runs on each device this build has kernels for, e.g.
    ``{"cpu": "tiled"}`` or ``{"cpu": "tiled", "cuda": "chunked"}``. CUDA also offers ``"tiles"``
    (``margin_cross_entropy(..., backend="tiles")``)."""
    import torch

    has = torch._C._dispatch_has_kernel_for_dispatch_key
    auto = {"cpu": "tiled", "cuda": "chunked"}
    return {d: auto[d] for d in ("cpu", "cuda") if has("marginops::margin_ce_forward", d.upper())}


def check_errors() -> None:
    """Raises the ValueError of a bad label or ``class_index`` entry that the CUDA kernels met
    since the last check (waiting for the devices to finish first). On CUDA a training step does
    not copy labels to the host: the kernels check them, a bad one gets a NaN loss and no target
    in that step, and its ValueError comes at the next call on that device or here. On the CPU
    labels are checked before each call, so this has nothing to raise."""
    import torch

    torch.ops.marginops.check_errors()


def set_sync_checks(enabled: bool) -> bool:
    """With ``True``, each CUDA call also checks labels and ``class_index`` on the host before
    launching: the ValueError comes from the call itself, at the cost of a copy to the host and a
    synchronization per call (for debugging). Returns the previous setting (default ``False``)."""
    import torch

    return bool(torch.ops.marginops.set_sync_checks(bool(enabled)))


def cuda_available() -> bool:
    """True when the CUDA kernels were built and a CUDA device is present."""
    import torch

    return "cuda" in backends() and torch.cuda.is_available()


__all__ = [
    "margin_cross_entropy",
    "MarginHead",
    "Margin",
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
    "WeightedMarginHead",
    "ShardedMarginHead",
    "backends",
    "cuda_available",
    "check_errors",
    "set_sync_checks",
    "reference",
    "margins",
    "regularizers",
    "subcenter",
    "distributed",
    "optim",
]
