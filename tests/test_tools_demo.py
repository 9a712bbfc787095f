"""`marginops demo` (marginops.tools.demo) in a CI-sized configuration: pictures and the
verification table written and well-formed; the verification figures on features whose answers
are known."""

import math
import subprocess
import sys

import pytest
import torch

from marginops.tools import demo

f64 = torch.float64


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "marginops", *args], capture_output=True, text=True, check=True)


def test_demo_writes_pictures_and_table(tmp_path):
    pytest.importorskip("sklearn")  # the bundled digits
    pytest.importorskip("matplotlib")
    proc = run_cli("demo", "--epochs", "2", "--dims", "2,3", "--out", str(tmp_path))
    assert "pair accuracy" in proc.stdout
    for png in ("features_2d.png", "features_3d.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [
        l
        for l in (tmp_path / "verification.md").read_text().splitlines()
        if l.startswith("| 2 ") or l.startswith("| 3 ")
    ]
    assert len(rows) == 10
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(0.0 <= float(c) <= 1.0 for c in cells[2:5]) and cells[5].endswith("°")


# ---- the demo's verification figures on features whose answers are known -------------------------


def test_demo_verification_on_exact_features():
    eye = torch.eye(3, dtype=f64)
    feats = eye[[0, 0, 0, 1, 1, 1, 2, 2, 2]] * torch.tensor([1.0, 2.0, 3.0] * 3, dtype=f64)[:, None]
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    got = demo.verification(feats, labels, far=0.01)  # same-class cos = 1, others 0: perfectly separable
    assert got == {"pair_accuracy": 1.0, "tar": 1.0, "intra_angle": 0.0}
    a = math.radians(10.0)  # each class: two features at ±10° around its axis; the mean direction is the axis
    base = [(0.0, 1.0), (math.pi / 2, 1.0), (math.pi, 1.0)]
    feats = torch.tensor([[r * math.cos(t + d), r * math.sin(t + d)] for t, r in base for d in (a, -a)], dtype=f64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert demo.verification(feats, labels, far=0.01)["intra_angle"] == pytest.approx(10.0, abs=1e-9)
