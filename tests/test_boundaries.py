"""Every public op of the CPU backend at sizes that cross all its internal
boundaries, against eager PyTorch in float64.

csrc/cpu/margin_ce_cpu.cpp processes rows in blocks of 256 (kRowBlock) and classes in tiles of 256
(kClassTile, each class with its K sub-center rows), and splits the tiles into one chunk per
thread (at most), merged in chunk order; top-k keeps a running top k per chunk and merges them.
Here B = 2·256 + 37 rows (two full row blocks and a ragged one), C = 4·256 + 45 classes (five
tiles, the last ragged; with 2 threads two unequal chunks of 2 and 3 tiles), labels on the first
and last class of every tile, ignored rows in every row block, k both below and above a tile, and
torch.set_num_threads 1 and 2. class_logits' own chunking (chunk_size) is crossed too.

Expected values: marginops.reference (the eager head, which materializes the logits) or torch
ops written out here; errors relative to the largest entry, at most 1e-10."""

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

import marginops as mo
from marginops import functional, ops, reference

f64 = torch.float64
ROW_BLOCK, CLASS_TILE = 256, 256  # csrc/cpu/margin_ce_cpu.cpp: kRowBlock, kClassTile
B = 2 * ROW_BLOCK + 37
C = 4 * CLASS_TILE + 45
D = 16
TOL = 1e-10


