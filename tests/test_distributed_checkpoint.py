"""marginops.distributed.checkpoint: sharded checkpoints reshard across world sizes (4 -> 2 -> 1 -> 3
ranks) and insightface's per-rank files import; damaged checkpoints are refused naming the file
(checksums, meta.json, shapes) and a failed load changes nothing; the checkpoint's margin and class
count must fit the head unless strict=False. The multi-process tests of damaged checkpoints run
under a short process-group timeout and their own deadline."""

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
from helpers import DIST_D, expect_error, spawn

import marginops as mo
from marginops import distributed as mdist

f64 = torch.float64
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def spawn_within(fn, world, *args, pg_timeout=5, deadline=90):
    """helpers.spawn with a short process-group timeout and deadline."""
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


# ---- resharding (4 -> 2 -> 1 -> 3 ranks) and insightface's per-rank files ----------------------


def check_checkpoint(rank, world, C, load_from, save_to, truth):
    margin = mo.SubCenterArcFace(K=2, s=30.0)
    torch.manual_seed(100 + rank)
    head = mdist.ShardedMarginHead(DIST_D, C, margin, bias=True)
    if load_from is not None:
        mdist.load_sharded(head, load_from)
        expected = truth["weight"]
        assert torch.equal(head.weight, mdist.split(expected, world, 2)[rank])
        assert torch.equal(head.bias, mdist.split(truth["bias"], world)[rank])
    mdist.save_sharded(head, save_to)


def check_insightface_import(rank, world, C, directory):
    full = mdist.import_insightface(directory)
    head = mdist.ShardedMarginHead(DIST_D, C, mo.ArcFace())
    with torch.no_grad():
        head.weight.copy_(mdist.split(full, world)[rank])
    assert torch.equal(head.weight, full[head.class_start : head.class_end])


def test_checkpoints_reshard_4_2_1_3_and_import_insightface(tmp_path):
    C = 4 * 10 + 3
    dirs = [str(tmp_path / name) for name in ("w4", "w2", "w1", "w3")]
    spawn(check_checkpoint, 4, C, None, dirs[0], None)
    truth = mdist.consolidate(dirs[0])
    assert truth["weight"].shape == (2 * C, DIST_D) and truth["bias"].shape == (C,)
    spawn(check_checkpoint, 2, C, dirs[0], dirs[1], truth)
    single = mo.MarginHead(DIST_D, C, margin=mo.SubCenterArcFace(K=2, s=30.0), bias=True)
    mdist.load_sharded(single, dirs[1])
    assert torch.equal(single.weight, truth["weight"]) and torch.equal(single.bias, truth["bias"])
    mdist.save_sharded(single, dirs[2])
    spawn(check_checkpoint, 3, C, dirs[2], dirs[3], truth)
    assert torch.equal(mdist.consolidate(dirs[3])["weight"], truth["weight"])
    with pytest.raises(ValueError, match="checkpoint does not fit this head: num_classes: checkpoint 43, head 44"):
        mdist.load_sharded(mo.MarginHead(DIST_D, C + 1, margin=mo.SubCenterArcFace(K=2), bias=True), dirs[0])
    with pytest.raises(ValueError, match="embedding_size: checkpoint 8, head 9"):
        mdist.load_sharded(mo.MarginHead(DIST_D + 1, C, margin=mo.SubCenterArcFace(K=2), bias=True), dirs[0])
    os.remove(os.path.join(dirs[0], "shard-00002-of-00004.pt"))
    with pytest.raises(ValueError, match="missing shard-00002-of-00004.pt of its 4 shards"):
        mdist.consolidate(dirs[0])

    # insightface: checkpoint_gpu_{rank}.pt with the shard under state_dict_softmax_fc, 3 ranks.
    insight = tmp_path / "insightface"
    insight.mkdir()
    full = torch.randn(C, DIST_D)
    for r, shard in enumerate(mdist.split(full, 3)):
        torch.save(
            {"epoch": 1, "global_step": 10, "state_dict_softmax_fc": {"weight": shard}},
            insight / f"checkpoint_gpu_{r}.pt",
        )
    assert torch.equal(mdist.import_insightface(str(insight)), full)
    head = mo.MarginHead(DIST_D, C, margin=mo.ArcFace())
    with torch.no_grad():
        head.weight.copy_(mdist.import_insightface(str(insight)))
    assert torch.equal(head.weight, full)
    spawn(check_insightface_import, 2, C, str(insight))
    (insight / "checkpoint_gpu_1.pt").unlink()
    with pytest.raises(ValueError, match="must be ranks 0..1"):
        mdist.import_insightface(str(insight))
    torch.save({"state_dict_softmax_fc": {"weight": torch.randn(5, DIST_D)}}, insight / "checkpoint_gpu_1.pt")
    with pytest.raises(ValueError, match="do not follow insightface's split"):
        mdist.import_insightface(str(insight))
