"""The eager reference against independent formulations of each method (as the papers and
insightface / pytorch-metric-learning write them), so the oracle itself is checked."""

import ast
import math
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from helpers import make_inputs

import marginops as mo
from marginops import reference

f64 = torch.float64


def cos_matrix(x, W):
    return F.normalize(x, dim=1) @ F.normalize(W, dim=1).T


def with_target(logits, y, target):
    out = logits.clone()
    out[torch.arange(len(y)), y] = target
    return out


def test_softmax_is_plain_cross_entropy():
    x, W, y, b = make_inputs(16, 8, 30, bias=True, requires_grad=False)
    expected = F.cross_entropy(x @ W.T + b, y, label_smoothing=0.1)
    torch.testing.assert_close(
        reference.margin_cross_entropy(x, W, y, mo.Softmax(), bias=b, label_smoothing=0.1), expected
    )


def test_arcface_is_insightface_formula():
    x, W, y, _ = make_inputs(64, 8, 30, requires_grad=False)
    s, m = 64.0, 0.5
    cos = cos_matrix(x, W)
    c = cos[torch.arange(64), y]
    sin = torch.sqrt(1 - c**2)
    phi = c * math.cos(m) - sin * math.sin(m)
    phi = torch.where(c > math.cos(math.pi - m), phi, c - math.sin(math.pi - m) * m)
    expected = F.cross_entropy(s * with_target(cos, y, phi), y)
    assert (c <= math.cos(math.pi - m)).any(), "the batch must reach the fallback region"
    torch.testing.assert_close(reference.margin_cross_entropy(x, W, y, mo.ArcFace(s=s, m=m)), expected)
    easy = torch.where(c > 0, c * math.cos(m) - sin * math.sin(m), c)
    expected_easy = F.cross_entropy(s * with_target(cos, y, easy), y)
    torch.testing.assert_close(
        reference.margin_cross_entropy(x, W, y, mo.ArcFace(s=s, m=m, policy="easy")), expected_easy
    )


def test_cosface_and_combined_honour_every_margin():
    x, W, y, _ = make_inputs(32, 8, 30, requires_grad=False)
    cos = cos_matrix(x, W)
    c = cos[torch.arange(32), y]
    expected = F.cross_entropy(30.0 * with_target(cos, y, c - 0.35), y)
    torch.testing.assert_close(reference.margin_cross_entropy(x, W, y, mo.CosFace(s=30.0, m=0.35)), expected)
    # insightface drops m1 and m2 when m3 > 0; marginops keeps all three.
    theta = torch.acos(c)
    combined = torch.where(theta + 0.3 <= math.pi, torch.cos(theta + 0.3) - 0.2, c - 0.2 - 0.3 * math.sin(0.3))
    expected = F.cross_entropy(30.0 * with_target(cos, y, combined), y)
    got = reference.margin_cross_entropy(x, W, y, mo.CombinedMargin(s=30.0, m1=1.0, m2=0.3, m3=0.2))
    torch.testing.assert_close(got, expected)


def test_sphereface_and_lsoftmax_use_feature_norms():
    x, W, y, _ = make_inputs(32, 8, 30, requires_grad=False)
    rows = torch.arange(32)
    for margin, w_used in ((mo.SphereFace(m=4), F.normalize(W, dim=1)), (mo.LSoftmax(m=4), W)):
        logits = x @ w_used.T
        c = cos_matrix(x, W)[rows, y]
        k = torch.floor(torch.acos(c) * 4 / math.pi)
        psi = (-1) ** k * (8 * c**4 - 8 * c**2 + 1) - 2 * k
        target = x.norm(dim=1) * w_used[y].norm(dim=1) * psi
        expected = F.cross_entropy(with_target(logits, y, target), y)
        torch.testing.assert_close(reference.margin_cross_entropy(x, W, y, margin), expected)


def test_normalized_softmaxes():
    x, W, y, _ = make_inputs(16, 8, 30, requires_grad=False)
    torch.testing.assert_close(
        reference.margin_cross_entropy(x, W, y, mo.NormFace(s=20.0)), F.cross_entropy(20.0 * cos_matrix(x, W), y)
    )
    torch.testing.assert_close(
        reference.margin_cross_entropy(x, W, y, mo.L2Softmax(s=16.0)),
        F.cross_entropy(16.0 * F.normalize(x, dim=1) @ W.T, y),
    )
    torch.testing.assert_close(
        reference.margin_cross_entropy(x, W, y, mo.WeightNormSoftmax()), F.cross_entropy(x @ F.normalize(W, dim=1).T, y)
    )


