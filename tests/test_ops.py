"""The ops as torch sees them: opcheck (schema, fake kernels, autograd registration) and
torch.compile(fullgraph=True) through the functional API and the head."""

import pytest
import torch
from helpers import make_inputs, rel_err

import marginops as mo
from marginops import ops, reference

f64 = torch.float64


def forward_args(
    device,
    margin,
    bias=False,
    row_margins=None,
    curricular=None,
    class_index=None,
    dtype=f64,
    C=40,
    num_classes=None,
    offset=0,
):
    x, W, y, b = make_inputs(12, 6, C, dtype=dtype, device=device, bias=bias, ignore=2)
    y = torch.where(y >= 0, y + offset, y)
    return (x, W, y, b, row_margins, curricular, class_index, num_classes or C, offset, -100, *margin.config())


def sample_inputs(device):
    rm = torch.rand(12, 3, dtype=f64, device=device)
    rm[:, 0] = 1.0
    yield forward_args(device, mo.Softmax(), bias=True)
    yield forward_args(device, mo.ArcFace(s=30.0))
    yield forward_args(device, mo.SphereFace(), bias=True)
    yield forward_args(device, mo.CombinedMargin(s=30.0, m2=0.3, m3=0.1), row_margins=rm.requires_grad_())
    yield forward_args(device, mo.CosFace(), dtype=torch.float32)
    yield forward_args(device, mo.ArcFace(), dtype=torch.bfloat16)
    # A shard: classes [50, 90) of 100, and a sampled subset of its rows.
    yield forward_args(device, mo.ArcFace(), num_classes=100, offset=50)
    idx = torch.tensor([0, 3, 4, 9, 20, 39], device=device)
    yield forward_args(device, mo.CosFace(), class_index=idx, num_classes=100, offset=50)


def test_opcheck_forward(device):
    for args in sample_inputs(device):
        torch.library.opcheck(torch.ops.marginops.margin_ce_forward, args)


def test_opcheck_backward(device):
    for args in sample_inputs(device):
        x, W = args[0], args[1]
        grads = [torch.randn(12, dtype=ops.acc_dtype(x, W), device=device) for _ in range(3)]
        lse = torch.ops.marginops.margin_ce_forward(*args)[0].detach()
        detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(
            torch.ops.marginops.margin_ce_backward, (*grads, lse, *detached, [True, True, True, True])
        )
        torch.library.opcheck(
            torch.ops.marginops.margin_ce_backward, (grads[0], None, None, lse, *detached, [True, False, False, False])
        )


def test_opcheck_psi():
    c = torch.linspace(-1, 1, 17, dtype=f64)
    ones, half, zero = torch.ones_like(c), torch.full_like(c, 0.5), torch.zeros_like(c)
    torch.library.opcheck(torch.ops.marginops.margin_psi, (c, ones, half, zero, 1, 0, 0.0))


@pytest.mark.parametrize(
    "margin", [mo.ArcFace(s=30.0), mo.SphereFace(), mo.Softmax()], ids=["arcface", "sphereface", "softmax"]
)
def test_compile_fullgraph_functional(device, margin):
    torch._dynamo.reset()
    x, W, y, b = make_inputs(32, 8, 100, device=device, bias=True, ignore=3)
    with torch.no_grad():  # half the rows next to their class, so that the accuracy is neither 0 nor 1
        x[::2] = 3 * W[y[::2].clamp_min(0)] + 0.1 * x[::2]

    def step(x, W, y, b):
        loss, acc = mo.margin_cross_entropy(x, W, y, margin, bias=b, label_smoothing=0.1, return_accuracy=True)
        return loss, acc

    compiled = torch.compile(step, fullgraph=True)
    loss, acc = compiled(x, W, y, b)
    grads = torch.autograd.grad(loss, [x, W, b])
    ref, ref_acc = reference.margin_cross_entropy(x, W, y, margin, bias=b, label_smoothing=0.1, return_accuracy=True)
    ref_grads = torch.autograd.grad(ref, [x, W, b])
    assert rel_err(loss, ref) <= 1e-10
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 1e-10
    assert float(acc) == float(ref_acc) and 0.0 < float(acc) < 1.0


def test_compile_fullgraph_head_training_step(device):
    """Five SGD steps of backbone + compiled head against the same steps with the eager
    reference head (reference.MarginHead), float64: every loss and the final parameters."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    backbone = torch.nn.Linear(16, 8).to(device, f64)
    head = mo.MarginHead(8, 50, margin=mo.CosFace(s=16.0, m=0.2)).to(device, f64)
    ref_backbone = torch.nn.Linear(16, 8).to(device, f64)
    ref_head = reference.MarginHead(8, 50, margin=mo.CosFace(s=16.0, m=0.2)).to(device, f64)
    ref_backbone.load_state_dict(backbone.state_dict())
    ref_head.load_state_dict(head.state_dict())
    opt = torch.optim.SGD(list(backbone.parameters()) + list(head.parameters()), lr=0.5)
    ref_opt = torch.optim.SGD(list(ref_backbone.parameters()) + list(ref_head.parameters()), lr=0.5)
    compiled = torch.compile(lambda inputs, labels: head(backbone(inputs), labels), fullgraph=True)
    inputs = torch.randn(64, 16, device=device, dtype=f64)
    labels = torch.randint(0, 50, (64,), device=device)
    losses, ref_losses = [], []
    for _ in range(5):
        for model, optimizer, out in (
            (compiled, opt, losses),
            (lambda i, y: ref_head(ref_backbone(i), y), ref_opt, ref_losses),
        ):
            optimizer.zero_grad()
            loss = model(inputs, labels)
            loss.backward()
            optimizer.step()
            out.append(loss.detach())
    for k, (got, want) in enumerate(zip(losses, ref_losses)):
        assert rel_err(got, want) <= 1e-10, f"step {k}: {float(got)} vs {float(want)}"
    assert float(ref_losses[-1]) < float(ref_losses[0]) - 0.1  # the steps did move the parameters
    assert rel_err(head.weight, ref_head.weight) <= 1e-10 and rel_err(backbone.weight, ref_backbone.weight) <= 1e-10


@pytest.mark.parametrize(
    "margin",
    [
        mo.CurricularFace(s=16.0),
        mo.AdaFace(s=16.0),
        mo.MagFace(s=16.0, l_a=0.1, u_a=10.0),
        mo.SubCenterArcFace(K=2, s=16.0),
    ],
    ids=["curricular", "adaface", "magface", "subcenter"],
)
def test_compile_fullgraph_stateful_and_subcenter_heads(device, margin):
    torch._dynamo.reset()
    torch.manual_seed(0)
    head = mo.MarginHead(8, 50, margin=margin).double().to(device)
    eager = reference.MarginHead(8, 50, margin=margin).double().to(device)
    eager.load_state_dict(head.state_dict())
    compiled = torch.compile(lambda x, y: head(x, y), fullgraph=True)
    for _ in range(3):
        x = torch.randn(32, 8, dtype=f64, device=device)
        y = torch.randint(0, 50, (32,), device=device)
        loss, ref = compiled(x, y), eager(x, y)
        assert rel_err(loss, ref) <= 1e-10
        loss.backward()
        ref.backward()
    assert rel_err(head.weight.grad, eager.weight.grad) <= 1e-10
    for key, value in eager.state_dict().items():
        assert rel_err(head.state_dict()[key], value) <= 1e-10, f"{key} follows in compiled training"
