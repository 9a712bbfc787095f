"""Labels and class_index checked by the CUDA kernels, not on the host, run
under the CPU emulation of tests/cuda_emu for both backends: a training step copies nothing to the
host; a bad label gets a NaN target logit, leaves every other row's statistics and gradients as
they are without it, and raises the host check's ValueError at the next call (or at
check_errors()); set_sync_checks(True) brings back the host check before the launch. On a GPU,
tests/test_cuda.py runs a step under torch.cuda.set_sync_debug_mode("error")."""

import math

import pytest
import torch

from marginops.margins import KIND_COMBINED, OpConfig

BACKENDS = {"chunked": 1, "fused": 2}
B, D, C = 6, 8, 700
CFG = OpConfig(KIND_COMBINED, 0, True, True, 30.0, 1.0, 0.5, 0.0, 0.0)
MASK = [True, True, False, False]


def inputs(labels):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    W = torch.randn(C, D, generator=g, dtype=torch.float64)
    return x, W, torch.tensor(labels)


def args(x, W, y, class_index=None):
    return (x, W, y, None, None, None, class_index, C, 0, -100, *CFG)


def step(emu, backend, a):
    fwd = emu.forward_any(*a, 0.0, BACKENDS[backend], 0)
    ones = torch.ones(B, dtype=torch.float64)
    bwd = emu.backward_any(ones, -ones, None, fwd[0], *a, MASK, 0.0, BACKENDS[backend], 0)
    return fwd, bwd


@pytest.fixture(autouse=True)
def clean(emu):
    try:
        emu.check_errors()
    except ValueError:
        pass
    emu.set_sync_checks(False)
    yield
    emu.set_sync_checks(False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_copies_nothing_to_the_host(emu, backend):
    x, W, y = inputs([3, 0, 699, -100, 350, 5])
    before = emu.host_copies()
    step(emu, backend, args(x, W, y))
    step(emu, backend, args(x, W, y, torch.arange(0, C, 1)))
    assert emu.host_copies() == before
    emu.set_sync_checks(True)
    step(emu, backend, args(x, W, y))
    assert emu.host_copies() > before


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [700, -5, 10**12])
def test_bad_label_is_reported_at_the_next_call_and_changes_no_other_row(emu, backend, bad):
    x, W, y = inputs([3, 0, bad, -100, 350, 5])
    a = args(x, W, y)
    lse, zt, zsum, best, best_class = emu.forward_any(*a, 0.0, BACKENDS[backend], 0)
    message = rf"labels\[2\] = {bad} is out of range"
    with pytest.raises(ValueError, match=message):  # the forward's report
        emu.check_errors()
    ones = torch.ones(B, dtype=torch.float64)
    dx, dw, _, _ = emu.backward_any(ones, -ones, None, lse, *a, MASK, 0.0, BACKENDS[backend], 0)
    with pytest.raises(ValueError, match=message):  # the backward's kernels check it too
        emu.check_errors()
    # the other rows as in a call where that row is ignored
    y_ok = y.clone()
    y_ok[2] = -100
    (lse2, zt2, zsum2, best2, _), (dx2, dw2, _, _) = step(emu, backend, args(x, W, y_ok))
    assert math.isnan(zt[2]) and torch.isfinite(lse).all()
    keep = torch.tensor([0, 1, 3, 4, 5])
    for got, want in ((lse, lse2), (zt, zt2), (zsum, zsum2), (best, best2)):
        torch.testing.assert_close(got[keep], want[keep], rtol=0, atol=0)
    torch.testing.assert_close(dx[keep], dx2[keep], rtol=0, atol=0)
    torch.testing.assert_close(dw, dw2, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_label_raises_at_the_next_call_then_clears(emu, backend):
    x, W, y = inputs([3, 0, 700, -100, 350, 5])
    fwd = emu.forward_any(*args(x, W, y), 0.0, BACKENDS[backend], 0)
    assert math.isnan(fwd[1][2])
    good = args(*inputs([3, 0, 1, -100, 350, 5]))
    with pytest.raises(
        ValueError,
        match=r"labels\[2\] = 700 is out of range: class ids must lie in \[0, 700\) "
        r"or equal ignore_index = -100 \(found by the CUDA kernels of an earlier call",
    ):
        emu.forward_any(*good, 0.0, BACKENDS[backend], 0)
    emu.forward_any(*good, 0.0, BACKENDS[backend], 0)  # reported once
    emu.check_errors()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_label_raises_at_check_errors_and_at_once_with_sync_checks(emu, backend):
    x, W, y = inputs([3, 0, 1, -100, 350, -7])
    emu.forward_any(*args(x, W, y), 0.0, BACKENDS[backend], 0)
    with pytest.raises(ValueError, match=r"labels\[5\] = -7 is out of range"):
        emu.check_errors()
    emu.set_sync_checks(True)
    with pytest.raises(
        ValueError,
        match=r"labels\[5\] = -7 is out of range: class ids must lie in \[0, 700\) "
        r"or equal ignore_index = -100$",
    ):
        emu.forward_any(*args(x, W, y), 0.0, BACKENDS[backend], 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "index,message",
    [
        ([0, 5, 700], r"class_index\[2\] = 700 is not a class of weight \(700 classes\)"),
        ([0, -1, 5], r"class_index\[1\] = -1 is not a class of weight \(700 classes\)"),
        ([0, 9, 9, 12], r"class_index must be strictly increasing: class_index\[1\] = 9, class_index\[2\] = 9"),
    ],
)
def test_bad_class_index_is_reported_without_reading_outside_weight(emu, backend, index, message):
    x, W, y = inputs([0, 5, -100, -100, -100, -100])
    ci = torch.tensor(index)
    a = (x, W, y, None, None, None, ci, C, 0, -100, *CFG)
    fwd = emu.forward_any(*a, 0.0, BACKENDS[backend], 0)  # clamped lookups: in bounds, whatever the entries
    with pytest.raises(ValueError, match=message):
        emu.check_errors()
    ones = torch.ones(B, dtype=torch.float64)
    emu.backward_any(ones, -ones, None, fwd[0], *a, MASK, 0.0, BACKENDS[backend], 0)
    with pytest.raises(ValueError, match=message):
        emu.check_errors()
    emu.set_sync_checks(True)
    with pytest.raises(ValueError, match=message):
        emu.forward_any(*a, 0.0, BACKENDS[backend], 0)
