"""The memory contract (docs/design.md) on the CPU: a forward+backward at B=256, D=128, C=1M keeps
its peak memory above the inputs and their gradients under BOUND, far below one [B, C] fp32
tensor (1 GB), while the eager reference needs several such tensors. Each run is a fresh process
so that its high-water mark is its own."""

import json
import subprocess
import sys

import pytest

from marginops.tools.memory import rss_peak_supported

BOUND = 64 * 2**20  # bytes; measured ~14 MB on 2 threads

pytestmark = pytest.mark.skipif(not rss_peak_supported(), reason="needs Linux /proc/self/clear_refs")


def probe(impl):
    out = subprocess.run(
        [sys.executable, "-m", "marginops.tools.memory", impl, "--B", "256", "--D", "128", "--C", "1000000"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_marginops_memory_is_bounded_and_eager_is_not():
    mine = probe("marginops")
    eager = probe("reference")
    print(
        f"\nmarginops extra {mine['extra_bytes'] / 2**20:.1f} MiB, eager extra {eager['extra_bytes'] / 2**20:.1f} MiB"
    )
    assert mine["extra_bytes"] <= BOUND < mine["logits_bytes"] / 10
    assert eager["extra_bytes"] >= 2 * eager["logits_bytes"]
    assert abs(mine["loss"] - eager["loss"]) <= 1e-4 * abs(eager["loss"])
