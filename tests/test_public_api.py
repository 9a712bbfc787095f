"""The public functions and methods that no other test checks against an independent
expectation, each against a value written out here with plain torch ops, a closed form or a
hand-built file (see tests/README.md for the whole table and the oracle policy).
Nothing here calls marginops code to compute an expected value."""

import hashlib
import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import spawn

import marginops as mo
from marginops import distributed as mdist
from marginops import functional, insightface, ops, regularizers, subcenter
from marginops.margins import (
    KIND_COMBINED,
    KIND_IDENTITY,
    KIND_MULTIPLICATIVE,
    THETA_POLICIES,
    OpConfig,
    masked_mean,
    target_cosines,
)

f64 = torch.float64


def unit(t):
    return t / t.norm(dim=-1, keepdim=True)


def seeded(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=f64) * scale


# ---- heads: inherited helpers, initialization, margin of the step, state ------------------------


def test_logits_of_a_normalized_head_with_bias_are_s_cos_plus_bias_without_margin():
    head = mo.MarginHead(6, 11, margin=mo.CosFace(s=12.0, m=0.4), bias=True, dtype=f64)
    with torch.no_grad():
        head.weight.copy_(seeded(11, 6, seed=1))
        head.bias.copy_(seeded(11, seed=2))
    x = seeded(9, 6, seed=3)
    cos = unit(x) @ unit(head.weight.detach()).T
    torch.testing.assert_close(head.logits(x, chunk_size=4), 12.0 * cos + head.bias.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head.cosine(x, chunk_size=5), cos, rtol=1e-12, atol=1e-12)  # cosine: no s, no bias


def test_functional_class_logits_topk_classes_and_cosine_margin():
    W, x = seeded(14, 5, seed=4), seeded(7, 5, seed=5)
    b = seeded(7, seed=6)
    # default margin: plain softmax logits x·Wᵀ (+ bias), chunked
    torch.testing.assert_close(functional.class_logits(x, W, chunk_size=3), x @ W.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        functional.class_logits(x, W[:7], bias=b, chunk_size=2), x @ W[:7].T + b, rtol=1e-12, atol=1e-12
    )
    # cosine_margin(K): cos θ of the best of K sub-centers (rows c·K … c·K + K − 1), s = 1
    cfg = functional.cosine_margin(2).config()
    assert (cfg.normalize_x, cfg.normalize_w, cfg.s, cfg.subcenters, cfg.margin_kind) == (
        True,
        True,
        1.0,
        2,
        KIND_IDENTITY,
    )
    best = (unit(x) @ unit(W).T).view(7, 7, 2).amax(2)
    torch.testing.assert_close(
        functional.class_logits(x, W, functional.cosine_margin(2), chunk_size=3), best, rtol=1e-12, atol=1e-12
    )
    # topk_classes: kind="logit" is its default (the heads' is "cosine")
    values, classes = functional.topk_classes(x, W[:7], 3, bias=b)
    want = (x @ W[:7].T + b).topk(3, dim=1)
    torch.testing.assert_close(values, want.values, rtol=1e-12, atol=1e-12)
    assert torch.equal(classes, want.indices)
    values, classes = functional.topk_classes(x, W, 2, mo.SubCenterArcFace(K=2, s=30.0), kind="cosine")
    want = best.topk(2, dim=1)
    torch.testing.assert_close(values, want.values, rtol=1e-12, atol=1e-12)
    assert torch.equal(classes, want.indices)


@pytest.mark.parametrize("bias", [False, True])
def test_reset_parameters_draws_normal_std_001_and_zero_bias(bias):
    head = mo.MarginHead(5, 13, margin=mo.SubCenterArcFace(K=3), bias=bias)
    with torch.no_grad():
        head.weight.fill_(7.0)
        if bias:
            head.bias.fill_(7.0)
    torch.manual_seed(123)
    head.reset_parameters()
    torch.manual_seed(123)
    want = torch.empty(39, 5).normal_(0.0, 0.01)  # N(0, 0.01²) for every sub-center row
    assert torch.equal(head.weight.detach(), want)
    if bias:
        assert torch.equal(head.bias.detach(), torch.zeros(13))


