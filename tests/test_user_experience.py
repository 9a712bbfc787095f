"""What a user sees. The dtype rule, check_finite, head.topk's kinds, every CLI option
documented, the demo reproducible."""

import argparse
import re

import pytest
import torch
import torch.nn.functional as F

import marginops as mo
from marginops import reference

ALL = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LEGAL = {(d, d) for d in ALL} | {(torch.float16, torch.float32), (torch.bfloat16, torch.float32)}
ILLEGAL = [(xd, wd) for xd in ALL for wd in ALL if (xd, wd) not in LEGAL]


def _name(d):
    return str(d).replace("torch.", "")


def _inputs(xd=torch.float32, wd=torch.float32, B=6, D=8, C=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g).to(xd)
    W = torch.randn(C, D, generator=g).to(wd)
    y = torch.randint(0, C, (B,), generator=g)
    return x, W, y


# -- one dtype rule --------------------------------------------------------------------------------


@pytest.mark.parametrize("xd,wd", ILLEGAL, ids=[f"{_name(a)}-{_name(b)}" for a, b in ILLEGAL])
def test_illegal_dtype_pairs_raise_the_same_error_fused_reference_and_op(xd, wd):
    x, W, y = _inputs(xd, wd)
    message = f"x is {_name(xd)} but weight is {_name(wd)}: use equal dtypes, or float32 weight with float16/bfloat16 x"
    errors = []
    for fn in (mo.margin_cross_entropy, reference.margin_cross_entropy):
        with pytest.raises(ValueError) as e:
            fn(x, W, y, mo.ArcFace())
        errors.append(str(e.value))
    with pytest.raises(ValueError) as e:  # the C++ op called directly
        torch.ops.marginops.margin_topk(x, W, None, None, 3, 0, True, True, 1.0, 1)
    errors.append(str(e.value).splitlines()[0])
    assert errors == [message] * 3


@pytest.mark.parametrize("xd,wd", sorted(LEGAL, key=str), ids=lambda d: _name(d))
def test_legal_dtype_pairs_run_fused_and_reference(xd, wd):
    x, W, y = _inputs(xd, wd)
    fused = mo.margin_cross_entropy(x, W, y, mo.CosFace(s=8.0))
    ref = reference.margin_cross_entropy(x, W, y, mo.CosFace(s=8.0))
    assert torch.isfinite(fused) and torch.isfinite(ref)


def test_head_with_bfloat16_weight_rejects_float32_features():
    head = mo.MarginHead(8, 12, margin=mo.ArcFace(), dtype=torch.bfloat16)
    x, _, y = _inputs()
    with pytest.raises(ValueError, match="x is float32 but weight is bfloat16"):
        head(x, y)


