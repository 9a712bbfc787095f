"""The fused margin cross-entropy: one call from features, class weights and labels to the loss,
without a [B, C] logits tensor."""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F

from . import ops
from ._checks import check_backend, check_grad_skip, check_head_inputs
from .margins import NORM_EPS, Margin, NormFace, RowContext, Softmax, target_cosines


def loss_from_stats(
    stats: ops.HeadStats,
    labels: torch.Tensor,
    num_classes: Union[int, torch.Tensor],
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


def _check_backend(x: torch.Tensor) -> None:
    if x.device.type not in ("cpu", "meta") and not torch._C._dispatch_has_kernel_for_dispatch_key(
        "marginops::margin_ce_forward", x.device.type.upper()
    ):
        raise RuntimeError(
            f"x is on {x.device}, but marginops was built without kernels for {x.device.type}; "
            "rebuild with CUDA (see README, 'Building with CUDA')"
        )


def autocast_features(x: torch.Tensor) -> torch.Tensor:
    """Under torch.autocast, float32 features become the autocast dtype, as a matmul's inputs
    would. The weight is left alone: the kernels convert its tiles as they load them, so no
    low-precision copy of W is made and dW comes back in W's dtype."""
    device = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


def margin_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    margin: Optional[Margin] = None,
    bias: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    return_accuracy: bool = False,
    margin_state: Optional[Dict[str, torch.Tensor]] = None,
    update_state: bool = True,
    grad_skip_threshold: float = 0.0,
    backend: str = "auto",
    workspace_bytes: Optional[int] = None,
    check_finite: bool = False,
):
    """Margin-softmax cross-entropy of features ``x [B, D]`` against class weights
    ``weight [C·K, D]`` (K = 1 but for sub-center margins), with ``labels [B]`` (class ids, or
    ``ignore_index``).

    ``margin`` is a spec from :mod:`marginops.margins` (default: plain :class:`Softmax`).
    ``reduction``, ``ignore_index`` and ``label_smoothing`` behave as in
    :func:`torch.nn.functional.cross_entropy`. The loss is float32 for float16/bfloat16/float32
    inputs and float64 for float64 ones. With ``return_accuracy=True`` returns
    ``(loss, accuracy)``, the accuracy being the fraction of non-ignored rows whose largest
    margin-free logit is the label, computed in the same pass.

    Stateful margins (CurricularFace's t, AdaFace's norm statistics) read ``margin_state`` (a
    dict of tensors from ``margin.state_init()``, as heads keep it) and update it in place when
    ``update_state``; without it they use the statistics of this batch alone.

    Under ``torch.autocast``, float32 ``x`` is cast to the autocast dtype (the weight is not:
    its tiles are converted in the kernel).

    ``grad_skip_threshold`` (default 0: exact) lets the backward drop a tile of the recomputed
    logits — rows × classes, 256 × 256 on the CPU, 32 × 64 (dx) and 64 × 32 (dW) weight rows on
    CUDA — when every non-label probability ``exp(z − lse)`` in it lies below the threshold and
    no row in it is label-smoothed: the tile's label entries still count exactly, the others'
    gradients (each below ``threshold`` times the row's loss weight) are dropped, and the tile's
    two products become one row update per label. Label smoothing puts ``ε/C`` on every entry,
    so smoothed rows are never dropped. The eager reference accepts it and computes every
    gradient. See the README for what it saves and costs. The chunked backend computes every
    gradient whatever the threshold (its products are cuBLAS GEMMs over whole chunks: a skipped
    tile would save nothing).

    ``backend`` picks the CUDA implementation: ``"chunked"`` (cuBLAS GEMMs over chunks of classes
    with our kernels for the margin softmax; all its extra memory within ``workspace_bytes``,
    default 64 MiB, whatever C is), ``"fused"`` (one tile kernel streaming classes, no logits in
    memory) or ``"auto"`` (the default: ``"chunked"`` on CUDA, the tiled CPU implementation on the
    CPU, where the other two are an error). :func:`marginops.backends` lists what each device runs.

    dtypes (the same rule for the eager reference and on every device): ``x`` and ``weight`` of
    equal dtypes (float16, bfloat16, float32 or float64), or a float32 ``weight`` with
    float16/bfloat16 ``x`` (mixed precision); any other pair is a ValueError naming both, e.g.
    "x is float32 but weight is bfloat16: use equal dtypes, or float32 weight with
    float16/bfloat16 x". Under autocast the rule applies to ``x`` after its cast. ``bias`` may be
    any of the four float dtypes: it is read in the arithmetic dtype and its gradient comes back
    in its own dtype.

    ``check_finite`` (default False): when True, a ValueError names the first row of ``x``
    (``"x[17] holds NaN/Inf (first bad row)"``), class of ``weight`` or entry of ``bias`` that
    holds NaN or Inf. It costs a pass over the inputs and a device sync. Without it, one NaN row
    of ``x`` makes its loss NaN and, through the backward, every entry of ``dW`` NaN (each class's
    gradient sums over all rows). Under ``torch.amp.GradScaler``'s dynamic loss scaling leave it
    off: GradScaler skips a step whose gradients hold inf/NaN (and lowers the scale), whereas
    ``check_finite=True`` raises on a NaN feature before GradScaler can see it.
    """
    margin = Softmax() if margin is None else margin
    labels = check_head_inputs(x, weight, labels, margin, bias, reduction, label_smoothing, check_finite)
    grad_skip_threshold = check_grad_skip(grad_skip_threshold)
    backend_code, workspace = check_backend(backend, x.device, workspace_bytes)
    _check_backend(x)
    x = autocast_features(x)
    cfg = margin.config()
    num_classes = weight.shape[0] // cfg.subcenters
    valid = labels != ignore_index
    ctx = RowContext(
        x,
        labels,
        valid,
        margin_state is not None and update_state,
        lambda: target_cosines(x, weight, labels, valid, cfg.subcenters),
    )
    terms = margin.prepare(ctx, margin_state)
    stats = ops.head_stats(
        x,
        weight,
        labels,
        bias,
        terms.row_margins,
        terms.curricular,
        None,
        num_classes,
        0,
        ignore_index,
        cfg,
        grad_skip_threshold,
        backend_code,
        workspace,
    )
    loss = loss_from_stats(stats, labels, num_classes, ignore_index, label_smoothing, reduction, terms.extra_loss)
    if return_accuracy:
        return loss, accuracy_from_stats(stats, labels, ignore_index)
    return loss