def test_current_margin_follows_the_lambda_schedule_in_training_only():
    plain = mo.MarginHead(4, 6, margin=mo.ArcFace(s=16.0))
    assert plain.current_margin() is plain.margin
    schedule = mo.LambdaSchedule(base=50.0, gamma=0.25, power=2.0, lambda_min=3.0)
    head = mo.MarginHead(4, 6, margin=mo.LSoftmax(m=3), lambda_schedule=schedule, dtype=f64)
    x, y = seeded(5, 4, seed=7), torch.tensor([0, 1, 2, 3, 4])
    seen = []
    for _ in range(4):
        seen.append(head.current_margin().lambda_)
        head(x, y)
    # λ(i) = max(3, 50·(1 + 0.25·i)^−2) at training step i = 1, 2, ... (SphereFace's Caffe layer
    # increments its counter before computing λ): 32, 22.2…, 16.3…, 12.5 — the head's step
    # counter advances per training step
    assert seen == pytest.approx([32.0, 50.0 / 1.5**2, 50.0 / 1.75**2, 50.0 / 4.0], rel=1e-15)
    cur = head.current_margin()
    assert (type(cur), cur.m, cur.lambda_) == (mo.LSoftmax, 3, pytest.approx(50.0 / 2.25**2))
    assert head.margin.lambda_ == 0.0, "the spec itself is not changed"
    head.eval()
    head(x, y)
    assert head.current_margin().lambda_ == pytest.approx(50.0 / 2.25**2), "evaluation does not advance λ"


def test_lambda_schedule_closed_form_and_floor():
    sched = mo.LambdaSchedule(base=200.0, gamma=0.5, power=1.5, lambda_min=10.0)
    for it, want in [
        (0, 200.0),
        (2, 200.0 / 2.0**1.5),
        (6, 200.0 / 4.0**1.5),
        (10, 200.0 / 6.0**1.5),
        (14, 10.0),
        (100, 10.0),
    ]:
        assert sched(it) == pytest.approx(want, rel=1e-14), it
    assert mo.LambdaSchedule()(1) == pytest.approx(1000.0 / 1.12)  # SphereFace's defaults


def test_margin_state_buffers_are_copies_and_as_dict_aliases_them():
    t = torch.tensor([0.5], dtype=f64)
    state = mo.heads.MarginState({"t": t, "u": torch.zeros(2)})
    t.fill_(9.0)
    assert float(state.t) == 0.5, "construction copies the initial values"
    d = state.as_dict()
    assert sorted(d) == ["t", "u"]
    d["t"].add_(1.0)  # margins update the dict in place: the buffer must see it
    assert float(state.state_dict()["t"]) == 1.5
    assert mo.heads.MarginState({}).as_dict() is None
    head = mo.MarginHead(4, 6, margin=mo.CurricularFace())
    assert sorted(head.margin_state.state_dict()) == ["t"] and float(head.margin_state.t) == 0.0


def test_weighted_head_is_the_weighted_sum_of_hand_written_losses():
    C, s, m = 9, 10.0, 0.3
    head = mo.WeightedMarginHead(
        5, C, terms=[(mo.NormFace(s=s), 0.25), (mo.CosFace(s=s, m=m), 2.0)], bias=True, label_smoothing=0.1, dtype=f64
    )
    with torch.no_grad():
        head.weight.copy_(seeded(C, 5, seed=8))
        head.bias.copy_(seeded(C, seed=9))
    x = seeded(12, 5, seed=10).requires_grad_()
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, -100, 2, 3])
    loss = head(x, y)
    cos = unit(x) @ unit(head.weight).T
    onehot = F.one_hot(y.clamp_min(0), C).bool()
    z1 = s * cos + head.bias
    z2 = s * torch.where(onehot, cos - m, cos) + head.bias
    want = 0.25 * F.cross_entropy(z1, y, label_smoothing=0.1) + 2.0 * F.cross_entropy(z2, y, label_smoothing=0.1)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(loss, [x, head.weight, head.bias])
    exp = torch.autograd.grad(want, [x, head.weight, head.bias])
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    # the inference helpers use the first term's scale
    torch.testing.assert_close(head.logits(x.detach()), (s * cos + head.bias).detach(), rtol=1e-12, atol=1e-12)


# ---- functional pieces: statistics, the loss from them, autocast ----------------------------------


