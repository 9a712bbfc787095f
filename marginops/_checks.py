"""The one check of a head call's tensors. It returns what is wrong as a BadInput (a code and a few
integers) instead of raising, so that a sharded head can all-gather it and every rank raise the
same ValueError; ``input_message`` turns it into the message, which names the argument and shows
what was expected. The options are checked by HeadOptions (marginops.options)."""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)
INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_DTYPES = FLOAT_DTYPES + INT_DTYPES + (torch.bool, torch.complex64, torch.complex128)
_DEVICES = ("cpu", "cuda", "meta", "mps", "xpu", "hpu", "privateuseone")
_ARGS = ("x", "weight", "labels", "bias")
_TYPES = ("NoneType", "int", "float", "list", "tuple", "ndarray", "str", "dict")
NONFINITE_ARGS = ("x", "weight", "bias")
SLOTS = 10  # integers a BadInput carries (two shapes)

# BadInput codes
(
    NOT_TENSOR,
    X_SHAPE,
    WEIGHT_SHAPE,
    WEIGHT_EMPTY,
    WEIGHT_ROWS,
    DTYPE,
    DTYPE_PAIR,
    LABEL_DTYPE,
    LABELS_SHAPE,
    DEVICE,
    META_DEVICE,
    BIAS_SHAPE,
    BIAS_DTYPE,
    NONFINITE,
    LABEL_RANGE,
) = range(1, 16)


class BadInput(NamedTuple):
    code: int
    values: Tuple[int, ...]


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


