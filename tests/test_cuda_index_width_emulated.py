"""64-bit index arithmetic of the CUDA kernels, visible on the CPU: both backends, built for the
emulation in tests/cuda_emu, read and write a weight of more than 2^31 elements at rows past
2^31 / D. The weight is a 4 GiB bfloat16 allocation of which only the sampled rows are ever
written or read (Partial FC's class_index), so the forward costs no more memory than the rows it
touches; the backward's dW is a real 4 GiB tensor (zeros, as the op returns with an index).

The oracle is the same op on those rows copied into a small weight: the same columns in the same
order, so every output must be bit-identical. A 32-bit offset anywhere on the way (load_tile's
src + g·ld, the chunk gather, dW's row writes) reads or writes another row and breaks equality.

Two widths: D = 64 (rows of 128 bytes: the 16-byte vector loads) and D = 60 (rows of 120 bytes,
not 16-byte aligned: every kernel's scalar fallback), one 4 GiB weight alive at a time."""

import pytest
import torch

import marginops as mo

CHUNKED, FUSED = 1, 2
OFFSET = 1000  # a shard's first class: labels are global ids offset + row


def classes(D):
    return 2**31 // D + 8  # C·D > 2^31 elements


def sampled_rows(D):
    """Rows on both sides of 2^31 / D, the last ones included."""
    edge, C = 2**31 // D, classes(D)
    return torch.tensor([0, 5, 2**24 + 3, edge - 2, edge - 1, edge, edge + 1, edge + 3, C - 2, C - 1])


@pytest.fixture(scope="module", params=[64, 60], ids=["D64-vector", "D60-scalar"])
def big_weight(request):
    """[C, D] bfloat16 with only the sampled rows written (the rest are untouched pages)."""
    D = request.param
    C = classes(D)
    try:
        W = torch.empty(C, D, dtype=torch.bfloat16)
    except RuntimeError as e:  # not a skip: the test needs 4 GiB of address space, not of memory
        raise RuntimeError(f"cannot reserve the 4 GiB weight of the index-width test: {e}") from e
    rows = sampled_rows(D)
    g = torch.Generator().manual_seed(0)
    W[rows] = torch.randn(len(rows), D, generator=g).to(torch.bfloat16)
    yield W
    del W


def inputs(W):
    D = W.shape[1]
    rows = sampled_rows(D)
    g = torch.Generator().manual_seed(1)
    B = 12
    pick = torch.tensor([9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 9, 6])  # every sampled row is some row's class
    x = (W[rows[pick]].float() + 0.3 * torch.randn(B, D, generator=g)).to(torch.bfloat16)
    y = OFFSET + rows[pick]
    y[3] = -100  # an ignored row
    return x, y, rows


@pytest.mark.parametrize("backend", [CHUNKED, FUSED], ids=["chunked", "fused"])
def test_rows_past_2_31_elements_match_a_small_copy(emu, big_weight, backend):
    W = big_weight
    C = W.shape[0]
    x, y, rows = inputs(W)
    small = W[rows].clone()  # the same rows at offsets < 2^31
    local = torch.arange(len(rows))
    small_y = torch.where(y >= 0, OFFSET + torch.searchsorted(rows, y - OFFSET), y)
    cfg = mo.ArcFace(s=30.0, m=0.5).config()
    big_args = (x, W, y, None, None, None, rows, C + OFFSET + 7, OFFSET, -100, *cfg)
    small_args = (x, small, small_y, None, None, None, local, len(rows) + OFFSET, OFFSET, -100, *cfg)
    got = emu.forward_any(*big_args, 0.0, backend, 0)
    want = emu.forward_any(*small_args, 0.0, backend, 0)
    for k in range(4):  # lse, target logit, logit sum, best logit
        assert torch.equal(got[k], want[k]), f"statistic {k}: {got[k]} vs {want[k]}"
    assert torch.equal(got[4], torch.where(want[4] >= 0, OFFSET + rows[(want[4] - OFFSET).clamp(min=0)], want[4]))
    assert float(want[0][y >= 0].abs().min()) > 0  # the small run did compute something

    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(len(y), generator=gen, dtype=got[0].dtype) for _ in range(3)]
    mask = [True, True, False, False]
    dx, dw, _, _ = emu.backward_any(*grads, got[0], *big_args, mask, 0.0, backend, 0)
    sdx, sdw, _, _ = emu.backward_any(*grads, want[0], *small_args, mask, 0.0, backend, 0)
    assert torch.equal(dx, sdx)
    assert torch.equal(dw[rows], sdw) and float(sdw.float().norm(dim=1).min()) > 0
    neighbours = torch.cat([rows[rows > 0] - 1, rows[rows < C - 1] + 1])
    neighbours = neighbours[~torch.isin(neighbours, rows)]
    assert float(dw[neighbours].float().abs().max()) == 0.0  # nothing written next to the sampled rows
