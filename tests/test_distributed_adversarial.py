"""Nothing silently wrong in the sharded head: damaged checkpoints are
refused naming the file (checksums, meta.json, shapes) and a failed load changes nothing; the
checkpoint's margin and class count must fit the head unless strict=False; labels of every
integer dtype give the loss of their int64 values; labels on the meta device and a tensor
label_smoothing are clear errors; ranks that call the head differently raise the same error on
every rank instead of hanging; the process-group timeout is documented for a rank that skips a
call. Every multi-process test runs under a short process-group timeout and its own deadline."""

import hashlib
import json
import os
import re
import shutil
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import expect_error, spawn

import marginops as mo
from marginops import distributed as mdist
from marginops import insightface

f64 = torch.float64
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spawn_within(fn, world, *args, pg_timeout=5, deadline=90):
    """test_distributed.spawn with a short process-group timeout and deadline."""
    spawn(fn, world, *args, timeout=pg_timeout, deadline=deadline)


# ---- checkpoints ---------------------------------------------------------------------------------

C, D = 10, 3


def by_hand(offset=0.0):
    """The whole head a checkpoint holds: W[c, d] = 10·c + d + offset, b[c] = 100 + c."""
    W = torch.arange(C * D, dtype=torch.float32).view(C, D) // D * 10 + torch.arange(D) + offset
    return W, torch.arange(C, dtype=torch.float32) + 100


SHARD1 = "shard-00001-of-00002.pt"


def snapshot(head):
    return [t.detach().clone() for t in (head.weight, head.bias, *head.margin_state.buffers())]


def assert_unchanged(head, before):
    after = snapshot(head)
    assert all(torch.equal(a, b) for a, b in zip(after, before)), "a failed load modified the head"


def _load_mismatched_margin(rank, world, directory):
    head = mdist.ShardedMarginHead(D, C, mo.CosFace(s=8.0), bias=True)
    before = snapshot(head)
    expect_error(
        lambda: mdist.load_sharded(head, directory), "margin: checkpoint 'CurricularFace(s=8.0, m=0.5, momentum=0.01)'"
    )
    assert_unchanged(head, before)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mdist.load_sharded(head, directory, strict=False)
    assert any("strict=False" in str(w.message) for w in caught)
    W, b = by_hand()
    assert torch.equal(head.weight.detach(), W[head.class_start : head.class_end])
    assert torch.equal(head.bias.detach(), b[head.class_start : head.class_end])


