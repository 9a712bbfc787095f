"""examples/insightface_train.py under torchrun on CPU (gloo): two ranks train and checkpoint,
then one rank resumes from their per-rank checkpoints (another world size)."""

import math
import os
import re
import subprocess
import sys

import pytest
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def torchrun(nproc, *args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        os.path.join(ROOT, "examples", "insightface_train.py"),
        *args,
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def losses(stdout):
    return [float(v) for v in re.findall(r"loss (\S+)", stdout)]


def test_train_checkpoint_and_resume_at_another_world_size(tmp_path):
    first = torchrun(2, "--steps", "6", "--save-every", "3", "--output", str(tmp_path))
    assert len(losses(first)) == 6 and all(math.isfinite(v) for v in losses(first))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_gpu_0.pt", "checkpoint_gpu_1.pt"]
    second = torchrun(1, "--steps", "8", "--output", str(tmp_path), "--resume")
    assert "resumed at step 6 from a world size of 2 on 1" in second
    assert len(losses(second)) == 2 and all(math.isfinite(v) for v in losses(second))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_gpu_0.pt"]


def test_the_head_optimizer_in_the_backward_follows_the_dense_run(tmp_path):
    """--head-optimizer exact under Partial FC: the loss curve of torch's SGD over both (dense
    gradients); lazy leaves the unsampled rows' momentum and decay out, and says so. Then a resume
    at another world size carries the head's momentum over (marginops checkpoints under head/)."""
    common = ["--steps", "6", "--save-every", "3", "--sample-rate", "0.5", "--num-classes", "40"]
    dense = losses(torchrun(2, *common, "--output", str(tmp_path / "dense")))
    out = torchrun(2, *common, "--output", str(tmp_path / "exact"), "--head-optimizer", "exact")
    assert "head optimizer: marginops.optim.SGD in the backward, sparse='exact'" in out
    assert losses(out) == pytest.approx(dense, rel=1e-4)
    lazy = torchrun(2, *common, "--output", str(tmp_path / "lazy"), "--head-optimizer", "lazy")
    assert "sparse='lazy'" in lazy and len(losses(lazy)) == 6
    again = ["--steps", "8", "--sample-rate", "0.5", "--num-classes", "40", "--resume", "--head-optimizer", "exact"]
    resumed = torchrun(1, *again, "--output", str(tmp_path / "exact"))
    assert "resumed at step 6 from a world size of 2 on 1" in resumed
    assert len(losses(resumed)) == 2 and all(math.isfinite(v) for v in losses(resumed))
