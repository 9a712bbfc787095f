"""CUDA-only checks (skipped without a GPU): graph capture, 64-bit indexing past 2^31 elements of
W, the memory contract at the face-recognition shape, mixed precision under autocast, and TF32
only when torch allows it; and for the two CUDA backends (backend="chunked", the default,
and backend="fused", the tile path): float64 and bfloat16 against the eager reference,
a CUDA graph of the chunked backend, its kernel-launch count and its 64 MiB contract. The
rest of the CUDA coverage comes from the device-parametrized tests (test_functional, test_ops,
test_margins_zoo: `-k cuda`)."""

import pytest
import torch
from helpers import make_inputs, rel_err

import marginops as mo
from marginops import reference

BACKENDS = ["chunked", "fused"]

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not mo.cuda_available(), reason="needs the CUDA kernels and a GPU")]


def capture(step, x, W):
    """step() (forward + backward) warmed up on a side stream, then captured: (graph, its loss)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            x.grad = W.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    x.grad = W.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    return graph, loss


def test_cuda_graph_capture_replays_forward_and_backward():
    torch.manual_seed(0)
    dev = torch.device("cuda")
    x = torch.randn(256, 128, device=dev, requires_grad=True)
    W = torch.randn(5000, 128, device=dev, requires_grad=True)
    y = torch.randint(0, 5000, (256,), device=dev)

    def step():
        loss = mo.margin_cross_entropy(x, W, y, mo.ArcFace())
        loss.backward()
        return loss

    graph, loss = capture(step, x, W)
    with torch.no_grad():  # new values in the captured input buffers
        x.copy_(torch.randn_like(x))
        y.copy_(torch.randint(0, 5000, (256,), device=dev))
        x.grad.zero_()
        W.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    xr, Wr = x.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    ref = reference.margin_cross_entropy(xr, Wr, y, mo.ArcFace())
    ref.backward()
    assert rel_err(loss, ref) < 1e-5 and rel_err(x.grad, xr.grad) < 1e-4 and rel_err(W.grad, Wr.grad) < 1e-4


def test_chunked_backend_in_a_cuda_graph_replays_like_eager_calls():
    """Forward+backward of backend="chunked" captured once with static inputs, replayed twice
    with new values in the input buffers: each replay equals an eager call of the same backend on
    those values, and the float64 reference."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    B, D, C = 256, 128, 5000
    x = torch.randn(B, D, device=dev, requires_grad=True)
    W = torch.randn(C, D, device=dev, requires_grad=True)
    y = torch.randint(0, C, (B,), device=dev)

    def step():
        loss = mo.margin_cross_entropy(x, W, y, mo.ArcFace(), backend="chunked")
        loss.backward()
        return loss

    graph, loss = capture(step, x, W)
    for replay in range(2):
        with torch.no_grad():  # new values in the captured input buffers
            x.copy_(torch.randn_like(x))
            W.copy_(torch.randn_like(W))
            y.copy_(torch.randint(0, C, (B,), device=dev))
            x.grad.zero_()
            W.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        got = (loss.detach().clone(), x.grad.clone(), W.grad.clone())
        xe, We = x.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
        eager = mo.margin_cross_entropy(xe, We, y, mo.ArcFace(), backend="chunked")
        eager.backward()
        xr, Wr = x.detach().double().requires_grad_(), W.detach().double().requires_grad_()
        ref = reference.margin_cross_entropy(xr, Wr, y, mo.ArcFace())
        ref.backward()
        assert rel_err(got[0], eager) < 1e-6, f"replay {replay}: loss differs from an eager call"
        assert rel_err(got[1], xe.grad) < 1e-5 and rel_err(got[2], We.grad) < 1e-5, f"replay {replay}: gradients"
        assert rel_err(got[0], ref) < 1e-5 and rel_err(got[1], xr.grad) < 1e-4 and rel_err(got[2], Wr.grad) < 1e-4


def test_auto_backend_is_chunked_on_cuda():
    assert mo.backends()["cuda"] == "chunked" and mo.backends()["cpu"] == "tiled"


# margin, bias: the angular margins, a sub-center one, and plain softmax with a bias
BACKEND_CASES = {
    "arcface": (mo.ArcFace(s=30.0, m=0.5), False),
    "cosface": (mo.CosFace(s=30.0, m=0.35), False),
    "subcenter_arcface": (mo.SubCenterArcFace(K=3), False),
    "softmax_bias": (mo.Softmax(), True),
}
IGNORED = 5


