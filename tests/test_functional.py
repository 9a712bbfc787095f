"""The functional API (marginops.functional.margin_cross_entropy, run through _pipeline.py and the
CPU op) against the eager reference: values and gradients in float64 for the whole matrix
of margins × reductions × ignore_index × label smoothing × bias, low-precision error against the
eager same-dtype error, gradcheck, per-row margins, accuracy and edge cases."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import MARGINS, make_inputs, rel_err

import marginops as mo
from marginops import reference

f64 = torch.float64
# B > 256 rows and C > 2·256 classes: several row blocks and class tiles, the last ones partial.
B, D, C = 300, 16, 600


def run(fn, margin, x, W, y, b, **kw):
    """Loss and gradients (x, W[, bias])."""
    loss = fn(x, W, y, margin, bias=b, **kw)
    out = loss.sum() if loss.dim() else loss
    inputs = [x, W] + ([b] if b is not None else [])
    return loss, torch.autograd.grad(out, inputs)


@pytest.mark.parametrize("name", list(MARGINS))
@pytest.mark.parametrize(
    "reduction, ignore, smoothing, bias",
    list(itertools.product(["mean", "sum", "none"], [0, 5], [0.0, 0.1], [False, True])),
)
def test_matches_reference_float64(device, name, reduction, ignore, smoothing, bias):
    x, W, y, b = make_inputs(B, D, C, device=device, bias=bias, ignore=ignore)
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    loss, grads = run(mo.margin_cross_entropy, MARGINS[name], x, W, y, b, **kw)
    ref_loss, ref_grads = run(reference.margin_cross_entropy, MARGINS[name], x, W, y, b, **kw)
    assert loss.dtype == f64 and loss.shape == ref_loss.shape
    assert rel_err(loss, ref_loss) <= 1e-10
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 1e-10
    if ignore:
        assert float(grads[0][:ignore].abs().max()) == 0.0, "ignored rows get no gradient"


@pytest.mark.parametrize("name", ["softmax", "normface", "sphereface", "cosface", "arcface", "combined"])
def test_float32_close_to_float64(device, name):
    x, W, y, _ = make_inputs(B, 64, C, device=device)
    x32, W32 = (t.detach().float().requires_grad_() for t in (x, W))
    loss, grads = run(mo.margin_cross_entropy, MARGINS[name], x32, W32, y, None)
    ref_loss, ref_grads = run(reference.margin_cross_entropy, MARGINS[name], x, W, y, None)
    assert loss.dtype == torch.float32 and grads[0].dtype == torch.float32
    assert rel_err(loss, ref_loss) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-4


def _errors(fn, margin, x, W, y, truth_loss, truth_grads):
    loss, grads = run(fn, margin, x, W, y, None)
    return [rel_err(loss, truth_loss)] + [rel_err(g, t) for g, t in zip(grads, truth_grads)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["softmax", "normface", "cosface", "arcface", "sphereface"])
def test_low_precision_error_within_twice_eager(device, dtype, name):
    margin = {"arcface": mo.ArcFace(s=64.0), "cosface": mo.CosFace(s=64.0)}.get(name, MARGINS[name])
    x, W, y, _ = make_inputs(128, 128, 1000, device=device)
    if name in ("softmax", "sphereface"):
        W = (W * 0.05).detach().requires_grad_()  # keep fp16 eager logits finite
    xl, Wl = (t.detach().to(dtype).requires_grad_() for t in (x, W))
    # The truth is float64 on the same rounded inputs.
    x64, W64 = (t.detach().double().requires_grad_() for t in (xl, Wl))
    truth_loss, truth_grads = run(reference.margin_cross_entropy, margin, x64, W64, y, None)
    fused = _errors(mo.margin_cross_entropy, margin, xl, Wl, y, truth_loss, truth_grads)
    eager = _errors(reference.margin_cross_entropy, margin, xl, Wl, y, truth_loss, truth_grads)
    for what, f, e in zip(("loss", "dx", "dW"), fused, eager):
        assert f <= 2 * e + 1e-6, f"{what}: fused error {f:.2e} vs eager {dtype} error {e:.2e}"


def test_mixed_precision_float32_weight_bfloat16_features(device):
    """bf16 features with fp32 master weights: gradients in each input's dtype, error within
    twice eager bf16's (CUDA rounds W's tiles to bf16 for the tensor cores; the CPU does not)."""
    x, W, y, _ = make_inputs(64, 32, 500, device=device)
    xl = x.detach().bfloat16().requires_grad_()
    W32 = W.detach().float().requires_grad_()
    loss, (dx, dW) = run(mo.margin_cross_entropy, mo.ArcFace(), xl, W32, y, None)
    assert (loss.dtype, dx.dtype, dW.dtype) == (torch.float32, torch.bfloat16, torch.float32)
    x64, W64 = xl.detach().double().requires_grad_(), W32.detach().double().requires_grad_()
    ref_loss, (rdx, rdW) = run(reference.margin_cross_entropy, mo.ArcFace(), x64, W64, y, None)
    Wl = W32.detach().bfloat16().requires_grad_()
    eager_loss, (edx, edW) = run(
        reference.margin_cross_entropy, mo.ArcFace(), xl.detach().requires_grad_(), Wl, y, None
    )
    for what, f, e in (
        ("loss", rel_err(loss, ref_loss), rel_err(eager_loss, ref_loss)),
        ("dx", rel_err(dx, rdx), rel_err(edx, rdx)),
        ("dW", rel_err(dW, rdW), rel_err(edW, rdW)),
    ):
        assert f <= 2 * e + 1e-6, f"{what}: fused {f:.2e} vs eager bf16 {e:.2e}"
    if device.type == "cpu":  # products in float32 from the exact inputs
        assert rel_err(loss, ref_loss) < 1e-5 and rel_err(dW, rdW) < 1e-4


def test_autocast_casts_features_not_weights(device):
    """Under torch.autocast, float32 features go to the autocast dtype as a matmul's would; the
    float32 weight is not copied (its tiles are converted in the kernel) and dW stays float32."""
    x, W, y, _ = make_inputs(64, 32, 500, device=device, dtype=torch.float32)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss, (dx, dW) = run(mo.margin_cross_entropy, mo.ArcFace(), x, W, y, None)
    assert (loss.dtype, dx.dtype, dW.dtype) == (torch.float32,) * 3
    xl = x.detach().bfloat16().requires_grad_()
    W2 = W.detach().clone().requires_grad_()
    loss2, (dx2, dW2) = run(mo.margin_cross_entropy, mo.ArcFace(), xl, W2, y, None)
    assert torch.equal(loss, loss2) and torch.equal(dx, dx2.float()) and torch.equal(dW, dW2)
    x64 = x.detach().double().requires_grad_()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=False):
        plain = mo.margin_cross_entropy(x64, W.detach().double(), y, mo.ArcFace())
    assert plain.dtype == torch.float64  # float64 is never cast


GRADCHECK_MARGINS = list(MARGINS) + ["arcface_clip"]


@pytest.mark.parametrize("name", GRADCHECK_MARGINS)
def test_gradcheck(device, name):
    margin = MARGINS.get(name) or mo.ArcFace(s=30.0, m=0.5, policy="clip")
    x, W, y, b = make_inputs(6, 5, 7, device=device, bias=True, seed=1)
    with torch.no_grad():  # rows at cos = +1 and cos = -1 exactly, and one deep in θ + m > π
        x[0] = 2.0 * W[y[0]]
        x[1] = -3.0 * W[y[1]]
        x[2] = -W[y[2]] + 0.2 * torch.randn(5, dtype=f64)
    cos = F.cosine_similarity(x, W[y], dim=1)
    assert cos[0] > 1 - 1e-12 and cos[1] < -1 + 1e-12 and cos[2] < -0.9

    def f(x, W, b):
        return mo.margin_cross_entropy(x, W, y, margin, bias=b, label_smoothing=0.1, reduction="sum")

    assert torch.autograd.gradcheck(f, (x, W, b))
    loss = f(x, W, b)
    assert torch.isfinite(torch.autograd.grad(loss, x)[0]).all()


def test_gradcheck_per_row_margins(device):
    x, W, y, _ = make_inputs(6, 5, 7, device=device, seed=2)
    m = torch.tensor([0.1, 0.5, 0.3, 0.0, 0.7, 0.2], dtype=f64, device=device, requires_grad=True)
    m3 = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.0, 0.1], dtype=f64, device=device, requires_grad=True)

    def f(x, W, m, m3):
        return mo.margin_cross_entropy(x, W, y, mo.CombinedMargin(s=20.0, m2=m, m3=m3), reduction="sum")

    assert torch.autograd.gradcheck(f, (x, W, m, m3))


def test_per_row_margins_match_reference(device):
    x, W, y, _ = make_inputs(B, D, C, device=device, ignore=3)
    m = (0.2 + 0.4 * torch.rand(B, dtype=f64)).to(device).requires_grad_()
    margin = mo.ArcFace(s=30.0, m=m)
    loss, (dx, dW, dm) = (lambda l: (l, torch.autograd.grad(l, [x, W, m])))(mo.margin_cross_entropy(x, W, y, margin))
    ref = reference.margin_cross_entropy(x, W, y, margin)
    rdx, rdW, rdm = torch.autograd.grad(ref, [x, W, m])
    for a, r in ((loss, ref), (dx, rdx), (dW, rdW), (dm, rdm)):
        assert rel_err(a, r) <= 1e-10
    assert float(dm.abs().max()) > 0 and float(dm[:3].abs().max()) == 0.0


@pytest.mark.parametrize("name", ["softmax", "arcface", "sphereface"])
def test_accuracy_matches_reference(device, name):
    x, W, y, b = make_inputs(B, D, C, device=device, ignore=7, bias=True)
    with torch.no_grad():
        x[10:100] = W[y[10:100]] + 0.1 * x[10:100]  # make part of the batch correct
    _, acc = mo.margin_cross_entropy(x, W, y, MARGINS[name], bias=b, return_accuracy=True)
    _, ref_acc = reference.margin_cross_entropy(x, W, y, MARGINS[name], bias=b, return_accuracy=True)
    assert 0.1 < float(acc) < 1.0 and float(acc) == pytest.approx(float(ref_acc), abs=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_behaves_like_cross_entropy(device, reduction):
    W = torch.randn(10, 4, dtype=f64, device=device, requires_grad=True)
    x = torch.randn(0, 4, dtype=f64, device=device, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=device)
    loss = mo.margin_cross_entropy(x, W, y, mo.ArcFace(), reduction=reduction)
    expected = F.cross_entropy(x @ W.T, y, reduction=reduction)
    assert loss.shape == expected.shape
    torch.testing.assert_close(loss, expected, equal_nan=True)
    if reduction == "sum":
        loss.backward()
        assert float(W.grad.abs().max()) == 0.0 and x.grad.shape == (0, 4)


def test_all_rows_ignored(device):
    x, W, y, _ = make_inputs(8, 4, 10, device=device, ignore=8)
    loss = mo.margin_cross_entropy(x, W, y, mo.CosFace())
    assert torch.isnan(loss)  # as F.cross_entropy: 0 / 0
    loss_sum = mo.margin_cross_entropy(x, W, y, mo.CosFace(), reduction="sum")
    loss_sum.backward()
    assert float(loss_sum.detach()) == 0.0 and float(x.grad.abs().max()) == 0.0 and float(W.grad.abs().max()) == 0.0


def test_non_contiguous_inputs(device):
    x, W, y, _ = make_inputs(B, 2 * D, C, device=device, requires_grad=False)
    b = torch.randn(2 * C, dtype=f64, device=device)
    xs, Ws, bs = (t.requires_grad_() for t in (x[:, ::2], W[:, ::2], b[::2]))
    assert not (xs.is_contiguous() or Ws.is_contiguous() or bs.is_contiguous())
    loss, grads = run(mo.margin_cross_entropy, mo.ArcFace(s=30.0), xs, Ws, y, bs)
    xc, Wc, bc = (t.detach().contiguous().requires_grad_() for t in (xs, Ws, bs))
    ref_loss, ref_grads = run(reference.margin_cross_entropy, mo.ArcFace(s=30.0), xc, Wc, y, bc)
    assert rel_err(loss, ref_loss) <= 1e-10
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 1e-10


def test_int32_labels_and_zero_vectors(device):
    x, W, y, _ = make_inputs(16, 8, 40, device=device)
    with torch.no_grad():
        x[3] = 0.0
        W[y[5]] = 0.0
    for margin in (mo.Softmax(), mo.ArcFace(s=30.0), mo.SphereFace()):
        loss, grads = run(mo.margin_cross_entropy, margin, x, W, y.int(), None)
        ref_loss, ref_grads = run(reference.margin_cross_entropy, margin, x, W, y, None)
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
        assert rel_err(loss, ref_loss) <= 1e-10
        for g, r in zip(grads, ref_grads):
            assert rel_err(g, r) <= 1e-10


def test_deterministic(device):
    x, W, y, _ = make_inputs(B, D, C, device=device, dtype=torch.float32)
    first = run(mo.margin_cross_entropy, mo.ArcFace(), x, W, y, None)
    second = run(mo.margin_cross_entropy, mo.ArcFace(), x, W, y, None)
    assert torch.equal(first[0], second[0]) and all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


def test_thread_count_does_not_change_results():
    x, W, y, _ = make_inputs(B, D, 5000, dtype=f64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(mo.margin_cross_entropy, mo.ArcFace(), x, W, y, None)
        torch.set_num_threads(max(2, threads))
        many = run(mo.margin_cross_entropy, mo.ArcFace(), x, W, y, None)
    finally:
        torch.set_num_threads(threads)
    assert rel_err(one[0], many[0]) < 1e-13
    for a, b in zip(one[1], many[1]):
        assert rel_err(a, b) < 1e-13
