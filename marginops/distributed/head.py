"""ShardedMarginHead: a margin head whose classes are sharded across the ranks of a process group
(the pipeline's Shard plug-in: marginops.distributed.sharding).

Gradients: each rank's weight (and bias) shard gets exactly ∂L/∂W of the global loss L, which
is identical on every rank. The features' gradient is exactly ∂L/∂x for the rank's own rows;
with ``scale_grad_by_world_size=True`` it is multiplied by the world size instead, so that DDP's
averaging of backbone gradients over ranks yields ∂L/∂θ (insightface's convention)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .. import _pipeline
from ..heads import ClassWeights, MarginState
from ..margins import Margin
from ..options import FIELDS, HeadOptions
from .sharding import Shard, call_flags, class_range


class ShardedMarginHead(ClassWeights):
    """A margin head whose classes are sharded across the ranks of a process group.

    Rank r owns classes ``class_range(num_classes, world_size, r)``: ``weight`` is that shard,
    ``[local_classes·K, embedding_size]``. ``forward(x [B_r, embedding_size], labels [B_r] or
    [B_r, 1])`` takes the rank's own batch (sizes may differ per rank) and returns the loss of the
    global batch, the same on every rank (``reduction="none"``: the rank's own rows). The options
    are MarginHead's; ``sample_rate < 1`` is Partial FC (in training, the shard's positives of the
    global batch plus sampled others, reproducible from (seed, rank, step));
    ``scale_grad_by_world_size`` multiplies dx by the world size (DDP's averaging).

    Bad input on one rank, or a call that differs between ranks, raises the same ValueError on
    every rank, naming the rank; a rank that does not call the head at all leaves the others
    waiting for the process group's timeout (``init_process_group(timeout=...)``; docs/design.md,
    "Sharding the class dimension")."""

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
                "ShardedMarginHead needs torch.distributed initialized (init_process_group); "
                "use MarginHead on one process"
            )
        self.options = HeadOptions(
            margin, reduction, ignore_index, label_smoothing, return_accuracy, grad_skip_threshold, backend,
            workspace_bytes, check_finite,
        )  # fmt: skip
        if not isinstance(sample_rate, (int, float)) or isinstance(sample_rate, bool) or not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
        self.group = process_group
        self.world_size, self.rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < self.world_size:
            raise ValueError(f"num_classes must be an int >= world size {self.world_size}, got {num_classes!r}")
        self.class_start, self.class_end = class_range(num_classes, self.world_size, self.rank)
        self.sample_rate = float(sample_rate)
        self.grad_scale = float(self.world_size) if scale_grad_by_world_size else 1.0
        self.seed = int(seed)
        K = self.margin.config().subcenters
        factory = {"device": device, "dtype": dtype}
        self._init_weights(embedding_size, self.class_end - self.class_start, K, bias, factory)
        self.num_classes = num_classes  # the head's classes, all ranks together
        self.local_classes = self.class_end - self.class_start
        self.margin_state = MarginState(self.margin.state_init())
        self.register_buffer("sample_step", torch.zeros((), dtype=torch.long, device=device))
        self.last_sample: Optional[torch.Tensor] = None
        self._check_consistent()

    def _check_consistent(self) -> None:
        """Every rank was given the same head: its size, sampling and every option."""
        mine = {
            "num_classes": self.num_classes,
            "embedding_size": self.embedding_size,
            "sample_rate": self.sample_rate,
            "seed": self.seed,
            "bias": self.bias is not None,
            "scale_grad_by_world_size": self.grad_scale != 1.0,
            **{name: getattr(self.options, name) for name in FIELDS},
            "margin": repr(self.margin),  # specs compare by identity
        }
        every = [None] * self.world_size
        dist.all_gather_object(every, mine, group=self.group)
        diffs = [f"rank {r}: {k}={v[k]!r}" for r, v in enumerate(every) for k in mine if v[k] != every[0][k]]
        if diffs:
            raise ValueError(
                f"ShardedMarginHead arguments differ between ranks (rank 0: {every[0]}); " + "; ".join(diffs)
            )

    def _shard(self, x, forward: bool = True) -> Shard:
        """This call's Shard record: the rank's classes and how it calls the head."""
        flags = 0
        if forward:
            weight_grad = self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)
            x_grad = isinstance(x, torch.Tensor) and x.requires_grad
            flags = call_flags(x_grad, weight_grad, self.training, self.grad_scale != 1.0)
        return Shard(
            self.num_classes, self.class_start, self.local_classes, self.group, self.rank, self.world_size,
            self.grad_scale, flags, self._sample if forward else None,
        )  # fmt: skip

    def forward(self, x: torch.Tensor, labels: torch.Tensor):
        self.last_sample = None
        return _pipeline.head_loss(
            self.options, x, self.weight, labels, self.bias, margin_state=self.margin_state.as_dict(),
            update_state=self.training, head_dim=self.embedding_size, shard=self._shard(x), optimizer=self.optimizer,
        )  # fmt: skip

    def _topk_shard(self) -> dict:
        return {"num_classes": self.num_classes, "shard": self._shard(None, forward=False)}

    def _sample(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """Partial FC: sorted local class indices (positives of the global batch + random others)."""
        if self.sample_rate >= 1.0 or not self.training:
            return None
        self.last_sample = self._draw(labels)
        return self.last_sample

    def _draw(self, labels: torch.Tensor) -> torch.Tensor:
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

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"rank={self.rank}/{self.world_size}, "
            f"classes=[{self.class_start}, {self.class_end}), margin={self.margin!r}, sample_rate={self.sample_rate}"
        )