def test_head_stats_of_a_sampled_shard_by_hand():
    """The op's per-row statistics over the classes [offset, offset + rows) picked by class_index:
    lse and Σz over them with the margin on the label, z_iy (0 when the label is not computed),
    and the best margin-free logit with its global class id."""
    C, off, s, m = 15, 5, 10.0, 0.3
    W, x = seeded(C, 6, seed=11), seeded(6, 6, seed=12)
    y = torch.tensor(
        [5, 7, 6, 0, -100, 11]
    )  # computed, computed, in the shard but not sampled, other shard, ignored, computed
    index = torch.tensor([0, 2, 3, 6])
    G = off + index  # global ids of the computed classes: 5, 7, 8, 11
    stats = ops.head_stats(
        x, W[off:12], y, class_index=index, num_classes=C, class_offset=off, cfg=mo.CosFace(s=s, m=m).config()
    )
    plain = s * unit(x) @ unit(W[G]).T  # [6, 4] margin-free
    hit = y[:, None] == G[None, :]
    z = plain - s * m * hit
    torch.testing.assert_close(stats.lse, torch.logsumexp(z, dim=1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.logit_sum, z.sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.target_logit, (z * hit).sum(1), rtol=1e-12, atol=1e-12)
    assert stats.target_logit[2] == 0.0 and stats.target_logit[3] == 0.0
    torch.testing.assert_close(stats.best_logit, plain.max(1).values, rtol=1e-12, atol=1e-12)
    assert torch.equal(stats.best_class, G[plain.argmax(1)])


def test_acc_dtype_is_float64_only_when_both_inputs_are():
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    for a in dtypes:
        for b in dtypes:
            want = f64 if (a, b) == (f64, f64) else torch.float32
            assert ops.acc_dtype(torch.zeros(1, dtype=a), torch.zeros(1, dtype=b)) == want, (a, b)


def test_loss_and_accuracy_from_hand_made_statistics():
    lse = torch.tensor([3.0, 2.0, 5.0, 1.0], dtype=f64)
    target = torch.tensor([1.0, 0.5, 4.0, 0.0], dtype=f64)
    total = torch.tensor([6.0, -2.0, 10.0, 0.0], dtype=f64)
    stats = ops.HeadStats(lse, target, total, torch.zeros(4, dtype=f64), torch.tensor([2, 7, 1, 3]))
    y = torch.tensor([2, 1, 1, -1])  # the last row ignored (ignore_index = -1)
    eps, C = 0.2, 8
    rows = [lse[i] - (1 - eps) * target[i] - eps / C * total[i] for i in range(3)]
    rows = torch.stack(rows + [torch.zeros((), dtype=f64)])
    torch.testing.assert_close(functional.loss_from_stats(stats, y, C, -1, eps, "none"), rows)
    torch.testing.assert_close(functional.loss_from_stats(stats, y, C, -1, eps, "sum"), rows.sum())
    torch.testing.assert_close(functional.loss_from_stats(stats, y, C, -1, eps, "mean"), rows.sum() / 3)
    plain = functional.loss_from_stats(stats, y, C, -1, 0.0, "none")
    torch.testing.assert_close(plain, torch.tensor([2.0, 1.5, 1.0, 0.0], dtype=f64))
    extra = torch.tensor([0.5, 0.25, 1.0, 100.0], dtype=f64)  # the ignored row's extra term does not count
    torch.testing.assert_close(
        functional.loss_from_stats(stats, y, C, -1, 0.0, "mean", extra), torch.tensor(6.25 / 3, dtype=f64)
    )
    # accuracy: best_class == label over non-ignored rows: rows 0 and 2 of 3
    assert float(functional.accuracy_from_stats(stats, y, -1)) == pytest.approx(2 / 3, rel=1e-7)


def test_autocast_features_casts_float32_only_inside_autocast():
    x = seeded(3, 4).float()
    assert functional.autocast_features(x) is x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = functional.autocast_features(x)
        x64 = seeded(3, 4)
        assert functional.autocast_features(x64) is x64, "float64 is left alone"
    assert got.dtype == torch.bfloat16 and torch.equal(got, x.to(torch.bfloat16))


def test_target_cosines_and_masked_mean_by_hand():
    K = 3
    W, x = seeded(4 * K, 5, seed=13), seeded(6, 5, seed=14)
    y = torch.tensor([0, 3, 1, 2, 0, 3])
    valid = torch.tensor([True, True, False, True, True, True])
    want = torch.tensor(
        [max(float(unit(x[i]) @ unit(W[int(y[i]) * K + k])) for k in range(K)) if valid[i] else 0.0 for i in range(6)],
        dtype=f64,
    )
    torch.testing.assert_close(target_cosines(x, W, y, valid, K), want, rtol=1e-12, atol=1e-12)
    v = torch.tensor([1.0, 2.0, 4.0, 8.0])
    assert float(masked_mean(v, torch.tensor([True, False, True, False]))) == 2.5
    assert float(masked_mean(v, torch.zeros(4, dtype=torch.bool))) == 0.0


def test_backends_and_cuda_available_on_this_build():
    got = mo.backends()
    assert got["cpu"] == "tiled"
    assert set(got) <= {"cpu", "cuda"} and got.get("cuda", "chunked") == "chunked"
    if not torch.cuda.is_available():
        assert mo.cuda_available() is False


# ---- every spec's config(): the op scalars its docstring describes ------------------------------

_C, _F, _N, _E = KIND_COMBINED, THETA_POLICIES["fallback"], THETA_POLICIES["none"], THETA_POLICIES["easy"]
CONFIGS = [
    (mo.Softmax(), OpConfig(KIND_IDENTITY, 0, False, False, 1.0, 1.0, 0.0, 0.0, 0.0)),
    (mo.WeightNormSoftmax(), OpConfig(KIND_IDENTITY, 0, False, True, 1.0, 1.0, 0.0, 0.0, 0.0)),
    (mo.L2Softmax(s=16.0), OpConfig(KIND_IDENTITY, 0, True, False, 16.0, 1.0, 0.0, 0.0, 0.0)),
    (mo.NormFace(s=20.0), OpConfig(KIND_IDENTITY, 0, True, True, 20.0, 1.0, 0.0, 0.0, 0.0)),
    (mo.LSoftmax(m=3, lambda_=0.5), OpConfig(KIND_MULTIPLICATIVE, 0, False, False, 1.0, 3.0, 0.0, 0.0, 0.5)),
    (mo.SphereFace(m=4), OpConfig(KIND_MULTIPLICATIVE, 0, False, True, 1.0, 4.0, 0.0, 0.0, 0.0)),
    (
        mo.CosFace(s=30.0, m=0.35, interclass_filtering_threshold=0.2),
        OpConfig(_C, _N, True, True, 30.0, 1.0, 0.0, 0.35, 0.0, 1, 0.2, False),
    ),
    (
        mo.ArcFace(s=32.0, m=0.4, policy="easy", straight_through=True),
        OpConfig(_C, _E, True, True, 32.0, 1.0, 0.4, 0.0, 0.0, 1, 0.0, True),
    ),
    (mo.CombinedMargin(s=64.0, m1=1.0, m2=0.3, m3=0.2), OpConfig(_C, _F, True, True, 64.0, 1.0, 0.3, 0.2, 0.0)),
    (
        mo.CombinedMargin(s=64.0, m1=1.5, m2=0.1, m3=0.0),
        OpConfig(_C, THETA_POLICIES["continuous"], True, True, 64.0, 1.5, 0.1, 0.0, 0.0),
    ),
    (mo.SubCenterArcFace(K=3, s=30.0, m=0.5), OpConfig(_C, _F, True, True, 30.0, 1.0, 0.5, 0.0, 0.0, 3)),
    (mo.CurricularFace(s=30.0, m=0.5), OpConfig(_C, _F, True, True, 30.0, 1.0, 0.5, 0.0, 0.0)),
    (mo.AdaFace(s=30.0, m=0.4), OpConfig(_C, THETA_POLICIES["clip"], True, True, 30.0, 1.0, 0.0, 0.4, 0.0)),
    (mo.MagFace(s=30.0), OpConfig(_C, _F, True, True, 30.0, 1.0, 0.0, 0.0, 0.0)),
    (mo.AdaptiveAngularMargin(), OpConfig(_C, THETA_POLICIES["continuous"], False, True, 1.0, 1.0, 0.0, 0.0, 0.0)),
    (
        mo.AdaptiveAngularMargin(s=20.0),
        OpConfig(_C, THETA_POLICIES["continuous"], True, True, 20.0, 1.0, 0.0, 0.0, 0.0),
    ),
]


@pytest.mark.parametrize("spec, want", CONFIGS, ids=[f"{type(s).__name__}-{i}" for i, (s, _) in enumerate(CONFIGS)])
def test_every_spec_config(spec, want):
    assert spec.config() == want


def test_insightface_foreign_modules_and_specs_map_by_attributes():
    class Arc(torch.nn.Module):  # insightface's ArcFace(s, margin)
        s, margin = 48.0, 0.45

    class Cos(torch.nn.Module):  # insightface's CosFace(s, m)
        s, m = 40.0, 0.3

    arc = insightface.to_margin(Arc())
    assert arc.config() == OpConfig(_C, _N, True, True, 48.0, 1.0, 0.45, 0.0, 0.0, 1, 0.0, True)
    assert insightface.to_margin(Arc(), semantics="marginops").config() == OpConfig(
        _C, _F, True, True, 48.0, 1.0, 0.45, 0.0, 0.0
    )
    assert insightface.to_margin(Cos()).config() == OpConfig(_C, _N, True, True, 40.0, 1.0, 0.0, 0.3, 0.0, 1, 0.0, True)
    spec = mo.ArcFace()
    assert insightface.to_margin(spec) is spec
    assert insightface.combined_spec(64, 1.2, 0.2, 0.0).config() == OpConfig(
        _C, THETA_POLICIES["continuous"], True, True, 64.0, 1.2, 0.2, 0.0, 0.0, 1, 0.0, True
    )


# ---- sub-center tools ---------------------------------------------------------------------------


def subcenter_data():
    C, K, D = 5, 3, 4
    W = seeded(C * K, D, seed=20)
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 0, 1, 1, 3])  # class 4 unseen
    x = seeded(len(y), D, seed=21)
    # class 2: one sample on sub-center 1, one on sub-center 2 — a tie that goes to the lower index
    x[8], x[9] = W[2 * K + 1] * 3, W[2 * K + 2] * 3
    return W, x, y, C, K


