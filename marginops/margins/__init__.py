"""Margin specs: each method of the margin-softmax family as a choice of
(normalize x?, normalize W?, scale s, target transform ψ); the formula is in docs/design.md,
"The margin-softmax family", and the specs, module by module, in docs/margins.md.

Angles are in radians. Margins given as a ``[B]`` tensor instead of a float apply per row (the
extension point of AdaFace, MagFace and the like); their values are not range-checked, and
gradients flow to them (except to a per-row m1, which must not require grad).
"""

from .adaptive import AdaFace, AdaptiveAngularMargin, CurricularFace, MagFace
from .additive import ArcFace, CombinedMargin, CosFace, SubCenterArcFace
from .base import (
    CLIP_EPS,
    COS_EPS,
    KIND_COMBINED,
    KIND_IDENTITY,
    KIND_MULTIPLICATIVE,
    NORM_EPS,
    THETA_POLICIES,
    Margin,
    OpConfig,
    RowContext,
    RowTerms,
    Scalar,
    masked_mean,
    psi,
    target_cosines,
)
from .multiplicative import LambdaSchedule, LSoftmax, SphereFace
from .softmax import L2Softmax, NormFace, Softmax, WeightNormSoftmax
