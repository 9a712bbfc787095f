"""The options of a margin head, validated once: every entry point (the functional call, the eager
reference, MarginHead, WeightedMarginHead, ShardedMarginHead) builds one HeadOptions and hands it
to the one pipeline (marginops._pipeline)."""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from typing import Optional

from .margins import Margin, Softmax

REDUCTIONS = ("mean", "sum", "none")
# The ops' `backend` codes. "fused" is the old name of "tiles".
BACKENDS = {"auto": 0, "chunked": 1, "tiles": 2}
CUDA_BACKENDS = ("chunked", "tiles")
DEFAULT_WORKSPACE_MIB = 64


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class HeadOptions:
    """What a head computes beyond its tensors. Construction checks every field and raises a
    ValueError naming the field and the value; ``replace(**changes)`` returns a checked copy.

    margin: a spec of marginops.margins (None: plain Softmax). reduction, ignore_index and
    label_smoothing: as in torch.nn.functional.cross_entropy. return_accuracy: also return the
    margin-free top-1 accuracy. grad_skip_threshold in [0, 1): 0 computes every gradient.
    backend: "auto", "chunked" or "tiles" (CUDA). workspace_bytes: the chunked backend's budget
    for all its extra memory (None: 64 MiB). check_finite: raise on NaN/Inf in x, weight, bias."""

    margin: Optional[Margin] = None
    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    return_accuracy: bool = False
    grad_skip_threshold: float = 0.0
    backend: str = "auto"
    workspace_bytes: Optional[int] = None
    check_finite: bool = False

    def __post_init__(self) -> None:
        fix = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen)
        margin = Softmax() if self.margin is None else self.margin
        if not isinstance(margin, Margin):
            raise ValueError(f"margin must be a marginops margin spec (e.g. mo.ArcFace()), got {margin!r}")
        fix("margin", margin)
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if not _is_int(self.ignore_index):
            raise ValueError(f"ignore_index must be an int, got {self.ignore_index!r}")
        fix("ignore_index", int(self.ignore_index))
        fix("label_smoothing", check_label_smoothing(self.label_smoothing))
        fix("return_accuracy", bool(self.return_accuracy))
        t = self.grad_skip_threshold
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0.0 <= t < 1.0:
            raise ValueError(f"grad_skip_threshold must lie in [0, 1), got {t!r}")
        fix("grad_skip_threshold", float(t))
        if self.backend == "fused":
            warnings.warn('backend="fused" is now called "tiles"', DeprecationWarning, stacklevel=4)
            fix("backend", "tiles")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {tuple(BACKENDS)}, got {self.backend!r}")
        w = self.workspace_bytes
        if w is not None and (not _is_int(w) or w <= 0):
            raise ValueError(
                f"workspace_bytes must be a positive int (bytes) or None ({DEFAULT_WORKSPACE_MIB} MiB), got {w!r}"
            )
        fix("check_finite", bool(self.check_finite))

    def replace(self, **changes) -> "HeadOptions":
        return dataclasses.replace(self, **changes)

    def check_device(self, device) -> None:
        """The backend runs on this device type (x's)."""
        if self.backend in CUDA_BACKENDS and device.type not in ("cuda", "meta"):
            raise ValueError(f"backend={self.backend!r} runs on CUDA only, but x is on {device} (use backend='auto')")

    @property
    def backend_code(self) -> int:
        """The ops' `backend` argument."""
        return BACKENDS[self.backend]

    @property
    def workspace_code(self) -> int:
        """The ops' `workspace_bytes` argument (0: the default)."""
        return 0 if self.workspace_bytes is None else int(self.workspace_bytes)


FIELDS = tuple(f.name for f in dataclasses.fields(HeadOptions))


def check_label_smoothing(label_smoothing) -> float:
    """label_smoothing: a Python number in [0, 1] (a tensor is refused: it would be read on the
    host at every step, and a 0-d tensor compares like a number only by accident)."""
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        kind = f"a {type(label_smoothing).__name__}"
        if type(label_smoothing).__name__ == "Tensor":
            kind += f" {label_smoothing!r}"
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {kind} (pass e.g. float(value))")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing!r}")
    return float(label_smoothing)


def check_positive_int(name: str, value) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)