def _backend_inputs(name, dtype, B=300, D=64, C=3000):
    """Inputs from helpers.make_inputs (the last rows past θ + m > π), W with K rows per class, the first
    IGNORED labels -100; softmax weights scaled down so 16-bit eager logits stay moderate."""
    margin, bias = BACKEND_CASES[name]
    K = margin.config().subcenters
    x, W, y, b = make_inputs(B, D, C * K, device="cuda", bias=bias, ignore=IGNORED, requires_grad=False)
    y = torch.where(y >= 0, y % C, y)
    if name == "softmax_bias":
        W, b = 0.05 * W, 0.1 * b
    to = lambda t: None if t is None else t.to(dtype).requires_grad_()  # noqa: E731
    return margin, to(x), to(W), y, to(b)


def _loss_and_grads(fn, margin, x, W, y, b, **kw):
    loss = fn(x, W, y, margin, bias=b, label_smoothing=0.1, ignore_index=-100, **kw)
    return [loss] + list(torch.autograd.grad(loss, [x, W] + ([b] if b is not None else [])))


@pytest.mark.parametrize(  # workspace_bytes is the chunked backend's
    "backend, workspace",
    [("chunked", None), ("chunked", 1 << 20), ("fused", None)],
    ids=["chunked", "chunked-1MiB", "fused"],
)
@pytest.mark.parametrize("name", list(BACKEND_CASES))
def test_backend_float64_matches_reference(backend, name, workspace):
    """float64, label smoothing 0.1, ignored rows: loss and every gradient to 1e-10 of eager.
    A 1 MiB workspace splits the chunked backend's 3000 classes into several chunks."""
    kw = dict(backend=backend) if workspace is None else dict(backend=backend, workspace_bytes=workspace)
    margin, x, W, y, b = _backend_inputs(name, torch.float64)
    got = _loss_and_grads(mo.margin_cross_entropy, margin, x, W, y, b, **kw)
    ref = _loss_and_grads(reference.margin_cross_entropy, margin, x, W, y, b)
    assert got[0].dtype == torch.float64
    for what, g, r in zip(("loss", "dx", "dW", "db"), got, ref):
        assert rel_err(g, r) <= 1e-10, f"{what}: {rel_err(g, r):.2e}"
    assert float(got[1][:IGNORED].abs().max()) == 0.0, "ignored rows get no gradient"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(BACKEND_CASES))
def test_backend_bfloat16_within_twice_eager(backend, name):
    """bfloat16: the backend's error against float64 (on the same rounded inputs) at most twice
    eager bfloat16's, for the loss and every gradient."""
    margin, x, W, y, b = _backend_inputs(name, torch.bfloat16)
    wide = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    truth = _loss_and_grads(reference.margin_cross_entropy, margin, wide(x), wide(W), y, wide(b))
    got = _loss_and_grads(mo.margin_cross_entropy, margin, x, W, y, b, backend=backend)
    eager = _loss_and_grads(reference.margin_cross_entropy, margin, x, W, y, b)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    for what, g, e, t in zip(("loss", "dx", "dW", "db"), got, eager, truth):
        f_err, e_err = rel_err(g, t), rel_err(e, t)
        assert f_err <= 2 * e_err + 1e-6, f"{what}: {backend} error {f_err:.2e} vs eager bfloat16 {e_err:.2e}"


