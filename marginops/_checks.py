"""Argument checks shared by the fused functional API, the eager reference and the heads.
Every failure is a ValueError that names the argument and shows what was expected."""

from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch

from .margins import Margin

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
HALF_DTYPES = (torch.float16, torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_pair_error(x_dtype: torch.dtype, weight_dtype: torch.dtype) -> Optional[str]:
    """The one dtype rule of every head, fused or eager, on every device: x and weight of equal
    dtypes, or a float32 weight with float16/bfloat16 x (mixed precision). None when the pair is
    legal, else the ValueError's message, naming both dtypes. (The C++ op checks the same rule:
    csrc/head_inputs.cpp, check_dtype_pair.)"""
    if x_dtype == weight_dtype or (weight_dtype == torch.float32 and x_dtype in HALF_DTYPES):
        return None
    return (
        f"x is {dtype_name(x_dtype)} but weight is {dtype_name(weight_dtype)}: "
        "use equal dtypes, or float32 weight with float16/bfloat16 x"
    )


def effective_x_dtype(x: torch.Tensor) -> torch.dtype:
    """x's dtype as the op sees it: under torch.autocast float32 features become the autocast
    dtype (marginops.functional.autocast_features), so the rule applies to that."""
    device = x.device.type
    if x.dtype == torch.float32 and device != "meta" and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def check_dtype_pair(x: torch.Tensor, weight: torch.Tensor) -> None:
    message = dtype_pair_error(effective_x_dtype(x), weight.dtype)
    if message is not None:
        raise ValueError(message)


def check_finite_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    subcenters: int = 1,
    class_offset: int = 0,
) -> None:
    """check_finite=True: a ValueError naming the first row of x, class of weight or entry of
    bias holding NaN or ±Inf. Costs one pass over the inputs and a device sync (the answer is
    read on the host). ``class_offset`` is added to the class ids named (a shard's first class)."""
    with torch.no_grad():
        bad = first_nonfinite(x, weight, bias, subcenters)
    if bad is not None:
        raise ValueError(nonfinite_message(*bad, subcenters=subcenters, class_offset=class_offset))


def first_nonfinite(x, weight, bias=None, subcenters: int = 1) -> Optional[Tuple[str, int]]:
    """("x", row), ("weight", row of weight) or ("bias", class) of the first non-finite entry, or None."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        rows = ~torch.isfinite(t.detach().reshape(t.shape[0], -1)).all(dim=1)
        if bool(rows.any()):
            return name, int(rows.nonzero()[0, 0])
    return None


def nonfinite_message(name: str, index: int, subcenters: int = 1, class_offset: int = 0) -> str:
    if name == "x":
        return f"x[{index}] holds NaN/Inf (first bad row)"
    if name == "weight":
        cls = class_offset + index // subcenters
        detail = [f"class {cls}"] if (subcenters > 1 or class_offset) else []
        if subcenters > 1:
            detail.append(f"sub-center {index % subcenters}")
        where = f"weight[{index}]" + (f" ({', '.join(detail)})" if detail else "")
        return f"{where} holds NaN/Inf (first bad class)"
    return f"bias[{class_offset + index}] holds NaN/Inf (first bad entry)"


def check_head_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    margin: Margin,
    bias: Optional[torch.Tensor],
    reduction: str,
    label_smoothing: float,
    check_finite: bool = False,
) -> torch.Tensor:
    """Checks shapes, dtypes and devices (and, with check_finite, that x, weight and bias hold no
    NaN/Inf); returns the labels as int64.

    dtypes: x and weight equal, or weight float32 with float16/bfloat16 x (dtype_pair_error).
    bias may be any of float16, bfloat16, float32, float64, whatever x and weight are: it is
    read in the arithmetic dtype (float32; float64 when x and weight are float64) and its
    gradient comes back in its own dtype."""
    if not isinstance(margin, Margin):
        raise ValueError(f"margin must be a marginops margin spec (e.g. mo.ArcFace()), got {margin!r}")
    for name, t in (("x", x), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must have shape [B, D], got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight must have shape [C, {x.shape[1]}] to match x {tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one class, got shape " + str(tuple(weight.shape)))
    K = margin.config().subcenters
    if weight.shape[0] % K:
        raise ValueError(
            f"weight has {weight.shape[0]} rows: {type(margin).__name__} needs num_classes·{K} (K sub-centers per "
            "class)"
        )
    for name, t in (("x", x), ("weight", weight)):
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    check_dtype_pair(x, weight)
    bad_dtype = label_dtype_error(labels)
    if bad_dtype is not None:
        raise ValueError(bad_dtype)
    if labels.shape != (x.shape[0],):
        raise ValueError(
            f"labels must have shape [{x.shape[0]}] to match x {tuple(x.shape)}, got {tuple(labels.shape)}"
        )
    for name, t in (("weight", weight), ("labels", labels)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if bias is not None:
        C = weight.shape[0] // K
        if not isinstance(bias, torch.Tensor) or bias.shape != (C,):
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must have shape [{C}] (one per class) to match weight, got {shape}")
        if bias.dtype not in FLOAT_DTYPES:
            raise ValueError(f"bias must be a floating tensor, got {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_label_smoothing(label_smoothing)
    if check_finite:
        check_finite_inputs(x, weight, bias, K)
    return labels.long()


BACKENDS = {"auto": 0, "chunked": 1, "fused": 2}  # the ops' `backend` codes
CUDA_BACKENDS = ("chunked", "fused")


def check_backend(backend: str, device: Optional[torch.device], workspace_bytes: Optional[int]) -> tuple:
    """backend and workspace_bytes as the ops take them: (code, bytes; 0 = the default 64 MiB).
    device: x's, or None where it is not known yet (a head's constructor)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {tuple(BACKENDS)}, got {backend!r}")
    if backend in CUDA_BACKENDS and device is not None and device.type not in ("cuda", "meta"):
        raise ValueError(f"backend={backend!r} runs on CUDA only, but x is on {device} (use backend='auto')")
    if workspace_bytes is None:
        return BACKENDS[backend], 0
    if isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int) or workspace_bytes <= 0:
        raise ValueError(f"workspace_bytes must be a positive int (bytes) or None (64 MiB), got {workspace_bytes!r}")
    return BACKENDS[backend], int(workspace_bytes)