def _save_two_ranks(rank, world, directory, other):
    head = mdist.ShardedMarginHead(D, C, mo.CurricularFace(s=8.0), bias=True)
    for path, offset in ((directory, 0.0), (other, 0.5)):  # `other`: same shapes, other weights
        W, b = by_hand(offset)
        with torch.no_grad():
            head.weight.copy_(W[head.class_start : head.class_end])
            head.bias.copy_(b[head.class_start : head.class_end])
            head.margin_state.t.fill_(0.25)
        mdist.save_sharded(head, path)
    # The sharded load's outcome is written down, not raised, so that the checkpoint tests do not
    # depend on it: test_sharded_head_refuses_another_margin_on_every_rank reads it.
    try:
        _load_mismatched_margin(rank, world, directory)
        outcome = "ok"
    except BaseException:
        outcome = traceback.format_exc()
    with open(os.path.join(os.path.dirname(directory), f"sharded-load-rank{rank}.txt"), "w") as f:
        f.write(outcome)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 2-rank checkpoint of CurricularFace(s=8), 10 classes, D = 3, a bias, t = 0.25, and a
    second one with other weights. The same 2 ranks then try a ShardedMarginHead of another
    margin on it and write down what happened (one spawn: starting gloo processes costs ~10 s)."""
    base = tmp_path_factory.mktemp("ckpt")
    spawn_within(_save_two_ranks, 2, str(base / "good"), str(base / "other"))
    return base


def test_sharded_head_refuses_another_margin_on_every_rank(saved):
    # On each rank: load_sharded raises naming the margins and leaves the shard as it was;
    # strict=False loads the rank's classes with a warning.
    for rank in range(2):
        assert (saved / f"sharded-load-rank{rank}.txt").read_text() == "ok", f"rank {rank}"


def fresh(saved, tmp_path, name="good"):
    """A copy of a saved checkpoint to damage."""
    return shutil.copytree(saved / name, tmp_path / name)


def curricular_head(num_classes=C):
    head = mo.MarginHead(D, num_classes, margin=mo.CurricularFace(s=8.0), bias=True)
    with torch.no_grad():
        head.weight.fill_(-1.0)
        head.bias.fill_(-2.0)
        head.margin_state.t.fill_(-3.0)
    return head


def test_meta_json_records_each_shards_size_and_sha256(saved):
    meta = json.loads((saved / "good" / "meta.json").read_text())
    want = []
    for name in ("shard-00000-of-00002.pt", SHARD1):
        data = (saved / "good" / name).read_bytes()
        want.append({"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    assert meta["shards"] == want and meta["world_size"] == 2
    head = curricular_head()
    mdist.load_sharded(head, str(saved / "good"))
    W, b = by_hand()
    assert torch.equal(head.weight.detach(), W) and torch.equal(head.bias.detach(), b)
    assert head.margin_state.t.tolist() == [0.25]


def test_a_shard_from_another_checkpoint_is_refused_by_its_checksum(saved, tmp_path):
    # Same name, size and shapes, loads with torch.load: only the checksum tells it apart.
    directory = fresh(saved, tmp_path)
    shutil.copy(saved / "other" / SHARD1, directory / SHARD1)
    assert (directory / SHARD1).stat().st_size == (saved / "good" / SHARD1).stat().st_size
    head = curricular_head()
    before = snapshot(head)
    pattern = (
        re.escape(SHARD1)
        + r" is damaged: its sha256 [0-9a-f]{16}\.\.\. differs from [0-9a-f]{16}\.\.\. recorded in meta.json"
    )
    with pytest.raises(ValueError, match=pattern):
        mdist.load_sharded(head, str(directory))
    assert_unchanged(head, before)
    with pytest.raises(ValueError, match=pattern):
        mdist.consolidate(str(directory))


def test_a_flipped_byte_and_a_truncated_shard_are_refused(saved, tmp_path):
    directory = fresh(saved, tmp_path)
    data = bytearray((directory / SHARD1).read_bytes())
    data[len(data) // 2] ^= 0x40
    (directory / SHARD1).write_bytes(bytes(data))
    head = curricular_head()
    before = snapshot(head)
    with pytest.raises(ValueError, match=re.escape(SHARD1) + " is damaged: its sha256"):
        mdist.load_sharded(head, str(directory))
    (directory / SHARD1).write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(
        ValueError, match=re.escape(SHARD1) + rf" is damaged: {len(data) // 2} bytes, but meta.json records {len(data)}"
    ):
        mdist.load_sharded(head, str(directory))
    with pytest.raises(ValueError, match=re.escape(SHARD1) + " is damaged"):
        mdist.consolidate(str(directory))
    assert_unchanged(head, before)


def test_a_damaged_meta_json_is_a_clear_error(saved, tmp_path):
    directory = fresh(saved, tmp_path)
    text = (directory / "meta.json").read_text()
    head = curricular_head()
    before = snapshot(head)
    (directory / "meta.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"meta.json is damaged: not valid JSON \(.*\); the checkpoint cannot be read"):
        mdist.load_sharded(head, str(directory))
    with pytest.raises(ValueError, match="meta.json is damaged: not valid JSON"):
        mdist.consolidate(str(directory))
    meta = json.loads(text)
    del meta["world_size"]
    (directory / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="meta.json is damaged: world_size must be a positive int, got None"):
        mdist.load_sharded(head, str(directory))
    meta = json.loads(text)
    meta["shards"][1]["sha256"] = 7
    (directory / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"meta.json is damaged: shards must list \{file, bytes, sha256\}"):
        mdist.load_sharded(head, str(directory))
    assert_unchanged(head, before)


def old_format(directory):
    """The checkpoint as marginops wrote it before checksums: meta.json without "shards"."""
    meta = json.loads((directory / "meta.json").read_text())
    del meta["shards"]
    (directory / "meta.json").write_text(json.dumps(meta))


def test_a_checkpoint_without_checksums_loads_with_a_warning(saved, tmp_path):
    directory = fresh(saved, tmp_path)
    old_format(directory)
    head = curricular_head()
    with pytest.warns(UserWarning, match="records no checksums .*checked for shape only"):
        mdist.load_sharded(head, str(directory))
    W, b = by_hand()
    assert torch.equal(head.weight.detach(), W) and torch.equal(head.bias.detach(), b)
    assert head.margin_state.t.tolist() == [0.25]
    with pytest.warns(UserWarning, match="records no checksums"):
        assert torch.equal(mdist.consolidate(str(directory))["bias"], b)


def test_a_short_shard_without_checksums_changes_nothing(saved, tmp_path):
    # A shard whose bias lacks an entry: before, the weight was copied and then the bias failed.
    directory = fresh(saved, tmp_path)
    old_format(directory)
    shard = torch.load(directory / SHARD1, weights_only=True)
    shard["bias"] = shard["bias"][:-1]
    torch.save(shard, directory / SHARD1)
    head = curricular_head()
    before = snapshot(head)
    with pytest.warns(UserWarning, match="records no checksums"):
        with pytest.raises(
            ValueError, match=re.escape(SHARD1) + r" does not match meta.json: bias has shape \(4,\), expected \(5,\)"
        ):
            mdist.load_sharded(head, str(directory))
    assert_unchanged(head, before)
    shard["bias"], shard["weight"] = torch.zeros(5), shard["weight"][:-1]
    torch.save(shard, directory / SHARD1)
    with (
        pytest.warns(UserWarning),
        pytest.raises(
            ValueError,
            match=re.escape(SHARD1)
            + r" does not match meta.json: weight is \(4, 3\) float32, expected .* shape \(5, 3\)",
        ),
    ):
        mdist.consolidate(str(directory))
    (directory / SHARD1).write_bytes((saved / "good" / SHARD1).read_bytes()[:100])
    with (
        pytest.warns(UserWarning),
        pytest.raises(ValueError, match=re.escape(SHARD1) + " is damaged: torch.load cannot read it"),
    ):
        mdist.load_sharded(head, str(directory))
    assert_unchanged(head, before)


def test_the_margin_and_class_count_must_fit_unless_strict_is_false(saved):
    directory = str(saved / "good")
    arc = mo.MarginHead(D, C, margin=mo.ArcFace(s=8.0), bias=True)
    before = snapshot(arc)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "checkpoint does not fit this head: margin: checkpoint 'CurricularFace(s=8.0, m=0.5, momentum=0.01)', "
            "head \"ArcFace(s=8.0, m=0.5, policy='fallback'"
        )
        + r".*strict=False\) loads it anyway",
    ):
        mdist.load_sharded(arc, directory)
    assert_unchanged(arc, before)
    W, b = by_hand()
    with pytest.warns(UserWarning, match=r"strict=False.*margin: checkpoint .*the head keeps its own margin state"):
        mdist.load_sharded(arc, directory, strict=False)
    assert torch.equal(arc.weight.detach(), W) and torch.equal(arc.bias.detach(), b)

    bigger = curricular_head(C + 3)
    before = snapshot(bigger)
    with pytest.raises(ValueError, match=r"num_classes: checkpoint 10, head 13 \(load_sharded\(\.\.\., strict=False\)"):
        mdist.load_sharded(bigger, directory)
    assert_unchanged(bigger, before)
    with pytest.warns(
        UserWarning, match=r"num_classes: checkpoint 10, head 13; the head keeps its own classes \[10, 13\)"
    ):
        mdist.load_sharded(bigger, directory, strict=False)
    assert torch.equal(bigger.weight.detach()[:C], W) and torch.equal(bigger.bias.detach()[:C], b)
    assert float(bigger.weight.detach()[C:].abs().max() - 1) == 0.0 and bigger.bias[C:].tolist() == [-2.0] * 3
    assert bigger.margin_state.t.tolist() == [0.25]
    with pytest.raises(ValueError, match="embedding_size: checkpoint 3, head 4$"):  # never overridable
        mdist.load_sharded(mo.MarginHead(D + 1, C, margin=mo.CurricularFace(s=8.0), bias=True), directory, strict=False)


# ---- label dtypes, meta labels, label_smoothing ----------------------------------------------------

BIG = 70_000  # past int16's range: a Python int compared with int16 labels would wrap
LABELS = {
    torch.uint8: [200, 156, 3, 255, 0, 17, 128],  # 156 is -100 mod 256: a class here, not ignored
    torch.int8: [100, 127, 0, -100, 5, 64, 1],
    torch.int16: [30_000, 20_000, 1, -100, 32_767, 300, 9],
    torch.int32: [69_999, 40_000, 2, -100, 50_000, 123, 65_536],
}


@pytest.fixture
def one_rank(tmp_path):
    """A gloo process group of this process alone (world size 1), destroyed after the test."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_every_integer_label_dtype_gives_the_int64_loss(one_rank):
    g = torch.Generator().manual_seed(5)
    W = torch.randn(BIG, 4, generator=g, dtype=f64)
    x = torch.randn(7, 4, generator=g, dtype=f64)
    head = mdist.ShardedMarginHead(4, BIG, mo.Softmax(), dtype=f64)
    pfc = insightface.PartialFC_V2(mo.Softmax(), 4, BIG).double()
    for h in (head, pfc):
        with torch.no_grad():
            h.weight.copy_(W)
    for dtype, values in LABELS.items():
        y = torch.tensor(values, dtype=dtype)
        want = F.cross_entropy(x @ W.T, y.long(), ignore_index=-100)  # Softmax: logits x·Wᵀ
        torch.testing.assert_close(head(x, y), want, rtol=1e-12, atol=0, msg=str(dtype))
        torch.testing.assert_close(pfc(x, y[:, None]), want, rtol=1e-12, atol=0, msg=str(dtype))  # insightface's [B, 1]
    small = mdist.ShardedMarginHead(4, 150, mo.Softmax(), dtype=f64)  # uint8 156 is a class id, not ignore_index -100
    with pytest.raises(
        ValueError, match=re.escape("rank 0: labels[1] = 156 is out of range: class ids must lie in [0, 150)")
    ):
        small(x, torch.tensor([3, 156, 0, 1, 2, 4, 5], dtype=torch.uint8))
    with pytest.raises(ValueError, match=re.escape("rank 0: labels is on meta but x is on cpu")):
        head(x, torch.tensor(LABELS[torch.int32]).to("meta"))
    with pytest.raises(ValueError, match=re.escape("rank 0: labels is on meta but x is on cpu")):
        pfc(x, torch.tensor(LABELS[torch.int32]).to("meta"))
    with pytest.raises(
        ValueError, match=re.escape("rank 0: labels must hold integer class ids, got dtype torch.complex64")
    ):
        head(x, torch.tensor(LABELS[torch.int32]).to(torch.complex64))
    with pytest.raises(
        ValueError, match=re.escape("label_smoothing must be a float in [0, 1], got a Tensor tensor(0.1000)")
    ):
        mdist.ShardedMarginHead(4, 10, label_smoothing=torch.tensor(0.1))