def hand_cosines(W, x, y, K):
    return torch.tensor(
        [[float(unit(x[i]) @ unit(W[int(y[i]) * K + k])) for k in range(K)] for i in range(len(y))], dtype=f64
    )


def test_dominant_subcenters_is_the_argmax_of_hand_counts():
    W, x, y, C, K = subcenter_data()
    cos = hand_cosines(W, x, y, K)
    counts = [[0] * K for _ in range(C)]
    for i in range(len(y)):
        row = cos[i].tolist()
        counts[int(y[i])][row.index(max(row))] += 1
    want = [counts[c].index(max(counts[c])) if sum(counts[c]) else -1 for c in range(C)]
    assert counts[4] == [0, 0, 0] and counts[2] == [0, 1, 1] and want[2] == 1
    got = subcenter.dominant_subcenters(x, W, y, K, chunk_size=4)
    assert got.tolist() == want
    assert got[4] == -1


@pytest.mark.parametrize("threshold", [45.0, 75.0])
def test_find_outliers_is_the_angle_to_the_dominant_subcenter_above_the_threshold(threshold):
    W, x, y, C, K = subcenter_data()
    cos = hand_cosines(W, x, y, K)
    outliers, dominant = subcenter.find_outliers(x, W, y, K, threshold_degrees=threshold, chunk_size=5)
    want = [math.degrees(math.acos(float(cos[i, int(dominant[int(y[i])])]))) > threshold for i in range(len(y))]
    assert outliers.tolist() == want
    assert 0 < sum(want) < len(want), "both kinds occur"