def label_dtype_error(labels: torch.Tensor) -> Optional[str]:
    """None when labels hold integer class ids (any integer dtype: every head compares them as
    int64), else the ValueError's message."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        return f"labels must hold integer class ids, got dtype {labels.dtype}"
    return None


def first_nonfinite(x, weight, bias=None) -> Optional[Tuple[str, int]]:
    """("x", row), ("weight", row of weight) or ("bias", class) of the first NaN/Inf entry, or
    None. Reads the answer on the host (a device sync)."""
    with torch.no_grad():
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


def _code(table, value) -> int:
    return table.index(value) if value in table else len(table)


def _shape(t: torch.Tensor) -> Tuple[int, ...]:
    dims = tuple(t.shape)[:4]
    return (t.dim(),) + dims + (0,) * (4 - len(dims))


def _shape_text(v) -> str:
    ndim, dims = v[0], tuple(v[1 : 1 + min(v[0], 4)])
    if ndim > 4:
        return "(" + ", ".join(map(str, dims)) + ", ...)"
    return str(dims)


def _bad(code: int, *values: int) -> BadInput:
    return BadInput(code, tuple(int(v) for v in values) + (0,) * (SLOTS - len(values)))


def check_inputs(
    x,
    weight,
    labels,
    bias=None,
    *,
    subcenters: int = 1,
    check_finite: bool = False,
    head_dim: Optional[int] = None,
    label_range: Optional[Tuple[int, int]] = None,
) -> Optional[BadInput]:
    """What is wrong with a call's tensors, or None. x [B, D] (D = head_dim for a head's own
    weight), weight [C·K, D], labels [B] of any integer dtype, bias [C] or None; x and weight
    float16/bfloat16/float32/float64 by dtype_pair_error's rule, bias of any of those; all on x's
    device. With check_finite, the first NaN/Inf row of x, class of weight or entry of bias (a
    sync). With label_range = (num_classes, ignore_index), label values too (a sync: a sharded
    head's; a local call leaves them to the op, whose CUDA kernels check them without one)."""
    for i, t in enumerate((x, weight, labels, bias)):
        if not isinstance(t, torch.Tensor) and not (i == 3 and t is None):
            return _bad(NOT_TENSOR, i, _code(_TYPES, type(t).__name__))
    if x.dim() != 2 or (head_dim is not None and x.shape[1] != head_dim):
        return _bad(X_SHAPE, -1 if head_dim is None else head_dim, *_shape(x))
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        return _bad(WEIGHT_SHAPE, *_shape(x), *_shape(weight))
    if weight.shape[0] == 0:
        return _bad(WEIGHT_EMPTY, *_shape(weight))
    if weight.shape[0] % subcenters:
        return _bad(WEIGHT_ROWS, weight.shape[0], subcenters)
    for i, t in enumerate((x, weight)):
        if t.dtype not in FLOAT_DTYPES:
            return _bad(DTYPE, i, _code(_DTYPES, t.dtype))
    x_dtype = effective_x_dtype(x)
    if dtype_pair_error(x_dtype, weight.dtype) is not None:
        return _bad(DTYPE_PAIR, _code(_DTYPES, x_dtype), _code(_DTYPES, weight.dtype))
    if label_dtype_error(labels) is not None:
        return _bad(LABEL_DTYPE, _code(_DTYPES, labels.dtype))
    if labels.shape != (x.shape[0],):
        return _bad(LABELS_SHAPE, *_shape(x), *_shape(labels))
    for i, t in ((1, weight), (2, labels), (3, bias)):
        if t is not None and t.device != x.device:
            return _bad(DEVICE, i, _code(_DEVICES, t.device.type), _code(_DEVICES, x.device.type))
    if bias is not None:
        C = weight.shape[0] // subcenters
        if bias.shape != (C,):
            return _bad(BIAS_SHAPE, C, *_shape(bias))
        if bias.dtype not in FLOAT_DTYPES:
            return _bad(BIAS_DTYPE, _code(_DTYPES, bias.dtype))
    if check_finite and x.device.type != "meta":
        found = first_nonfinite(x, weight, bias)
        if found is not None:
            return _bad(NONFINITE, NONFINITE_ARGS.index(found[0]), found[1])
    if label_range is not None and x.device.type != "meta":
        found = first_bad_label(labels, *label_range)
        if found is not None:
            return _bad(LABEL_RANGE, *found)
    return None


def input_message(
    bad: BadInput,
    *,
    margin_name: str = "the margin",
    subcenters: int = 1,
    num_classes: int = 0,
    ignore_index: int = -100,
    class_offset: int = 0,
) -> str:
    """The ValueError's message of a BadInput. margin_name and subcenters (K) describe the margin;
    num_classes and ignore_index a label's range; class_offset is added to the class of a weight
    or bias entry (a shard's first class)."""
    code, v = bad
    dtype = lambda i: str(_DTYPES[i]) if i < len(_DTYPES) else "another dtype"  # noqa: E731
    device = lambda i: _DEVICES[i] if i < len(_DEVICES) else "another device type"  # noqa: E731
    if code == NOT_TENSOR:
        got = _TYPES[v[1]] if v[1] < len(_TYPES) else "another type"
        return f"{_ARGS[v[0]]} must be a tensor, got {got}"
    if code == X_SHAPE:
        return f"x must have shape [B, {'D' if v[0] < 0 else v[0]}], got {_shape_text(v[1:])}"
    if code == WEIGHT_SHAPE:
        x_shape, w_shape = _shape_text(v[:5]), _shape_text(v[5:])
        return f"weight must have shape [C, {v[2]}] to match x {x_shape}, got {w_shape}"
    if code == WEIGHT_EMPTY:
        return f"weight must have at least one class, got shape {_shape_text(v)}"
    if code == WEIGHT_ROWS:
        return f"weight has {v[0]} rows: {margin_name} needs num_classes·{v[1]} (K sub-centers per class)"
    if code == DTYPE:
        return f"{_ARGS[v[0]]} must be float16, bfloat16, float32 or float64, got {dtype(v[1])}"
    if code == DTYPE_PAIR:
        return str(dtype_pair_error(_DTYPES[v[0]], _DTYPES[v[1]]))
    if code == LABEL_DTYPE:
        return f"labels must hold integer class ids, got dtype {dtype(v[0])}"
    if code == LABELS_SHAPE:
        return f"labels must have shape [{v[1]}] to match x {_shape_text(v[:5])}, got {_shape_text(v[5:])}"
    if code == DEVICE:
        return f"{_ARGS[v[0]]} is on {device(v[1])} but x is on {device(v[2])}"
    if code == META_DEVICE:
        return "x, labels and the head are on the meta device: ShardedMarginHead needs data to exchange"
    if code == BIAS_SHAPE:
        return f"bias must have shape [{v[0]}] (one per class) to match weight, got {_shape_text(v[1:])}"
    if code == BIAS_DTYPE:
        return f"bias must be a floating tensor, got {dtype(v[0])}"
    if code == NONFINITE:
        name = NONFINITE_ARGS[v[0]]
        return nonfinite_message(name, v[1], subcenters, class_offset)
    if code == LABEL_RANGE:
        return label_range_message(v[0], v[1], num_classes, ignore_index)
    return f"bad input (code {code})"


def message_context(margin, ignore_index: int, num_classes: int) -> dict:
    """input_message's description of the call (the same on every rank of a sharded head)."""
    K = margin.config().subcenters
    return {
        "margin_name": type(margin).__name__,
        "subcenters": K,
        "num_classes": num_classes,
        "ignore_index": ignore_index,
    }


def check_call(options, x, weight, labels, bias=None, *, margin=None, head_dim=None, label_values=True):
    """A call on one process: the one check (label values too, on the host, unless the op checks
    them), then the backend against x's device. Raises its ValueError; returns the labels as int64."""
    margin = options.margin if margin is None else margin
    K = margin.config().subcenters
    C = weight.shape[0] // K if isinstance(weight, torch.Tensor) and weight.dim() == 2 else 0
    label_range = (C, options.ignore_index) if label_values else None
    bad = check_inputs(
        x, weight, labels, bias, subcenters=K, check_finite=options.check_finite, head_dim=head_dim,
        label_range=label_range,
    )  # fmt: skip
    if bad is not None:
        raise ValueError(input_message(bad, **message_context(margin, options.ignore_index, C)))
    options.check_device(x.device)
    return labels.long()