def cosine_margin(subcenters: int = 1) -> Margin:
    """A spec whose margin-free logits are the cosines (s = 1), with the given sub-centers."""
    return _Cosine(subcenters)


class _Cosine(Margin):
    def __init__(self, subcenters: int):
        self.subcenters = subcenters

    def config(self):
        return NormFace(s=1.0).config()._replace(subcenters=self.subcenters)


def class_logits(
    x: torch.Tensor,
    weight: torch.Tensor,
    margin: Optional[Margin] = None,
    bias: Optional[torch.Tensor] = None,
    chunk_size: int = 65536,
) -> torch.Tensor:
    """Margin-free logits [B, C] of a head (a class's logit being its best sub-center's), computed
    chunk_size classes at a time, so temporaries stay at B·chunk_size·K."""
    margin = Softmax() if margin is None else margin
    cfg = margin.config()
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


TOPK_KINDS = ("cosine", "logit")


def topk_classes(
    x: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    margin: Optional[Margin] = None,
    bias: Optional[torch.Tensor] = None,
    kind: str = "logit",
):
    """The k best classes of each row from the fused pass, without a [B, C] tensor:
    (values [B, k], classes [B, k]). ``kind="logit"``: values are the margin-free logits of
    ``margin`` (s·cos θ + bias for normalized margins); ``kind="cosine"``: values are cos θ
    (unscaled, in [-1, 1], no bias), classes ranked by it. A class's value is its best
    sub-center's. Not differentiable."""
    if kind not in TOPK_KINDS:
        raise ValueError(f"kind must be one of {TOPK_KINDS}, got {kind!r}")
    margin = Softmax() if margin is None else margin
    cfg = margin.config()
    if kind == "cosine":
        cfg, bias = cosine_margin(cfg.subcenters).config(), None
    with torch.no_grad():
        values, classes = torch.ops.marginops.margin_topk(
            x, weight, bias, None, k, 0, cfg.normalize_x, cfg.normalize_w, cfg.s, cfg.subcenters
        )
    return values, classes