def check_grad_skip(threshold: float) -> float:
    """grad_skip_threshold: a probability in [0, 1); 0 (the default) computes every gradient."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold < 1.0:
        raise ValueError(f"grad_skip_threshold must lie in [0, 1), got {threshold!r}")
    return float(threshold)


def label_dtype_error(labels: torch.Tensor) -> Optional[str]:
    """None when labels hold integer class ids (any integer dtype: uint8, int8, int16, int32,
    int64; every head compares them as int64), else the ValueError's message."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        return f"labels must hold integer class ids, got dtype {labels.dtype}"
    return None


def check_label_smoothing(label_smoothing) -> float:
    """label_smoothing: a Python number in [0, 1] (a tensor is refused: it would be read on the
    host at every step, and a 0-d tensor compares like a number only by accident)."""
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        kind = f"a {type(label_smoothing).__name__}" + (
            f" {label_smoothing!r}" if isinstance(label_smoothing, torch.Tensor) else ""
        )
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {kind} (pass e.g. float(value))")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing!r}")
    return float(label_smoothing)


def first_bad_label(labels: torch.Tensor, num_classes: int, ignore_index: int) -> Optional[Tuple[int, int]]:
    """(index, value) of the first label outside [0, num_classes) that is not ignore_index, or
    None (syncs on GPU). Compared as int64, whatever the integer dtype: a uint8/int8/int16 label
    compared with a Python int num_classes or ignore_index past its range would wrap around."""
    wide = labels.long()
    bad = ((wide < 0) | (wide >= num_classes)) & (wide != ignore_index)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        return i, int(wide[i])
    return None


def label_range_message(index: int, value: int, num_classes: int, ignore_index: int) -> str:
    return (
        f"labels[{index}] = {value} is out of range: class ids must lie in "
        f"[0, {num_classes}) or equal ignore_index = {ignore_index}"
    )


def check_label_values(labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raises on the first label outside [0, num_classes) that is not ignore_index (syncs on GPU)."""
    bad = first_bad_label(labels, num_classes, ignore_index)
    if bad is not None:
        raise ValueError(label_range_message(*bad, num_classes, ignore_index))
