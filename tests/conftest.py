import os

import pytest
import torch

import marginops as mo
from marginops.functional import loss_from_stats
from marginops.margins import RowContext, target_cosines
from marginops.ops import HeadStats

# Every margin spec of the foundation, with parameters chosen so that a random batch has rows on
# both sides of the θ + m > π boundary for the angular ones.
MARGINS = {
    "softmax": mo.Softmax(),
    "weightnorm": mo.WeightNormSoftmax(),
    "l2softmax": mo.L2Softmax(s=16.0),
    "normface": mo.NormFace(s=20.0),
    "lsoftmax": mo.LSoftmax(m=3, lambda_=0.5),
    "sphereface": mo.SphereFace(m=4),
    "cosface": mo.CosFace(s=30.0, m=0.35),
    "arcface": mo.ArcFace(s=30.0, m=0.5),
    "arcface_easy": mo.ArcFace(s=30.0, m=0.5, policy="easy"),
    "arcface_none": mo.ArcFace(s=30.0, m=0.5, policy="none"),
    "arcface_continuous": mo.ArcFace(s=30.0, m=0.5, policy="continuous"),
    "combined": mo.CombinedMargin(s=30.0, m1=1.0, m2=0.3, m3=0.2),
    "combined_m1": mo.CombinedMargin(s=30.0, m1=1.35, m2=0.25, m3=0.1, policy="continuous"),
}

DEVICES = ["cpu"] + (["cuda"] if mo.cuda_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def make_inputs(B, D, C, dtype=torch.float64, device="cpu", bias=False, ignore=0, seed=0, requires_grad=True):
    """Features, class weights, labels (the first `ignore` rows set to -100) and an optional bias.
    A few rows point almost opposite their class so that θ + m > π occurs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    W = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    for i in range(min(3, B)):
        x[B - 1 - i] = -W[y[B - 1 - i]] * (1 + i) + 0.1 * x[B - 1 - i]
    y[:ignore] = -100
    b = torch.randn(C, generator=g, dtype=torch.float64) if bias else None
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
    return to(x), to(W), y.to(device), to(b)


def rel_err(a, b):
    """max |a - b| / max |b| (0 when both vanish)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    scale = b.abs().max() if b.numel() else torch.tensor(0.0)
    diff = (a - b).abs().max() if b.numel() else torch.tensor(0.0)
    return float(diff / scale) if scale > 0 else float(diff)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Emulated:
    """csrc/cuda built for the CPU emulation (tests/cuda_emu): the fused backend's ops with the
    schemas' trailing default (grad_skip = 0), the CUDA entry points that pick a backend
    (forward_any, backward_any), and the chunked backend's plan."""

    def __init__(self, ext):
        self.ext = ext

    def forward(self, *args, grad_skip=0.0):
        return self.ext.forward(*args, grad_skip)

    def backward(self, *args, grad_skip=0.0):
        return self.ext.backward(*args, grad_skip)

    def __getattr__(self, name):
        return getattr(self.ext, name)


@pytest.fixture(scope="session")
def emu():
    from torch.utils.cpp_extension import load

    if os.environ.get("MARGINOPS_SKIP_EMULATION") == "1":
        pytest.skip("MARGINOPS_SKIP_EMULATION=1")
    return _Emulated(load(
        name="marginops_cuda_emu",
        sources=[os.path.join(ROOT, "tests", "cuda_emu", "emu_ext.cpp"), os.path.join(ROOT, "csrc", "head_inputs.cpp")],
        extra_include_paths=[os.path.join(ROOT, "tests", "cuda_emu", "include")],
        extra_cflags=["-O2", "-std=c++20"],  # std::barrier; torch before 2.13 defaults to C++17
    ))


def check_tf32(errors, eager_float16_errors, taken=(10, 10, 10)):
    """errors() (relative errors against float64 of loss, dx, dW) measured with float32 products
    exact, then with torch.backends.cuda.matmul.allow_tf32: TF32 must be really taken (each error
    more than taken[k] times the exact one) and within twice eager float16's error, which has the
    same 10-bit mantissa."""
    exact = errors()
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        tf32 = errors()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert max(exact) < 1e-5, exact
    assert all(t > f * e for t, e, f in zip(tf32, exact, taken)), f"TF32 {tf32} vs exact {exact}"
    assert all(t <= 2 * e for t, e in zip(tf32, eager_float16_errors)), f"TF32 {tf32} vs eager float16 {eager_float16_errors}"


class _EmulatedOp(torch.autograd.Function):
    """The op pair as the CUDA dispatch runs it (forward_any, backward_any) with a backend, under autograd."""

    @staticmethod
    def forward(ctx, emu, backend, workspace, x, W, y, bias, row_margins, curricular, num_classes, ignore_index, cfg):
        args = (x, W, y, bias, row_margins, curricular, None, num_classes, 0, ignore_index, *cfg)
        stats = emu.forward_any(*args, 0.0, backend, workspace)
        ctx.save_for_backward(x, W, y, bias, row_margins, curricular, stats[0])
        ctx.emu, ctx.backend, ctx.workspace, ctx.rest = emu, backend, workspace, (num_classes, ignore_index, cfg)
        ctx.mark_non_differentiable(stats[3], stats[4])
        return stats

    @staticmethod
    def backward(ctx, gl, gt, gs, _gb, _gc):
        x, W, y, bias, row_margins, curricular, lse = ctx.saved_tensors
        num_classes, ignore_index, cfg = ctx.rest
        need = ctx.needs_input_grad
        mask = [need[3], need[4], need[6] and bias is not None, need[7] and row_margins is not None]
        args = (x, W, y, bias, row_margins, curricular, None, num_classes, 0, ignore_index, *cfg)
        dx, dw, db, dm = ctx.emu.backward_any(gl, gt, gs, lse, *args, mask, 0.0, ctx.backend, ctx.workspace)
        pick = lambda t, m: t if m else None  # noqa: E731
        return (None, None, None, pick(dx, mask[0]), pick(dw, mask[1]), None, pick(db, mask[2]), pick(dm, mask[3]), None, None, None, None)


def emulated_loss(emu, backend, x, W, y, margin, bias=None, reduction="mean", ignore_index=-100, label_smoothing=0.0, workspace=0):
    """marginops.margin_cross_entropy's steps with an emulated CUDA backend (1 chunked, 2 fused)
    in place of the CPU op."""
    cfg = margin.config()
    C = W.shape[0] // cfg.subcenters
    valid = y != ignore_index
    ctx = RowContext(x, y, valid, False, lambda: target_cosines(x, W, y, valid, cfg.subcenters))
    terms = margin.prepare(ctx, None)
    stats = _EmulatedOp.apply(emu, backend, workspace, x, W, y, bias, terms.row_margins, terms.curricular, C, ignore_index, cfg)
    return loss_from_stats(HeadStats(*stats), y, C, ignore_index, label_smoothing, reduction, terms.extra_loss)


# -- skips: with MARGINOPS_NO_SKIPS=1 (set by .ci/run) a skip whose reason does not name a GPU fails
# the session, so a missing test dependency or a broken fixture cannot pass CI as "skipped".
_skips = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skips.append((report.nodeid, reason))


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("MARGINOPS_NO_SKIPS") != "1":
        return
    bad = [(node, reason) for node, reason in _skips if "GPU" not in reason]
    if bad:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        reporter.write_line(f"MARGINOPS_NO_SKIPS=1: {len(bad)} test(s) skipped for a reason other than a missing GPU:", red=True)
        for node, reason in bad:
            reporter.write_line(f"  {node}: {reason}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

