"""The implementations a benchmark compares: marginops, the eager reference, torch.compile of the
reference, and the peers when their packages are installed. Each turns (x, W, labels) into a
loss that autograd can differentiate with respect to x and W.

PyTorch's own ``torch.nn.functional.linear_cross_entropy`` (torch >= 2.13) is a peer in two rows,
``torch-lce`` (its reference path, ``options=None``) and ``torch-lce-chunked``
(``options=torch.nn.LinearCrossEntropyOptions()``, which chunks the batch so the logits never
exist whole), for plain softmax and for NormFace: it has no scale, margin or normalization, so
NormFace's x and W are normalized outside it (their copies are part of its step, time and memory)
and its input is s·x̂ (logits s·x̂·Ŵᵀ). On an older torch both rows are "unavailable".

marginops appears as ``marginops`` (its default, ``backend="auto"``: the tiled path on the CPU,
the chunked backend on CUDA) and, on CUDA only, as ``chunked`` (``backend="chunked"``: cuBLAS
GEMMs over chunks of classes) and ``tiles`` (``backend="tiles"``: the one-kernel tile path).
``fused``, the old name of the ``marginops`` row, is accepted on the command line (see ALIASES).

Each implementation also estimates the device memory one step needs above the inputs and their
gradients, so that a GPU sweep skips a class count that cannot fit instead of running out of
memory (a rough upper estimate; an out-of-memory error is still caught)."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from ... import margins as M
from ...functional import margin_cross_entropy
from ...reference import unchecked_margin_cross_entropy
from ..common import MARGINS


@dataclass(frozen=True)
class Case:
    batch: int
    dim: int
    classes: int
    dtype: str  # "float32", "bfloat16", "float16"
    margin: str  # a key of MARGINS

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def flops(self) -> float:
        """Algorithmic flops of forward + backward: 6·B·D·C (one scale for every design)."""
        return 6.0 * self.batch * self.dim * self.classes


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Impl:
    name = ""
    description = ""
    package: Optional[str] = None  # the module that must be importable

    def unavailable(self) -> Optional[str]:
        if self.package and importlib.util.find_spec(self.package) is None:
            return f"{self.package} not installed"
        return None

    def unsupported(self, case: Case, device: torch.device) -> Optional[str]:
        return None

    def make(self, case: Case, device: torch.device) -> LossFn:
        raise NotImplementedError

    # Peak bytes above inputs and gradients ≈ logits·B·C·e + weights·C·D·e + fixed, e the element
    # size: upper estimates, from the design (how many [B, C] and [C, D] temporaries it keeps).
    logits, weights, fixed = 0.0, 0.0, 64 * 2**20

    def extra_bytes(self, case: Case) -> int:
        e = torch.empty((), dtype=case.torch_dtype).element_size()
        return int(
            self.logits * case.batch * case.classes * e + self.weights * case.classes * case.dim * e + self.fixed
        )


class Marginops(Impl):
    name, description = "marginops", "marginops (backend auto: tiled on the CPU, chunked on CUDA)"
    fixed = 96 * 2**20  # the chunked backend's 64 MiB workspace and small per-row buffers

    def make(self, case, device):
        margin = MARGINS[case.margin]()
        return lambda x, W, y: margin_cross_entropy(x, W, y, margin)


class _CudaBackend(Impl):
    backend = ""
    fixed = 96 * 2**20

    def unsupported(self, case, device):
        return None if device.type == "cuda" else "CUDA only (on the CPU, `marginops` is marginops)"

    def make(self, case, device):
        margin = MARGINS[case.margin]()
        backend = self.backend
        return lambda x, W, y: margin_cross_entropy(x, W, y, margin, backend=backend)


class Chunked(_CudaBackend):
    name, description, backend = "chunked", 'marginops backend="chunked" (cuBLAS GEMMs over class chunks)', "chunked"


class FusedTiles(_CudaBackend):
    name, description, backend = "tiles", 'marginops backend="tiles" (one-kernel tile path)', "tiles"


class Reference(Impl):
    name, description = "reference", "eager marginops.reference"
    logits, weights = 5.0, 3.0  # logits, scaled, index_put copy, log-softmax, their gradients; ŵ and its gradients

    def make(self, case, device):
        margin = MARGINS[case.margin]()
        return lambda x, W, y: unchecked_margin_cross_entropy(x, W, y, margin)


class Compiled(Impl):
    name, description = "compiled", "torch.compile(reference)"
    logits, weights = 4.0, 3.0
    _cache: Dict[str, Callable] = {}

    def make(self, case, device):
        margin = MARGINS[case.margin]()
        if case.margin not in self._cache:  # one compile per margin; shapes are dynamic
            self._cache[case.margin] = torch.compile(
                lambda x, W, y, margin=margin: unchecked_margin_cross_entropy(x, W, y, margin), dynamic=True
            )
        return self._cache[case.margin]


class PytorchMetricLearning(Impl):
    name, description, package = "pml", "pytorch-metric-learning ArcFaceLoss/CosFaceLoss", "pytorch_metric_learning"
    logits, weights = 8.0, 3.0

    def unsupported(self, case, device):
        return None if case.margin in ("arcface", "cosface") else "margins only (ArcFace, CosFace)"

    def make(self, case, device):
        from pytorch_metric_learning import losses

        spec = MARGINS[case.margin]()
        if case.margin == "arcface":  # its margin is in degrees
            loss = losses.ArcFaceLoss(case.classes, case.dim, margin=math.degrees(spec.m), scale=spec.s)
        else:
            loss = losses.CosFaceLoss(case.classes, case.dim, margin=spec.m, scale=spec.s)
        loss = loss.to(device)
        del loss.W  # its own [D, C] parameter: replaced by a view of the shared W below

        def fn(x, W, y):
            # pytorch-metric-learning 2.x keeps its weight as [D, C]; a transposed view of W keeps
            # the gradient flowing to W.
            loss.W = W.t()
            return loss(x, y)

        return fn


class _SoftmaxOnlyCuda(Impl):
    def unsupported(self, case, device):
        if device.type != "cuda":
            return "CUDA only"
        if case.margin != "softmax":
            return "plain softmax only"
        if case.dtype == "float32":
            return "bfloat16/float16 only"
        return None


class CutCrossEntropy(_SoftmaxOnlyCuda):
    name, description, package = "cce", "Cut Cross-Entropy linear_cross_entropy", "cut_cross_entropy"
    weights = 2.0  # dW accumulated in float32

    def make(self, case, device):
        from cut_cross_entropy import linear_cross_entropy

        return lambda x, W, y: linear_cross_entropy(x, W, y)


class Liger(_SoftmaxOnlyCuda):
    name, description, package = "liger", "Liger fused linear cross-entropy", "liger_kernel"
    logits, weights = 2.0, 2.0  # float32 logits of a chunk of rows; dW computed in the forward

    def make(self, case, device):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss()
        return lambda x, W, y: loss(W, x, y)


def torch_lce_missing() -> Optional[str]:
    """Why torch's linear_cross_entropy cannot run here, or None."""
    if not hasattr(torch.nn.functional, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch.nn.functional.linear_cross_entropy needs torch >= 2.13 (this is torch {torch.__version__})"
    return None


class TorchLinearCrossEntropy(Impl):
    name = "torch-lce"
    description = "torch F.linear_cross_entropy, reference path (options=None); NormFace: s·x̂ and Ŵ made outside it"
    chunked = False
    logits, weights = 3.0, 1.0  # logits, their log-softmax and gradient; dW's product

    def unavailable(self):
        return torch_lce_missing()

    def unsupported(self, case, device):
        return None if case.margin in ("softmax", "normface") else "plain softmax and NormFace only (no margin)"

    def extra_bytes(self, case: Case) -> int:
        e = torch.empty((), dtype=case.torch_dtype).element_size()
        normalized = 2 * case.classes * case.dim * e if case.margin == "normface" else 0  # Ŵ and its gradient
        return super().extra_bytes(case) + normalized

    def make(self, case, device):
        F = torch.nn.functional
        options = torch.nn.LinearCrossEntropyOptions() if self.chunked else None
        if case.margin == "softmax":
            return lambda x, W, y: F.linear_cross_entropy(x, W, y, options=options)
        s = float(MARGINS["normface"]().s)

        def normface(x, W, y):
            # NormFace's logits s·cos θ = (s·x̂)·Ŵᵀ: the normalized copies as the eager reference makes them
            x_hat = x / x.norm(dim=1, keepdim=True).clamp_min(M.NORM_EPS)
            w_hat = W / W.norm(dim=1, keepdim=True).clamp_min(M.NORM_EPS)
            return F.linear_cross_entropy(s * x_hat, w_hat, y, options=options)

        return normface


class TorchLinearCrossEntropyChunked(TorchLinearCrossEntropy):
    name = "torch-lce-chunked"
    description = (
        "torch F.linear_cross_entropy, chunked path (options=LinearCrossEntropyOptions()); "
        "NormFace: s·x̂ and Ŵ made outside it"
    )
    chunked = True
    logits, weights = 1.0, 2.0  # a chunk of rows' logits (at most the whole batch's); dW accumulated


IMPLS: Dict[str, Impl] = {
    i.name: i
    for i in (
        Marginops(),
        Chunked(),
        FusedTiles(),
        Reference(),
        Compiled(),
        PytorchMetricLearning(),
        CutCrossEntropy(),
        Liger(),
        TorchLinearCrossEntropy(),
        TorchLinearCrossEntropyChunked(),
    )
}

# Old implementation names the command line still accepts, with a notice on stderr: old -> new.
ALIASES: Dict[str, str] = {"fused": "marginops", "fused-tiles": "tiles"}
