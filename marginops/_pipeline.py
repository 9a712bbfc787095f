"""The one path from a head call to the op: check the inputs, autocast, the margin's per-row terms,
the op's per-row statistics, then loss, accuracy and the margin's extra loss. Every entry point
(margin_cross_entropy, MarginHead, WeightedMarginHead, ShardedMarginHead) runs it; a sharded head
plugs in a Shard record (marginops.distributed.sharding), which adds the collectives: the header
exchange, the all-gathered batch, the merged statistics. docs/design.md describes the stages."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from . import ops
from ._checks import check_call, check_inputs
from .distributed import sharding
from .margins import Margin, RowContext, target_cosines
from .optim import head_stats_with_step
from .options import HeadOptions

TOPK_KINDS = ("cosine", "logit")


def autocast_features(x: torch.Tensor) -> torch.Tensor:
    """Under torch.autocast, float32 features become the autocast dtype, as a matmul's inputs
    would. The weight is left alone: the kernels convert its tiles as they load them, so no
    low-precision copy of W is made and dW comes back in W's dtype."""
    device = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


def loss_from_stats(
    stats: ops.HeadStats,
    labels: torch.Tensor,
    num_classes,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    extra_loss: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Cross-entropy from per-row statistics, as torch.nn.functional.cross_entropy defines it:
    loss_i = lse_i − (1 − ε)·z_iy − (ε/C)·Σ_j z_ij (+ extra_loss_i), ignored rows excluded
    (mean over the rest)."""
    loss = stats.lse - (1.0 - label_smoothing) * stats.target_logit
    if label_smoothing > 0:
        loss = loss - (label_smoothing / num_classes) * stats.logit_sum
    if extra_loss is not None:
        loss = loss + extra_loss
    valid = labels != ignore_index
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum()


def accuracy_from_stats(stats: ops.HeadStats, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Fraction of non-ignored rows whose margin-free argmax is the label."""
    valid = labels != ignore_index
    return ((stats.best_class == labels) & valid).sum() / valid.sum()


def check_kernels(x: torch.Tensor) -> None:
    """This build has kernels for x's device."""
    if x.device.type not in ("cpu", "meta") and not torch._C._dispatch_has_kernel_for_dispatch_key(
        "marginops::margin_ce_forward", x.device.type.upper()
    ):
        raise RuntimeError(
            f"x is on {x.device}, but marginops was built without kernels for {x.device.type}; "
            "rebuild with CUDA (see README, 'Building with CUDA')"
        )


def check_x(x, head_dim: int) -> None:
    """x [B, head_dim] for a head's inference helpers and its eager oracle."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != head_dim:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must have shape [B, {head_dim}], got {shape}")


def head_loss(
    opts: HeadOptions,
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    margin: Optional[Margin] = None,
    margin_state: Optional[Dict[str, torch.Tensor]] = None,
    update_state: bool = True,
    head_dim: Optional[int] = None,
    shard: Optional[sharding.Shard] = None,
    optimizer=None,
):
    """The loss (and accuracy with opts.return_accuracy) of x [B, D] against weight [C·K, D]
    (a shard of the classes with ``shard``), labels [B]. ``margin`` overrides opts.margin for
    this call (an annealed λ); ``margin_state`` is the stateful margins' state, updated in place
    when update_state; ``head_dim`` is a head's embedding size (x's D is checked against it);
    ``optimizer`` a marginops.optim optimizer of the head, which the backward runs."""
    margin = opts.margin if margin is None else margin
    K = margin.config().subcenters
    x = autocast_features(x) if isinstance(x, torch.Tensor) else x
    if shard is not None and isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels.squeeze(1)  # insightface's [B, 1] labels
    if shard is None:  # label values are the op's to check: its CUDA kernels do, without a sync
        labels = check_call(opts, x, weight, labels, bias, margin=margin, head_dim=head_dim, label_values=False)
        num_classes, counts = weight.shape[0] // K, [x.shape[0]]
        check_kernels(x)
        xg, yg = x, labels
    else:
        num_classes = shard.num_classes
        bad = check_inputs(
            x, weight, labels, bias, margin=margin, check_finite=opts.check_finite, head_dim=head_dim,
            label_range=(num_classes, opts.ignore_index), class_offset=shard.class_offset,
        )  # fmt: skip
        counts = sharding.exchange_header(shard, bad, x, weight, margin)
        opts.check_device(x.device)
        check_kernels(x)
        xg, yg = sharding.gather_batch(shard, x, labels.long(), counts)
    valid = yg != opts.ignore_index
    if shard is None:
        target_cos = lambda: target_cosines(xg, weight, yg, valid, K)  # noqa: E731
    else:
        target_cos = lambda: sharding.target_cosines(shard, xg, weight, yg, valid, K)  # noqa: E731
    class_index = None if shard is None or shard.sample is None else shard.sample(yg)
    if optimizer is not None:  # rows it updates lazily are brought up to date before they are read
        optimizer.before_forward(class_index, K)
    update = margin_state is not None and update_state
    terms = margin.prepare(RowContext(xg, yg, valid, update, target_cos), margin_state)
    head_stats = ops.head_stats if optimizer is None else head_stats_with_step(optimizer)
    stats = head_stats(
        xg,
        weight,
        yg,
        bias=bias,
        row_margins=terms.row_margins,
        curricular=terms.curricular,
        class_index=class_index,
        num_classes=num_classes,
        class_offset=0 if shard is None else shard.class_offset,
        ignore_index=opts.ignore_index,
        cfg=margin.config(),
        grad_skip=opts.grad_skip_threshold,
        backend=opts.backend_code,
        workspace_bytes=opts.workspace_code,
    )
    computed, extra = num_classes, terms.extra_loss
    if shard is not None:
        stats, computed, extra = sharding.merge_stats(shard, stats, class_index, extra, opts.reduction != "none")
    loss = loss_from_stats(stats, yg, computed, opts.ignore_index, opts.label_smoothing, opts.reduction, extra)
    if opts.reduction == "none":  # the caller's own rows (a sharded head's rank's, of the global batch)
        loss = loss[_own_rows(shard, counts)]
    loss = loss.to(ops.acc_dtype(xg, weight))
    if opts.return_accuracy:
        return loss, accuracy_from_stats(stats, yg, opts.ignore_index)
    return loss


def _own_rows(shard, counts: List[int]) -> slice:
    start = 0 if shard is None else sum(counts[: shard.rank])
    return slice(start, start + counts[0 if shard is None else shard.rank])


def cosine_margin(subcenters: int = 1) -> Margin:
    """A spec whose margin-free logits are the cosines (s = 1), with the given sub-centers."""
    return _Cosine(subcenters)


class _Cosine(Margin):
    def __init__(self, subcenters: int):
        self.subcenters = subcenters

    def config(self):
        from .margins import NormFace

        return NormFace(s=1.0).config()._replace(subcenters=self.subcenters)


def topk(
    x: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    margin: Margin,
    bias: Optional[torch.Tensor] = None,
    kind: str = "logit",
    *,
    num_classes: Optional[int] = None,
    head_dim: Optional[int] = None,
    shard: Optional[sharding.Shard] = None,
):
    """The k best classes of each row of x over every class (a sharded head's: over all shards),
    without a [B, C] tensor: (values [B, k], classes [B, k]). kind "logit": the margin-free
    logits of ``margin`` (s·cos θ + bias); "cosine": cos θ in [-1, 1], no bias. A class's value
    is its best sub-center's. Not differentiable. A sharded head's ranks check x in the header
    (x's D against head_dim), so that a bad x on one rank raises on all."""
    if kind not in TOPK_KINDS:
        raise ValueError(f"kind must be one of {TOPK_KINDS}, got {kind!r}")
    cfg = margin.config()
    C = weight.shape[0] // cfg.subcenters if num_classes is None else num_classes
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= C:
        raise ValueError(f"k = {k} must lie in [1, {C}] (the number of classes)")
    if kind == "cosine":
        cfg, bias = cosine_margin(cfg.subcenters).config(), None
    if shard is None:
        if head_dim is not None:
            check_x(x, head_dim)
        return ops.topk(x, weight, k=k, cfg=cfg, bias=bias)
    with torch.no_grad():
        rows, device = (x.shape[0], x.device) if isinstance(x, torch.Tensor) and x.dim() else (0, weight.device)
        labels = torch.full((rows,), -1, dtype=torch.long, device=device)
        bad = check_inputs(x, weight, labels, None, margin=margin, head_dim=head_dim, class_offset=shard.class_offset)
        counts = sharding.exchange_header(shard, bad, x, weight, margin)
        xg, _ = sharding.gather_batch(shard, x, labels, counts)
        kk = min(k, shard.local_classes)
        values, classes = ops.topk(xg, weight, k=kk, cfg=cfg, bias=bias, class_offset=shard.class_offset)
        if kk < k:  # every rank contributes k candidates
            values = F.pad(values, (0, k - kk), value=-float("inf"))
            classes = F.pad(classes, (0, k - kk), value=-1)
        every = sharding.gather_stack(torch.stack([values.double(), classes.double()], dim=2), shard.group)
        all_values = every[..., 0].permute(1, 0, 2).reshape(xg.shape[0], -1)
        all_classes = every[..., 1].permute(1, 0, 2).reshape(xg.shape[0], -1)
        top, pos = all_values.topk(k, dim=1)
        own = _own_rows(shard, counts)
        return top[own].to(values.dtype), all_classes.gather(1, pos)[own].long()


def class_logits(
    x: torch.Tensor,
    weight: torch.Tensor,
    margin: Optional[Margin] = None,
    bias: Optional[torch.Tensor] = None,
    chunk_size: int = 65536,
) -> torch.Tensor:
    """Margin-free logits [B, C] of a head (a class's logit being its best sub-center's), computed
    chunk_size classes at a time, so temporaries stay at B·chunk_size·K."""
    from .margins import NORM_EPS, Softmax

    cfg = (Softmax() if margin is None else margin).config()
    K = cfg.subcenters
    num_classes = weight.shape[0] // K
    acc = ops.acc_dtype(x, weight)
    xs = x.to(acc)
    if cfg.normalize_x:
        xs = cfg.s * F.normalize(xs, dim=1, eps=NORM_EPS)
    out = torch.empty(x.shape[0], num_classes, dtype=acc, device=x.device)
    for c0 in range(0, num_classes, chunk_size):
        c1 = min(num_classes, c0 + chunk_size)
        w = weight[c0 * K : c1 * K].to(acc)
        if cfg.normalize_w:
            w = F.normalize(w, dim=1, eps=NORM_EPS)
        z = xs @ w.T
        if K > 1:
            z = z.view(x.shape[0], c1 - c0, K).amax(dim=2)
        out[:, c0:c1] = z if bias is None else z + bias[c0:c1].to(acc)
    return out
