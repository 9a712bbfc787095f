"""nn.Module heads that own the class weights and return the loss: drop-in for the eager heads.
Each holds one HeadOptions and runs the one pipeline (marginops._pipeline)."""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from . import _pipeline
from .margins import LambdaSchedule, LSoftmax, Margin
from .options import FIELDS, HeadOptions, check_positive_int


class MarginState(nn.Module):
    """The buffers of a stateful margin (CurricularFace's t, AdaFace's norm statistics), so that
    they follow the head's device and survive state_dict."""

    def __init__(self, state: Dict[str, torch.Tensor]):
        super().__init__()
        for name, value in state.items():
            self.register_buffer(name, value.clone())

    def as_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        return dict(self.named_buffers()) or None


def _option(name: str) -> property:
    """A head's option as an attribute; setting it checks the new value (HeadOptions.replace)."""

    def set_option(self, value):
        self.options = self.options.replace(**{name: value})

    return property(lambda self: getattr(self.options, name), set_option, doc=f"HeadOptions.{name}")


class ClassWeights(nn.Module):
    """weight [num_classes·K, embedding_size] (and bias [num_classes]), the head's HeadOptions
    (each option also an attribute: ``head.label_smoothing = 0.1`` is checked like the
    constructor's), and the inference helpers every head shares."""

    options: HeadOptions
    # A marginops.optim optimizer that the backward runs (it sets this), or None: weight.grad.
    optimizer = None

    def _init_weights(self, embedding_size, num_classes, subcenters, bias, factory):
        self.embedding_size = check_positive_int("embedding_size", embedding_size)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.subcenters = subcenters
        self.weight = nn.Parameter(torch.empty(num_classes * subcenters, embedding_size, **factory))
        self.bias = nn.Parameter(torch.empty(num_classes, **factory)) if bias else None
        self.reset_parameters()

    def __getstate__(self):
        """Pickled or copied, a head leaves its optimizer behind (it belongs to this head's weights)."""
        state = super().__getstate__()
        state.pop("optimizer", None)
        return state

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.01)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @torch.no_grad()
    def logits(self, x: torch.Tensor, chunk_size: int = 65536) -> torch.Tensor:
        """Margin-free logits [B, num_classes] (no margin, no hard-negative modulation),
        computed chunk_size classes at a time."""
        _pipeline.check_x(x, self.embedding_size)
        return _pipeline.class_logits(x, self.weight, self.margin, self.bias, chunk_size)

    @torch.no_grad()
    def cosine(self, x: torch.Tensor, chunk_size: int = 65536) -> torch.Tensor:
        """cos θ [B, num_classes] between features and class weights (the best sub-center)."""
        _pipeline.check_x(x, self.embedding_size)
        return _pipeline.class_logits(x, self.weight, _pipeline.cosine_margin(self.subcenters), None, chunk_size)

    @torch.no_grad()
    def topk(self, x: torch.Tensor, k: int = 5, kind: str = "cosine") -> Tuple[torch.Tensor, torch.Tensor]:
        """The k best classes of each row: (values [B, k], classes [B, k]), from the fused pass,
        without a [B, num_classes] tensor. ``kind="cosine"`` (default): cos θ in [-1, 1] of the
        best sub-center; ``kind="logit"``: the margin-free logits s·cos θ (+ bias)."""
        return _pipeline.topk(
            x, self.weight, k, self.margin, self.bias, kind, head_dim=self.embedding_size,
            **self._topk_shard(),
        )  # fmt: skip

    def _topk_shard(self) -> dict:
        return {}


for _name in FIELDS:
    setattr(ClassWeights, _name, _option(_name))