def test_autocast_applies_the_rule_after_the_cast():
    x, W, y = _inputs(torch.float32, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # x becomes bfloat16: equal dtypes
        loss = mo.margin_cross_entropy(x, W, y, mo.ArcFace(s=8.0))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("bd", ALL, ids=_name)
def test_bias_of_any_float_dtype_is_accepted(bd):
    x, W, y = _inputs()
    b = torch.zeros(12, dtype=bd)
    mo.margin_cross_entropy(x, W, y, mo.Softmax(), bias=b)
    reference.margin_cross_entropy(x, W, y, mo.Softmax(), bias=b)


# -- check_finite ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [mo.margin_cross_entropy, reference.margin_cross_entropy], ids=["fused", "reference"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_names_the_first_bad_row_class_and_bias_entry(fn, bad):
    x, W, y = _inputs(B=20, C=30)
    b = torch.zeros(30)
    x[17, 2] = bad
    x[19, 0] = bad
    with pytest.raises(ValueError, match=re.escape("x[17] holds NaN/Inf (first bad row)")):
        fn(x, W, y, mo.ArcFace(), check_finite=True)
    x[17, 2] = x[19, 0] = 0.0
    W[23, 5] = bad
    with pytest.raises(ValueError, match=re.escape("weight[23] holds NaN/Inf (first bad class)")):
        fn(x, W, y, mo.ArcFace(), check_finite=True)
    W[23, 5] = 0.0
    b[4] = bad
    with pytest.raises(ValueError, match=re.escape("bias[4] holds NaN/Inf (first bad entry)")):
        fn(x, W, y, mo.Softmax(), bias=b, check_finite=True)
    b[4] = 0.0
    fn(x, W, y, mo.Softmax(), bias=b, check_finite=True)  # all finite: no error


def test_check_finite_names_the_class_of_a_subcenter_row():
    x, W, y = _inputs(C=30)  # 10 classes x 3 sub-centers
    W[13, 0] = float("nan")
    with pytest.raises(ValueError, match=re.escape("weight[13] (class 4, sub-center 1) holds NaN/Inf")):
        mo.margin_cross_entropy(x, W, y.remainder(10), mo.SubCenterArcFace(K=3), check_finite=True)


def test_without_check_finite_one_nan_row_spoils_all_of_dW():
    x, W, y = _inputs(B=8, C=16)
    x[3] = float("nan")
    W.requires_grad_()
    mo.margin_cross_entropy(x, W, y, mo.ArcFace()).backward()
    assert torch.isnan(W.grad).all()


def test_heads_take_check_finite():
    x, _, y = _inputs(B=20)
    x[5, 1] = float("nan")
    for head in (
        mo.MarginHead(8, 12, margin=mo.ArcFace(), check_finite=True),
        reference.MarginHead(8, 12, margin=mo.ArcFace(), check_finite=True),
        mo.WeightedMarginHead(8, 12, terms=[(mo.ArcFace(), 1.0), (mo.SphereFace(), 0.5)], check_finite=True),
    ):
        with pytest.raises(ValueError, match=re.escape("x[5] holds NaN/Inf (first bad row)")):
            head(x, y)
    assert torch.isnan(mo.MarginHead(8, 12, margin=mo.ArcFace())(x, y))  # off by default


# -- head.topk(kind=...) ---------------------------------------------------------------------------


def test_topk_kinds_against_formula():
    torch.manual_seed(0)
    head = mo.MarginHead(8, 50, margin=mo.ArcFace(s=30.0), bias=True)
    with torch.no_grad():
        head.weight.normal_()
        head.bias.normal_()
    x = torch.randn(7, 8)
    cos = F.normalize(x, dim=1) @ F.normalize(head.weight.detach(), dim=1).T
    want_cos, want_cls = cos.topk(5, dim=1)
    for values, classes in (head.topk(x, 5), head.topk(x, 5, kind="cosine")):  # "cosine" is the default
        torch.testing.assert_close(values, want_cos, atol=1e-5, rtol=1e-5)
        assert torch.equal(classes, want_cls)
        assert values.abs().max() <= 1.0
    want_logit, want_cls = (30.0 * cos + head.bias.detach()).topk(5, dim=1)
    values, classes = head.topk(x, 5, kind="logit")
    torch.testing.assert_close(values, want_logit, atol=1e-4, rtol=1e-5)
    assert torch.equal(classes, want_cls)
    with pytest.raises(ValueError, match="kind must be one of"):
        head.topk(x, 5, kind="probability")


def test_topk_cosine_of_subcenters_is_the_best_subcenter():
    torch.manual_seed(1)
    head = mo.MarginHead(8, 20, margin=mo.SubCenterArcFace(K=3))
    x = torch.randn(4, 8)
    cos = (F.normalize(x, dim=1) @ F.normalize(head.weight.detach(), dim=1).T).view(4, 20, 3).amax(2)
    values, classes = head.topk(x, 3)
    want, want_cls = cos.topk(3, dim=1)
    torch.testing.assert_close(values, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(classes, want_cls)


def test_margin_head_defaults_to_softmax():
    assert isinstance(mo.MarginHead(8, 4).margin, mo.Softmax)
    assert "default margin is plain" in mo.MarginHead.__doc__


# -- the CLI ---------------------------------------------------------------------------------------


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_every_option_of_every_subcommand_has_help_and_shows_its_default():
    from marginops.tools.cli import build_parser

    parser = build_parser()
    subs = dict(_subparsers(parser))
    assert {"bench", "demo", "train"} <= set(subs)
    missing = []
    for name, sub in subs.items():
        assert sub.formatter_class is argparse.ArgumentDefaultsHelpFormatter or issubclass(
            sub.formatter_class, argparse.ArgumentDefaultsHelpFormatter
        ), name
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
        text = sub.format_help()
        assert "``" not in text, f"{name} --help has markup"
    assert not missing, f"options without help: {missing}"


# -- the sharded head: the same rule, check_finite and topk kinds, raised on every rank ------------


def _check_sharded(rank, world):
    from marginops import distributed as mdist

    torch.manual_seed(0)
    C, D = 12, 8
    g = torch.Generator().manual_seed(1)
    W = torch.randn(C, D, generator=g)
    b = torch.randn(C, generator=g)
    x = torch.randn(5, D, generator=g)
    y = torch.randint(0, C, (5,), generator=g)
    head = mdist.ShardedMarginHead(D, C, margin=mo.ArcFace(s=30.0), bias=True, check_finite=True)
    lo, hi = mdist.class_range(C, world, rank)
    with torch.no_grad():
        head.weight.copy_(W[lo:hi])
        head.bias.copy_(b[lo:hi])
    with pytest.raises(ValueError, match="rank 0: x is float64 but weight is float32"):
        head(x.double() if rank == 0 else x, y)
    bad = x.clone()
    if rank == 1:
        bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match=re.escape("rank 1: x[3] holds NaN/Inf (first bad row)")):
        head(bad, y)
    if rank == 1:
        with torch.no_grad():
            head.weight[2, 0] = float("inf")
    with pytest.raises(
        ValueError, match=re.escape(f"rank 1: weight[2] (class {mdist.class_range(C, world, 1)[0] + 2}) holds NaN/Inf")
    ):
        head(x, y)
    with torch.no_grad():
        head.weight.copy_(W[lo:hi])
    cos = F.normalize(x, dim=1) @ F.normalize(W, dim=1).T
    values, classes = head.topk(x, 4)
    want, want_cls = cos.topk(4, dim=1)
    torch.testing.assert_close(values, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(classes, want_cls)
    values, classes = head.topk(x, 4, kind="logit")
    want, want_cls = (30.0 * cos + b).topk(4, dim=1)
    torch.testing.assert_close(values, want, atol=1e-4, rtol=1e-5)
    assert torch.equal(classes, want_cls)


def test_sharded_head_dtype_rule_check_finite_and_topk_kinds():
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from helpers import spawn

    spawn(_check_sharded, 2)


# -- the benchmark states its result ---------------------------------------------------------------


def test_bench_memory_is_never_printed_as_zero_and_marginops_reads_real_bytes():
    from marginops.tools import memory
    from marginops.tools.bench import impls, measure, report

    assert report.fmt_bytes(0) == "0 B" and report.fmt_bytes(900) == "900 B"
    assert report.fmt_bytes(12_800) == "12.5 KiB" and report.fmt_bytes(3 * 2**20) == "3.0 MiB"
    assert report.fmt_bytes(int(1.5 * 2**30)) == "1.50 GiB"
    memory.precise_host_memory()
    case = impls.Case(64, 32, 20_000, "float32", "arcface")
    x, W, y = measure.make_inputs(case, torch.device("cpu"))
    fn = impls.IMPLS["marginops"].make(case, torch.device("cpu"))
    measure.run_step(fn, x, W, y)
    peak = measure.peak_extra(fn, x, W, y, torch.device("cpu"), tries=2)
    if peak is not None:  # Linux: the marginops step's own buffers are seen, not rounded away
        assert 0 < peak < 8 * 2**20
        eager = measure.peak_extra(
            impls.IMPLS["reference"].make(case, torch.device("cpu")), x, W, y, torch.device("cpu")
        )
        assert eager > 64 * 20_000 * 4  # at least one [B, C] float32 logits tensor


def test_bench_repeats_follow_a_time_budget():
    from marginops.tools.bench import measure

    assert len(measure.timed_runs(lambda: 1.0, 5, None)) == 5
    assert len(measure.timed_runs(lambda: 1.0, 5, 3.0)) == 5  # the least number of runs comes first
    assert len(measure.timed_runs(lambda: 0.25, 5, 2.0)) == 8  # then runs while the budget lasts
    assert len(measure.timed_runs(lambda: 0.0, 5, 1.0)) == measure.MAX_REPEATS


def test_bench_headline_states_speed_memory_and_largest_c_ratios():
    from marginops.tools.bench import impls, measure, report

    R = measure.Result
    rows = []
    for C, (tf, mf, te, me) in {100_000: (10.0, 2**20, 30.0, 2**28), 300_000: (25.0, 2**20, 80.0, 240 * 2**20)}.items():
        case = impls.Case(256, 128, C, "float32", "arcface")
        rows += [R(case, "marginops", "ok", tf, mf), R(case, "reference", "ok", te, me), R(case, "gemm3", "ok", 5.0)]
    rows[0].max_classes, rows[1].max_classes = 400_000, 100_000
    case = impls.Case(256, 128, 300_000, "float32", "arcface")
    rows.append(R(case, "pml", "oom"))
    lines = report.headline(rows)
    assert [(l["impl"], l["against"], l["classes"]) for l in lines] == [("marginops", "reference", 300_000)]
    assert lines[0]["text"] == (
        "marginops vs eager at C = 300k (arcface, float32, B=256, D=128): 3.2x faster, 240x less memory, fits 4x more "
        "classes"
    )
    assert "x 3 GEMMs (reference cost)" in report.text_table(rows) and "not a floor" in report.LEGEND


def test_bench_json_keeps_old_fields_and_adds_spread_and_headline(tmp_path):
    import json
    import subprocess
    import sys

    subprocess.run(
        [
            sys.executable,
            "-m",
            "marginops",
            "bench",
            "--quick",
            "--no-max-classes",
            "--classes",
            "500,1000",
            "--out",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    data = json.loads((tmp_path / "cpu-bench.json").read_text())
    for r in data["results"]:
        if r["status"] == "ok":
            assert {"time_ms", "peak_extra_bytes", "tflops", "loss", "loss_rel_err", "max_classes"} <= set(r)
            assert r["repeats"] >= 5 and r["time_ms_min"] <= r["time_ms"] <= r["time_ms_max"]
    assert data["headline"] and data["headline"][0]["impl"] == "marginops"
    md = (tmp_path / "cpu-bench.md").read_text()
    assert "marginops vs eager at C = 1k" in md and "0.00 MiB" not in md


# -- the demo is reproducible ----------------------------------------------------------------------


def test_demo_gives_identical_numbers_on_two_runs(tmp_path):
    import subprocess
    import sys

    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    tables = []
    for run in ("a", "b"):
        out = tmp_path / run
        subprocess.run(
            [sys.executable, "-m", "marginops", "demo", "--epochs", "1", "--dims", "2", "--out", str(out)],
            check=True,
            capture_output=True,
            text=True,
        )
        tables.append((out / "verification.md").read_text())
    assert tables[0] == tables[1]
    assert tables[0].count("| 2 |") == 5
