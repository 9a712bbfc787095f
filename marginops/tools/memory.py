"""Peak memory of a piece of work: on CUDA from the caching allocator's counters, on the host from
the kernel's resident-set high-water mark (Linux /proc). The one place the tools measure memory.

Run as ``python -m marginops.tools.memory IMPL``, it measures one head step in a fresh process
and prints JSON (tests/test_memory.py)."""

from __future__ import annotations

import contextlib
import ctypes
import re
import sys
from typing import Callable, Optional, Tuple, TypeVar

import torch

T = TypeVar("T")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    if match is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def rss_peak_supported() -> bool:
    """Whether the host's high-water mark can be reset (Linux); resets it to the current size."""
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


def peak_bytes(device: torch.device, fn: Callable[[], T]) -> Tuple[T, Optional[int]]:
    """Runs fn; returns (its result, peak bytes above the memory in use just before it, or None
    where the host cannot measure it). On CUDA: torch.cuda.max_memory_allocated, exact; on the
    host: the resident set (see byte_precise_host_memory for readings exact to a few pages)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - base
    return peak_rss_above_baseline(fn)


MMAP_THRESHOLD_DEFAULT = 1 << 20
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def _mallopt(param: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(param, value))
    except OSError:
        return False


def precise_host_memory(threshold: int = MMAP_THRESHOLD_DEFAULT) -> bool:
    """Makes glibc serve allocations above `threshold` bytes with mmap, so that freed tensors
    leave the resident set at once and host peak-memory readings are the step's own."""
    return _mallopt(M_MMAP_THRESHOLD, threshold)


@contextlib.contextmanager
def byte_precise_host_memory():
    """While measuring a step's peak on the host: every allocation of a page or more gets its own
    mmap (and freed heap memory is returned at once), so that a step's small buffers add fresh
    pages to the resident set instead of reusing heap memory that is already resident (which
    would read as 0 bytes); malloc_trim first takes the free heap pages out of the resident set,
    so that reusing a free chunk counts too. Restores the 1 MiB threshold after."""
    ok = precise_host_memory(4096) and _mallopt(M_TRIM_THRESHOLD, 0)
    if ok:  # free heap pages out of the resident set: a reused free chunk then faults fresh pages in
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
    try:
        yield ok
    finally:
        precise_host_memory(MMAP_THRESHOLD_DEFAULT)
        _mallopt(M_TRIM_THRESHOLD, 128 * 1024)


def head_step_memory(
    impl: str, B: int, D: int, C: int, margin: str = "arcface", dtype: str = "float32", seed: int = 0
) -> dict:
    """One forward+backward of a head on fresh inputs on the host; the peak resident memory above
    the inputs and the gradients it had to produce. Meant for a fresh process (see main).
    impl: "marginops" (margin_cross_entropy) or "reference" (the eager reference)."""
    import marginops as mo

    from .common import MARGINS

    fn = {"marginops": mo.margin_cross_entropy, "reference": mo.reference.margin_cross_entropy}[impl]
    spec = MARGINS[margin]()
    torch.manual_seed(seed)
    dt = getattr(torch, dtype)
    x = torch.randn(B, D, dtype=dt, requires_grad=True)
    W = torch.randn(C, D, dtype=dt, requires_grad=True)
    y = torch.randint(0, C, (B,))

    def step():
        loss = fn(x, W, y, spec)
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

    from .common import MARGINS

    p = argparse.ArgumentParser(description="peak host memory of one head step, as JSON")
    p.add_argument("impl", choices=["marginops", "reference"])
    p.add_argument("--B", type=int, default=256)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--C", type=int, default=1_000_000)
    p.add_argument("--margin", choices=sorted(MARGINS), default="arcface")
    args = p.parse_args(argv)
    print(json.dumps(head_step_memory(args.impl, args.B, args.D, args.C, args.margin)))


if __name__ == "__main__":
    main()
