"""Measuring one implementation on one case: forward+backward time (median of at least
`repeat` runs, more while a time budget lasts; warm-up excluded; min and max kept as the spread),
peak memory above the inputs and their gradients (on the host to about a page: see
peak_extra), algorithmic TFLOP/s, the loss's error against
float64, and the largest class count that fits (bisection).

On a GPU the inputs are drawn on the device (no host copy of W), a case an implementation cannot
fit in the free device memory is skipped from its estimate (an out-of-memory error is still
caught), the largest-C search stops where W and its gradient alone would fill the device, and a
deadline bounds the whole sweep: what is left when it passes is reported as skipped."""

from __future__ import annotations

import gc
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Dict, Iterable, List, Optional

import torch

from ...functional import margin_cross_entropy
from ..common import MARGINS
from ..memory import byte_precise_host_memory, peak_bytes
from .impls import IMPLS, Case


@dataclass
class Result:
    case: Case
    impl: str
    status: str  # "ok", "oom", "unsupported: ...", "unavailable: ...", "error: ..."
    time_ms: Optional[float] = None
    peak_extra_bytes: Optional[int] = None
    tflops: Optional[float] = None
    loss: Optional[float] = None
    loss_rel_err: Optional[float] = None
    max_classes: Optional[int] = None
    time_ms_min: Optional[float] = None  # the spread of the timed runs
    time_ms_max: Optional[float] = None
    repeats: Optional[int] = None  # how many timed runs the median is of
    memory_method: Optional[str] = None  # how peak_extra_bytes was measured

    def to_json(self) -> dict:
        d = asdict(self)
        d["case"] = asdict(self.case)
        return d


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(case: Case, device: torch.device, seed: int = 0):
    """x [B, D], W [C, D] (scaled by 0.05) and labels [B], drawn with a generator seeded on the
    device itself: on a GPU, directly in the case's dtype (W of several GB never exists on the
    host, nor in float32); on the CPU, in float32 and then cast, as the committed CPU results were."""
    g = torch.Generator(device=device).manual_seed(seed)
    draw_dtype = case.torch_dtype if device.type == "cuda" else torch.float32
    x = torch.randn(case.batch, case.dim, generator=g, device=device, dtype=draw_dtype)
    W = torch.randn(case.classes, case.dim, generator=g, device=device, dtype=draw_dtype).mul_(0.05)
    y = torch.randint(0, case.classes, (case.batch,), generator=g, device=device)
    x, W = (t.to(case.torch_dtype).requires_grad_() for t in (x, W))
    return x, W, y


