"""CUDA-only checks (skipped without a GPU): graph capture, 64-bit indexing past 2^31 elements of
W, the memory contract at the face-recognition shape, mixed precision under autocast, and TF32
only when torch allows it. The
rest of the CUDA coverage comes from the device-parametrized tests (test_fused, test_ops,
test_margin_zoo: `-k cuda`)."""

import pytest
import torch

import marginops as mo
from marginops import reference

from conftest import rel_err

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not mo.cuda_available(), reason="needs the CUDA kernels and a GPU")]


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


def test_weight_past_2_31_elements():
    """C·D = 4.5M · 512 > 2^31: indices in 64 bits. The eager reference is cheap at B = 4."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    C, D, B = 4_500_000, 512, 4
    W = (0.05 * torch.randn(C, D, device=dev)).to(torch.bfloat16).requires_grad_()
    y = torch.tensor([0, 2**31 // D + 7, C - 1, 3_000_001], device=dev)
    x = (W[y].detach().float() + 0.05 * torch.randn(B, D, device=dev)).to(torch.bfloat16).requires_grad_()
    loss = mo.margin_cross_entropy(x, W, y, mo.ArcFace())
    loss.backward()
    xr, Wr = x.detach().float().requires_grad_(), W.detach().float().requires_grad_()
    ref = reference.margin_cross_entropy(xr, Wr, y, mo.ArcFace())
    ref.backward()
    rows = torch.cat([y, torch.randint(0, C, (64,), device=dev), torch.tensor([C - 2, 2**31 // D], device=dev)])
    assert rel_err(loss, ref) < 1e-3
    assert rel_err(x.grad, xr.grad) < 2e-2
    assert rel_err(W.grad[rows], Wr.grad[rows]) < 2e-2


def test_memory_contract_face_recognition_shape():
    """B = 1024, D = 512, C = 1M, bfloat16, ArcFace: at most 64 MB above inputs and gradients."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    x = torch.randn(1024, 512, device=dev, dtype=torch.bfloat16, requires_grad=True)
    W = (0.05 * torch.randn(1_000_000, 512, device=dev)).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, 1_000_000, (1024,), device=dev)
    mo.margin_cross_entropy(x, W, y, mo.ArcFace()).backward()  # warm-up
    x.grad = W.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    mo.margin_cross_entropy(x, W, y, mo.ArcFace()).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - x.grad.nbytes - W.grad.nbytes
    print(f"\npeak above inputs and gradients: {extra / 2**20:.1f} MiB")
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
