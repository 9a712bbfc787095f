"""Every compiled variant of the chunked backend's per-logit kernels (csrc/cuda/chunked/chunk_logits.cuh:
Variant<sub-centers 1 | 3 | any, inverse norms, bias, hard negatives>), run under the CPU
emulation of tests/cuda_emu against the op's semantics written out eagerly
(helpers.eager_op_outputs: torch ops, no code shared with csrc): forward statistics and, for
random incoming gradients of all three, dx, dW and dbias, in float64.

The shape crosses every boundary of the kernels: a chunk of 576 classes (three segments, one row
warp per segment) and a last chunk of 149 classes (a partial 16-byte unit of u), with targets at
the first column, at unit, segment and chunk boundaries and in the partial unit, and an ignored
row. The run-time sub-center count (K = 2) is the generic fallback: two of its variants.
float16 with normalized weights runs the variants without inverse norms (the chunk's
weight copy is prescaled), which is also where hard negatives meet them."""

import pytest
import torch
from helpers import budget_for, check_op_against_eager, rel_err

from marginops.margins import KIND_COMBINED, KIND_IDENTITY, OpConfig

CHUNKED = 1
B, D, CHUNK = 9, 8, 576
C = CHUNK + 149
TARGETS = [0, 3, 192, CHUNK - 1, CHUNK, CHUNK + 100, C - 1, -100, 400]


def inputs(K, dtype=torch.float64, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    W = torch.randn(C * K, D, generator=g, dtype=torch.float64)
    y = torch.tensor(TARGETS)
    for i in (1, 4):  # rows close to their class, so that the target's unit holds the best column
        x[i] = W[y[i] * K] * 3 + 0.1 * x[i]
    b = torch.randn(C, generator=g, dtype=torch.float64) if bias else None
    to = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return to(x), to(W), y, to(b)


def config(normalize_w, K, hard):
    if normalize_w:  # ArcFace with K sub-centers (and hard negatives)
        return OpConfig(KIND_COMBINED, 0, True, True, 30.0, 1.0, 0.5, 0.0, 0.0, K, 0.2 if hard == "filter" else 0.0)
    return OpConfig(KIND_IDENTITY, 0, False, False, 1.0, 1.0, 0.0, 0.0, 0.0, K)  # plain softmax


def run(emu, x, W, y, b, cfg, curricular, tol):
    args = (x, W, y, b, None, curricular, None, C, 0, -100, *cfg)
    ws = budget_for(
        emu,
        CHUNK,
        B,
        D,
        C,
        K=cfg.subcenters,
        dtype=x.dtype,
        wdtype=W.dtype,
        need_db=b is not None,
        normalize_w=cfg.normalize_w,
    )
    fwd = emu.forward_any(*args, 0.0, CHUNKED, ws)
    gen = torch.Generator().manual_seed(1)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    grads = [torch.randn(B, generator=gen, dtype=acc) for _ in range(3)]
    mask = [True, True, b is not None, False]
    bwd = emu.backward_any(*grads, fwd[0], *args, mask, 0.0, CHUNKED, ws)
    plan = emu.last_plan()
    assert plan["classes"] == CHUNK and plan["chunks"] == 2 and plan["segments"] == 3, plan
    check_op_against_eager(fwd, bwd, args, grads, mask, tol)
    return fwd, bwd


# (a bias with CurricularFace's hard negatives runs the fused backend: test_curricular_bias_backend)
CASES = [
    (K, nw, bias, hard)
    for K in (1, 3)
    for nw in (True, False)
    for bias in (False, True)
    for hard in ((None, "curricular", "filter") if nw else (None,))
    if not (bias and hard == "curricular")
]
CASES += [(2, True, False, None), (2, True, True, "filter")]


@pytest.mark.parametrize("K,normalize_w,bias,hard", CASES, ids=lambda v: str(v))
def test_variant_float64_against_eager(emu, K, normalize_w, bias, hard):
    x, W, y, b = inputs(K, bias=bias)
    cur = None
    if hard == "curricular":
        cur = torch.stack(
            [torch.linspace(-0.2, 0.3, B, dtype=torch.float64), torch.full((B,), 0.4, dtype=torch.float64)], 1
        )
    run(emu, x, W, y, b, config(normalize_w, K, hard), cur, 1e-10)


def test_curricular_bias_backend(emu):
    """CurricularFace's hard negatives with a bias: the chunked backend's G carries the factor
    t + 2c that the bias's gradient must not see, so "auto" runs the fused backend (right against
    eager) and an explicit "chunked" is refused, naming both."""
    x, W, y, b = inputs(1, bias=True)
    cur = torch.stack(
        [torch.linspace(-0.2, 0.3, B, dtype=torch.float64), torch.full((B,), 0.4, dtype=torch.float64)], 1
    )
    args = (x, W, y, b, None, cur, None, C, 0, -100, *config(True, 1, "curricular"))
    grads = [torch.randn(B, generator=torch.Generator().manual_seed(k), dtype=torch.float64) for k in range(3)]
    fwd = emu.forward_any(*args, 0.0, 0, 0)
    bwd = emu.backward_any(*grads, fwd[0], *args, [True, True, True, False], 0.0, 0, 0)
    check_op_against_eager(fwd, bwd, args, grads, [True, True, True, False], 1e-10)
    with pytest.raises(ValueError, match="chunked.*bias.*CurricularFace"):
        emu.forward_any(*args, 0.0, CHUNKED, 0)


@pytest.mark.parametrize("K", (1, 3))
@pytest.mark.parametrize("hard", (None, "curricular"))
def test_prescaled_float16_variants(emu, K, hard):
    """float16 with normalized weights: u already holds W/‖W‖ (no inverse norms in the loop),
    with and without hard negatives; against float64 eager within float16's error."""
    x, W, y, b = inputs(K, dtype=torch.float16, bias=hard is None)
    cur = None
    if hard:
        cur = torch.stack([torch.linspace(-0.2, 0.3, B), torch.full((B,), 0.4)], 1)
    args = (x, W, y, b, None, cur, None, C, 0, -100, *config(True, K, hard))
    ws = budget_for(emu, CHUNK, B, D, C, K=K, dtype=x.dtype, wdtype=W.dtype, need_db=b is not None, normalize_w=True)
    fwd = emu.forward_any(*args, 0.0, CHUNKED, ws)
    assert emu.last_plan()["prescale_w"]
    from helpers import eager_op_outputs

    want = eager_op_outputs(
        x.double(),
        W.double(),
        y,
        b.double() if b is not None else None,
        None,
        cur.double() if cur is not None else None,
        None,
        C,
        0,
        -100,
        *config(True, K, hard),
    )
    for got, w in zip(fwd[:3], want[:3]):
        assert rel_err(got, w) <= 5e-3