def test_lsoftmax_lambda_anneals_to_softmax():
    x, W, y, _ = make_inputs(16, 8, 30, requires_grad=False)
    soft = reference.margin_cross_entropy(x, W, y, mo.Softmax())
    gaps = [
        float((reference.margin_cross_entropy(x, W, y, mo.LSoftmax(m=4, lambda_=lam)) - soft).abs())
        for lam in (0.0, 10.0, 1e4)
    ]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-2


def test_per_row_margins_match_scalar_margins():
    x, W, y, _ = make_inputs(16, 8, 30, requires_grad=False)
    m = torch.full((16,), 0.4, dtype=f64)
    torch.testing.assert_close(
        reference.margin_cross_entropy(x, W, y, mo.ArcFace(m=m)),
        reference.margin_cross_entropy(x, W, y, mo.ArcFace(m=0.4)),
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignore_index_and_accuracy(reduction):
    x, W, y, _ = make_inputs(16, 8, 30, ignore=4, requires_grad=False)
    logits = 30.0 * cos_matrix(x, W)
    loss, acc = reference.margin_cross_entropy(x, W, y, mo.NormFace(s=30.0), reduction=reduction, return_accuracy=True)
    torch.testing.assert_close(loss, F.cross_entropy(logits, y, reduction=reduction))
    valid = y != -100
    assert float(acc) == pytest.approx(float((logits.argmax(1) == y)[valid].double().mean()))


PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "marginops")
NEEDS_EXTENSION = {"marginops.ops", "marginops._C", "marginops.heads", "marginops.functional", "marginops._pipeline"}


def _module_file(name):
    """The file of module ``name`` inside marginops, or None (outside the package, or absent)."""
    parts = name.split(".")
    if parts[0] != "marginops":
        return None
    base = os.path.join(PACKAGE, *parts[1:])
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def _imports_at_load(path, name):
    """The modules that loading ``path`` (module ``name``) imports: every import statement at any
    depth except inside a function body (a function's imports run when it is called), with each
    ``from X import y`` counted as both X and X.y (y may be a submodule)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    source = ".".join(base + ([child.module] if child.module else []))
                else:
                    source = child.module
                if source != "__future__":
                    found.add(source)
                    found.update(f"{source}.{a.name}" for a in child.names)
            visit(child)

    visit(ast.parse(open(path).read(), path))
    parents = {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 1)}
    return found | parents


def test_reference_imports_nothing_that_needs_the_extension():
    """marginops.reference (the oracle) must load without the compiled extension: neither it nor a
    module it imports, transitively inside marginops (marginops/__init__.py aside: it imports
    everything), imports marginops.ops, marginops._C, marginops.heads, marginops._pipeline or
    marginops.functional at load."""
    seen, todo, chains = set(), ["marginops.reference"], {"marginops.reference": ["marginops.reference"]}
    while todo:
        name = todo.pop()
        if name in seen or name == "marginops":
            continue
        seen.add(name)
        path = _module_file(name)
        if path is None:
            continue
        for dep in _imports_at_load(path, name):
            if dep.startswith("marginops") and dep not in chains:
                chains[dep] = chains[name] + [dep]
                todo.append(dep)
    bad = sorted(NEEDS_EXTENSION & set(chains))
    assert not bad, "imported at load: " + "; ".join(" -> ".join(chains[b]) for b in bad)
    assert "marginops.margins.base" in seen and "marginops._checks" in seen  # the walk reached them


def test_reference_margin_head_is_built_once_and_pickles():
    assert reference.MarginHead is reference.MarginHead
    assert issubclass(reference.MarginHead, mo.MarginHead)
    assert reference.MarginHead._loss_fn is reference.margin_cross_entropy
    head = reference.MarginHead(4, 6, margin=mo.CosFace(s=8.0, m=0.2), dtype=f64)
    again = pickle.loads(pickle.dumps(head))
    assert type(again) is reference.MarginHead
    x, y = torch.randn(5, 4, dtype=f64), torch.tensor([0, 1, 2, 3, 5])
    torch.testing.assert_close(again(x, y), head(x, y))
    with pytest.raises(AttributeError):
        reference.NoSuchName  # noqa: B018
