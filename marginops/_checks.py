"""The one check of a head call's tensors. ``check_inputs`` returns what is wrong as the ValueError's
message (naming the argument and showing what was expected) instead of raising, so that a sharded
head can tell every rank and each raise the same error. The options are checked by HeadOptions
(marginops.options)."""

from __future__ import annotations

from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_pair_error(x_dtype: torch.dtype, weight_dtype: torch.dtype) -> Optional[str]:
    """The one dtype rule of every head, fused or eager, on every device: x and weight of equal
    dtypes, or a float32 weight with float16/bfloat16 x (mixed precision). None when the pair is
    legal, else the ValueError's message, naming both dtypes."""
    if x_dtype == weight_dtype or (weight_dtype == torch.float32 and x_dtype in HALF_DTYPES):
        return None
    return (
        f"x is {dtype_name(x_dtype)} but weight is {dtype_name(weight_dtype)}: "
        "use equal dtypes, or float32 weight with float16/bfloat16 x"
    )


def effective_x_dtype(x: torch.Tensor) -> torch.dtype:
    """x's dtype as the op sees it: under torch.autocast float32 features become the autocast
    dtype (marginops._pipeline.autocast_features), so the rule applies to that."""
    device = x.device.type
    if x.dtype == torch.float32 and device != "meta" and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _nonfinite(x, weight, bias, subcenters: int, class_offset: int) -> Optional[str]:
    """The first row of x, class of weight or entry of bias holding NaN/Inf, or None. Reads the
    answer on the host (a device sync)."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        rows = ~torch.isfinite(t.detach().reshape(t.shape[0], -1)).all(dim=1)
        if not bool(rows.any()):
            continue
        i = int(rows.nonzero()[0, 0])
        if name == "x":
            return f"x[{i}] holds NaN/Inf (first bad row)"
        if name == "bias":
            return f"bias[{class_offset + i}] holds NaN/Inf (first bad entry)"
        detail = [f"class {class_offset + i // subcenters}"] if (subcenters > 1 or class_offset) else []
        if subcenters > 1:
            detail.append(f"sub-center {i % subcenters}")
        return f"weight[{i}]" + (f" ({', '.join(detail)})" if detail else "") + " holds NaN/Inf (first bad class)"
    return None


def _bad_label(labels: torch.Tensor, num_classes: int, ignore_index: int) -> Optional[str]:
    """The first label outside [0, num_classes) that is not ignore_index, or None (syncs on GPU).
    Compared as int64, whatever the integer dtype: a uint8/int8/int16 label compared with a Python
    int num_classes or ignore_index past its range would wrap around."""
    wide = labels.long()
    bad = ((wide < 0) | (wide >= num_classes)) & (wide != ignore_index)
    if not bool(bad.any()):
        return None
    i = int(bad.nonzero()[0, 0])
    return (
        f"labels[{i}] = {int(wide[i])} is out of range: class ids must lie in "
        f"[0, {num_classes}) or equal ignore_index = {ignore_index}"
    )


def check_inputs(
    x, weight, labels, bias=None, *, margin, check_finite=False, head_dim=None, label_range=None, class_offset=0
) -> Optional[str]:
    """What is wrong with a call's tensors, as the ValueError's message, or None. x [B, D]
    (D = head_dim for a head's own weight), weight [C·K, D] (K: margin's sub-centers), labels [B]
    of any integer dtype, bias [C] or None; x and weight float16/bfloat16/float32/float64 by
    dtype_pair_error's rule, bias of any of those; all on x's device. With check_finite, the first
    NaN/Inf row of x, class of weight or entry of bias (a sync). With label_range = (num_classes,
    ignore_index), label values too (a sync: a sharded head's; a local call leaves them to the op,
    whose CUDA kernels check them without one). class_offset: a shard's first class, added to the
    class a message names."""
    K = margin.config().subcenters
    for name, t in (("x", x), ("weight", weight), ("labels", labels), ("bias", bias)):
        if not isinstance(t, torch.Tensor) and not (name == "bias" and t is None):
            return f"{name} must be a tensor, got {type(t).__name__}"
    if x.dim() != 2 or (head_dim is not None and x.shape[1] != head_dim):
        return f"x must have shape [B, {'D' if head_dim is None else head_dim}], got {tuple(x.shape)}"
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        return f"weight must have shape [C, {x.shape[1]}] to match x {tuple(x.shape)}, got {tuple(weight.shape)}"
    if weight.shape[0] == 0:
        return f"weight must have at least one class, got shape {tuple(weight.shape)}"
    if weight.shape[0] % K:
        name = type(margin).__name__
        return f"weight has {weight.shape[0]} rows: {name} needs num_classes·{K} (K sub-centers per class)"
    for name, t in (("x", x), ("weight", weight)):
        if t.dtype not in FLOAT_DTYPES:
            return f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
    pair = dtype_pair_error(effective_x_dtype(x), weight.dtype)
    if pair is not None:
        return pair
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        return f"labels must hold integer class ids, got dtype {labels.dtype}"
    if labels.shape != (x.shape[0],):
        return f"labels must have shape [{x.shape[0]}] to match x {tuple(x.shape)}, got {tuple(labels.shape)}"
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != x.device:
            return f"{name} is on {t.device.type} but x is on {x.device.type}"
    if bias is not None:
        C = weight.shape[0] // K
        if bias.shape != (C,):
            return f"bias must have shape [{C}] (one per class) to match weight, got {tuple(bias.shape)}"
        if bias.dtype not in FLOAT_DTYPES:
            return f"bias must be a floating tensor, got {bias.dtype}"
    if check_finite and x.device.type != "meta":
        found = _nonfinite(x, weight, bias, K, class_offset)
        if found is not None:
            return found
    if label_range is not None and x.device.type != "meta":
        return _bad_label(labels, *label_range)
    return None


def check_call(options, x, weight, labels, bias=None, *, margin=None, head_dim=None, label_values=True):
    """A call on one process: the one check (label values too, on the host, unless the op checks
    them), then the backend against x's device. Raises its ValueError; returns the labels as int64."""
    margin = options.margin if margin is None else margin
    K = margin.config().subcenters
    C = weight.shape[0] // K if isinstance(weight, torch.Tensor) and weight.dim() == 2 else 0
    label_range = (C, options.ignore_index) if label_values else None
    bad = check_inputs(
        x, weight, labels, bias, margin=margin, check_finite=options.check_finite, head_dim=head_dim,
        label_range=label_range,
    )  # fmt: skip
    if bad is not None:
        raise ValueError(bad)
    options.check_device(x.device)
    return labels.long()