def test_a_tensor_label_smoothing_must_be_a_float():
    x, W, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"label_smoothing must be a float in \[0, 1\], got a Tensor tensor\(0.1000\)"):
        mo.margin_cross_entropy(x, W, y, mo.ArcFace(), label_smoothing=torch.tensor(0.1))
    with pytest.raises(ValueError, match="label_smoothing must be a float"):  # checked once, by the constructor
        mo.MarginHead(4, 5, mo.ArcFace(), label_smoothing=torch.tensor(0.1))
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\], got 1.5"):
        mo.margin_cross_entropy(x, W, y, mo.ArcFace(), label_smoothing=1.5)


# ---- ranks that call the head differently ----------------------------------------------------------

PREFIX = "ShardedMarginHead is called differently across ranks: "


def _mismatches(rank, world):
    g = torch.Generator().manual_seed(9)
    W = torch.randn(12, 5, generator=g)
    x = torch.randn(6, 5, generator=g)
    y = torch.tensor([0, 11, 5, 6, -100, 3])
    rows = [slice(0, 2), slice(2, 6)][rank]
    xl, yl = x[rows], y[rows]
    head = mdist.ShardedMarginHead(5, 12, mo.Softmax())
    with torch.no_grad():
        head.weight.copy_(W[head.class_start : head.class_end])

    yi = torch.tensor([1, 2])
    expect_error(lambda: head(xl[:2], yi.to("meta") if rank == 0 else yi), "rank 0: labels is on meta but x is on cpu")

    def still_works():  # the ranks are still in step: forward, backward, values
        xr = xl.clone().requires_grad_()
        loss = head(xr, yl)
        loss.backward()
        xw = x.clone().requires_grad_()
        want = F.cross_entropy(xw @ W.T, y)
        want.backward()
        torch.testing.assert_close(loss, want.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(xr.grad, xw.grad[rows], rtol=1e-5, atol=1e-7)
        head.zero_grad()

    expect_error(
        lambda: head(xl.clone().requires_grad_(rank == 0), yl),
        PREFIX + "rank 1 has x.requires_grad=False but rank 0 has x.requires_grad=True",
    )
    still_works()

    def no_grad_on_rank_1():
        with torch.set_grad_enabled(rank == 0):
            head(xl.clone().requires_grad_(), yl)

    expect_error(no_grad_on_rank_1, "rank 1 has x.requires_grad=False")
    still_works()
    head.train(rank == 0)
    expect_error(lambda: head(xl, yl), PREFIX + "rank 1 has training=False but rank 0 has training=True")
    head.train()
    still_works()
    head.weight.requires_grad_(rank == 1)
    expect_error(
        lambda: head(xl, yl), PREFIX + "rank 1 has weight.requires_grad=True but rank 0 has weight.requires_grad=False"
    )
    head.weight.requires_grad_(True)
    still_works()
    head.grad_scale = 2.0 if rank == 1 else 1.0
    expect_error(
        lambda: head(xl, yl),
        PREFIX + "rank 1 has scale_grad_by_world_size=True but rank 0 has scale_grad_by_world_size=False",
    )
    head.grad_scale = 1.0
    expect_error(
        lambda: mdist.ShardedMarginHead(5, 12, scale_grad_by_world_size=rank == 1),
        "rank 1: scale_grad_by_world_size=True",
    )
    still_works()
    head.margin = mo.Softmax() if rank == 0 else mo.NormFace(s=4.0)
    expect_error(lambda: head(xl, yl), PREFIX + "rank 1 has margin=NormFace(s=4.0) but rank 0 has margin=Softmax()")
    head.margin = mo.Softmax()
    still_works()
    expect_error(
        lambda: head(xl.to(torch.bfloat16 if rank else torch.float32), yl),
        PREFIX + "x has different dtypes across ranks: rank 1 has x.dtype=bfloat16 but rank 0 has x.dtype=float32",
    )
    head.to(torch.bfloat16 if rank else torch.float32)
    expect_error(
        lambda: head(xl.bfloat16(), yl),
        PREFIX
        + "weight has different dtypes across ranks: "
        + "rank 1 has weight.dtype=bfloat16 but rank 0 has weight.dtype=float32",
    )
    head.float()
    with torch.no_grad():
        head.weight.copy_(W[head.class_start : head.class_end])
    still_works()


def test_ranks_that_call_the_head_differently_raise_on_every_rank():
    # Before the header carried these fields, x.requires_grad on one rank only passed the forward
    # and the other rank waited in the backward's reduce-scatter until the process-group timeout.
    spawn_within(_mismatches, 2, pg_timeout=5, deadline=90)


# ---- a rank that skips a call ----------------------------------------------------------------------


def test_the_process_group_timeout_is_documented_for_a_skipped_call():
    doc = " ".join(mdist.ShardedMarginHead.__doc__.split())
    assert "does not call the head" in doc and "init_process_group(timeout=" in doc
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("## Sharding across GPUs") :]
    section = " ".join(section[: section.index("\n## ", 1)].split())
    assert "skips a call" in section and "init_process_group(timeout=" in section