class MarginHead(ClassWeights):
    """Classification head with a margin-softmax loss; the default margin is plain Softmax.

    Owns ``weight [num_classes·K, embedding_size]`` (K sub-centers for SubCenterArcFace, else 1)
    and, with ``bias=True``, ``bias [num_classes]``; ``forward(x [B, embedding_size], labels [B])``
    returns the loss (and the accuracy with ``return_accuracy=True``). The options are
    :class:`marginops.options.HeadOptions`' (see :func:`marginops.margin_cross_entropy`).
    Stateful margins keep their state in ``margin_state`` buffers, updated in training mode.
    ``lambda_schedule`` anneals an LSoftmax/SphereFace λ per training step as SphereFace's Caffe
    layer does: training step n (from 1) uses ``lambda_schedule(n)``; the buffer
    ``lambda_iteration`` counts the steps taken and is saved in the state_dict."""

    # An eager oracle's functional (marginops.reference) in place of the pipeline, or None.
    _loss_fn = None

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
        self.options = HeadOptions(
            margin, reduction, ignore_index, label_smoothing, return_accuracy, grad_skip_threshold, backend,
            workspace_bytes, check_finite,
        )  # fmt: skip
        if lambda_schedule is not None:
            if not isinstance(self.margin, LSoftmax):
                raise ValueError(
                    f"lambda_schedule anneals LSoftmax/SphereFace margins, not {type(self.margin).__name__}"
                )
            if not isinstance(lambda_schedule, LambdaSchedule):
                raise ValueError(f"lambda_schedule must be a marginops LambdaSchedule, got {lambda_schedule!r}")
        self.lambda_schedule = lambda_schedule
        factory = {"device": device, "dtype": dtype}
        self._init_weights(embedding_size, num_classes, self.margin.config().subcenters, bias, factory)
        self.margin_state = MarginState(self.margin.state_init())
        if lambda_schedule is not None:
            self.register_buffer("lambda_iteration", torch.zeros((), dtype=torch.long, device=device))

    def current_margin(self) -> Margin:
        """The margin of the next step: the spec, with λ from the schedule when annealing —
        ``lambda_schedule(lambda_iteration + 1)``."""
        if self.lambda_schedule is None:
            return self.margin
        return dataclasses.replace(self.margin, lambda_=self.lambda_schedule(int(self.lambda_iteration) + 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor):
        margin = self.current_margin()  # λ(lambda_iteration + 1): this step's, counted from 1
        if self.lambda_schedule is not None and self.training:
            self.lambda_iteration += 1
        return self._head_loss(x, labels, self.options, margin)

    def _head_loss(self, x, labels, options: HeadOptions, margin: Margin):
        state = self.margin_state.as_dict() if hasattr(self, "margin_state") else None
        if self._loss_fn is not None:
            _pipeline.check_x(x, self.embedding_size)
            kwargs = {name: getattr(options, name) for name in FIELDS}
            kwargs["margin"] = margin
            return self._loss_fn(
                x, self.weight, labels, bias=self.bias, margin_state=state, update_state=self.training, **kwargs
            )
        return _pipeline.head_loss(
            options, x, self.weight, labels, self.bias, margin=margin, margin_state=state,
            update_state=self.training, head_dim=self.embedding_size, optimizer=self.optimizer,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"margin={self.margin!r}, bias={self.bias is not None}"
        )


class WeightedMarginHead(MarginHead):
    """One set of class weights trained by a weighted sum of margin losses,
    ``Σ_k w_k · loss_k(x, W, labels)`` — CCL combines its adaptive margin with SphereFace this
    way. Each term is one fused pass; margins with sub-centers or state are not supported here.
    Inference helpers use the first margin's scaling; check_finite is checked by the first term."""

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
        if not terms:
            raise ValueError("terms must hold at least one (margin, weight) pair")
        checked = []
        for term in terms:
            if not (isinstance(term, (tuple, list)) and len(term) == 2):
                raise ValueError(f"terms must be (margin, weight) pairs, got {term!r}")
            margin, w = HeadOptions(term[0]).margin, term[1]
            if margin.config().subcenters != 1 or margin.state_init():
                raise ValueError(f"{type(margin).__name__} has sub-centers or state; use MarginHead")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                raise ValueError(f"term weights must be non-negative numbers, got {w!r}")
            checked.append((margin, float(w)))
        super().__init__(
            embedding_size, num_classes, checked[0][0], bias, "mean", ignore_index, label_smoothing,
            grad_skip_threshold=grad_skip_threshold, backend=backend, workspace_bytes=workspace_bytes,
            check_finite=check_finite, device=device, dtype=dtype,
        )  # fmt: skip
        del self.margin_state  # no stateful margins here
        self.terms = checked

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total = None
        for i, (margin, w) in enumerate(self.terms):
            options = self.options if i == 0 else self.options.replace(check_finite=False)
            loss = w * self._head_loss(x, labels, options, margin)
            total = loss if total is None else total + loss
        return total
