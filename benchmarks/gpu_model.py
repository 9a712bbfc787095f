"""A roofline model of one training step (forward + backward) of marginops' chunked CUDA backend
(docs/design.md, "CUDA chunked"): model, not measured.

    python3 benchmarks/gpu_model.py [--B 1024] [--D 512] [--C 1000000] [--dtype bf16]
                                    [--margin arcface] [--workspace 64] [--gpu H100,H200,A100]
                                    [--sass benchmarks/results/sass-cost.json] [--json PATH]

What it does. The step is the launch sequence of csrc/cuda/chunked/chunked_launch.h (forward:
row_prep · per chunk chunk_weights, GEMM u = x·Wcᵀ, chunk_softmax · merge; backward: row_prep,
target_grad, row_scale · sort of the row keys · chunk_scaled_x · per chunk chunk_weights, GEMM u,
chunk_grad, GEMM dx_acc += G·Wc, GEMM dw_acc = Gᵀ·xs, chunk_dw · chunk_dx_finalize), with the
chunk size Cc of plan_chunks() (csrc/cuda/chunked/chunk_kernels.cu) reimplemented below in Python — the
CPU build of the extension has no plan_chunks; tests/test_gpu_model.py checks this copy against
the C++ one compiled for the CPU emulation (tests/cuda_emu). Every launch gets

    time = max(HBM bytes / (HBM_EFFICIENCY · peak bandwidth),
               GEMM flops / (GEMM_EFFICIENCY · dense peak),
               thread instructions / issue rate,  MUFU ex2 / MUFU rate) + launch gap

and a kernel's time in the table is the sum over its launches. The step is the sum of the kernels,
plus a "host issue" row when the host cannot enqueue the launches as fast as the GPU runs them.

Instructions. chunk_softmax and chunk_grad: the per-logit SASS count of the variant the step runs
(benchmarks/results/sass-cost.json, written by scripts/sass-cost: sm_90a for H100/H200, sm_80 for
A100) × the entries of u, plus ROW_SETUP_INSTR per thread of each (row, segment) warp. The other
kernels are not in sass-cost: they get the per-element estimates of EST_INSTR (they are bound by
memory at any plausible count). "pre-specialization" replaces the two counts with the issue's
figures for main before the specialization (chunk_softmax ~139, chunk_grad ~264 per logit).

Bytes (HBM only; what stays in L2). The L2 is modelled as an LRU cache of whole buffers (x, the
chunk's weight rows W[t], u, G, dw_acc — written over u's buffer, so the same buffer —, xs,
dx_acc, the slots ...) of L2_EFFECTIVE_FRACTION of the L2's size (one half: Hopper's and Ampere's
L2 is two partitions and data that every SM reads is held in both, so about 24 MiB of an
H100's 50 MB holds a chunk's u). A kernel's read of a buffer costs no HBM traffic when the
buffer was resident when the kernel started, else its bytes; a write costs nothing when issued
and its bytes when the dirty buffer is evicted (charged to the kernel that wrote it; at the end
of the step everything dirty is written back). A buffer larger than the cache streams through it
and leaves nothing behind (LRU over a scan longer than the cache: no reuse). So when a chunk's u
(and in the backward G) fits, the GEMM's write of u and the per-logit kernel's read of it never
reach HBM; at the default 64 MiB workspace they do not fit (u is 63 MiB in the forward, 40 MiB
in the backward at B = 1024), and every chunk writes u to HBM and reads it back.

Launches. LAUNCH_GAP_S per kernel on the GPU (the gap between dependent kernels on one stream,
with the grid's ramp-up and tail), LAUNCH_GAP_GRAPH_S when the step is a CUDA graph. The host
must also issue each launch (HOST_KERNEL_S for ours, HOST_GEMM_S for a cuBLAS call through torch,
nothing per launch in a graph); when the host's total exceeds the GPU's the difference is a row.

The eager step is modelled the same way (same L2 model, same rates): the ops of
marginops.reference.unchecked_margin_cross_entropy for ArcFace — what `marginops bench` times as
"reference" — listed in eager_ops() with the bytes each moves. Its logits are in the input dtype
(bfloat16 logits from F.linear on bfloat16 x and W, as the reference computes them); --eager-logits
fp32 models an insightface-style head (float32 logits, a cast of G back to 16 bits for the two
backward GEMMs) instead, which moves about twice the [B, C] bytes.

Named constants (peaks, with their public source) and assumptions are below; gpu-check's profile
stage (benchmarks/chunked_profile.py) prints the measured per-kernel device times beside these
predictions, which is how the assumptions get calibrated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SASS = os.path.join(ROOT, "benchmarks", "results", "sass-cost.json")
MiB = 2**20


# ---- the GPUs: peak figures from the vendor's public documents ----------------------------------


@dataclass(frozen=True)
class GPU:
    key: str
    name: str
    hbm_tbps: float  # peak HBM bandwidth, TB/s (10^12 B/s)
    bf16_tflops: float  # dense bf16/fp16 tensor-core peak, TFLOP/s (no sparsity)
    tf32_tflops: float  # dense TF32 tensor-core peak, TFLOP/s (float32 operands)
    sms: int
    boost_ghz: float  # the clock of the datasheet's tensor-core peak
    sustained_ghz: float  # assumed clock under this load (instruction and MUFU rates)
    l2_mb: float  # L2 size, 10^6 bytes
    arch: str  # which sass-cost.json counts apply

    @property
    def issue_rate(self) -> float:
        """Thread instructions per second: 4 schedulers per SM, one warp instruction (32 threads)
        each per clock (NVIDIA's Ampere and Hopper architecture whitepapers: four processing
        blocks per SM, each with a warp scheduler dispatching one warp instruction per clock)."""
        return self.sms * SCHEDULERS_PER_SM * 32 * self.sustained_ghz * 1e9

    @property
    def mufu_rate(self) -> float:
        """exp2 results per second: 16 per clock per SM (CUDA C++ Programming Guide,
        "Arithmetic Instructions" throughput table, compute capability 8.0 and 9.0)."""
        return self.sms * MUFU_PER_SM_CLOCK * self.sustained_ghz * 1e9


SCHEDULERS_PER_SM = 4
MUFU_PER_SM_CLOCK = 16

GPUS: Dict[str, GPU] = {
    # NVIDIA H100 Tensor Core GPU datasheet (H100 SXM: HBM3 3.35 TB/s, BF16 1,979 TFLOP/s with
    # sparsity = 989.4 dense, TF32 989 with sparsity = 494.7 dense) and the NVIDIA H100 Tensor
    # Core GPU Architecture whitepaper (132 SMs in the SXM5 part, 50 MB L2). 989.4 TFLOP/s =
    # 132 SMs × 1024 dense bf16 FMA/clock × 2 × 1.83 GHz; the maximum boost is 1.98 GHz and the
    # base 1.59 GHz; under a sustained 700 W load ~1.7 GHz (the design's figures use 1.7).
    "H100": GPU("H100", "H100 SXM5 80GB", 3.35, 989.4, 494.7, 132, 1.83, 1.70, 50.0, "sm_90a"),
    # NVIDIA H200 Tensor Core GPU datasheet (H200 SXM: HBM3e 4.8 TB/s, 141 GB; BF16 1,979 TFLOP/s
    # with sparsity = 989 dense): the same GH100 die as the H100 SXM (132 SMs, 50 MB L2, clocks).
    "H200": GPU("H200", "H200 SXM 141GB", 4.8, 989.4, 494.7, 132, 1.83, 1.70, 50.0, "sm_90a"),
    # NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM: HBM2e 2,039 GB/s; BF16 312 TFLOP/s
    # dense, TF32 156 dense) and the NVIDIA A100 Tensor Core GPU Architecture whitepaper (108 SMs,
    # 40 MB L2, boost 1410 MHz: 108 × 1024 FMA × 2 × 1.41 GHz = 312 TFLOP/s). Assumed to hold its
    # boost clock under this load.
    "A100": GPU("A100", "A100 SXM4 80GB", 2.039, 312.0, 156.0, 108, 1.41, 1.41, 40.0, "sm_80"),
}

# ---- assumptions (what a GPU run calibrates: gpu-check's profile stage) -------------------------

HBM_EFFICIENCY = 0.90  # achievable share of peak HBM bandwidth (ANCHORS.md: ~3.0 of 3.35 TB/s measured)
GEMM_EFFICIENCY = 0.75  # achievable share of dense tensor-core peak for the step's GEMMs: ANCHORS.md
#                               measures ~800 of 989 TFLOP/s (0.81) on large GEMMs; these have K = 512
#                               (u, dw_acc) or a [B, D] output (dx), and a float32 output, so a bit less
#                               (the design's estimate, the four cuBLAS GEMMs at about 6 ms at C = 1M: 0.72)
L2_EFFECTIVE_FRACTION = 0.5  # the share of L2 that holds a chunk's buffers (see the module docstring)
LAUNCH_GAP_S = 2.0e-6  # per kernel on one stream: the gap between dependent kernels + grid ramp/tail
LAUNCH_GAP_GRAPH_S = 1.0e-6  # the same inside a CUDA graph
HOST_KERNEL_S = 3.0e-6  # host time to issue one of our kernels (cudaLaunchKernel + dispatch)
HOST_GEMM_S = 6.0e-6  # host time to issue one cuBLAS GEMM through torch's handle
HOST_ATEN_S = 8.0e-6  # host time of one ATen op (the sort of the row keys; the eager step's ops)
L2_HIT_GOAL = 0.95  # "L2-resident chunks": at least this share of u's reads served by the L2
ROW_SETUP_INSTR = 64  # instructions per thread of a (row, segment) warp outside the per-logit loop
SORT_LAUNCHES = 2  # kernels of torch's sort of B int64 keys (not in plan's launch count)
# Instructions per element of the kernels sass-cost does not count (estimates, not from SASS;
# each is far below its memory-bound threshold of ~35 per 4-byte element):
EST_INSTR = {
    "chunk_weights": 4.0,  # per weight element: 16-byte loads, converts, FMAs, warp reduction
    "chunk_weights_copy": 3.0,  # per weight element copied (gather, conversion, prescale)
    "chunk_dw": 20.0,  # per dW element: scalar loads of dw_acc and W, projection dot and write loops
    "row": 16.0,  # per [B, D] element: row_prep, chunk_scaled_x, chunk_dx_finalize
}
# The kernels before the specialization (about 139 and about 264 instructions per logit, sm_90a,
# bf16, K = 1, ArcFace); ex2 per logit taken as 1 (accurate expf: one MUFU.EX2 and its range
# reduction, the latter in the instruction count).
PRE_SPECIALIZATION = {"chunk_softmax": 139.0, "chunk_grad": 264.0}

DTYPES = {"bf16": ("bf16", 2), "fp16": ("half", 2), "fp32": ("float", 4)}
ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
# margin → (sub-centers K, weights normalized, CurricularFace hard negatives, features normalized,
# a margin on the target logit)
MARGINS = {
    "arcface": (1, True, False, True, True),
    "cosface": (1, True, False, True, True),
    "normface": (1, True, False, True, False),
    "combined": (1, True, False, True, True),
    "sphereface": (1, True, False, False, True),
    "softmax": (1, False, False, False, False),
    "l2softmax": (1, False, False, True, False),
    "subcenter": (3, True, False, True, True),
    "curricular": (1, True, True, True, True),
}

# ---- plan_chunks, reimplemented (csrc/cuda/chunked/chunk_kernels.cu) --------------------------------

K_MAX_SEGMENTS = 16
K_SEGMENT_MIN = 256
INT32_MAX = 2**31 - 1
# sizeof(RowInfo<float>), sizeof(RowInfo<double>) (csrc/cuda/rows.cuh with margin_math.h's Side,
# Target, TargetGrad): B of them come off the budget before the chunks; a few bytes more or less
# move Cc by at most one step of 64 classes (tests/test_gpu_model.py compares with the C++ plan)
ROWINFO_BYTES = {4: 152, 8: 280}


def align256(n: int) -> int:
    return (n + 255) // 256 * 256


def chunk_ldu(classes: int, K: int) -> int:
    return (classes * K + 7) // 8 * 8


def plan_chunks(
    B: int,
    D: int,
    C: int,
    K: int,
    dtype: str,
    normalize_w: bool,
    backward: bool,
    need_db: bool = False,
    budget: int = 64 * MiB,
    class_index: bool = False,
    w_dtype: Optional[str] = None,
) -> dict:
    """plan_chunks() of csrc/cuda/chunked/chunk_kernels.cu, line for line, for x in `dtype` and W in
    `w_dtype` (default the same); float64 is not modelled (acc float32)."""
    w_dtype = w_dtype or dtype
    op = dtype  # chunk_operand_dtype: x's (float64 x with 16-bit W aside)
    acc, ope = 4, DTYPES[op][1]
    pl = dict(ldx=(D + 8) // 8 * 8 if backward and need_db else D, prescale_w=op == "fp16" and normalize_w)
    pl["copy_w"] = class_index or op != w_dtype or pl["prescale_w"]
    ldx = pl["ldx"]
    rows = B * ROWINFO_BYTES[acc]
    slots = 0 if backward else K_MAX_SEGMENTS * B * 4 * acc
    slot_best = 0 if backward else K_MAX_SEGMENTS * B * 8
    dx_acc = B * D * acc if backward else 0
    xs = B * ldx * ope if backward else 0
    row_keys = B * 8 if backward else 0
    scalar = acc
    pad = 7 * B * (acc + (ope if backward else 0))
    fixed = (
        pad
        + align256(rows)
        + align256(slots)
        + align256(slot_best)
        + align256(dx_acc)
        + align256(xs)
        + align256(row_keys)
        + align256(scalar)
        + (2 * B * 8 if backward else 0)
        + 4 * 256
    )
    per_class = K * (
        acc * (max(B, ldx) if backward else B)
        + (ope * B if backward else 0)
        + (ope * D if pl["copy_w"] else 0)
        + (acc if normalize_w else 0)
    )
    cc = (budget - fixed) // max(per_class, 1) if budget > fixed else 0
    if cc >= 64:
        cc -= cc % 64
    cc = min(max(cc, 1), C)
    max_cc = (INT32_MAX // max(B, 1) - 8) // K
    if cc > max_cc:
        cc = max_cc - max_cc % 64 if max_cc >= 64 else max_cc
    chunks = (C + cc - 1) // cc if cc > 0 else 0
    seg = (cc + K_SEGMENT_MIN - 1) // K_SEGMENT_MIN
    n, ldu = cc * K, chunk_ldu(cc, K)
    logits = acc * (max(B * ldu, n * ldx) if backward else B * ldu)
    grad = ldu * B * ope if backward else 0
    w_copy = n * D * ope if pl["copy_w"] else 0
    col_norm = n * acc if normalize_w else 0
    col_inv = n * acc if normalize_w and not pl["prescale_w"] else 0
    total = sum(
        align256(v)
        for v in (rows, slots, slot_best, logits, grad, w_copy, col_norm, col_inv, dx_acc, xs, row_keys, scalar)
    )
    pl.update(
        classes=cc,
        chunks=chunks,
        segments=max(1, min(seg, K_MAX_SEGMENTS)),
        logits=logits,
        grad=grad,
        w_copy=w_copy,
        total=total,
    )
    return pl


def chunk_launches(plan: dict, normalize_w: bool, backward: bool, dx: bool = True, dw: bool = True) -> int:
    """chunk_launches() of chunk_kernels.cu (GEMMs included; the sort not)."""
    weights = 1 if plan["copy_w"] or normalize_w else 0
    if not backward:
        return 2 + plan["chunks"] * (weights + 2) + (1 if plan["chunks"] == 0 else 0)
    return (
        3 + (1 if dw else 0) + plan["chunks"] * (weights + 2 + (1 if dx else 0) + (2 if dw else 0)) + (1 if dx else 0)
    )


# ---- per-logit instruction counts -----------------------------------------------------------------


def load_counts(path: str) -> List[dict]:
    with open(path) as f:
        return json.load(f)["kernels"]


def per_logit(
    counts: List[dict], kernel: str, arch: str, dtype: str, K: int, normalize_w: bool, bias: bool, hard: bool
) -> Tuple[float, float]:
    """(instructions, ex2) per logit of the variant a step runs, from sass-cost.json."""
    op = DTYPES[dtype][0] if kernel == "chunk_grad" else None
    for k in counts:
        c = k["config"]
        if (
            k["kernel"] == kernel
            and k["arch"] == arch
            and k["acc"] == "float"
            and k["op"] == op
            and c["K"] == K
            and c["normalize_w"] == normalize_w
            and c["bias"] == bias
            and c["hard_negatives"] == hard
        ):
            if k["instr_per_logit"] is None:
                raise ValueError(f"sass-cost has no count for {k['name']} on {arch}")
            return float(k["instr_per_logit"]), float(k.get("ex2_per_logit") or 0.0)
    raise ValueError(
        f"sass-cost.json has no {kernel} {arch} op={op} K={K} normalize_w={normalize_w} bias={bias} hard={hard}"
    )


# ---- the launch sequence and the L2 -------------------------------------------------------------


@dataclass
class Launch:
    pass_: str  # "fwd" or "bwd"
    kernel: str  # the row it adds to ("gemm_u", "chunk_softmax", ...)
    reads: List[Tuple[str, int, int]] = field(default_factory=list)  # (buffer, bytes, buffer size)
    writes: List[Tuple[str, int, int]] = field(default_factory=list)
    flops: float = 0.0
    tensor: bool = False  # flops on tensor cores (a GEMM)
    tf32: bool = False  # float32 operands: the TF32 peak
    instr: float = 0.0
    ex2: float = 0.0
    host_s: float = HOST_KERNEL_S
    hbm: float = 0.0  # filled by the L2 model
    misses: Dict[str, float] = field(default_factory=dict)  # HBM bytes read, by buffer


class L2:
    """An LRU cache of buffers, evicted in part (see the module docstring): each buffer has its
    resident and its dirty bytes; eviction takes bytes from the least recently used buffers first
    and writes their dirty share back to HBM, charged to the launch that last wrote them."""

    def __init__(self, capacity: float):
        self.capacity = capacity
        self.lru: "OrderedDict[str, dict]" = OrderedDict()

    def _touch(self, name: str, size: int) -> dict:
        e = self.lru.pop(name, None) or dict(size=size, res=0.0, dirty=0.0, writer=None)
        e["size"] = max(e["size"], size)
        self.lru[name] = e
        return e

    def _evict(self, group: Dict[str, float]):
        """Evict the least recently used bytes down to the capacity: the buffers before this
        launch first; if the launch's own buffers (`group`, bytes each touched) exceed the cache,
        they keep shares of it in proportion to those bytes (they were touched together)."""
        used = sum(e["res"] for e in self.lru.values())
        for name in list(self.lru):
            if used <= self.capacity:
                return
            if name in group:
                break
            used -= self._drop(name, used - self.capacity)
        if used > self.capacity:
            total = sum(group.values())
            for name, nbytes in group.items():
                e = self.lru.get(name)
                if e is not None:
                    self._drop(name, max(0.0, e["res"] - self.capacity * nbytes / total))

    def _drop(self, name: str, take: float) -> float:
        e = self.lru[name]
        take = min(take, e["res"])
        if take > 0 and e["dirty"] > 0 and e["writer"] is not None:
            wb = take * e["dirty"] / e["res"]
            e["writer"].hbm += wb
            e["dirty"] -= wb
        e["res"] -= take
        if e["res"] <= 1e-9:
            del self.lru[name]
        return take

    def run(self, launch: "Launch"):
        for name, nbytes, _ in launch.reads:  # what is resident when the kernel starts
            e = self.lru.get(name)
            hit = 0.0 if e is None or nbytes > self.capacity else min(1.0, e["res"] / nbytes)
            if e is not None and nbytes > self.capacity:
                self._drop(name, e["res"])  # a scan longer than the cache: its resident part is evicted, no hits
            miss = nbytes * (1.0 - hit)
            launch.hbm += miss
            launch.misses[name] = launch.misses.get(name, 0.0) + miss
        group: Dict[str, float] = {}
        for name, nbytes, size in launch.reads:
            e = self._touch(name, size)
            e["res"] = min(e["size"], max(e["res"], nbytes))
            group[name] = group.get(name, 0.0) + min(nbytes, e["size"])
        for name, nbytes, size in launch.writes:
            # a resident dirty buffer overwritten in L2 never reaches HBM with its old contents
            e = self._touch(name, size)
            e["res"] = min(e["size"], max(e["res"], nbytes))
            e["dirty"] = min(e["res"], max(e["dirty"], nbytes))
            e["writer"] = launch
            group[name] = group.get(name, 0.0) + min(nbytes, e["size"])
        self._evict(group)

    def flush(self):
        for e in self.lru.values():
            if e["dirty"] > 0 and e["writer"] is not None:
                e["writer"].hbm += e["dirty"]
        self.lru.clear()


@dataclass
class Shape:
    B: int
    D: int
    C: int
    dtype: str = "bf16"
    margin: str = "arcface"

    @property
    def K(self) -> int:
        return MARGINS[self.margin][0]

    @property
    def normalize_w(self) -> bool:
        return MARGINS[self.margin][1]

    @property
    def hard(self) -> bool:
        return MARGINS[self.margin][2]

    @property
    def normalize_x(self) -> bool:
        return MARGINS[self.margin][3]

    @property
    def has_margin(self) -> bool:
        return MARGINS[self.margin][4]

    @property
    def e(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def flops(self) -> float:
        return 6.0 * self.B * self.D * self.C


def chunked_launches(s: Shape, fplan: dict, bplan: dict, counts: Dict[str, Tuple[float, float]]) -> List[Launch]:
    """The launches of one forward + backward of the chunked backend, in stream order."""
    B, D, C, K, e = s.B, s.D, s.C, s.K, s.e
    acc, ope = 4, e
    L: List[Launch] = []
    xb, rows = B * D * e, B * ROWINFO_BYTES[acc]
    sm_i, sm_x = counts["chunk_softmax"]
    gr_i, gr_x = counts["chunk_grad"]

    def row_kernel(pass_, name, reads, writes, elements):
        L.append(Launch(pass_, name, reads, writes, instr=EST_INSTR["row"] * elements))

    def weights(pass_, t, plan, n):
        wb = n * K * D * e
        l = Launch(
            pass_,
            "chunk_weights",
            [(f"W[{t}]", wb, wb)],
            [("col", 2 * n * K * acc, 2 * plan["classes"] * K * acc)],
            instr=EST_INSTR["chunk_weights"] * n * K * D,
        )
        if plan["copy_w"]:
            cb = n * K * D * ope
            l.writes.append(("wcopy", cb, plan["w_copy"]))
            l.instr += EST_INSTR["chunk_weights_copy"] * n * K * D
        if plan["copy_w"] or s.normalize_w:
            L.append(l)

    def wc(t, plan, n):  # the GEMMs' weight operand: the copy or a view of W
        return (
            ("wcopy", n * K * D * ope, plan["w_copy"]) if plan["copy_w"] else (f"W[{t}]", n * K * D * e, n * K * D * e)
        )

    def gemm_u(pass_, t, plan, n):
        ldu = chunk_ldu(n, K)
        L.append(
            Launch(
                pass_,
                "gemm_u",
                [("x", xb, xb), wc(t, plan, n)],
                [("u", 4 * B * ldu, plan["logits"])],
                flops=2.0 * B * D * n * K,
                tensor=True,
                host_s=HOST_GEMM_S,
            )
        )

    def per_logit_kernel(pass_, name, plan, n, instr, ex2, reads, writes):
        warps = B * plan["segments"]
        L.append(
            Launch(
                pass_, name, reads, writes, instr=instr * B * n * K + ROW_SETUP_INSTR * 32 * warps, ex2=ex2 * B * n * K
            )
        )

    # forward
    slots = K_MAX_SEGMENTS * B * (4 * acc + 8)
    row_kernel("fwd", "row_prep", [("x", xb, xb), ("W_targets", xb, xb)], [("rows", rows, rows)], B * D)
    for t in range(fplan["chunks"]):
        n = min(fplan["classes"], C - t * fplan["classes"])
        ldu = chunk_ldu(n, K)
        weights("fwd", t, fplan, n)
        gemm_u("fwd", t, fplan, n)
        per_logit_kernel(
            "fwd",
            "chunk_softmax",
            fplan,
            n,
            sm_i,
            sm_x,
            [
                ("u", 4 * B * ldu, fplan["logits"]),
                ("col", acc * n * K, 2 * fplan["classes"] * K * acc),
                ("rows", rows, rows),
                ("slots", slots, slots),
            ],
            [("slots", slots, slots)],
        )
    row_kernel("fwd", "merge", [("slots", slots, slots), ("rows", rows, rows)], [("stats", 5 * B * 8, 5 * B * 8)], B)

    # backward
    ldx = bplan["ldx"]
    xsb, dxacc = B * ldx * ope, B * D * acc
    row_kernel("bwd", "row_prep", [("x", xb, xb), ("W_targets", xb, xb)], [("rows", rows, rows)], B * D)
    row_kernel("bwd", "row_prep", [("rows", rows, rows)], [("rows", rows, rows)], B)  # target_grad
    row_kernel("bwd", "row_prep", [("rows", rows, rows)], [("keys", 8 * B, 8 * B)], B)  # row_scale
    for _ in range(SORT_LAUNCHES):
        L.append(
            Launch(
                "bwd",
                "sort",
                [("keys", 8 * B, 8 * B)],
                [("sorted", 16 * B, 16 * B)],
                instr=64.0 * B,
                host_s=HOST_ATEN_S / SORT_LAUNCHES,
            )
        )
    row_kernel("bwd", "chunk_scaled_x", [("x", xb, xb), ("rows", rows, rows)], [("xs", xsb, xsb)], B * ldx)
    for t in range(bplan["chunks"]):
        n = min(bplan["classes"], C - t * bplan["classes"])
        nk, ldu = n * K, chunk_ldu(n, K)
        weights("bwd", t, bplan, n)
        gemm_u("bwd", t, bplan, n)
        per_logit_kernel(
            "bwd",
            "chunk_grad",
            bplan,
            n,
            gr_i,
            gr_x,
            [
                ("u", 4 * B * ldu, bplan["logits"]),
                ("col", acc * nk, 2 * bplan["classes"] * K * acc),
                ("rows", rows, rows),
            ],
            [("G", ope * B * ldu, bplan["grad"])],
        )
        w = wc(t, bplan, n)
        L.append(
            Launch(
                "bwd",
                "gemm_dx",
                [("G", ope * B * ldu, bplan["grad"]), w, ("dx_acc", dxacc, dxacc)],
                [("dx_acc", dxacc, dxacc)],
                flops=2.0 * B * D * nk,
                tensor=True,
                host_s=HOST_GEMM_S,
            )
        )
        L.append(
            Launch(
                "bwd",
                "gemm_dw",
                [("G", ope * B * ldu, bplan["grad"]), ("xs", xsb, xsb)],
                [("u", acc * nk * ldx, bplan["logits"])],
                flops=2.0 * B * ldx * nk,
                tensor=True,
                host_s=HOST_GEMM_S,
            )
        )
        wb = nk * D * e
        L.append(
            Launch(
                "bwd",
                "chunk_dw",
                [
                    ("u", acc * nk * ldx, bplan["logits"]),
                    (f"W[{t}]", wb, wb),
                    ("col", acc * nk, 2 * bplan["classes"] * K * acc),
                    ("rows", rows, rows),
                ],
                [(f"dW[{t}]", wb, wb)],
                instr=EST_INSTR["chunk_dw"] * nk * D,
            )
        )
    row_kernel(
        "bwd",
        "chunk_dx_finalize",
        [("dx_acc", dxacc, dxacc), ("x", xb, xb), ("W_targets", xb, xb), ("rows", rows, rows)],
        [("dx", xb, xb)],
        B * D,
    )
    return L


def eager_ops(s: Shape, logits_bytes: int) -> List[Launch]:
    """The eager step of marginops.reference.unchecked_margin_cross_entropy, op by op as autograd
    runs it on CUDA, for the shape's margin; [B, C] tensors of `logits_bytes` per element, [C, D]
    ones of the dtype's. Counted (ArcFace: every line; other margins skip what the reference skips):
      forward  ‖x‖ and ‖W‖ (read x, W) · x̂ = x/‖x‖, Ŵ = W/‖W‖ (read, write a normalized copy; the
               reference makes both whatever the margin) · GEMM logits = x̂·Ŵᵀ or x·Wᵀ (write
               [B, C·K]) · [K > 1: the max over sub-centers, read [B, C·K], write [B, C] and the
               argmax] · [normalized x: logits·s, read, write] · [CurricularFace: c = logits/s,
               c > τ, the where: 4 reads, 3 writes] · [a margin: the target rows' ψ ([B]-sized, 12
               small launches) and index_put of the targets, out of place: read, write] ·
               log_softmax (read [B, C] three times — max, sum of exp, then the write pass — and
               write once: torch's kernel for rows that do not fit in shared memory) · nll_loss.
      backward nll_loss' gradient (write a zero [B, C], scatter) · log_softmax's (read the gradient
               for its row sums, then it and the output again, write: 3 reads, 1 write) · [a
               margin: index_put's, a copy with the targets zeroed: read, write] · [CurricularFace:
               the where's and the product's: 3 reads, 2 writes] · [normalized x: the scale's:
               read, write] · [K > 1: max's, a zero [B, C·K] and a scatter: write, read] ·
               [float32 logits from 16-bit operands: a cast of G: read, write] · GEMM dx = G·Ŵ
               (read G, Ŵ) · GEMM dŴ = Gᵀ·x̂ (read G, write [C·K, D]) · [normalized W: Ŵ =
               W/‖W‖'s backward, autograd's division and norm backward: 7 reads and 4 writes of
               [C·K, D]] · x̂'s ([B, D]).
    Every [B, C] and [C, D] tensor is far above the L2, so all of it is HBM traffic."""
    B, D, C, K, e = s.B, s.D, s.C, s.K, s.e
    bc, bck, cd, bd = B * C * logits_bytes, B * C * K * logits_bytes, C * K * D * e, B * D * e
    L: List[Launch] = []

    def op(name, pass_, reads, writes, flops=0.0, tensor=False, launches=1):
        for i in range(launches):
            first = i == 0
            L.append(
                Launch(
                    pass_,
                    name,
                    reads if first else [],
                    writes if first else [],
                    flops=flops if first else 0.0,
                    tensor=tensor,
                    host_s=HOST_ATEN_S,
                )
            )

    xin, win = ("xh" if s.normalize_x else "x"), ("Wh" if s.normalize_w else "W")
    op("norms", "fwd", [("x", bd, bd), ("W", cd, cd)], [("norms", 4 * (B + C * K), 4 * (B + C * K))], launches=2)
    op("normalize", "fwd", [("x", bd, bd), ("W", cd, cd)], [("xh", bd, bd), ("Wh", cd, cd)], launches=4)
    op(
        "gemm_logits",
        "fwd",
        [(xin, bd, bd), (win, cd, cd)],
        [("logits", bck, bck)],
        flops=2.0 * B * D * C * K,
        tensor=True,
    )
    cur = "logits"
    if K > 1:
        op("subcenter_max", "fwd", [("logits", bck, bck)], [("best", bc, bc), ("best_sub", B * C * 8, B * C * 8)])
        cur = "best"
    if s.normalize_x:
        op("scale", "fwd", [(cur, bc, bc)], [("scaled", bc, bc)])
        cur = "scaled"
    if s.hard:
        op("curricular", "fwd", [(cur, 4 * bc, bc)], [("hard", 3 * bc, bc)], launches=3)
        cur = "hard"
    if s.has_margin:
        op("margin_rows", "fwd", [("xh", bd, bd), ("Wh_targets", bd, bd)], [("psi", 64 * B, 64 * B)], launches=12)
        op("index_put", "fwd", [(cur, bc, bc)], [("marg", bc, bc)], launches=2)
        cur = "marg"
    op("log_softmax", "fwd", [(cur, 3 * bc, bc)], [("logp", bc, bc)])
    op("nll_loss", "fwd", [("logp", 8 * B, bc)], [("loss", 8, 8)])
    op("nll_backward", "bwd", [], [("glogp", bc, bc)], launches=2)
    op("log_softmax_backward", "bwd", [("glogp", 2 * bc, bc), ("logp", bc, bc)], [("g", bc, bc)])
    if s.has_margin:
        op("index_put_backward", "bwd", [("g", bc, bc)], [("g1", bc, bc)], launches=2)
    if s.hard:
        op("curricular_backward", "bwd", [("g1", 3 * bc, bc)], [("g2", 2 * bc, bc)], launches=3)
    if s.normalize_x:
        op("scale_backward", "bwd", [("g2", bc, bc)], [("g3", bc, bc)])
    if K > 1:
        op(
            "subcenter_max_backward",
            "bwd",
            [("g3", bc, bc), ("best_sub", B * C * 8, B * C * 8)],
            [("G", bck, bck)],
            launches=2,
        )
    g = "G"
    if logits_bytes != e:
        gb = B * C * K * e
        op("cast_G", "bwd", [("G", bck, bck)], [("G16", gb, gb)])
        g = "G16"
    gbytes = B * C * K * e
    op(
        "gemm_dx",
        "bwd",
        [(g, gbytes, gbytes), (win, cd, cd)],
        [("dxh", bd, bd)],
        flops=2.0 * B * D * C * K,
        tensor=True,
    )
    op(
        "gemm_dw",
        "bwd",
        [(g, gbytes, gbytes), (xin, bd, bd)],
        [("dWh", cd, cd)],
        flops=2.0 * B * D * C * K,
        tensor=True,
    )
    if s.normalize_w:
        op(
            "normalize_backward",
            "bwd",
            [("dWh", 2 * cd, cd), ("W", 3 * cd, cd), ("tmp", 2 * cd, cd)],
            [("tmp", 3 * cd, cd), ("dW", cd, cd)],
            launches=8,
        )
    op("normalize_backward", "bwd", [("dxh", bd, bd), ("x", bd, bd)], [("dx", bd, bd)], launches=6)
    return L


# ---- time ------------------------------------------------------------------------------------------


def simulate(launches: List[Launch], gpu: GPU, graph: bool) -> dict:
    """HBM bytes through the L2 model, then each launch's time; rows by (pass, kernel)."""
    for l in launches:
        l.hbm, l.misses = 0.0, {}
    cache = L2(L2_EFFECTIVE_FRACTION * gpu.l2_mb * 1e6)
    for l in launches:
        cache.run(l)
    cache.flush()
    bw = HBM_EFFICIENCY * gpu.hbm_tbps * 1e12
    gap = LAUNCH_GAP_GRAPH_S if graph else LAUNCH_GAP_S
    rows: "OrderedDict[Tuple[str, str], dict]" = OrderedDict()
    gpu_s = host_s = 0.0
    for l in launches:
        rate = GEMM_EFFICIENCY * (gpu.tf32_tflops if l.tf32 else gpu.bf16_tflops) * 1e12 if l.tensor else None
        terms = {
            "memory": l.hbm / bw,
            "flops": l.flops / rate if rate else 0.0,
            "instructions": max(l.instr / gpu.issue_rate, l.ex2 / gpu.mufu_rate),
        }
        busy = max(terms.values())
        r = rows.setdefault(
            (l.pass_, l.kernel),
            dict(
                pass_=l.pass_,
                kernel=l.kernel,
                launches=0,
                hbm_gb=0.0,
                gflop=0.0,
                ginstr=0.0,
                memory_ms=0.0,
                flops_ms=0.0,
                instructions_ms=0.0,
                busy_ms=0.0,
                launch_ms=0.0,
                ms=0.0,
                bound="",
            ),
        )
        r["launches"] += 1
        r["hbm_gb"] += l.hbm / 1e9
        r["gflop"] += l.flops / 1e9
        r["ginstr"] += l.instr / 1e9
        for k, v in terms.items():
            r[k + "_ms"] += 1e3 * v
        r["busy_ms"] += 1e3 * busy
        r["launch_ms"] += 1e3 * gap
        r["ms"] += 1e3 * (busy + gap)
        gpu_s += busy + gap
        host_s += 0.0 if graph else l.host_s
    out = []
    for r in rows.values():
        r["bound"] = max(("memory", "flops", "instructions"), key=lambda k: r[k + "_ms"])
        out.append(r)
    if host_s > gpu_s:  # the GPU waits for the host's launches
        out.append(
            dict(
                pass_="host",
                kernel="host issue (not hidden)",
                launches=0,
                hbm_gb=0.0,
                gflop=0.0,
                ginstr=0.0,
                memory_ms=0.0,
                flops_ms=0.0,
                instructions_ms=0.0,
                busy_ms=0.0,
                launch_ms=0.0,
                ms=1e3 * (host_s - gpu_s),
                bound="host",
            )
        )
    step = sum(r["ms"] for r in out)
    return dict(rows=out, step_ms=step, launches=len(launches), host_ms=1e3 * host_s, gpu_ms=1e3 * gpu_s)


def _mark_tf32(launches: List[Launch], dtype: str) -> List[Launch]:
    for l in launches:
        l.tf32 = dtype == "fp32"
    return launches


def composition(res: dict) -> Dict[str, float]:
    """The step split into the terms that compete: GEMMs, our per-logit kernels (by their bound),
    the other kernels, the launch gaps, the host."""
    comp = defaultdict(float)
    for r in res["rows"]:
        if r["pass_"] == "host":
            comp["host issue"] += r["ms"]
            continue
        comp["launch gaps"] += r["launch_ms"]
        if r["kernel"].startswith("gemm"):
            comp[f"GEMMs ({r['bound']})"] += r["busy_ms"]
        elif r["kernel"] in ("chunk_softmax", "chunk_grad"):
            comp[f"per-logit kernels ({r['bound']})"] += r["busy_ms"]
        else:
            comp[f"other kernels ({r['bound']})"] += r["busy_ms"]
    return dict(sorted(comp.items(), key=lambda kv: -kv[1]))


def model(
    s: Shape, gpu: GPU, counts_src, workspace_mib: float = 64, graph: bool = False, pre_specialization: bool = False
) -> dict:
    """One configuration of the chunked backend on one GPU."""
    budget = int(workspace_mib * MiB)
    fplan = plan_chunks(s.B, s.D, s.C, s.K, s.dtype, s.normalize_w, False, budget=budget)
    bplan = plan_chunks(s.B, s.D, s.C, s.K, s.dtype, s.normalize_w, True, budget=budget)
    if pre_specialization:
        counts = {k: (v, 1.0) for k, v in PRE_SPECIALIZATION.items()}
    else:
        counts = {
            k: per_logit(counts_src, k, gpu.arch, s.dtype, s.K, s.normalize_w, False, s.hard)
            for k in ("chunk_softmax", "chunk_grad")
        }
    launches = _mark_tf32(chunked_launches(s, fplan, bplan, counts), s.dtype)
    res = simulate(launches, gpu, graph)
    u_reads = [l for l in launches if l.kernel in ("chunk_softmax", "chunk_grad")]
    res.update(
        workspace_mib=workspace_mib,
        graph=graph,
        pre_specialization=pre_specialization,
        counts={k: dict(instr_per_logit=v[0], ex2_per_logit=v[1]) for k, v in counts.items()},
        plan=dict(
            fwd=dict(
                classes=fplan["classes"], chunks=fplan["chunks"], u_mib=4 * s.B * chunk_ldu(fplan["classes"], s.K) / MiB
            ),
            bwd=dict(
                classes=bplan["classes"],
                chunks=bplan["chunks"],
                u_mib=4 * s.B * chunk_ldu(bplan["classes"], s.K) / MiB,
                g_mib=bplan["grad"] / MiB,
            ),
        ),
        plan_launches=chunk_launches(fplan, s.normalize_w, False) + chunk_launches(bplan, s.normalize_w, True),
        u_from_l2={
            p_: 1.0
            - sum(l.misses.get("u", 0.0) for l in u_reads if l.pass_ == p_)
            / max(1.0, sum(b for l in u_reads if l.pass_ == p_ for n, b, _ in l.reads if n == "u"))
            for p_ in ("fwd", "bwd")
        },
        tflops=s.flops / (res["step_ms"] / 1e3) / 1e12,
        composition=composition(res),
    )
    return res


def eager_model(s: Shape, gpu: GPU, logits_bytes: int) -> dict:
    res = simulate(_mark_tf32(eager_ops(s, logits_bytes), s.dtype), gpu, graph=False)
    res.update(logits_bytes=logits_bytes, tflops=s.flops / (res["step_ms"] / 1e3) / 1e12, composition=composition(res))
    return res


def l2_resident_workspace(
    s: Shape, gpu: GPU, counts_src, start_mib: int = 64, hits: float = L2_HIT_GOAL
) -> Optional[int]:
    """The largest workspace (whole MiB, at most start_mib) whose chunks' u the L2 model serves
    from L2 for at least `hits` of its bytes in both passes: "chunks sized to stay in L2"."""
    for mib in range(int(start_mib), 0, -1):
        fplan = plan_chunks(s.B, s.D, s.C, s.K, s.dtype, s.normalize_w, False, budget=mib * MiB)
        bplan = plan_chunks(s.B, s.D, s.C, s.K, s.dtype, s.normalize_w, True, budget=mib * MiB)
        if min(fplan["classes"], bplan["classes"]) < min(64, s.C):
            return None  # the O(B·D) buffers take the budget: no chunk worth the name
        if fplan["logits"] > L2_EFFECTIVE_FRACTION * gpu.l2_mb * 1e6:
            continue
        r = model(s, gpu, counts_src, mib)
        if min(r["u_from_l2"].values()) >= hits:
            return mib
    return None


# ---- output ----------------------------------------------------------------------------------------


def fmt_classes(C: int) -> str:
    for div, suffix in ((10**6, "M"), (10**3, "k")):
        if C >= div and C % (div // 10) == 0:
            v = C / div
            return f"{v:g}{suffix}"
    return str(C)


def summary_line(gpu: GPU, s: Shape, step_ms: float, tflops: float, ratio: float) -> str:
    return (
        f"{gpu.key} B={s.B} D={s.D} C={fmt_classes(s.C)} {s.dtype} {s.margin}: step {step_ms:.1f} ms, "
        f"{tflops:.0f} TFLOP/s, {ratio:.2f}x eager (model)"
    )


def table(res: dict) -> str:
    lines = [
        f"  {'pass':4s} {'kernel':24s} {'launches':>8s} {'HBM GB':>7s} {'GFLOP':>8s} {'Ginstr':>7s} {'mem ms':>7s} "
        f"{'flop ms':>7s} {'instr ms':>8s} {'launch':>7s} {'ms':>7s}  bound"
    ]
    for r in res["rows"]:
        lines.append(
            f"  {r['pass_']:4s} {r['kernel']:24s} {r['launches']:8d} {r['hbm_gb']:7.2f} {r['gflop']:8.0f} "
            f"{r['ginstr']:7.2f} {r['memory_ms']:7.3f} {r['flops_ms']:7.3f} {r['instructions_ms']:8.3f} "
            f"{r['launch_ms']:7.3f} {r['ms']:7.3f}  {r['bound']}"
        )
    lines.append(
        f"  step {res['step_ms']:.2f} ms = the sum of the rows; {res['launches']} launches; host issue "
        f"{res['host_ms']:.2f} ms" + (" (a CUDA graph: none per launch)" if res.get("graph") else "")
    )
    return "\n".join(lines)


CONFIGS = (
    ("current", "current kernels (sass-cost.json)", dict()),
    (
        "pre_specialization",
        "pre-specialization kernels (chunk_softmax 139, chunk_grad 264 instr/logit)",
        dict(pre_specialization=True),
    ),
    ("l2", "next step, part 1: L2-resident chunks, launches as today", dict(l2=True)),
    ("l2_graph", "next step: L2-resident chunks + the chunk loop in a CUDA graph", dict(l2=True, graph=True)),
)


SENSITIVITY = (
    ("GEMM_EFFICIENCY", 0.6),
    ("GEMM_EFFICIENCY", 0.85),
    ("HBM_EFFICIENCY", 0.75),
    ("L2_EFFECTIVE_FRACTION", 0.8),
    ("LAUNCH_GAP_S", 4.0e-6),
)


def sensitivity(s: Shape, gpu: GPU, counts_src, workspace_mib: float, eager_logits_bytes: int) -> List[dict]:
    """The current configuration's step and eager ratio with one assumption changed at a time."""
    out = []
    for name, value in SENSITIVITY:
        old = globals()[name]
        globals()[name] = value
        try:
            r = model(s, gpu, counts_src, workspace_mib)
            e = eager_model(s, gpu, eager_logits_bytes)
        finally:
            globals()[name] = old
        out.append(dict(assumption=name, value=value, step_ms=r["step_ms"], eager_ratio=r["step_ms"] / e["step_ms"]))
    return out


def run(s: Shape, gpus: List[GPU], sass_path: str, workspace_mib: float, eager_logits: str) -> dict:
    counts_src = load_counts(sass_path)
    out = dict(
        model="roofline model of one chunked-backend step, not measured",
        shape=asdict(s),
        workspace_mib=workspace_mib,
        sass=os.path.relpath(sass_path, ROOT) if sass_path.startswith(ROOT) else sass_path,
        assumptions=dict(
            HBM_EFFICIENCY=HBM_EFFICIENCY,
            GEMM_EFFICIENCY=GEMM_EFFICIENCY,
            L2_EFFECTIVE_FRACTION=L2_EFFECTIVE_FRACTION,
            LAUNCH_GAP_S=LAUNCH_GAP_S,
            LAUNCH_GAP_GRAPH_S=LAUNCH_GAP_GRAPH_S,
            HOST_KERNEL_S=HOST_KERNEL_S,
            HOST_GEMM_S=HOST_GEMM_S,
            HOST_ATEN_S=HOST_ATEN_S,
            ROW_SETUP_INSTR=ROW_SETUP_INSTR,
            EST_INSTR=EST_INSTR,
            PRE_SPECIALIZATION=PRE_SPECIALIZATION,
            eager_logits=eager_logits,
        ),
        gpus={},
    )
    lb = 4 if eager_logits == "fp32" else s.e
    for gpu in gpus:
        eager = eager_model(s, gpu, lb)
        g = dict(gpu=asdict(gpu), eager=eager, eager_fp32=eager if lb == 4 else eager_model(s, gpu, 4), configs={})
        l2_mib = None
        for key, _, opts in CONFIGS:
            ws = workspace_mib
            if opts.get("l2"):
                l2_mib = l2_mib if l2_mib is not None else l2_resident_workspace(s, gpu, counts_src, int(workspace_mib))
                if l2_mib is None:
                    g["configs"][key] = None
                    continue
                ws = l2_mib
            r = model(
                s,
                gpu,
                counts_src,
                ws,
                graph=opts.get("graph", False),
                pre_specialization=opts.get("pre_specialization", False),
            )
            r["eager_ratio"] = r["step_ms"] / eager["step_ms"]
            r["summary"] = summary_line(gpu, s, r["step_ms"], r["tflops"], r["eager_ratio"])
            g["configs"][key] = r
        if gpu is gpus[0]:  # the first GPU only (the issue's target, by default): 10 more steps to model
            g["sensitivity"] = sensitivity(s, gpu, counts_src, workspace_mib, lb)
        out["gpus"][gpu.key] = g
    return out


def report(out: dict, s: Shape) -> str:
    p = [
        f"gpu_model: model, not measured. B={s.B} D={s.D} C={s.C} {s.dtype} {s.margin}, forward + backward; "
        f"per-logit instruction counts from {out['sass']}.",
        "Assumptions: "
        + ", ".join(f"{k} {v}" for k, v in out["assumptions"].items() if k not in ("EST_INSTR", "PRE_SPECIALIZATION")),
        "",
    ]
    for key, g in out["gpus"].items():
        gpu = GPUS[key]
        p.append(
            f"=== {gpu.name}: HBM {gpu.hbm_tbps} TB/s, bf16 dense {gpu.bf16_tflops} TFLOP/s, {gpu.sms} SMs at "
            f"{gpu.sustained_ghz} GHz ({gpu.issue_rate / 1e12:.1f}e12 thread instr/s), L2 {gpu.l2_mb:g} MB "
            f"(modelled resident: {L2_EFFECTIVE_FRACTION * gpu.l2_mb:g} MB); counts for {gpu.arch}"
        )
        for ckey, label, _ in CONFIGS:
            r = g["configs"].get(ckey)
            if r is None:
                p.append(f"-- {label}: no workspace keeps a chunk in the modelled L2")
                continue
            f, b = r["plan"]["fwd"], r["plan"]["bwd"]
            p.append(
                f"-- {label}: workspace {r['workspace_mib']:g} MiB; forward Cc={f['classes']} ({f['chunks']} chunks, "
                f"u {f['u_mib']:.1f} MiB), backward Cc={b['classes']} ({b['chunks']} chunks, u {b['u_mib']:.1f} + G "
                f"{b['g_mib']:.1f} MiB); u read from L2: {100 * r['u_from_l2']['fwd']:.0f}% fwd, "
                f"{100 * r['u_from_l2']['bwd']:.0f}% bwd; "
                f"per logit: chunk_softmax {r['counts']['chunk_softmax']['instr_per_logit']:g}, chunk_grad "
                f"{r['counts']['chunk_grad']['instr_per_logit']:g} instructions"
            )
            p.append(table(r))
            p.append("  terms: " + ", ".join(f"{k} {v:.2f} ms" for k, v in r["composition"].items()))
            p.append("  " + r["summary"])
        for ekey, label in (("eager", "eager step (marginops.reference"), ("eager_fp32", "eager step, float32 logits")):
            e = g[ekey]
            if ekey == "eager_fp32" and e is g["eager"]:
                continue
            what = f"{label}, logits {e['logits_bytes']} bytes per element)" if ekey == "eager" else label
            p.append(f"-- {what}: {e['step_ms']:.2f} ms, {e['tflops']:.0f} TFLOP/s; ops (see eager_ops):")
            p.append(table(e))
        if g.get("sensitivity"):
            p.append(
                "-- sensitivity of the current configuration (one assumption changed at a time): "
                + "; ".join(
                    f"{x['assumption']} {x['value']:g}: {x['step_ms']:.1f} ms, {x['eager_ratio']:.2f}x eager"
                    for x in g["sensitivity"]
                )
            )
        c = g["configs"]
        steps = [
            (label, c[k]["step_ms"])
            for k, label in (
                ("pre_specialization", "pre-specialization"),
                ("current", "specialized kernels"),
                ("l2", "+ L2-resident chunks"),
                ("l2_graph", "+ CUDA graph"),
            )
            if c.get(k)
        ]
        p.append("-- what each change does to the model: " + " -> ".join(f"{label} {ms:.1f} ms" for label, ms in steps))
        p.append("")
    p.append("Summary (model, not measured):")
    for ckey, label, _ in CONFIGS:
        p.append(f"{label}:")
        for key, g in out["gpus"].items():
            r = g["configs"].get(ckey)
            p.append(r["summary"] if r else f"{key}: no L2-resident workspace")
    if "H100" in out["gpus"] and out["gpus"]["H100"]["configs"].get("current"):
        r = out["gpus"]["H100"]["configs"]["current"]
        top = next(iter(r["composition"].items()))
        p.append(
            f"H100, current kernels: the largest term is {top[0]} ({top[1]:.2f} of {r['step_ms']:.2f} ms); "
            f"the target is <= 13 ms (>= 240 TFLOP/s, <= 0.66x eager): "
            f"{'met' if r['step_ms'] <= 13.0 and r['eager_ratio'] <= 0.66 else 'NOT met'} by this model."
        )
    return "\n".join(p)


def gpu_for_device_name(name: str) -> Optional[GPU]:
    """The constants for torch.cuda.get_device_name() ("NVIDIA H100 80GB HBM3", "NVIDIA H200",
    "NVIDIA A100-SXM4-80GB", ...), or None. PCIe and NVL parts share the key (their clocks and
    bandwidth are lower: the comparison says so)."""
    up = name.upper()
    for key in ("H200", "H100", "A100"):
        if key in up:
            return GPUS[key]
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--B", type=int, default=1024, help="rows (default: %(default)s)")
    p.add_argument("--D", type=int, default=512, help="embedding size (default: %(default)s)")
    p.add_argument("--C", type=int, default=1_000_000, help="classes (default: %(default)s)")
    p.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32 (TF32 GEMMs) (default: %(default)s)")
    p.add_argument("--margin", default="arcface", choices=sorted(MARGINS), help="(default: %(default)s)")
    p.add_argument(
        "--workspace", type=float, default=64, help="workspace_bytes in MiB, as the op's (default: %(default)s)"
    )
    p.add_argument(
        "--gpu", default="H100,H200,A100", help="comma-separated of " + ", ".join(GPUS) + " (default: %(default)s)"
    )
    p.add_argument("--sass", default=DEFAULT_SASS, help="scripts/sass-cost --json output (default: %(default)s)")
    p.add_argument(
        "--eager-logits",
        choices=("input", "fp32"),
        default="input",
        help="the modelled eager step's logits: in the input dtype, as marginops.reference computes and "
        "`marginops bench` times them, or float32 (insightface-style) (default: %(default)s)",
    )
    p.add_argument("--json", help="also write everything as JSON here")
    a = p.parse_args(argv)
    dtype = ALIASES.get(a.dtype, a.dtype)
    if dtype not in DTYPES:
        p.error(f"--dtype: one of {', '.join(DTYPES)}")
    gpus = [GPUS[k.strip().upper()] for k in a.gpu.split(",") if k.strip()]
    s = Shape(a.B, a.D, a.C, dtype, a.margin)
    out = run(s, gpus, a.sass, a.workspace, a.eager_logits)
    print(report(out, s))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