def _face_recognition_inputs(C=1_000_000, B=1024, D=512):
    """bfloat16 drawn on the device (no float32 copy of W)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    W = torch.randn(C, D, device="cuda", dtype=torch.bfloat16, generator=g).mul_(0.05).requires_grad_()
    y = torch.randint(0, C, (B,), device="cuda", generator=g)
    return x, W, y


def _is_kernel(event) -> bool:
    kind = getattr(event, "activity_type", None)  # kineto's "kernel", "gpu_memcpy", ... (newer torch)
    if isinstance(kind, str) and kind:
        return kind.lower() == "kernel"
    return (
        event.device_type == torch.autograd.DeviceType.CUDA
        and not event.name.startswith(("Memcpy", "Memset"))
        and ("Sync" not in event.name)
    )


def test_chunked_kernel_launches_at_face_recognition_shape():
    """B = 1024, D = 512, C = 1M, bfloat16, ArcFace: one forward+backward of the chunked backend
    launches at most 1100 kernels (counted by the profiler's CUDA activity)."""
    from torch.profiler import ProfilerActivity, profile

    x, W, y = _face_recognition_inputs()
    mo.margin_cross_entropy(x, W, y, mo.ArcFace(), backend="chunked").backward()  # warm-up
    x.grad = W.grad = None
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        mo.margin_cross_entropy(x, W, y, mo.ArcFace(), backend="chunked").backward()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if _is_kernel(e)]
    print(f"\nkernel launches, one forward+backward: {len(kernels)}")
    assert 0 < len(kernels) <= 1100


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_past_2_31_elements(backend):
    """C·D = 4.5M · 512 > 2^31: indices in 64 bits. The eager reference is cheap at B = 4."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    C, D, B = 4_500_000, 512, 4
    W = (0.05 * torch.randn(C, D, device=dev)).to(torch.bfloat16).requires_grad_()
    y = torch.tensor([0, 2**31 // D + 7, C - 1, 3_000_001], device=dev)
    x = (W[y].detach().float() + 0.05 * torch.randn(B, D, device=dev)).to(torch.bfloat16).requires_grad_()
    loss = mo.margin_cross_entropy(x, W, y, mo.ArcFace(), backend=backend)
    loss.backward()
    xr, Wr = x.detach().float().requires_grad_(), W.detach().float().requires_grad_()
    ref = reference.margin_cross_entropy(xr, Wr, y, mo.ArcFace())
    ref.backward()
    rows = torch.cat([y, torch.randint(0, C, (64,), device=dev), torch.tensor([C - 2, 2**31 // D], device=dev)])
    assert rel_err(loss, ref) < 1e-3
    assert rel_err(x.grad, xr.grad) < 2e-2
    # Row by row: a row that is no label's has a gradient ~1e-4 of a label row's, so one scale for
    # all rows would hide a wrong row there. Every sampled row's gradient is nonzero in the eager one.
    got, want = W.grad[rows].float(), Wr.grad[rows]
    per_row = (got - want).norm(dim=1) / want.norm(dim=1)
    print(f"\n{backend}: dW per-row relative error, worst of {len(rows)} rows: {float(per_row.max()):.2e}")
    assert bool((want.norm(dim=1) > 0).all()) and float(per_row.max()) < 2e-2, per_row


@pytest.mark.parametrize("backend", [None] + BACKENDS, ids=["auto"] + BACKENDS)
def test_memory_contract_face_recognition_shape(backend):
    """B = 1024, D = 512, C = 1M, bfloat16, ArcFace: at most 64 MiB above inputs and gradients
    (the "64 MB check"; for chunked, its default workspace_bytes is that budget)."""
    x, W, y = _face_recognition_inputs()
    kw = {} if backend is None else dict(backend=backend)
    mo.margin_cross_entropy(x, W, y, mo.ArcFace(), **kw).backward()  # warm-up
    x.grad = W.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    mo.margin_cross_entropy(x, W, y, mo.ArcFace(), **kw).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - x.grad.nbytes - W.grad.nbytes
    print(f"\n{backend or 'auto'}: peak above inputs and gradients: {extra / 2**20:.1f} MiB")
    assert extra <= 64 * 2**20


def test_autocast_features_with_float32_master_weights():
    """bf16 features, fp32 weight converted tile by tile: within twice the error of eager under the
    same autocast (which casts W to bf16 for its matmul), both against float64."""
    torch.manual_seed(0)
    backbone = torch.nn.Linear(64, 128).cuda()
    head = mo.MarginHead(128, 3000, margin=mo.CosFace()).cuda()
    inputs = torch.randn(96, 64, device="cuda")
    labels = torch.randint(0, 3000, (96,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        feats = backbone(inputs)
        loss = head(feats, labels)
    assert feats.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert head.weight.grad.dtype == torch.float32
    fused_dw = head.weight.grad.clone()
    fe, We = feats.detach().requires_grad_(), head.weight.detach().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = reference.margin_cross_entropy(fe, We, labels, mo.CosFace())
    eager.backward()
    fr, Wr = feats.detach().double().requires_grad_(), head.weight.detach().double().requires_grad_()
    ref = reference.margin_cross_entropy(fr, Wr, labels, mo.CosFace())
    ref.backward()
    assert rel_err(loss, ref) <= 2 * rel_err(eager, ref) + 1e-6
    assert rel_err(fused_dw, Wr.grad) <= 2 * rel_err(We.grad, Wr.grad) + 1e-6


@pytest.mark.parametrize("allow", [False, True])
def test_float32_tf32_only_when_allowed(allow):
    """float32 is exact unless torch.backends.cuda.matmul.allow_tf32 is set; with it, the products
    run as TF32 and the error stays within twice eager's under the same switch."""
    torch.manual_seed(0)
    x = torch.randn(300, 256, device="cuda", requires_grad=True)
    W = torch.randn(4000, 256, device="cuda", requires_grad=True)
    y = torch.randint(0, 4000, (300,), device="cuda")
    xr, Wr = x.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    ref = reference.margin_cross_entropy(xr, Wr, y, mo.ArcFace())
    ref.backward()
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        loss = mo.margin_cross_entropy(x, W, y, mo.ArcFace())
        loss.backward()
        xe, We = x.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
        eager = reference.margin_cross_entropy(xe, We, y, mo.ArcFace())
        eager.backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    errs = [rel_err(loss, ref), rel_err(x.grad, xr.grad), rel_err(W.grad, Wr.grad)]
    eager_errs = [rel_err(eager, ref), rel_err(xe.grad, xr.grad), rel_err(We.grad, Wr.grad)]
    if allow:
        assert max(errs) > 1e-5, f"TF32 allowed but the products look exact: {errs}"
        assert all(f <= 2 * e + 1e-6 for f, e in zip(errs, eager_errs)), f"fused {errs} vs eager TF32 {eager_errs}"
    else:
        assert max(errs) < 2e-5, f"float32 without TF32 must be exact: {errs}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "margin", [mo.ArcFace(), mo.SubCenterArcFace(K=3), mo.Softmax()], ids=lambda m: type(m).__name__
)
def test_training_step_never_synchronizes(backend, margin):
    """A forward + backward (after a warm-up that allocates the error record) under
    torch.cuda.set_sync_debug_mode("error"): any copy to the host or synchronization raises."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    K = getattr(margin, "K", 1)
    x = torch.randn(96, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    W = torch.randn(3000 * K, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 3000, (96,), device=dev)
    mo.margin_cross_entropy(x, W, y, margin, backend=backend).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = mo.margin_cross_entropy(x, W, y, margin, backend=backend)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    mo.check_errors()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_label_on_the_device_raises_at_check_errors(backend):
    """A label out of range: no device-side assert; that row's loss is NaN, and the host check's
    ValueError comes from check_errors() (or the next call); with set_sync_checks(True) from the call."""
    dev = torch.device("cuda")
    x = torch.randn(8, 32, device=dev)
    W = torch.randn(500, 32, device=dev)
    y = torch.tensor([1, 2, 500, 3, 4, 5, 6, 7], device=dev)
    loss = mo.margin_cross_entropy(x, W, y, mo.ArcFace(), reduction="none", backend=backend)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3]]).all()
    with pytest.raises(ValueError, match=r"labels\[2\] = 500 is out of range"):
        mo.check_errors()
    mo.check_errors()
    old = mo.set_sync_checks(True)
    try:
        with pytest.raises(ValueError, match=r"labels\[2\] = 500 is out of range"):
            mo.margin_cross_entropy(x, W, y, mo.ArcFace(), backend=backend)
    finally:
        mo.set_sync_checks(old)


@pytest.mark.parametrize("backend", ["chunked", "tiles"])
@pytest.mark.parametrize("kind", ["SGD", "AdamW"])
def test_the_head_optimizer_on_cuda_equals_torch_optim(backend, kind):
    """The head's optimizer in its backward on a GPU (each chunk's dW, then one step kernel):
    three steps over five chunks of classes equal torch.optim's on the dense gradient (float64)."""
    from marginops import optim

    dev, f64 = torch.device("cuda"), torch.float64
    kwargs = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3) if kind == "SGD" else dict(lr=1e-2)

    def make():
        options = dict(bias=True, backend=backend, workspace_bytes=1 << 20, device=dev, dtype=f64)
        return mo.MarginHead(64, 3000, mo.ArcFace(s=16.0), **options)

    torch.manual_seed(0)
    ours, theirs = make(), make()
    theirs.load_state_dict(ours.state_dict())
    opts = getattr(optim, kind)(ours, **kwargs), getattr(torch.optim, kind)(theirs.parameters(), **kwargs)
    for _ in range(3):
        x, y = torch.randn(128, 64, device=dev, dtype=f64), torch.randint(0, 3000, (128,), device=dev)
        for head, opt in zip((ours, theirs), opts):
            head(x, y).backward()
            opt.step()
            opt.zero_grad()
    assert ours.weight.grad is None
    for p, q in ((ours.weight, theirs.weight), (ours.bias, theirs.bias)):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-13)
