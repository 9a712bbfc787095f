"""The README's main job, `marginops train`, in a CI-sized configuration."""

import json
import subprocess
import sys


def test_train_fused_vs_eager(tmp_path):
    out = tmp_path / "train.json"
    cmd = [
        sys.executable,
        "-m",
        "marginops",
        "train",
        "--classes",
        "3000",
        "--batch",
        "64",
        "--dim",
        "16",
        "--samples",
        "256",
        "--steps",
        "12",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "fused / eager: step time" in proc.stdout
    data = json.loads(out.read_text())
    fused, eager = data["results"]["fused"], data["results"]["eager"]
    assert len(fused["losses"]) == 12
    assert max(abs(a - b) for a, b in zip(fused["losses"], eager["losses"])) < 1e-3
    assert fused["losses"][-1] < 0.5 * fused["losses"][0], "the synthetic task is learnt in three epochs"


def test_bad_arguments_exit_with_usage():
    proc = subprocess.run(
        [sys.executable, "-m", "marginops", "train", "--margin", "nope"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