def test_drop_subcenters_keeps_row_c_times_k_plus_dominant():
    C, K, D = 4, 3, 2
    W = torch.arange(C * K * D, dtype=f64).view(C * K, D)
    dominant = torch.tensor([2, -1, 1, 0])
    rows = [c * K + max(int(d), 0) for c, d in enumerate(dominant)]  # never-seen classes keep sub-center 0
    assert rows == [2, 3, 7, 9]
    assert torch.equal(subcenter.drop_subcenters(W, K, dominant), torch.stack([W[r] for r in rows]))


# ---- regularizers ---------------------------------------------------------------------------------


def test_ring_loss_with_a_given_radius_and_a_learned_one_kept_after_the_first_batch():
    x = seeded(10, 4, seed=30).requires_grad_()
    ring = regularizers.RingLoss(weight=0.3, radius=2.5)
    norms = torch.sqrt((x.detach() ** 2).sum(1))
    assert float(ring(x).detach()) == pytest.approx(float(0.15 * ((norms - 2.5) ** 2).mean()), rel=1e-6)
    assert float(ring.radius.detach()) == 2.5, "a given radius is not reset from the data"
    lazy = regularizers.RingLoss(weight=1.0)
    a, b = seeded(8, 4, seed=31), seeded(8, 4, seed=32, scale=5.0)
    lazy(a)
    r0 = float(torch.sqrt((a**2).sum(1)).mean())
    nb = torch.sqrt((b**2).sum(1))
    assert float(lazy(b).detach()) == pytest.approx(float(0.5 * ((nb - r0) ** 2).mean()), rel=1e-6)
    assert float(lazy.radius.detach()) == pytest.approx(r0, rel=1e-6), "R starts from the first batch only"


