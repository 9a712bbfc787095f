"""The class dimension sharded across the ranks of a process group, as a plug-in of the one head
pipeline (marginops._pipeline): a Shard record says which classes this rank holds, and the
functions here are the pipeline's collectives. Each rank owns a contiguous range of classes; the
batch is all-gathered, every rank runs the op on its shard, one collective combines the per-row
statistics into the global loss, and the features' gradient is reduce-scattered back.
Communication per step is independent of the number of classes (docs/design.md, "Sharding")."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import ops
from .._checks import FLOAT_DTYPES, dtype_name
from ..margins import Margin
from ..margins import target_cosines as _target_cosines

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def class_range(num_classes: int, world_size: int, rank: int) -> Tuple[int, int]:
    """[start, end) of the classes rank owns: num_classes // world_size each, the first
    num_classes % world_size ranks one more (insightface's split)."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclasses.dataclass
class Shard:
    """This rank's part of a sharded head call. call_flags: bits of CALL_FLAGS (how this rank
    calls the head, compared across ranks); sample: Partial FC's choice of local classes from the
    global labels (None: every class)."""

    num_classes: int  # all ranks together
    class_offset: int  # this rank's first class
    local_classes: int
    group: Any
    rank: int
    world_size: int
    grad_scale: float = 1.0  # the features' gradient is multiplied by it (DDP's averaging)
    call_flags: int = 0
    sample: Optional[Callable[[torch.Tensor], Optional[torch.Tensor]]] = None


def gather_stack(t: torch.Tensor, group) -> torch.Tensor:
    """[world, *t.shape]: every rank's t (same shape on every rank)."""
    world = dist.get_world_size(group)
    flat = t.contiguous().reshape((-1,) + tuple(t.shape[1:])) if t.dim() else t.reshape(1)
    out = flat.new_empty((world * flat.shape[0],) + tuple(flat.shape[1:]))
    _all_gather(out, flat, group=group)
    return out.view((world,) + tuple(t.shape))


def _gather_rows(t: torch.Tensor, counts: List[int], group) -> torch.Tensor:
    """Every rank's rows of t (counts[r] on rank r), in rank order: padded to the largest count
    for one all-gather."""
    most = max(counts)
    padded = t.new_zeros((most,) + tuple(t.shape[1:]))
    padded[: t.shape[0]] = t
    out = t.new_empty((len(counts) * most,) + tuple(t.shape[1:]))
    _all_gather(out, padded, group=group)
    return torch.cat([out[r * most : r * most + n] for r, n in enumerate(counts)])


class _GatherRows(torch.autograd.Function):
    """_gather_rows, whose backward reduce-scatters the gradient (sums every rank's contribution
    to this rank's rows)."""

    @staticmethod
    def forward(ctx, x, counts: List[int], group, grad_scale: float):
        ctx.counts, ctx.group, ctx.grad_scale, ctx.rank = counts, group, grad_scale, dist.get_rank(group)
        ctx.most = max(counts)
        return _gather_rows(x, counts, group)

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
        return gather_stack(stats, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.replicated:
            return grad[ctx.rank], None, None
        mine = grad.new_empty(grad.shape[1:])
        _reduce_scatter(mine, grad.contiguous().reshape((-1,) + tuple(grad.shape[2:])), group=ctx.group)
        return mine, None, None


# How a rank calls the head, one bit each. Every rank must call it alike, or the backward's
# collectives (or a stateful margin's) would wait for a rank that never joins them.
CALL_FLAGS = (
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
_PREFIX = "ShardedMarginHead is called differently across ranks: "


def call_flags(x_grad: bool, weight_grad: bool, training: bool, scaled: bool) -> int:
    grad = torch.is_grad_enabled()
    bits = (grad and x_grad, grad and weight_grad, training, scaled)
    return sum(1 << i for i, b in enumerate(bits) if b)


def margin_key(margin) -> str:
    """The margin spec as a string, alike on every rank that holds the same spec (tensor fields by
    shape and dtype, not device or values)."""
    if dataclasses.is_dataclass(margin):
        fields = ", ".join(f"{f.name}={_value_key(getattr(margin, f.name))}" for f in dataclasses.fields(margin))
        return f"{type(margin).__name__}({fields})"
    return repr(margin)


def _value_key(value) -> str:
    if isinstance(value, torch.Tensor):  # a per-row margin: its values differ per batch, not per rank
        return f"tensor{tuple(value.shape)}:{dtype_name(value.dtype)}"
    if isinstance(value, Margin):
        return margin_key(value)
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_value_key(v) for v in value) + ")"
    return repr(value)


def _margin_hash(margin) -> int:
    return int.from_bytes(hashlib.sha256(margin_key(margin).encode()).digest()[:7], "little")  # < 2^56: fits int64


def exchange_header(shard: Shard, bad: Optional[str], x, weight, margin: Margin) -> List[int]:
    """Every rank learns every batch size, whether any rank's input is bad (the one check's message)
    and how each calls the head; raises the same ValueError on every rank, naming the rank, when
    any rank's input is bad or the ranks call the head differently. Returns the batch sizes."""
    if bad is None and x.device.type == "meta":
        bad = "x, labels and the head are on the meta device: ShardedMarginHead needs data to exchange"
    rows = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() else 0
    dtype_code = lambda t: FLOAT_DTYPES.index(t.dtype) if t.dtype in FLOAT_DTYPES else -1  # noqa: E731
    x_dtype = dtype_code(x) if isinstance(x, torch.Tensor) else -1
    header = torch.tensor(
        [rows, x_dtype, dtype_code(weight), shard.call_flags, _margin_hash(margin), bad is not None],
        device="cpu" if weight.device.type == "meta" else weight.device,
    )
    every = gather_stack(header, shard.group).tolist()
    if any(row[5] for row in every):  # every rank sees it: one more collective brings the messages
        messages = [None] * shard.world_size
        dist.all_gather_object(messages, bad, group=shard.group)
        r = next(r for r, row in enumerate(every) if row[5])
        raise ValueError(f"rank {r}: {messages[r]}")
    _check_same_call(shard, every, margin)
    return [row[0] for row in every]


def _check_same_call(shard: Shard, every: List[List[int]], margin: Margin) -> None:
    first = every[0]
    odd = lambda i: next((r for r, row in enumerate(every) if row[i] != first[i]), None)  # noqa: E731
    for i, name, advice in (
        (1, "x", "cast every rank's features alike"),
        (2, "weight", "convert every rank's head alike"),
    ):
        r = odd(i)
        if r is not None:
            raise ValueError(
                f"{_PREFIX}{name} has different dtypes across ranks: rank {r} has {name}.dtype="
                f"{dtype_name(FLOAT_DTYPES[every[r][i]])} but rank 0 has "
                f"{name}.dtype={dtype_name(FLOAT_DTYPES[first[i]])}; {advice}"
            )
    r = odd(3)
    if r is not None:
        for bit, (name, advice) in enumerate(CALL_FLAGS):
            mine, theirs = bool(every[r][3] >> bit & 1), bool(first[3] >> bit & 1)
            if mine != theirs:
                raise ValueError(f"{_PREFIX}rank {r} has {name}={mine} but rank 0 has {name}={theirs}; {advice}")
    r = odd(4)
    if r is not None:  # every rank sees the difference: one more collective names the margins
        keys = [None] * shard.world_size
        dist.all_gather_object(keys, margin_key(margin), group=shard.group)
        raise ValueError(
            f"{_PREFIX}rank {r} has margin={keys[r]} but rank 0 has margin={keys[0]}; "
            "give every rank the same margin spec (and change it on every rank alike)"
        )


def gather_batch(shard: Shard, x, labels, counts: List[int]):
    """The global batch: every rank's rows of x (differentiable: the gradient is reduce-scattered
    back, times shard.grad_scale) and labels, in rank order."""
    return _GatherRows.apply(x, counts, shard.group, shard.grad_scale), _gather_rows(labels, counts, shard.group)


def target_cosines(shard: Shard, x, weight, labels, valid, subcenters: int) -> torch.Tensor:
    """cos θ_iy for the global batch: each rank fills the rows whose class it owns."""
    local = labels - shard.class_offset
    mine = valid & (local >= 0) & (local < shard.local_classes)
    cos = _target_cosines(x, weight, local.clamp(0, shard.local_classes - 1), mine, subcenters)
    dist.all_reduce(cos, group=shard.group)
    return cos


def merge_stats(shard: Shard, stats: ops.HeadStats, class_index, extra, replicated: bool):
    """Every rank's per-row statistics combined into the global ones: (stats, classes computed
    over all ranks, the extra loss counted once). replicated: the loss is the same on every rank
    ("mean"/"sum"), so each rank's slice of the gradient is complete without communication."""
    computed = float(shard.local_classes if class_index is None else class_index.numel())
    packed = torch.stack(
        [s.to(torch.float64) for s in (stats.lse, stats.target_logit, stats.logit_sum)]
        + [
            stats.best_logit.detach().double(),
            stats.best_class.double(),
            torch.full_like(stats.lse, computed, dtype=torch.float64),
        ],
        dim=1,
    )
    every = _GatherStats.apply(packed, shard.group, replicated)  # [world, B, 6]
    best, owner = every[:, :, 3].max(dim=0)
    merged = ops.HeadStats(
        lse=torch.logsumexp(every[:, :, 0], dim=0),
        target_logit=every[:, :, 1].sum(0),
        logit_sum=every[:, :, 2].sum(0),
        best_logit=best,
        best_class=every[:, :, 4].gather(0, owner[None]).squeeze(0).long(),
    )
    num_computed = every[:, 0, 5].sum() if every.shape[1] else torch.tensor(float(shard.num_classes))
    if extra is not None and replicated:  # computed alike on every rank: count its gradient once
        extra = extra / shard.world_size + (extra - extra / shard.world_size).detach()
    return merged, num_computed, extra