def boundary_inputs(K=1, seed=0, bias=False):
    """x [B, D], W [C·K, D], labels [B] and an optional bias, float64, requiring grad. Labels
    hit the first and last class of every tile; two rows per row block are ignored (-100);
    every fourth row lies near its class (so the accuracy is neither 0 nor 1 and the argmax
    falls in every tile); the last rows point away from their class (θ + m > π)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(C * K, D, generator=g, dtype=f64)
    y = torch.randint(0, C, (B,), generator=g)
    edges = [c for t in range(0, C, CLASS_TILE) for c in (t, min(t + CLASS_TILE, C) - 1)]
    y[1 : 1 + 3 * len(edges) : 3] = torch.tensor(edges)
    x = torch.randn(B, D, generator=g, dtype=f64)
    near = torch.arange(0, B, 4)
    x[near] = 3 * W[y[near] * K] + 0.3 * x[near]
    for i in range(3):
        x[B - 1 - i] = -W[y[B - 1 - i] * K] * (1 + i) + 0.1 * x[B - 1 - i]
    for r0 in range(0, B, ROW_BLOCK):  # ignored rows in every row block, the ragged one too
        y[r0 + 2] = -100
        y[min(r0 + ROW_BLOCK, B) - 2] = -100
    b = torch.randn(C, generator=g, dtype=f64) if bias else None
    req = lambda t: None if t is None else t.requires_grad_()  # noqa: E731
    return req(x), req(W), y, req(b)


def per_row_combined():
    m2 = torch.linspace(0.2, 0.45, B, dtype=f64).requires_grad_()
    return mo.CombinedMargin(s=30.0, m1=1.0, m2=m2, m3=0.1), [m2]


CASES = {  # name: (margin and its differentiable per-row tensors, K, bias, loss options)
    "softmax_bias_smoothing": (lambda: (mo.Softmax(), []), 1, True, {"label_smoothing": 0.1}),
    "arcface_none": (lambda: (mo.ArcFace(s=30.0, m=0.5), []), 1, False, {"reduction": "none"}),
    "subcenter_sum": (lambda: (mo.SubCenterArcFace(K=3, s=30.0, m=0.5), []), 3, False, {"reduction": "sum"}),
    "sphereface": (lambda: (mo.SphereFace(m=4), []), 1, False, {}),
    "curricular_bias": (lambda: (mo.CurricularFace(s=30.0, m=0.5), []), 1, True, {}),
    "combined_per_row": (per_row_combined, 1, False, {"label_smoothing": 0.05}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_gradients_and_accuracy_across_blocks_tiles_and_chunks(case, threads):
    make_margin, K, bias, opts = CASES[case]
    margin, extra = make_margin()
    x, W, y, b = boundary_inputs(K=K, bias=bias, seed=len(case))
    inputs = [t for t in (x, W, b) if t is not None] + extra
    loss, acc = mo.margin_cross_entropy(x, W, y, margin, bias=b, return_accuracy=True, **opts)
    ref, ref_acc = reference.margin_cross_entropy(x, W, y, margin, bias=b, return_accuracy=True, **opts)
    assert rel_err(loss, ref) <= TOL
    # reduction="none": a different weight per row, so each row's gradient is checked on its own
    up = torch.rand(B, dtype=f64, generator=torch.Generator().manual_seed(1)) + 0.5 if loss.dim() else None
    got = torch.autograd.grad(loss, inputs, up)
    want = torch.autograd.grad(ref, inputs, up)
    for name, g, r in zip(["x", "W", "bias" if bias else "m2", "m2"], got, want):
        assert rel_err(g, r) <= TOL, name
    # the accuracy: the margin-free argmax over every tile, ignored rows excluded
    assert float(acc) == float(ref_acc) and 0.1 < float(acc) < 0.9


def test_head_forward_backward_and_inference_helpers(threads):
    x, W, y, b = boundary_inputs(K=2, bias=True, seed=5)
    margin = mo.SubCenterArcFace(K=2, s=20.0, m=0.4)
    head = mo.MarginHead(D, C, margin=margin, bias=True, return_accuracy=True, dtype=f64)
    eager = reference.MarginHead(D, C, margin=margin, bias=True, return_accuracy=True, dtype=f64)
    with torch.no_grad():
        for h in (head, eager):
            h.weight.copy_(W)
            h.bias.copy_(b)
    loss, acc = head(x, y)
    ref, ref_acc = eager(x, y)
    assert rel_err(loss, ref) <= TOL and float(acc) == float(ref_acc)
    for g, r in zip(
        torch.autograd.grad(loss, [x, head.weight, head.bias]), torch.autograd.grad(ref, [x, eager.weight, eager.bias])
    ):
        assert rel_err(g, r) <= TOL
    # inference helpers, written out: cos θ of the best sub-center, logits s·cos θ + bias
    with torch.no_grad():
        cos = (F.normalize(x, dim=1) @ F.normalize(W, dim=1).T).view(B, C, 2).amax(2)
        logits = 20.0 * cos + b
        assert rel_err(head.cosine(x, chunk_size=300), cos) <= TOL
        assert rel_err(head.logits(x, chunk_size=300), logits) <= TOL
        assert rel_err(head.logits(x), logits) <= TOL
        for k in (5, 300):
            for kind, full in (("cosine", cos), ("logit", logits)):
                values, classes = head.topk(x, k, kind=kind)
                check_topk(values, classes, full, k)


def check_topk(values, classes, full, k):
    """values/classes [B, k] are a top k of full [B, C]: the k largest values in order (as
    torch.topk), each the value of its class, classes distinct (robust to exact ties)."""
    want = full.topk(k, dim=1)
    assert values.shape == (B, k) and classes.shape == (B, k)
    assert rel_err(values, want.values) <= TOL
    assert rel_err(full.gather(1, classes), want.values) <= TOL
    assert all(len(set(row)) == k for row in classes.tolist())


TOPK_CASES = {  # name: (margin, K, bias, kind, the margin-free values written out)
    "softmax_bias_logit": (mo.Softmax(), 1, True, "logit", lambda x, W, b: x @ W.T + b),
    "sphereface_logit": (mo.SphereFace(m=4), 1, False, "logit", lambda x, W, b: x @ F.normalize(W, dim=1).T),
    "subcenter_cosine": (
        mo.SubCenterArcFace(K=3, s=30.0),
        3,
        False,
        "cosine",
        lambda x, W, b: (F.normalize(x, dim=1) @ F.normalize(W, dim=1).T).view(B, C, 3).amax(2),
    ),
    "subcenter_logit_bias": (
        mo.SubCenterArcFace(K=3, s=30.0),
        3,
        True,
        "logit",
        lambda x, W, b: 30.0 * (F.normalize(x, dim=1) @ F.normalize(W, dim=1).T).view(B, C, 3).amax(2) + b,
    ),
}


@pytest.mark.parametrize("case", list(TOPK_CASES))
def test_topk_and_class_logits_across_tiles_and_chunks(case, threads):
    margin, K, bias, kind, formula = TOPK_CASES[case]
    x, W, _, b = boundary_inputs(K=K, bias=bias, seed=7)
    with torch.no_grad():
        full = formula(x, W, b)
        for k in (1, 7, CLASS_TILE + 44):  # k above a tile: each chunk's running top k spans tiles
            values, classes = functional.topk_classes(x, W, k, margin, b, kind=kind)
            check_topk(values, classes, full, k)
        if kind == "logit":  # class_logits: the same values, in chunks of 300 classes (ragged last)
            assert rel_err(functional.class_logits(x, W, margin, b, chunk_size=300), full) <= TOL


def test_head_stats_of_a_sampled_shard_across_tiles_and_chunks(threads):
    """ops.head_stats over a shard's sampled classes (class_offset + class_index, as Partial FC
    calls it), against the statistics of hand CosFace logits and their autograd."""
    s, m, total, off = 20.0, 0.3, C + 600, 400
    g = torch.Generator().manual_seed(11)
    local = C + 100  # the shard's classes [off, off + local) of total
    W = torch.randn(local, D, generator=g, dtype=f64, requires_grad=True)
    bias = torch.randn(local, generator=g, dtype=f64, requires_grad=True)
    index = torch.randperm(local, generator=g)[:C].sort().values  # C sampled classes: five tiles
    x = torch.randn(B, D, generator=g, dtype=f64, requires_grad=True)
    G = off + index  # global ids of the computed columns
    y = G[torch.randint(0, C, (B,), generator=g)]
    y[::5] = torch.randint(0, total, (len(y[::5]),), generator=g)  # some labels elsewhere: other shard, or not sampled
    y[3::ROW_BLOCK] = -100
    stats = ops.head_stats(
        x, W, y, bias=bias, class_index=index, num_classes=total, class_offset=off, cfg=mo.CosFace(s=s, m=m).config()
    )
    plain = s * F.normalize(x, dim=1) @ F.normalize(W[index], dim=1).T + bias[index]
    hit = y[:, None] == G[None, :]
    z = plain - s * m * hit
    assert hit.any(1).float().mean() > 0.5 and not hit.any(1).all()
    want = (torch.logsumexp(z, dim=1), (z * hit).sum(1), z.sum(1))
    for got, ref in zip(stats[:3], want):
        assert rel_err(got, ref) <= TOL
    assert rel_err(stats.best_logit, plain.max(1).values) <= TOL
    assert torch.equal(stats.best_class, G[plain.argmax(1)])
    # gradients of a combination of the three differentiable statistics
    w = torch.rand(3, B, dtype=f64, generator=g)
    combo = lambda st: (w[0] * st[0] - w[1] * st[1] + 0.01 * w[2] * st[2]).sum()  # noqa: E731
    got = torch.autograd.grad(combo(stats), [x, W, bias])
    ref = torch.autograd.grad(combo(want), [x, W, bias])
    for name, a, r in zip(["x", "W", "bias"], got, ref):
        assert rel_err(a, r) <= TOL, name
