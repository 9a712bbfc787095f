"""The class dimension sharded across processes (DESIGN.md §3): each rank owns a contiguous range
of classes, the batch is all-gathered, every rank runs the fused op on its shard, one collective
combines the per-row statistics into the global loss, and the features' gradient is
reduce-scattered back. Communication per step is independent of the number of classes.

Gradients: each rank's weight (and bias) shard gets exactly ∂L/∂W of the global loss L, which
is identical on every rank. The features' gradient is exactly ∂L/∂x for the rank's own rows;
with ``scale_grad_by_world_size=True`` it is multiplied by the world size instead, so that DDP's
averaging of backbone gradients over ranks yields ∂L/∂θ (insightface's convention).

Faults: construction compares num_classes, embedding_size, margin, sample_rate, seed and the
other options across ranks and raises the same ValueError on every rank when they differ; each
forward exchanges a small header first, so a rank with bad input (labels out of range, wrong
dimension, dtype or device) makes every rank raise instead of leaving the others waiting, and so
does a call that differs between ranks (x.requires_grad, training mode, scale_grad_by_world_size,
the margin, the dtypes of x and weight). A rank that does not call the head at all cannot be told
from a slow one: the others wait in the first collective for the process group's timeout
(``init_process_group(timeout=...)``) and then raise.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import ops
from ._checks import (
    FLOAT_DTYPES,
    REDUCTIONS,
    check_backend,
    check_grad_skip,
    check_label_smoothing,
    dtype_name,
    dtype_pair_error,
    first_bad_label,
    first_nonfinite,
    label_dtype_error,
    label_range_message,
    nonfinite_message,
)
from .functional import accuracy_from_stats, autocast_features, loss_from_stats
from .margins import Margin, RowContext, target_cosines
from .nn import MarginState, _check_margin, _ClassWeights

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def class_range(num_classes: int, world_size: int, rank: int) -> Tuple[int, int]:
    """[start, end) of the classes rank owns: num_classes // world_size each, the first
    num_classes % world_size ranks one more (insightface's split)."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _group_info(group) -> Tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def _gather_stack(t: torch.Tensor, group) -> torch.Tensor:
    """[world, *t.shape]: every rank's t (same shape on every rank)."""
    world = dist.get_world_size(group)
    flat = t.contiguous().reshape((-1,) + tuple(t.shape[1:])) if t.dim() else t.reshape(1)
    out = flat.new_empty((world * flat.shape[0],) + tuple(flat.shape[1:]))
    _all_gather(out, flat, group=group)
    return out.view((world,) + tuple(t.shape))


class _GatherRows(torch.autograd.Function):
    """All-gathers rows of different counts per rank; backward reduce-scatters the gradient
    (sums every rank's contribution to this rank's rows)."""

    @staticmethod
    def forward(ctx, x, counts: List[int], group, grad_scale: float):
        world, rank = _group_info(group)
        most = max(counts)
        padded = x.new_zeros((most,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        out = x.new_empty((world * most,) + tuple(x.shape[1:]))
        _all_gather(out, padded.contiguous(), group=group)
        ctx.counts, ctx.group, ctx.grad_scale, ctx.rank, ctx.most = counts, group, grad_scale, rank, most
        return torch.cat([out[r * most : r * most + n] for r, n in enumerate(counts)])

    @staticmethod
    def backward(ctx, grad):
        counts, most = ctx.counts, ctx.most
        padded = grad.new_zeros((len(counts) * most,) + tuple(grad.shape[1:]))
        offset = 0
        for r, n in enumerate(counts):
            padded[r * most : r * most + n] = grad[offset : offset + n]
            offset += n
        mine = grad.new_empty((most,) + tuple(grad.shape[1:]))
        _reduce_scatter(mine, padded, group=ctx.group)
        return mine[: counts[ctx.rank]] * ctx.grad_scale, None, None, None


class _GatherStats(torch.autograd.Function):
    """All-gathers per-row statistics [B, k] into [world, B, k]. When the loss built from them is
    the same on every rank (reductions "mean" and "sum"), each rank's own slice of the gradient
    is already complete and backward needs no communication (as in Megatron's vocab-parallel
    cross-entropy); otherwise ("none": each rank backpropagates its own rows) the slices are
    summed over ranks."""

    @staticmethod
    def forward(ctx, stats, group, replicated: bool):
        ctx.rank, ctx.group, ctx.replicated = dist.get_rank(group), group, replicated
        return _gather_stack(stats, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.replicated:
            return grad[ctx.rank], None, None
        mine = grad.new_empty(grad.shape[1:])
        _reduce_scatter(mine, grad.contiguous().reshape((-1,) + tuple(grad.shape[2:])), group=ctx.group)
        return mine, None, None


# Header codes: what a rank found wrong with its own input, so that every rank can raise it.
_OK, _BAD_LABEL, _BAD_DIM, _BAD_DTYPE, _BAD_SHAPE, _BAD_X_NDIM, _BAD_LABELS_NDIM, _BAD_PAIR, _NONFINITE, _BAD_DEVICE = (
    range(10)
)
_NONFINITE_WHAT = ("x", "weight", "bias")
_DEVICE_TYPES = ("cpu", "cuda", "meta", "mps", "xpu", "hpu", "privateuseone")
# Flags of the header: how the rank calls the head. Every rank must call it alike, or the backward's
# collectives (or a stateful margin's) would wait for a rank that never joins them.
_CALL_FLAGS = (
    (
        "x.requires_grad",
        "require grad on x alike on every rank (and call under the same torch.no_grad / enable_grad mode): "
        "the backward reduce-scatters dx, and a rank without that backward would leave the others waiting in it",
    ),
    ("weight.requires_grad", "freeze or unfreeze the head alike on every rank (and call under the same grad mode)"),
    (
        "training",
        "call head.train() / head.eval() alike on every rank (Partial FC sampling and stateful margins follow it)",
    ),
    (
        "scale_grad_by_world_size",
        "scale the features' gradient alike on every rank (scale_grad_by_world_size / grad_scale)",
    ),
)


def _device_code(device: torch.device) -> int:
    return _DEVICE_TYPES.index(device.type) if device.type in _DEVICE_TYPES else len(_DEVICE_TYPES)


def _device_name(code: int) -> str:
    return _DEVICE_TYPES[code] if code < len(_DEVICE_TYPES) else "another device type"


def _value_key(value) -> str:
    if isinstance(value, torch.Tensor):  # a per-row margin: its values differ per batch, not per rank
        return f"tensor{tuple(value.shape)}:{dtype_name(value.dtype)}"
    if isinstance(value, Margin):
        return _margin_key(value)
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_value_key(v) for v in value) + ")"
    return repr(value)


def _margin_key(margin) -> str:
    """The margin spec as a string, alike on every rank that holds the same spec (tensor fields by
    shape and dtype, not device or values)."""
    if dataclasses.is_dataclass(margin):
        fields = ", ".join(f"{f.name}={_value_key(getattr(margin, f.name))}" for f in dataclasses.fields(margin))
        return f"{type(margin).__name__}({fields})"
    return repr(margin)


def _margin_hash(margin) -> int:
    return int.from_bytes(hashlib.sha256(_margin_key(margin).encode()).digest()[:7], "little")  # < 2^56: fits int64


class ShardedMarginHead(_ClassWeights):
    """A margin head whose classes are sharded across the ranks of a process group.

    Rank r owns classes ``class_range(num_classes, world_size, r)`` (``weight`` is that shard,
    ``[local_classes·K, embedding_size]``). ``forward(x, labels)`` takes the rank's own batch
    (batch sizes may differ between ranks) and returns the loss of the global batch, the same on
    every rank (with ``reduction="none"``, the per-row losses of the rank's own rows). Works for
    every margin, ignore_index and label smoothing; stateful margins keep their state in sync
    from global-batch statistics.

    Partial FC: with ``sample_rate < 1`` each rank computes, in training, only the classes of its
    shard that are labels of the global batch plus uniformly sampled others, up to
    ``int(sample_rate · local_classes)`` (all positives are always kept), passed to the kernel as
    an index list. The sample is a function of (seed, rank, step): reproducible. Unsampled rows of
    ``weight.grad`` are zero; label smoothing spreads over the sampled classes.

    dtypes follow :func:`marginops.margin_cross_entropy`'s rule (x like weight, or
    float16/bfloat16 x with a float32 weight); ``check_finite=True`` makes every rank raise a
    ValueError naming the rank and the first NaN/Inf row of its x (or global class of its weight
    shard, entry of its bias shard), at the cost of a device sync per step.

    Every rank must call the head alike. Bad input on one rank (labels out of range, a wrong
    shape, dtype or device) and a call that differs between ranks (x.requires_grad, the grad
    mode, weight.requires_grad, training/eval mode, scale_grad_by_world_size, the margin, the
    dtypes of x and weight) raise the same ValueError on every rank, naming the rank and the
    field, before any collective that could wait. A rank that does not call the head at all (an
    early ``continue``, an exception caught on that rank only, a shorter data loader) cannot be
    detected: the other ranks wait in the first collective until the process group's timeout
    and then raise a RuntimeError. That timeout is ``init_process_group(timeout=...)``; its
    default is 10 minutes for NCCL and 30 minutes for gloo, so shorten it (e.g.
    ``timeout=datetime.timedelta(minutes=2)``) to learn of such a rank sooner.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margin: Optional[Margin] = None,
        process_group=None,
        sample_rate: float = 1.0,
        bias: bool = False,
        reduction: str = "mean",
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        return_accuracy: bool = False,
        scale_grad_by_world_size: bool = False,
        seed: int = 0,
        grad_skip_threshold: float = 0.0,
        backend: str = "auto",
        workspace_bytes: Optional[int] = None,
        check_finite: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "ShardedMarginHead needs torch.distributed initialized (init_process_group); use MarginHead on one "
                "process"
            )
        self.margin = _check_margin(margin)
        if not isinstance(sample_rate, (int, float)) or isinstance(sample_rate, bool) or not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.group = process_group
        self.world_size, self.rank = _group_info(process_group)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < self.world_size:
            raise ValueError(f"num_classes must be an int >= world size {self.world_size}, got {num_classes!r}")
        self.total_classes = num_classes
        self.class_start, self.class_end = class_range(num_classes, self.world_size, self.rank)
        self.sample_rate = float(sample_rate)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.return_accuracy = return_accuracy
        self.grad_scale = float(self.world_size) if scale_grad_by_world_size else 1.0
        self.seed = int(seed)
        self.grad_skip_threshold = check_grad_skip(grad_skip_threshold)
        check_backend(backend, None, workspace_bytes)  # the device is checked per call
        self.backend, self.workspace_bytes = backend, workspace_bytes
        self.check_finite = bool(check_finite)
        K = self.margin.config().subcenters
        self._init_weights(
            embedding_size, self.class_end - self.class_start, K, bias, {"device": device, "dtype": dtype}
        )
        self.num_classes = num_classes  # the head's classes, all ranks together
        self.local_classes = self.class_end - self.class_start
        self.margin_state = MarginState(self.margin.state_init())
        self.register_buffer("sample_step", torch.zeros((), dtype=torch.long, device=device))
        self.last_sample: Optional[torch.Tensor] = None
        self._check_consistent()

    def _signature(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "embedding_size": self.embedding_size,
            "margin": repr(self.margin),
            "sample_rate": self.sample_rate,
            "seed": self.seed,
            "bias": self.bias is not None,
            "ignore_index": self.ignore_index,
            "label_smoothing": self.label_smoothing,
            "reduction": self.reduction,
            "grad_skip_threshold": self.grad_skip_threshold,
            "backend": self.backend,
            "scale_grad_by_world_size": self.grad_scale != 1.0,
        }

    def _check_consistent(self) -> None:
        mine = self._signature()
        every = [None] * self.world_size
        dist.all_gather_object(every, mine, group=self.group)
        diffs = [f"rank {r}: {k}={v[k]!r}" for r, v in enumerate(every) for k in mine if v[k] != every[0][k]]
        if diffs:
            raise ValueError(
                f"ShardedMarginHead arguments differ between ranks (rank 0: {every[0]}); " + "; ".join(diffs)
            )

    # -- the forward's collectives -------------------------------------------------------------

    def _call_flags(self, x: torch.Tensor) -> int:
        """Bits of _CALL_FLAGS: how this rank calls the head."""
        grad = torch.is_grad_enabled()
        weight_grad = self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)
        bits = (grad and x.requires_grad, grad and weight_grad, self.training, self.grad_scale != 1.0)
        return sum(1 << i for i, b in enumerate(bits) if b)

    def _exchange_header(
        self, x: torch.Tensor, labels: torch.Tensor, check_finite: bool = False, forward: bool = True
    ) -> List[int]:
        """Every rank learns every batch size and every rank's input errors; raises on all ranks
        if any rank's input is bad (dtypes: x like weight, or float16/bfloat16 x with a float32
        weight; labels of any integer dtype on x's device; with check_finite, the first NaN/Inf
        row of x, class of the weight shard or entry of the bias shard), or if the ranks call the
        head differently (x.requires_grad, weight.requires_grad, training mode,
        scale_grad_by_world_size — these for a forward only — the margin, the dtypes of x and
        weight): the same ValueError on every rank, naming the rank and the field."""
        code, where, value = _OK, 0, 0
        if x.dim() != 2:
            code, value = _BAD_X_NDIM, x.dim()
        elif labels.dim() != 1:
            code, where, value = _BAD_LABELS_NDIM, labels.dim(), labels.shape[-1] if labels.dim() else -1
        elif labels.shape[0] != x.shape[0]:
            code, where, value = _BAD_SHAPE, x.shape[0], labels.shape[0]
        elif x.shape[1] != self.embedding_size:
            code, value = _BAD_DIM, x.shape[1]
        elif x.dtype not in FLOAT_DTYPES or label_dtype_error(labels) is not None:
            code = _BAD_DTYPE
        elif labels.device != x.device or x.device != self.weight.device:
            pair = (labels, x) if labels.device != x.device else (x, self.weight)
            code, where, value = (
                _BAD_DEVICE,
                int(pair[0] is x),
                _device_code(pair[0].device) * 100 + _device_code(pair[1].device),
            )
        elif x.device.type == "meta":
            code, where, value = _BAD_DEVICE, 2, _device_code(x.device)
        elif dtype_pair_error(x.dtype, self.weight.dtype) is not None:
            code, value = _BAD_PAIR, FLOAT_DTYPES.index(self.weight.dtype) if self.weight.dtype in FLOAT_DTYPES else -1
        elif check_finite and (bad_entry := first_nonfinite(x, self.weight, self.bias, self.subcenters)) is not None:
            code, value, where = _NONFINITE, _NONFINITE_WHAT.index(bad_entry[0]), bad_entry[1]
        elif (bad_label := first_bad_label(labels, self.num_classes, self.ignore_index)) is not None:
            code, (where, value) = _BAD_LABEL, bad_label
        rows = x.shape[0] if x.dim() else 0
        dtype_code = lambda t: FLOAT_DTYPES.index(t.dtype) if t.dtype in FLOAT_DTYPES else -1  # noqa: E731
        flags = self._call_flags(x) if forward else 0
        header = torch.tensor(
            [rows, code, where, value, dtype_code(x), dtype_code(self.weight), flags, _margin_hash(self.margin)],
            device="cpu" if self.weight.device.type == "meta" else self.weight.device,
        )
        every = _gather_stack(header, self.group).tolist()
        for r, (_, c, w, v, *_) in enumerate(every):
            if c == _BAD_LABEL:
                raise ValueError(f"rank {r}: " + label_range_message(w, v, self.num_classes, self.ignore_index))
            if c == _BAD_DIM:
                raise ValueError(f"rank {r}: x must have shape [B, {self.embedding_size}], got D = {v}")
            if c == _BAD_DTYPE:
                raise ValueError(
                    f"rank {r}: x must be float16/bfloat16/float32/float64 and labels integer (any integer dtype)"
                )
            if c == _BAD_DEVICE:
                if w == 2:
                    raise ValueError(
                        f"rank {r}: x, labels and the head are on the meta device: ShardedMarginHead needs data to "
                        "exchange"
                    )
                what = ("labels", "x") if w == 0 else ("x", "the head's weight")
                raise ValueError(
                    f"rank {r}: {what[0]} is on {_device_name(v // 100)} but {what[1]} is on {_device_name(v % 100)} "
                    "(x, labels and the head must be on one device)"
                )
            if c == _BAD_PAIR:
                raise ValueError(f"rank {r}: " + str(dtype_pair_error(FLOAT_DTYPES[every[r][4]], FLOAT_DTYPES[v])))
            if c == _NONFINITE:
                what = _NONFINITE_WHAT[v]
                offset = class_range(self.num_classes, self.world_size, r)[0] if what != "x" else 0
                raise ValueError(f"rank {r}: " + nonfinite_message(what, w, self.subcenters, offset))
            if c == _BAD_SHAPE:
                raise ValueError(f"rank {r}: x has {w} rows but labels has {v} entries (one label per row of x)")
            if c == _BAD_X_NDIM:
                raise ValueError(f"rank {r}: x must have shape [B, {self.embedding_size}], got a {v}-D tensor")
            if c == _BAD_LABELS_NDIM:
                shape = "a 0-D tensor" if w == 0 else f"a {w}-D tensor whose last dimension is {v}"
                raise ValueError(f"rank {r}: labels must have shape [B] or [B, 1], got {shape}")
        self._check_same_call(every)
        return [row[0] for row in every]

    def _check_same_call(self, every: List[List[int]]) -> None:
        """Raises the same ValueError on every rank when the ranks' headers (all alike on every
        rank) show that they call the head differently."""
        first = every[0]
        odd = lambda i: next((r for r, row in enumerate(every) if row[i] != first[i]), None)  # noqa: E731
        prefix = "ShardedMarginHead is called differently across ranks: "
        for i, name, advice in (
            (4, "x", "cast every rank's features alike"),
            (5, "weight", "convert every rank's head alike"),
        ):
            r = odd(i)
            if r is not None:
                raise ValueError(
                    f"{prefix}{name} has different dtypes across ranks: rank {r} has {name}.dtype="
                    f"{dtype_name(FLOAT_DTYPES[every[r][i]])} but rank 0 has "
                    f"{name}.dtype={dtype_name(FLOAT_DTYPES[first[i]])}; {advice}"
                )
        r = odd(6)
        if r is not None:
            for bit, (name, advice) in enumerate(_CALL_FLAGS):
                mine, theirs = bool(every[r][6] >> bit & 1), bool(first[6] >> bit & 1)
                if mine != theirs:
                    raise ValueError(f"{prefix}rank {r} has {name}={mine} but rank 0 has {name}={theirs}; {advice}")
        r = odd(7)
        if r is not None:  # every rank sees the difference: one more collective names the margins
            keys = [None] * self.world_size
            dist.all_gather_object(keys, _margin_key(self.margin), group=self.group)
            raise ValueError(
                f"{prefix}rank {r} has margin={keys[r]} but rank 0 has margin={keys[0]}; "
                "give every rank the same margin spec (and change it on every rank alike)"
            )

    def _sample(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """Partial FC: sorted local class indices (positives of the global batch + random others)."""
        if self.sample_rate >= 1.0 or not self.training:
            return None
        budget = int(self.sample_rate * self.local_classes)
        local = labels - self.class_start
        mine = (local >= 0) & (local < self.local_classes) & (labels != self.ignore_index)
        positives = torch.unique(local[mine])
        step = int(self.sample_step)
        self.sample_step += 1
        if positives.numel() >= budget:
            return positives
        gen = torch.Generator(device=self.weight.device)
        gen.manual_seed((self.seed * 1_000_003 + self.rank) * 1_000_003 + step)
        score = torch.rand(self.local_classes, generator=gen, device=self.weight.device)
        score[positives] = 2.0  # positives first
        return torch.topk(score, budget).indices.sort().values

    def _target_cosines(self, x: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """cos θ_iy for the global batch: each rank fills the rows whose class it owns."""
        local = labels - self.class_start
        mine = valid & (local >= 0) & (local < self.local_classes)
        cos = target_cosines(x, self.weight, local.clamp(0, self.local_classes - 1), mine, self.subcenters)
        dist.all_reduce(cos, group=self.group)
        return cos

    def forward(self, x: torch.Tensor, labels: torch.Tensor):
        x = autocast_features(x)  # before the all-gather: half the bytes under bf16/fp16 autocast
        if labels.dim() == 2 and labels.shape[1] == 1:  # insightface's [B, 1] labels
            labels = labels.squeeze(1)
        counts = self._exchange_header(x, labels, self.check_finite)
        labels = labels.long()
        xg = _GatherRows.apply(x, counts, self.group, self.grad_scale)
        yg = self._gather_labels(labels, counts)
        valid = yg != self.ignore_index
        ctx = RowContext(xg, yg, valid, self.training, lambda: self._target_cosines(xg, yg, valid))
        terms = self.margin.prepare(ctx, self.margin_state.as_dict())
        sample = self._sample(yg)
        self.last_sample = sample
        cfg = self.margin.config()
        backend, workspace = check_backend(self.backend, xg.device, self.workspace_bytes)
        stats = ops.head_stats(
            xg,
            self.weight,
            yg,
            self.bias,
            terms.row_margins,
            terms.curricular,
            sample,
            self.num_classes,
            self.class_start,
            self.ignore_index,
            cfg,
            self.grad_skip_threshold,
            backend,
            workspace,
        )
        computed = float(self.local_classes if sample is None else sample.numel())
        packed = torch.stack(
            [s.to(torch.float64) for s in (stats.lse, stats.target_logit, stats.logit_sum)]
            + [
                stats.best_logit.detach().double(),
                stats.best_class.double(),
                torch.full_like(stats.lse, computed, dtype=torch.float64),
            ],
            dim=1,
        )
        replicated = self.reduction != "none"
        every = _GatherStats.apply(packed, self.group, replicated)  # [world, B, 6]
        best, owner = every[:, :, 3].max(dim=0)
        merged = ops.HeadStats(
            lse=torch.logsumexp(every[:, :, 0], dim=0),
            target_logit=every[:, :, 1].sum(0),
            logit_sum=every[:, :, 2].sum(0),
            best_logit=best,
            best_class=every[:, :, 4].gather(0, owner[None]).squeeze(0).long(),
        )
        num_computed = every[:, 0, 5].sum() if every.shape[1] else torch.tensor(float(self.num_classes))
        extra = terms.extra_loss
        if extra is not None and replicated:  # computed alike on every rank: count its gradient once
            extra = extra / self.world_size + (extra - extra / self.world_size).detach()
        loss_all = loss_from_stats(merged, yg, num_computed, self.ignore_index, self.label_smoothing, "none", extra)
        # MarginHead's dtype: float64 only when x and weight both are, else float32.
        loss = self._reduce(loss_all, valid, counts).to(ops.acc_dtype(xg, self.weight))
        if self.return_accuracy:
            return loss, accuracy_from_stats(merged, yg, self.ignore_index)
        return loss

    def _gather_labels(self, labels: torch.Tensor, counts: List[int]) -> torch.Tensor:
        most = max(counts)
        padded = labels.new_full((most,), self.ignore_index)
        padded[: labels.shape[0]] = labels
        out = labels.new_empty(self.world_size * most)
        _all_gather(out, padded, group=self.group)
        return torch.cat([out[r * most : r * most + n] for r, n in enumerate(counts)])

    def _reduce(self, loss_all: torch.Tensor, valid: torch.Tensor, counts: List[int]) -> torch.Tensor:
        if self.reduction == "sum":
            return loss_all.sum()
        if self.reduction == "mean":
            return loss_all.sum() / valid.sum()
        start = sum(counts[: self.rank])  # "none": this rank's rows of the global per-row loss
        return loss_all[start : start + counts[self.rank]]

    @torch.no_grad()
    def topk(self, x: torch.Tensor, k: int = 5, kind: str = "cosine") -> Tuple[torch.Tensor, torch.Tensor]:
        """The k best classes of each of this rank's rows, over all shards: (values [B, k],
        classes [B, k]), without a [B, num_classes] tensor. ``kind`` as in
        :meth:`marginops.MarginHead.topk`: ``"cosine"`` (default) gives cos θ in [-1, 1],
        ``"logit"`` the margin-free logits s·cos θ (+ bias)."""
        from .functional import TOPK_KINDS, cosine_margin

        if kind not in TOPK_KINDS:
            raise ValueError(f"kind must be one of {TOPK_KINDS}, got {kind!r}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_classes:  # as MarginHead.topk
            raise ValueError(f"k = {k} must lie in [1, {self.num_classes}] (the number of classes)")
        self._check_x(x)
        counts = self._exchange_header(
            x, torch.full((x.shape[0],), self.ignore_index, dtype=torch.long, device=x.device), forward=False
        )
        xg = _GatherRows.apply(x, counts, self.group, 1.0)
        cfg = self.margin.config()
        bias = self.bias
        if kind == "cosine":
            cfg, bias = cosine_margin(cfg.subcenters).config(), None
        kk = min(k, self.local_classes)
        vals, cls = torch.ops.marginops.margin_topk(
            xg, self.weight, bias, None, kk, self.class_start, cfg.normalize_x, cfg.normalize_w, cfg.s, cfg.subcenters
        )
        if kk < k:  # pad so that every rank contributes k candidates
            vals = F.pad(vals, (0, k - kk), value=-math.inf)
            cls = F.pad(cls, (0, k - kk), value=-1)
        every = _gather_stack(torch.stack([vals.double(), cls.double()], dim=2), self.group)
        allv = every[..., 0].permute(1, 0, 2).reshape(xg.shape[0], -1)
        allc = every[..., 1].permute(1, 0, 2).reshape(xg.shape[0], -1)
        top, pos = allv.topk(k, dim=1)
        start = sum(counts[: self.rank])
        rows = slice(start, start + counts[self.rank])
        return top[rows].to(vals.dtype), allc.gather(1, pos)[rows].long()

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"rank={self.rank}/{self.world_size}, "
            f"classes=[{self.class_start}, {self.class_end}), margin={self.margin!r}, sample_rate={self.sample_rate}"
        )


# -- checkpoints ------------------------------------------------------------------------------

_SHARD = "shard-{rank:05d}-of-{world:05d}.pt"


def _head_meta(head) -> dict:
    return {
        "num_classes": head.num_classes,
        "embedding_size": head.embedding_size,
        "subcenters": head.subcenters,
        "bias": head.bias is not None,
        "margin": repr(head.margin),
    }


def _file_digest(path: str) -> Tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a file, read in 1 MiB blocks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def _write_atomically(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def save_sharded(head: Union["ShardedMarginHead", _ClassWeights], directory: str) -> None:
    """Writes this rank's shard (weight, bias, margin state, class range) to
    ``directory/shard-RRRRR-of-WWWWW.pt`` and, from rank 0, ``meta.json``. Call on every rank;
    a MarginHead saves as one shard. Load at any world size with :func:`load_sharded`.

    ``meta.json`` holds num_classes, embedding_size, subcenters, bias, margin (the spec's repr),
    world_size and ``shards``: per shard file, in rank order, ``{"file", "bytes", "sha256"}`` (its
    size and the SHA-256 of its bytes), which :func:`load_sharded` and :func:`consolidate` verify."""
    sharded = isinstance(head, ShardedMarginHead)
    rank, world = (head.rank, head.world_size) if sharded else (0, 1)
    start, end = (head.class_start, head.class_end) if sharded else (0, head.num_classes)
    os.makedirs(directory, exist_ok=True)
    shard = {
        "class_start": start,
        "class_end": end,
        "weight": head.weight.detach().cpu(),
        "bias": None if head.bias is None else head.bias.detach().cpu(),
        "margin_state": {k: v.detach().cpu() for k, v in head.margin_state.state_dict().items()},
        "meta": _head_meta(head),
    }
    name = _SHARD.format(rank=rank, world=world)
    path = os.path.join(directory, name)
    _write_atomically(path, lambda tmp: torch.save(shard, tmp))
    digest, size = _file_digest(path)  # of the bytes on disk
    entries = [{"file": name, "bytes": size, "sha256": digest}]
    if sharded:
        entries = [None] * world
        dist.all_gather_object(entries, {"file": name, "bytes": size, "sha256": digest}, group=head.group)
    if rank == 0:
        meta = {**_head_meta(head), "world_size": world, "shards": entries}

        def write(tmp):
            with open(tmp, "w") as f:
                json.dump(meta, f, indent=2)

        _write_atomically(os.path.join(directory, "meta.json"), write)
    if sharded:
        dist.barrier(group=head.group)


_META_FIELDS = {
    "num_classes": int,
    "embedding_size": int,
    "subcenters": int,
    "bias": bool,
    "margin": str,
    "world_size": int,
}


def _read_meta(directory: str) -> dict:
    meta_path = os.path.join(directory, "meta.json")
    if not os.path.exists(meta_path):
        raise ValueError(f"{directory} holds no marginops checkpoint (no meta.json)")
    damaged = f"{meta_path} is damaged"
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{damaged}: not valid JSON ({e}); the checkpoint cannot be read") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{damaged}: expected a JSON object, got {type(meta).__name__}")
    for key, kind in _META_FIELDS.items():
        value = meta.get(key)
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 1)):
            wanted = "a positive int" if kind is int else kind.__name__
            raise ValueError(f"{damaged}: {key} must be {wanted}, got {value!r}")
    world = meta["world_size"]
    entries = meta.get("shards")
    if entries is not None:
        names = [_SHARD.format(rank=r, world=world) for r in range(world)]
        ok = (
            isinstance(entries, list)
            and len(entries) == world
            and all(
                isinstance(e, dict)
                and e.get("file") == n
                and isinstance(e.get("sha256"), str)
                and isinstance(e.get("bytes"), int)
                and not isinstance(e.get("bytes"), bool)
                for e, n in zip(entries, names)
            )
        )
        if not ok:
            raise ValueError(f"{damaged}: shards must list {{file, bytes, sha256}} of {names}, got {entries!r}")
    return meta


def _verify_file(path: str, entry: Optional[dict]) -> None:
    """The shard file's size and SHA-256 against meta.json's record of them."""
    if entry is None:
        return
    digest, size = _file_digest(path)
    if size != entry["bytes"]:
        raise ValueError(
            f"{path} is damaged: {size} bytes, but meta.json records {entry['bytes']} (truncated, or overwritten "
            "after the "
            "checkpoint was written)"
        )
    if digest != entry["sha256"]:
        raise ValueError(
            f"{path} is damaged: its sha256 {digest[:16]}... differs from {entry['sha256'][:16]}... recorded in "
            "meta.json "
            "(its bytes changed after the checkpoint was written, or it comes from another checkpoint)"
        )


def _check_shard(path: str, shard, meta: dict, rank: int, first: int) -> int:
    """A loaded shard holds what meta.json says it should: a class range that continues the
    previous shard's (from ``first``; the last one ends at num_classes), weight [(end − start)·K, D],
    bias [end − start] (or None), margin state tensors. Returns its end."""
    bad = lambda what: ValueError(f"{path} does not match meta.json: {what}")  # noqa: E731
    keys = ("class_start", "class_end", "weight", "bias", "margin_state")
    if not isinstance(shard, dict) or any(k not in shard for k in keys):
        raise bad(
            f"a shard holds {list(keys)}, got {sorted(shard) if isinstance(shard, dict) else type(shard).__name__}"
        )
    C, world, K, D = meta["num_classes"], meta["world_size"], meta["subcenters"], meta["embedding_size"]
    start, end = shard["class_start"], shard["class_end"]
    last = rank == world - 1
    if (
        not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end))
        or start != first
        or not (end == C if last else first < end < C)
    ):
        want = f"[{first}, {C})" if last else f"[{first}, e) with {first} < e < {C}"
        raise bad(f"classes [{start}, {end}), expected {want} (shard {rank} of {world}, {C} classes)")
    weight, bias = shard["weight"], shard["bias"]
    want = ((end - start) * K, D)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != want or weight.dtype not in FLOAT_DTYPES:
        got = (
            f"{tuple(weight.shape)} {dtype_name(weight.dtype)}"
            if isinstance(weight, torch.Tensor)
            else type(weight).__name__
        )
        raise bad(
            f"weight is {got}, expected a floating tensor of shape {want} (classes [{start}, {end}) x {K} "
            f"sub-centers, D = {D})"
        )
    if meta["bias"] != (bias is not None):
        raise bad(f"bias is {'absent' if bias is None else 'present'}, but meta.json says bias={meta['bias']}")
    if bias is not None and (
        not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (end - start,) or bias.dtype not in FLOAT_DTYPES
    ):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise bad(f"bias has shape {got}, expected ({end - start},)")
    state = shard["margin_state"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise bad("margin_state must map names to tensors")
    return end


def _read_shards(directory: str) -> Tuple[dict, List[dict]]:
    """meta.json and every shard, verified (checksums, then contents against meta.json) before
    anything is returned: a damaged checkpoint is a ValueError naming the file."""
    meta = _read_meta(directory)
    world = meta["world_size"]
    entries = meta.get("shards")
    if entries is None:
        warnings.warn(
            f"checkpoint {directory} records no checksums (written before marginops recorded them): its shard files "
            "are "
            "checked for shape only, not for damage; save it again to add them",
            stacklevel=3,
        )
    shards, first = [], 0
    for r in range(world):
        path = os.path.join(directory, _SHARD.format(rank=r, world=world))
        if not os.path.exists(path):
            raise ValueError(f"checkpoint {directory} is missing {os.path.basename(path)} of its {world} shards")
        _verify_file(path, None if entries is None else entries[r])
        try:
            shard = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or damaged zip, unpickling errors: all one story for the user
            raise ValueError(f"{path} is damaged: torch.load cannot read it ({type(e).__name__}: {e})") from None
        first = _check_shard(path, shard, meta, r, first)
        shards.append(shard)
    return meta, shards


_OVERRIDABLE = ("num_classes", "margin")


def _check_meta(meta: dict, head, strict: bool) -> List[str]:
    """Raises when the checkpoint cannot load into head; returns the differences strict=False lets through."""
    mine = _head_meta(head)
    keys = ("num_classes", "embedding_size", "subcenters", "bias", "margin")
    diffs = {k: f"{k}: checkpoint {meta[k]!r}, head {mine[k]!r}" for k in keys if meta[k] != mine[k]}
    fatal = [d for k, d in diffs.items() if k not in _OVERRIDABLE]
    if fatal or (diffs and strict):
        hint = (
            ""
            if fatal
            else " (load_sharded(..., strict=False) loads it anyway: the classes both have, whatever the margin)"
        )
        raise ValueError("checkpoint does not fit this head: " + "; ".join(diffs.values()) + hint)
    return list(diffs.values())


def _gather_range(shards: List[dict], key: str, start: int, end: int, per_class: int) -> Optional[torch.Tensor]:
    """Rows of classes [start, end) from the shards that hold them."""
    parts = []
    for s in shards:
        lo, hi = max(start, s["class_start"]), min(end, s["class_end"])
        if lo < hi and s[key] is not None:
            off = s["class_start"]
            parts.append(s[key][(lo - off) * per_class : (hi - off) * per_class])
    return torch.cat(parts) if parts else None


@torch.no_grad()
def load_sharded(head: Union["ShardedMarginHead", _ClassWeights], directory: str, *, strict: bool = True) -> None:
    """Loads a checkpoint written by :func:`save_sharded` at any world size into this rank's
    shard (or a whole MarginHead).

    Everything is verified before any tensor of the head changes, so a failed load leaves the
    head as it was: meta.json must parse, every shard file must have the size and SHA-256 that
    meta.json records (a checkpoint written before checksums were recorded loads with a warning,
    its shards checked for shape only) and hold the class range and shapes meta.json describes;
    otherwise a ValueError names the file. A checkpoint of another embedding_size, sub-center
    count or bias is always an error, never a silent re-initialisation.

    ``strict`` (default True): the checkpoint's num_classes and margin (the spec's repr, i.e.
    its configuration) must equal the head's, else a ValueError lists the differences.
    ``strict=False`` loads it anyway, with a warning naming them: the classes both have
    (the head's others keep their values), and the margin state only where its entries have
    the same names and shapes (e.g. fine-tuning a Softmax-trained head with ArcFace)."""
    meta, shards = _read_shards(directory)
    differences = _check_meta(meta, head, strict)
    sharded = isinstance(head, ShardedMarginHead)
    start, end = (head.class_start, head.class_end) if sharded else (0, head.num_classes)
    stop = min(end, meta["num_classes"])
    K = head.subcenters
    weight = _gather_range(shards, "weight", start, stop, K)
    bias = _gather_range(shards, "bias", start, stop, 1) if head.bias is not None else None
    state, mine = shards[0]["margin_state"], head.margin_state.state_dict()
    state_fits = sorted(state) == sorted(mine) and all(tuple(state[k].shape) == tuple(mine[k].shape) for k in mine)
    if not state_fits and not differences:
        raise ValueError(
            f"{directory}: the margin state {{{', '.join(f'{k}: {tuple(v.shape)}' for k, v in state.items())}}} does "
            "not fit "
            f"the head's {{{', '.join(f'{k}: {tuple(v.shape)}' for k, v in mine.items())}}}"
        )
    if differences:
        kept = [] if state_fits else ["margin state"]
        if stop < end:
            kept.append(f"classes [{max(start, stop)}, {end})")
        warnings.warn(
            f"load_sharded(strict=False) of {directory}: "
            + "; ".join(differences)
            + (f"; the head keeps its own {' and '.join(kept)}" if kept else ""),
            stacklevel=3,
        )
    # nothing above touched the head: now copy
    if weight is not None:
        head.weight[: weight.shape[0]].copy_(weight)
    if bias is not None:
        head.bias[: bias.shape[0]].copy_(bias)
    if state_fits:
        head.margin_state.load_state_dict(state)  # kept alike on every rank


def consolidate(directory: str) -> Dict[str, Optional[torch.Tensor]]:
    """The whole head of a sharded checkpoint: {"weight": [C·K, D], "bias": [C] or None}.
    Verifies the files as :func:`load_sharded` does."""
    meta, shards = _read_shards(directory)
    C = meta["num_classes"]
    return {
        "weight": _gather_range(shards, "weight", 0, C, meta["subcenters"]),
        "bias": _gather_range(shards, "bias", 0, C, 1),
    }


def split(weight: torch.Tensor, world_size: int, subcenters: int = 1) -> List[torch.Tensor]:
    """A whole weight [C·K, D] (or bias [C]) cut into the shards of a world_size-rank head."""
    C = weight.shape[0] // subcenters
    if C * subcenters != weight.shape[0]:
        raise ValueError(f"weight has {weight.shape[0]} rows, not a multiple of subcenters = {subcenters}")
    return [
        weight[s * subcenters : e * subcenters] for s, e in (class_range(C, world_size, r) for r in range(world_size))
    ]


def import_insightface(paths: Union[str, Sequence[str]]) -> torch.Tensor:
    """The class weight [C, D] of an insightface Partial FC run from its per-rank files: either
    ``checkpoint_gpu_{rank}.pt`` (the shard under ``state_dict_softmax_fc``) or
    ``softmax_fc_gpu_{rank}.pt`` (the shard's state dict). ``paths``: a directory or the files.
    Checks that the shard sizes follow insightface's split. Load the result with
    ``head.weight.copy_(...)`` or, for a ShardedMarginHead, its ``split(...)[rank]``."""
    if isinstance(paths, str):
        found = sorted(glob.glob(os.path.join(paths, "checkpoint_gpu_*.pt"))) or sorted(
            glob.glob(os.path.join(paths, "softmax_fc_gpu_*.pt"))
        )
        if not found:
            raise ValueError(f"{paths} holds no insightface checkpoint_gpu_*.pt or softmax_fc_gpu_*.pt files")
        paths = found
    rank_of = lambda p: int(os.path.basename(p).rsplit("_", 1)[1].split(".")[0])  # noqa: E731
    paths = sorted(paths, key=rank_of)
    if [rank_of(p) for p in paths] != list(range(len(paths))):
        raise ValueError(
            f"insightface shards must be ranks 0..{len(paths) - 1}, got {[os.path.basename(p) for p in paths]}"
        )
    shards = []
    for p in paths:
        state = torch.load(p, map_location="cpu", weights_only=True)
        state = state.get("state_dict_softmax_fc", state)
        if "weight" not in state:
            raise ValueError(f"{p} has no softmax-fc weight (keys: {sorted(state)})")
        shards.append(state["weight"])
    C = sum(s.shape[0] for s in shards)
    expected = [e - s for s, e in (class_range(C, len(shards), r) for r in range(len(shards)))]
    if [s.shape[0] for s in shards] != expected or len({s.shape[1] for s in shards}) != 1:
        raise ValueError(
            f"shard shapes {[tuple(s.shape) for s in shards]} do not follow insightface's split of {C} classes over "
            f"{len(shards)} ranks"
        )
    return torch.cat(shards)
