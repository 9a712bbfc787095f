"""nn.Module heads that own the class weights and return the loss: drop-in for the eager heads."""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from . import functional
from ._checks import REDUCTIONS, check_backend, check_grad_skip
from .margins import LambdaSchedule, LSoftmax, Margin, Softmax


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_margin(margin) -> Margin:
    margin = Softmax() if margin is None else margin
    if not isinstance(margin, Margin):
        raise ValueError(f"margin must be a marginops margin spec, got {margin!r}")
    return margin


class MarginState(nn.Module):
    """The buffers of a stateful margin (CurricularFace's t, AdaFace's norm statistics), so that
    they follow the head's device and survive state_dict."""

    def __init__(self, state: Dict[str, torch.Tensor]):
        super().__init__()
        for name, value in state.items():
            self.register_buffer(name, value.clone())

    def as_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        return dict(self.named_buffers()) or None


class _ClassWeights(nn.Module):
    """weight [num_classes·K, embedding_size] (and bias [num_classes]) plus the inference
    helpers every head shares."""

    def _init_weights(self, embedding_size, num_classes, subcenters, bias, factory):
        self.embedding_size = _check_size("embedding_size", embedding_size)
        self.num_classes = _check_size("num_classes", num_classes)
        self.subcenters = subcenters
        self.weight = nn.Parameter(torch.empty(num_classes * subcenters, embedding_size, **factory))
        self.bias = nn.Parameter(torch.empty(num_classes, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.01)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _check_x(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.embedding_size:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape [B, {self.embedding_size}], got {shape}")

    def _inference_margin(self) -> Margin:
        return self.margin

    @torch.no_grad()
    def logits(self, x: torch.Tensor, chunk_size: int = 65536) -> torch.Tensor:
        """Margin-free logits [B, num_classes] (no margin, no hard-negative modulation),
        computed chunk_size classes at a time."""
        self._check_x(x)
        return functional.class_logits(x, self.weight, self._inference_margin(), self.bias, chunk_size)

    @torch.no_grad()
    def cosine(self, x: torch.Tensor, chunk_size: int = 65536) -> torch.Tensor:
        """cos θ [B, num_classes] between features and class weights (the best sub-center)."""
        self._check_x(x)
        return functional.class_logits(x, self.weight, functional.cosine_margin(self.subcenters), None, chunk_size)

    @torch.no_grad()
    def topk(self, x: torch.Tensor, k: int = 5, kind: str = "cosine") -> Tuple[torch.Tensor, torch.Tensor]:
        """The k best classes of each row: (values [B, k], classes [B, k]), from the fused pass,
        without a [B, num_classes] tensor.

        ``kind="cosine"`` (the default: a face-recognition user reads scores as cosines):
        values are cos θ between the row and the class weight (unscaled, in [-1, 1], the best
        sub-center's), classes ranked by it. ``kind="logit"``: values are the margin-free logits
        s·cos θ (+ bias) of the head's margin, classes ranked by them (the ranking differs from
        the cosine's only with a bias, or with unnormalized features or weights). Another kind
        is a ValueError."""
        self._check_x(x)
        return functional.topk_classes(x, self.weight, k, self._inference_margin(), self.bias, kind=kind)


class MarginHead(_ClassWeights):
    """Classification head with a margin-softmax loss. The default margin is plain
    :class:`Softmax` (``margin=None``); pass e.g. ``margin=mo.ArcFace()``.

    Owns ``weight [num_classes·K, embedding_size]`` (K sub-centers for SubCenterArcFace, else 1)
    and ``bias [num_classes]`` with ``bias=True``; ``forward(x, labels)`` returns the loss (and
    the training accuracy with ``return_accuracy=True``). Any torch optimizer trains it with the
    backbone. Stateful margins keep their state in ``margin_state`` buffers, updated in training
    mode only. ``lambda_schedule`` anneals an L-Softmax/SphereFace margin's λ per training step
    as SphereFace's Caffe layer (margin_inner_product) does: the step counter is incremented
    before λ is computed, so training step n (n = 1, 2, ...) uses λ = ``lambda_schedule(n)`` —
    the first step ``max(lambda_min, base·(1 + gamma)^−power)``, not ``base``. The buffer
    ``lambda_iteration`` holds the number of training steps taken (it is saved in the
    state_dict, so a resumed head continues the schedule); evaluation does not advance it and
    uses the λ of the next training step, ``current_margin()``. λ changes a Python float each
    step, so ``torch.compile`` recompiles while it anneals.
    ``grad_skip_threshold``, ``backend`` and ``workspace_bytes`` are
    :func:`marginops.margin_cross_entropy`'s (defaults: exact gradients, the device's default
    backend, 64 MiB). ``check_finite`` (default False) raises a ValueError naming the first row
    of ``x`` (or class of ``weight``, entry of ``bias``) holding NaN/Inf, at the cost of a device
    sync per step; leave it off under ``torch.amp.GradScaler`` (see
    :func:`marginops.margin_cross_entropy`). dtypes: ``x`` like ``weight``, or float16/bfloat16
    ``x`` with a float32 ``weight``.
    """

    _loss_fn = staticmethod(functional.margin_cross_entropy)

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margin: Optional[Margin] = None,
        bias: bool = False,
        reduction: str = "mean",
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        return_accuracy: bool = False,
        lambda_schedule: Optional[LambdaSchedule] = None,
        grad_skip_threshold: float = 0.0,
        backend: str = "auto",
        workspace_bytes: Optional[int] = None,
        check_finite: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.margin = _check_margin(margin)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if lambda_schedule is not None:
            if not isinstance(self.margin, LSoftmax):
                raise ValueError(
                    f"lambda_schedule anneals LSoftmax/SphereFace margins, not {type(self.margin).__name__}"
                )
            if not isinstance(lambda_schedule, LambdaSchedule):
                raise ValueError(f"lambda_schedule must be a marginops LambdaSchedule, got {lambda_schedule!r}")
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.return_accuracy = return_accuracy
        self.lambda_schedule = lambda_schedule
        self.grad_skip_threshold = check_grad_skip(grad_skip_threshold)
        check_backend(backend, None, workspace_bytes)  # the device is checked per call
        self.backend, self.workspace_bytes = backend, workspace_bytes
        self.check_finite = bool(check_finite)
        self._init_weights(
            embedding_size, num_classes, self.margin.config().subcenters, bias, {"device": device, "dtype": dtype}
        )
        self.margin_state = MarginState(self.margin.state_init())
        if lambda_schedule is not None:
            self.register_buffer("lambda_iteration", torch.zeros((), dtype=torch.long, device=device))

    def current_margin(self) -> Margin:
        """The margin of the next step: the spec, with λ from the schedule when annealing —
        ``lambda_schedule(lambda_iteration + 1)``, the iteration counted from 1 at the first
        training step, as in SphereFace's Caffe layer."""
        if self.lambda_schedule is None:
            return self.margin
        return dataclasses.replace(self.margin, lambda_=self.lambda_schedule(int(self.lambda_iteration) + 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor):
        self._check_x(x)
        margin = self.current_margin()  # λ(lambda_iteration + 1): this step's, counted from 1
        if self.lambda_schedule is not None and self.training:
            self.lambda_iteration += 1
        return self._loss_fn(
            x,
            self.weight,
            labels,
            margin=margin,
            bias=self.bias,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            return_accuracy=self.return_accuracy,
            margin_state=self.margin_state.as_dict(),
            update_state=self.training,
            grad_skip_threshold=self.grad_skip_threshold,
            backend=self.backend,
            workspace_bytes=self.workspace_bytes,
            check_finite=self.check_finite,
        )

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"margin={self.margin!r}, bias={self.bias is not None}"
        )


class WeightedMarginHead(_ClassWeights):
    """One set of class weights trained by a weighted sum of margin losses,
    ``Σ_k w_k · loss_k(x, W, labels)`` — CCL combines its adaptive margin with SphereFace this
    way. Each term is one fused pass; margins with sub-centers or state are not supported here.
    Inference helpers use the first margin's scaling. ``check_finite`` as in :class:`MarginHead`
    (checked once per step, by the first term)."""

    _loss_fn = staticmethod(functional.margin_cross_entropy)

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        terms: Sequence[Tuple[Margin, float]],
        bias: bool = False,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        grad_skip_threshold: float = 0.0,
        backend: str = "auto",
        workspace_bytes: Optional[int] = None,
        check_finite: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not terms:
            raise ValueError("terms must hold at least one (margin, weight) pair")
        checked = []
        for term in terms:
            if not (isinstance(term, (tuple, list)) and len(term) == 2):
                raise ValueError(f"terms must be (margin, weight) pairs, got {term!r}")
            margin, w = _check_margin(term[0]), term[1]
            if margin.config().subcenters != 1 or margin.state_init():
                raise ValueError(f"{type(margin).__name__} has sub-centers or state; use MarginHead")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                raise ValueError(f"term weights must be non-negative numbers, got {w!r}")
            checked.append((margin, float(w)))
        self.terms = checked
        self.margin = checked[0][0]
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.grad_skip_threshold = check_grad_skip(grad_skip_threshold)
        check_backend(backend, None, workspace_bytes)  # the device is checked per call
        self.backend, self.workspace_bytes = backend, workspace_bytes
        self.check_finite = bool(check_finite)
        self._init_weights(embedding_size, num_classes, 1, bias, {"device": device, "dtype": dtype})

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._check_x(x)
        total = None
        for margin, w in self.terms:
            loss = self._loss_fn(
                x,
                self.weight,
                labels,
                margin=margin,
                bias=self.bias,
                ignore_index=self.ignore_index,
                label_smoothing=self.label_smoothing,
                grad_skip_threshold=self.grad_skip_threshold,
                backend=self.backend,
                workspace_bytes=self.workspace_bytes,
                check_finite=self.check_finite and total is None,
            )
            total = w * loss if total is None else total + w * loss
        return total
