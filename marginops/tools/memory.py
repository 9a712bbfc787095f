"""Peak host memory of a piece of work, from the kernel's high-water mark (Linux /proc)."""

from __future__ import annotations

import re
from typing import Callable, Optional, Tuple, TypeVar

T = TypeVar("T")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    if match is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def rss_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


def peak_rss_above_baseline(fn: Callable[[], T]) -> Tuple[T, Optional[int]]:
    """Runs fn and returns (its result, peak resident bytes above the resident size just before),
    or None for the bytes where the kernel cannot reset the high-water mark (non-Linux)."""
    if not rss_peak_supported():  # also resets the high-water mark to the current size
        return fn(), None
    base = _status_kib("VmRSS")
    result = fn()
    return result, (_status_kib("VmHWM") - base) * 1024


def head_step_memory(
    impl: str, B: int, D: int, C: int, margin: str = "arcface", dtype: str = "float32", seed: int = 0
) -> dict:
    """One forward+backward of a head on fresh inputs; the peak resident memory above the inputs
    and the gradients it had to produce. Meant for a fresh process (see main)."""
    import torch

    import marginops as mo

    margins = {"arcface": mo.ArcFace(), "cosface": mo.CosFace(), "softmax": mo.Softmax()}
    fn = {"fused": mo.margin_cross_entropy, "reference": mo.reference.margin_cross_entropy}[impl]
    torch.manual_seed(seed)
    dt = getattr(torch, dtype)
    x = torch.randn(B, D, dtype=dt, requires_grad=True)
    W = torch.randn(C, D, dtype=dt, requires_grad=True)
    y = torch.randint(0, C, (B,))

    def step():
        loss = fn(x, W, y, margins[margin])
        loss.backward()
        return float(loss.detach())

    loss, peak = peak_rss_above_baseline(step)
    grads = x.grad.nbytes + W.grad.nbytes
    return {
        "impl": impl,
        "B": B,
        "D": D,
        "C": C,
        "loss": loss,
        "grad_bytes": grads,
        "extra_bytes": None if peak is None else peak - grads,
        "logits_bytes": B * C * 4,
    }


def main(argv=None) -> None:
    import argparse
    import json

    p = argparse.ArgumentParser(description="peak host memory of one head step, as JSON")
    p.add_argument("impl", choices=["fused", "reference"])
    p.add_argument("--B", type=int, default=256)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--C", type=int, default=1_000_000)
    p.add_argument("--margin", default="arcface")
    args = p.parse_args(argv)
    print(json.dumps(head_step_memory(args.impl, args.B, args.D, args.C, args.margin)))


if __name__ == "__main__":
    main()