def test_weight_norm_equalizer_counts_every_subcenter_row():
    W = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # squared norms 25, 1, 4, 2: mean 8
    want = 0.1 * ((25 - 8) ** 2 + (1 - 8) ** 2 + (4 - 8) ** 2 + (2 - 8) ** 2) / 4
    assert float(regularizers.WeightNormEqualizer(weight=0.1)(W)) == pytest.approx(want, rel=1e-6)


def test_feature_whitening_in_eval_uses_the_running_statistics():
    w = regularizers.FeatureWhitening(3, decay=0.5, eps=0.01)
    a = torch.tensor([[1.0, 2.0, 0.0], [3.0, 6.0, 0.0]])  # mean (2, 4, 0), biased var (1, 4, 0)
    w(a)
    w.eval()
    x = torch.tensor([[4.0, 0.0, 1.0]])
    want = torch.tensor([[(4 - 2) / math.sqrt(1.01), (0 - 4) / math.sqrt(4.01), 1 / math.sqrt(0.01)]])
    torch.testing.assert_close(w(x), want)
    w.train()
    w(torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 2.0]]))  # batch mean (0, 0, 2), var 0: halfway with ρ = 0.5
    torch.testing.assert_close(w.running_mean, torch.tensor([1.0, 2.0, 1.0]))
    torch.testing.assert_close(w.running_var, torch.tensor([0.5, 2.0, 0.0]))


# ---- class ranges, split, checkpoints, insightface import ------------------------------------------