def free_device_bytes(device: torch.device) -> Optional[int]:
    """Bytes a new allocation can get on a GPU (driver-free plus what torch caches unused); None
    on the CPU."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def fits_estimate(need: int, device: torch.device, slack: float = 0.9) -> Optional[str]:
    """None when `need` bytes look affordable on the device, else the reason to skip."""
    free = free_device_bytes(device)
    if free is None or need <= slack * free:
        return None
    return f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"


def run_step(fn, x, W, y) -> float:
    """One forward+backward of fn on (x, W, y), the gradients reset first; the loss."""
    x.grad, W.grad = None, None
    loss = fn(x, W, y)
    loss.backward()
    return float(loss.detach())


MAX_REPEATS = 100


def timed_runs(run_once: Callable[[], float], repeat: int, time_budget_s: Optional[float]) -> List[float]:
    """Seconds of at least `repeat` runs of run_once (which returns its own duration), more while
    their total stays under time_budget_s (at most MAX_REPEATS)."""
    times: List[float] = []
    while len(times) < max(1, repeat) or (
        time_budget_s is not None and sum(times) < time_budget_s and len(times) < MAX_REPEATS
    ):
        times.append(run_once())
    return times


def step_times(fn, x, W, y, device, repeat, time_budget_s=None) -> List[float]:
    """Seconds of each timed forward+backward (see timed_runs)."""

    def once() -> float:
        if device.type == "cuda":
            x.grad, W.grad = None, None
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x, W, y).backward()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        run_step(fn, x, W, y)
        return time.perf_counter() - t0

    return timed_runs(once, repeat, time_budget_s)


def peak_extra(fn, x, W, y, device, tries: int = 1) -> Optional[int]:
    """Peak bytes of one step above the inputs, minus the gradients it produces (memory.peak_bytes:
    on a GPU exact; on the host with every allocation of a page or more mapped on its own
    (byte_precise_host_memory), exact to a few pages, so the least of `tries` readings is taken:
    the noise only adds). None where the host cannot measure it."""
    readings = []
    for _ in range(max(1, tries)):
        x.grad, W.grad = None, None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            _, peak = peak_bytes(device, lambda: run_step(fn, x, W, y))
        else:
            with byte_precise_host_memory():
                _, peak = peak_bytes(device, lambda: run_step(fn, x, W, y))
        if peak is None:
            return None
        grads = sum(t.grad.nbytes for t in (x, W) if t.grad is not None)
        readings.append(max(0, peak - grads))
    return min(readings)


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated above the inputs, minus the gradients"
    return (
        "peak resident set (VmHWM) above the inputs, every allocation >= 4 KiB its own mmap, minus the gradients; "
        "least of up to 3 readings"
    )


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def truth_loss(case: Case, device: torch.device, x, W, y) -> Optional[float]:
    """The loss in float64 (marginops' op, which matches the eager float64 reference to 1e-10);
    None where a float64 copy of W does not fit."""
    if fits_estimate(8 * (x.numel() + W.numel()) + 256 * 2**20, device, 0.8):
        return None
    try:
        with torch.no_grad():
            return float(margin_cross_entropy(x.double(), W.double(), y, MARGINS[case.margin]()))
    except Exception as e:  # noqa: BLE001 (a case too large for float64 still benchmarks)
        if not _is_oom(e):
            raise
        return None


def measure(
    case: Case,
    impl_name: str,
    device: torch.device,
    repeat: int,
    truth: Optional[float],
    inputs=None,
    time_budget_s: Optional[float] = None,
) -> Result:
    impl = IMPLS[impl_name]
    reason = impl.unavailable()
    if reason:
        return Result(case, impl_name, "unavailable: " + reason)
    reason = impl.unsupported(case, device)
    if reason:
        return Result(case, impl_name, "unsupported: " + reason)
    x, W, y = inputs if inputs is not None else make_inputs(case, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        reason = fits_estimate(impl.extra_bytes(case) + x.nbytes + W.nbytes, device)
        if reason:
            return Result(case, impl_name, "skipped: " + reason)
    try:
        fn = impl.make(case, device)
        t0 = time.perf_counter()
        loss = run_step(fn, x, W, y)  # warm-up (and compilation)
        warm = time.perf_counter() - t0
        peak = peak_extra(fn, x, W, y, device, tries=3 if warm < 0.5 else 1)
        times = step_times(fn, x, W, y, device, repeat, time_budget_s)
    except Exception as e:  # noqa: BLE001 (a failing implementation is reported, the sweep goes on)
        if _is_oom(e):
            return Result(case, impl_name, "oom")
        return Result(case, impl_name, f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    finally:
        x.grad, W.grad = None, None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    err = None if truth is None else abs(loss - truth) / max(abs(truth), 1e-30)
    seconds = statistics.median(times)
    return Result(
        case,
        impl_name,
        "ok",
        1e3 * seconds,
        peak,
        case.flops / seconds / 1e12,
        loss,
        err,
        time_ms_min=1e3 * min(times),
        time_ms_max=1e3 * max(times),
        repeats=len(times),
        memory_method=memory_method(device),
    )


def gemm_floor(case: Case, device: torch.device, repeat: int, time_budget_s: Optional[float] = None) -> Result:
    """Three GEMMs of the head's shape (logits x·Wᵀ, then G·W and Gᵀ·x with a [B, C] G in
    memory): a reference cost, the matmul work of one step done the plain way — not a floor (a
    fused design can beat it: it never writes or reads a [B, C] matrix)."""
    e = torch.empty((), dtype=case.torch_dtype).element_size()
    reason = fits_estimate(
        e * (2 * case.classes * case.dim + 2 * case.batch * case.classes + 2 * case.batch * case.dim), device
    )
    if reason:
        return Result(case, "gemm3", "skipped: " + reason)
    try:
        x, W, _ = make_inputs(case, device)
        x, W = x.detach(), W.detach()
        G = torch.randn(case.batch, case.classes, device=device, dtype=case.torch_dtype)

        def three():
            z = x @ W.t()
            return z, G @ W, G.t() @ x

        three()
        sync(device)

        def once() -> float:
            t0 = time.perf_counter()
            three()
            sync(device)
            return time.perf_counter() - t0

        times = timed_runs(once, repeat, time_budget_s)
        G = x = W = None  # free them: three() is not called again
    except Exception as e:  # noqa: BLE001
        return Result(case, "gemm3", "oom" if _is_oom(e) else f"error: {type(e).__name__}: {e}")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    seconds = statistics.median(times)
    return Result(
        case,
        "gemm3",
        "ok",
        1e3 * seconds,
        None,
        case.flops / seconds / 1e12,
        time_ms_min=1e3 * min(times),
        time_ms_max=1e3 * max(times),
        repeats=len(times),
    )


def fits(case: Case, impl_name: str, device: torch.device, budget_bytes: Optional[int]) -> bool:
    """Whether one step runs: on a GPU, without running out of memory; on the host, with inputs,
    gradients and peak extra memory inside budget_bytes."""
    gc.collect()
    x = W = y = fn = None
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        x, W, y = make_inputs(case, device)
        fn = IMPLS[impl_name].make(case, device)
        if device.type == "cuda":
            run_step(fn, x, W, y)
            return True
        extra = peak_extra(fn, x, W, y, device)
        used = 2 * (x.nbytes + W.nbytes) + (extra or 0)
        return budget_bytes is None or used <= budget_bytes
    except Exception as e:  # noqa: BLE001
        if _is_oom(e):
            return False
        raise
    finally:
        x = W = y = fn = None  # before emptying the cache, so the next, larger C gets the memory
        if device.type == "cuda":
            torch.cuda.empty_cache()


def device_class_limit(case: Case, device: torch.device) -> Optional[int]:
    """On a GPU, the class count at which W and its gradient alone fill the free memory: no
    implementation fits more. None on the CPU."""
    free = free_device_bytes(device)
    if free is None:
        return None
    e = torch.empty((), dtype=case.torch_dtype).element_size()
    return max(1, free // (2 * case.dim * e))


class SearchCut(Exception):
    """The largest-C search ran out of time; `lower` classes are known to fit."""

    def __init__(self, lower: int):
        super().__init__(f"time budget: at least {lower:,}")
        self.lower = lower


def max_classes(
    case: Case,
    impl_name: str,
    device: torch.device,
    budget_bytes: Optional[int],
    limit: int,
    precision: float = 0.05,
    deadline: Optional[float] = None,
) -> int:
    """The largest class count (to `precision`) at which one step fits: doubling from
    case.classes, then bisection. 0 when even case.classes does not fit; `limit` caps it, and on
    a GPU so does the free device memory (device_class_limit). Raises SearchCut when
    time.monotonic() passes `deadline` before the search ends."""
    device_limit = device_class_limit(case, device)
    if device_limit is not None:
        limit = min(limit, device_limit)

    def try_fit(classes: int) -> bool:
        if deadline is not None and time.monotonic() > deadline:
            raise SearchCut(lo)
        return fits(replace(case, classes=classes), impl_name, device, budget_bytes)

    lo, hi = 0, case.classes
    while hi <= limit and try_fit(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        if lo < limit and try_fit(limit):
            return limit
        hi = limit
    while hi - lo > precision * max(lo, 1) and hi - lo > 1:
        mid = (lo + hi) // 2
        if try_fit(mid):
            lo = mid
        else:
            hi = mid
    return lo


def environment(device: torch.device) -> Dict[str, str]:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "threads": str(torch.get_num_threads()),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, cuda=str(torch.version.cuda), memory_gib=f"{props.total_memory / 2**30:.1f}")
        try:
            import subprocess

            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = "unknown"
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def sweep(
    cases: Iterable[Case],
    impls: List[str],
    device: torch.device,
    repeat: int,
    max_classes_budget: Optional[int],
    find_max: bool,
    max_limit: int,
    progress: Callable[[str], None],
    deadline: Optional[float] = None,
    results: Optional[List[Result]] = None,
    time_budget_s: Optional[float] = None,
) -> List[Result]:
    """Every implementation on every case, then (find_max) the largest class count per
    implementation and (dtype, margin, batch, dim). Past `deadline` (time.monotonic()), what is
    left is reported as "skipped: time budget" and a largest-C search stops with a lower bound.
    Results are appended to `results` (a list the caller can read if the run is interrupted).
    Each timing is the median of at least `repeat` runs, more while `time_budget_s` (seconds of
    timed runs per implementation and case) lasts."""
    results = [] if results is None else results
    late = lambda: deadline is not None and time.monotonic() > deadline  # noqa: E731
    for case in cases:
        if late():
            results.extend(Result(case, name, "skipped: time budget") for name in impls + ["gemm3"])
            continue
        x, W, y = make_inputs(case, device)
        truth = truth_loss(case, device, x, W, y)
        for name in impls:
            if late():
                results.append(Result(case, name, "skipped: time budget"))
                continue
            progress(f"{name} {case.batch}x{case.dim}x{case.classes} {case.dtype} {case.margin}")
            results.append(measure(case, name, device, repeat, truth, (x, W, y), time_budget_s))
        del x, W, y
        if device.type == "cuda":
            torch.cuda.empty_cache()
        progress(f"gemm3 {case.batch}x{case.dim}x{case.classes}")
        results.append(
            Result(case, "gemm3", "skipped: time budget") if late() else gemm_floor(case, device, repeat, time_budget_s)
        )
    if find_max:
        firsts: Dict[tuple, Case] = {}
        for r in results:
            key = (r.case.dtype, r.case.margin, r.case.batch, r.case.dim)
            firsts.setdefault(key, r.case)
        for case in firsts.values():
            for name in impls:
                ok = [r for r in results if r.case == case and r.impl == name and r.status == "ok"]
                if not ok:
                    continue
                if late():
                    ok[0].status = "ok (largest C: no time left)"
                    continue
                progress(f"largest C for {name} {case.dtype} {case.margin}")
                try:
                    ok[0].max_classes = max_classes(
                        case, name, device, max_classes_budget, max_limit, deadline=deadline
                    )
                except SearchCut as cut:
                    ok[0].max_classes = cut.lower
                    ok[0].status = f"ok (largest C search cut by the time budget: at least {cut.lower:,})"
                except Exception as e:  # noqa: BLE001
                    ok[0].status = f"ok (largest C failed: {type(e).__name__})"
    return results
