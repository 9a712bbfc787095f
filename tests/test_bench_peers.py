"""torch's own F.linear_cross_entropy as a peer of `marginops bench`: its two rows
(reference path, chunked path) compute marginops.reference's Softmax and NormFace exactly (float64,
loss and both gradients), are "unavailable" on a torch without it, "unsupported" for margins, and
appear in a tiny sweep and in the gpu-check preset."""

import json
import subprocess
import sys

import pytest
import torch

import marginops as mo
from marginops import reference
from marginops.tools.bench import DEFAULTS, PRESETS, case_groups, impls, measure

LCE = ("torch-lce", "torch-lce-chunked")
needs_lce = pytest.mark.skipif(impls.torch_lce_missing() is not None, reason="torch < 2.13: no F.linear_cross_entropy")


@needs_lce
@pytest.mark.parametrize("name", LCE)
@pytest.mark.parametrize("margin", ["softmax", "normface"])
def test_loss_and_gradients_equal_the_reference_in_float64(name, margin):
    g = torch.Generator().manual_seed(3)
    B, D, C = 7, 5, 13
    x0 = torch.randn(B, D, generator=g, dtype=torch.float64)
    W0 = torch.randn(C, D, generator=g, dtype=torch.float64) * 0.3
    y = torch.randint(0, C, (B,), generator=g)
    spec = impls.MARGINS[margin]()
    assert isinstance(spec, mo.NormFace if margin == "normface" else mo.Softmax)

    x, W = x0.clone().requires_grad_(), W0.clone().requires_grad_()
    ref = reference.margin_cross_entropy(x, W, y, spec)
    ref.backward()
    fn = impls.IMPLS[name].make(impls.Case(B, D, C, "float64", margin), torch.device("cpu"))
    xl, Wl = x0.clone().requires_grad_(), W0.clone().requires_grad_()
    loss = fn(xl, Wl, y)
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(xl.grad, x.grad, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(Wl.grad, W.grad, rtol=1e-11, atol=1e-13)


def test_unavailable_on_a_torch_without_it(monkeypatch):
    monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy", raising=False)
    for name in LCE:
        reason = impls.IMPLS[name].unavailable()
        assert reason and "torch >= 2.13" in reason
        r = measure.measure(impls.Case(4, 3, 10, "float32", "softmax"), name, torch.device("cpu"), 1, None)
        assert r.status.startswith("unavailable: ") and "linear_cross_entropy" in r.status


def test_margins_are_unsupported():
    for name in LCE:
        assert "no margin" in impls.IMPLS[name].unsupported(
            impls.Case(4, 3, 10, "float32", "arcface"), torch.device("cpu")
        )
        assert impls.IMPLS[name].unsupported(impls.Case(4, 3, 10, "float32", "normface"), torch.device("cpu")) is None


def test_in_the_gpu_defaults_and_the_gpu_check_preset():
    assert set(LCE) <= set(DEFAULTS["cuda"]["impls"].split(",")) and "normface" in DEFAULTS["cuda"]["margins"]
    cfg = dict(DEFAULTS["cuda"], **PRESETS["gpu-check"])
    assert set(LCE) <= set(cfg["impls"].split(","))
    groups = case_groups(cfg, cfg["margins"].split(","), cfg["impls"].split(","), cfg["by_margin"])
    first_cases, _ = groups[0]
    assert [c.margin for c in first_cases] == ["arcface"] * 3  # the chunked backend's checks' cases come first
    if impls.torch_lce_missing() is None:
        rest = {c.margin: (c.classes, names) for cases, names in groups[1:] for c in cases}
        assert rest["softmax"][0] == rest["normface"][0] == 1_000_000
        assert set(LCE) | {"chunked", "reference"} <= set(rest["normface"][1])


@needs_lce
def test_tiny_sweep_lists_the_rows(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "marginops",
            "bench",
            "--batch",
            "16",
            "--dim",
            "8",
            "--classes",
            "300",
            "--margins",
            "softmax,normface",
            "--impls",
            "marginops,torch-lce,torch-lce-chunked",
            "--repeat",
            "1",
            "--repeat-time-s",
            "0",
            "--no-max-classes",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "torch F.linear_cross_entropy" in proc.stdout  # the headline's name for the peer
    data = json.loads((tmp_path / "cpu-bench.json").read_text())
    by = {(r["impl"], r["case"]["margin"]): r for r in data["results"]}
    for name in LCE:
        for margin in ("softmax", "normface"):
            r = by[(name, margin)]
            assert r["status"] == "ok" and r["loss_rel_err"] < 1e-5, (name, margin, r["status"])
    md = (tmp_path / "cpu-bench.md").read_text()
    assert "| torch-lce |" in md and "| torch-lce-chunked |" in md