def test_class_range_is_dealt_out_in_order_with_the_remainder_first():
    for C in range(1, 30):
        for world in range(1, min(C, 7) + 1):
            sizes = [C // world + (1 if r < C % world else 0) for r in range(world)]
            starts = [sum(sizes[:r]) for r in range(world)]
            got = [mdist.class_range(C, world, r) for r in range(world)]
            assert got == [(s, s + n) for s, n in zip(starts, sizes)], (C, world)
    assert [mdist.class_range(11, 3, r) for r in range(3)] == [(0, 4), (4, 8), (8, 11)]


def test_split_cuts_rows_per_class_range_and_concatenates_back():
    C, K = 11, 2
    W = torch.arange(C * K * 3, dtype=f64).view(C * K, 3)
    parts = mdist.split(W, 3, subcenters=K)
    assert [p.shape[0] for p in parts] == [8, 8, 6]
    assert torch.equal(parts[1], W[8:16]) and torch.equal(parts[2], W[16:22])
    assert torch.equal(torch.cat(parts), W)
    b = torch.arange(C, dtype=f64)
    assert [p.tolist() for p in mdist.split(b, 3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]


def file_record(path):
    """{"file", "bytes", "sha256"} of a file, as save_sharded's meta.json lists each shard."""
    data = open(path, "rb").read()
    return {"file": os.path.basename(path), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_checkpoint(directory, meta, shards):
    """A checkpoint in save_sharded's documented layout, written by hand: meta.json (with each
    shard file's size and SHA-256) and shard-RRRRR-of-WWWWW.pt holding class_start, class_end,
    weight, bias, margin_state, meta."""
    os.makedirs(directory, exist_ok=True)
    world = len(shards)
    records = []
    for r, (start, end, weight, bias, state) in enumerate(shards):
        path = os.path.join(directory, f"shard-{r:05d}-of-{world:05d}.pt")
        torch.save(
            {
                "class_start": start,
                "class_end": end,
                "weight": weight,
                "bias": bias,
                "margin_state": state,
                "meta": meta,
            },
            path,
        )
        records.append(file_record(path))
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump({**meta, "world_size": world, "shards": records}, f)


def hand_checkpoint(tmp_path, name="ckpt", margin=repr(mo.SubCenterArcFace(K=2))):
    """13 classes, K = 2 sub-centers, D = 3, a bias, cut 5 / 4 / 4 (any contiguous cut loads)."""
    C, K = 13, 2
    W = torch.arange(C * K * 3, dtype=torch.float32).view(C * K, 3)
    b = torch.arange(C, dtype=torch.float32) + 100
    cuts = [(0, 5), (5, 9), (9, 13)]
    meta = {"num_classes": C, "embedding_size": 3, "subcenters": K, "bias": True, "margin": margin}
    shards = [(s, e, W[s * K : e * K].clone(), b[s:e].clone(), {}) for s, e in cuts]
    directory = str(tmp_path / name)
    write_checkpoint(directory, meta, shards)
    return directory, W, b


def test_load_sharded_and_consolidate_read_a_hand_written_checkpoint(tmp_path):
    directory, W, b = hand_checkpoint(tmp_path)
    head = mo.MarginHead(3, 13, margin=mo.SubCenterArcFace(K=2), bias=True)
    mdist.load_sharded(head, directory)
    assert torch.equal(head.weight.detach(), W) and torch.equal(head.bias.detach(), b)
    whole = mdist.consolidate(directory)
    assert torch.equal(whole["weight"], W) and torch.equal(whole["bias"], b)


def test_save_sharded_of_a_head_writes_one_shard_and_meta(tmp_path):
    head = mo.MarginHead(3, 4, margin=mo.CurricularFace(s=8.0), bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.arange(12.0).view(4, 3))
        head.bias.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        head.margin_state.t.fill_(0.25)
    mdist.save_sharded(head, str(tmp_path / "one"))
    assert sorted(os.listdir(tmp_path / "one")) == ["meta.json", "shard-00000-of-00001.pt"]
    meta = json.loads((tmp_path / "one" / "meta.json").read_text())
    shard_file = str(tmp_path / "one" / "shard-00000-of-00001.pt")
    assert meta == {
        "num_classes": 4,
        "embedding_size": 3,
        "subcenters": 1,
        "bias": True,
        "margin": repr(head.margin),
        "world_size": 1,
        "shards": [file_record(shard_file)],
        "optimizer": None,  # no head optimizer: no optimizer state in the checkpoint
    }
    shard = torch.load(tmp_path / "one" / "shard-00000-of-00001.pt", weights_only=True)
    assert (shard["class_start"], shard["class_end"]) == (0, 4)
    assert torch.equal(shard["weight"], torch.arange(12.0).view(4, 3)) and torch.equal(
        shard["bias"], torch.tensor([1.0, 2.0, 3.0, 4.0])
    )
    assert shard["margin_state"]["t"].tolist() == [0.25]
    # and the margin state comes back with load_sharded
    other = mo.MarginHead(3, 4, margin=mo.CurricularFace(s=8.0), bias=True)
    mdist.load_sharded(other, str(tmp_path / "one"))
    assert other.margin_state.t.tolist() == [0.25] and torch.equal(
        other.bias.detach(), torch.tensor([1.0, 2.0, 3.0, 4.0])
    )


def test_import_insightface_softmax_fc_files_in_any_order(tmp_path):
    D = 3
    shards = [
        torch.full((4, D), 0.0),
        torch.full((4, D), 1.0),
        torch.full((3, D), 2.0),
    ]  # 11 classes over 3 ranks: 4, 4, 3
    paths = []
    for r, w in enumerate(shards):
        paths.append(str(tmp_path / f"softmax_fc_gpu_{r}.pt"))
        torch.save({"weight": w}, paths[-1])  # insightface saves module.state_dict() of its PartialFC
    want = torch.cat(shards)
    assert torch.equal(mdist.import_insightface(str(tmp_path)), want)
    assert torch.equal(mdist.import_insightface([paths[2], paths[0], paths[1]]), want)
    torch.save({"weight": torch.zeros(3, D)}, paths[0])  # 3, 4, 4 is not insightface's split of 11 (4, 4, 3)
    torch.save({"weight": torch.zeros(4, D)}, paths[2])
    with pytest.raises(ValueError, match="do not follow insightface's split of 11 classes over 3 ranks"):
        mdist.import_insightface(str(tmp_path))


# ---- the sharded head on 2 gloo processes against hand formulas -------------------------------------


def _sharded_by_hand(rank, world, ckpt, out):
    C, s = 13, 10.0
    start, end = [(0, 7), (7, 13)][rank]  # class_range(13, 2, rank), written out
    # load_sharded: a 3-shard hand-written checkpoint into this rank's range
    head = mdist.ShardedMarginHead(3, C, mo.SubCenterArcFace(K=2), bias=True)
    assert (head.class_start, head.class_end, head.local_classes) == (start, end, end - start)
    assert f"classes=[{start}, {end})" in repr(head) and f"rank={rank}/2" in repr(head)
    mdist.load_sharded(head, ckpt)
    W = torch.arange(13 * 2 * 3, dtype=torch.float32).view(26, 3)
    assert torch.equal(head.weight.detach(), W[2 * start : 2 * end])
    assert torch.equal(head.bias.detach(), torch.arange(start, end, dtype=torch.float32) + 100)
    # save_sharded: one file per rank with its range; rank 0 writes meta.json
    mdist.save_sharded(head, out)
    mine = torch.load(os.path.join(out, f"shard-{rank:05d}-of-00002.pt"), weights_only=True)
    assert (mine["class_start"], mine["class_end"]) == (start, end) and torch.equal(
        mine["weight"], W[2 * start : 2 * end]
    )
    dist.barrier()
    with open(os.path.join(out, "meta.json")) as f:
        assert json.load(f)["world_size"] == 2
    # forward: NormFace with bias, label smoothing and ignored rows against F.cross_entropy of s·cos + b
    Wf, bf = seeded(C, 5, seed=40), seeded(C, seed=41)
    x = seeded(7, 5, seed=42)
    y = torch.tensor([0, 12, 6, 7, -100, 3, 9])
    rows = [slice(0, 3), slice(3, 7)][rank]  # batch sizes 3 and 4
    norm = mdist.ShardedMarginHead(
        5, C, mo.NormFace(s=s), bias=True, label_smoothing=0.1, return_accuracy=True, dtype=f64
    )
    with torch.no_grad():
        norm.weight.copy_(Wf[start:end])
        norm.bias.copy_(bf[start:end])
    xl = x[rows].clone().requires_grad_()
    loss, acc = norm(xl, y[rows])
    loss.backward()
    xr, Wr, br = x.clone().requires_grad_(), Wf.clone().requires_grad_(), bf.clone().requires_grad_()
    z = s * unit(xr) @ unit(Wr).T + br
    want = F.cross_entropy(z, y, label_smoothing=0.1)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-12)
    valid = y != -100
    assert float(acc) == pytest.approx(float((z.argmax(1) == y)[valid].double().mean()), rel=1e-7)
    torch.testing.assert_close(xl.grad, xr.grad[rows], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(norm.weight.grad, Wr.grad[start:end], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(norm.bias.grad, br.grad[start:end], rtol=1e-10, atol=1e-12)
    # topk over both shards, logit kind, against the hand logits
    values, classes = norm.topk(x[rows], 3, kind="logit")
    top = z.detach()[rows].topk(3, dim=1)
    torch.testing.assert_close(values, top.values, rtol=1e-12, atol=1e-12)
    assert torch.equal(classes, top.indices)
    # k above a shard's classes: every class of both shards, ranked (no padding leaks out)
    values, classes = norm.topk(x[rows], C, kind="logit")
    top = z.detach()[rows].topk(C, dim=1)
    torch.testing.assert_close(values, top.values, rtol=1e-12, atol=1e-12)
    assert torch.equal(classes, top.indices)
    with pytest.raises(ValueError, match=r"k = 14 must lie in \[1, 13\] \(the number of classes\)"):
        norm.topk(x[rows], C + 1)  # as MarginHead.topk, not -inf values with class -1


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_sharded_head_loads_saves_and_computes_by_hand_on_two_ranks(tmp_path):
    ckpt, _, _ = hand_checkpoint(tmp_path, margin=repr(mo.SubCenterArcFace(K=2)))
    spawn(_sharded_by_hand, 2, ckpt, str(tmp_path / "out"))
    # the two ranks' save consolidates to the hand-written checkpoint's contents
    whole = mdist.consolidate(str(tmp_path / "out"))
    assert torch.equal(whole["weight"], torch.arange(13 * 2 * 3, dtype=torch.float32).view(26, 3))
    assert torch.equal(whole["bias"], torch.arange(13, dtype=torch.float32) + 100)
