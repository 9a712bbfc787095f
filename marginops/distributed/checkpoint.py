"""Checkpoints of a head's classes, at any world size: save_sharded writes each rank's shard and a
meta.json with every shard file's size and SHA-256; load_sharded and consolidate verify them
before a tensor changes; split and import_insightface convert from whole weights and from
insightface's per-rank files."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from .._checks import FLOAT_DTYPES, dtype_name
from .sharding import class_range

_SHARD = "shard-{rank:05d}-of-{world:05d}.pt"


def _head_meta(head) -> dict:
    return {
        "num_classes": head.num_classes,
        "embedding_size": head.embedding_size,
        "subcenters": head.subcenters,
        "bias": head.bias is not None,
        "margin": repr(head.margin),
    }


def _file_digest(path: str) -> Tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a file, read in 1 MiB blocks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def _write_atomically(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def save_sharded(head: torch.nn.Module, directory: str) -> None:
    """Writes this rank's shard (weight, bias, margin state, class range) to
    ``directory/shard-RRRRR-of-WWWWW.pt`` and, from rank 0, ``meta.json``. Call on every rank;
    a MarginHead saves as one shard. Load at any world size with :func:`load_sharded`.

    ``meta.json`` holds num_classes, embedding_size, subcenters, bias, margin (the spec's repr),
    world_size and ``shards``: per shard file, in rank order, ``{"file", "bytes", "sha256"}`` (its
    size and the SHA-256 of its bytes), which :func:`load_sharded` and :func:`consolidate` verify."""
    sharded = hasattr(head, "class_start")
    rank, world = (head.rank, head.world_size) if sharded else (0, 1)
    start, end = (head.class_start, head.class_end) if sharded else (0, head.num_classes)
    os.makedirs(directory, exist_ok=True)
    shard = {
        "class_start": start,
        "class_end": end,
        "weight": head.weight.detach().cpu(),
        "bias": None if head.bias is None else head.bias.detach().cpu(),
        "margin_state": {k: v.detach().cpu() for k, v in head.margin_state.state_dict().items()},
        "optimizer": None if head.optimizer is None else head.optimizer.shard_state(),
        "meta": _head_meta(head),
    }
    name = _SHARD.format(rank=rank, world=world)
    path = os.path.join(directory, name)
    _write_atomically(path, lambda tmp: torch.save(shard, tmp))
    digest, size = _file_digest(path)  # of the bytes on disk
    entry = {"file": name, "bytes": size, "sha256": digest}
    entries = [entry] * world
    if sharded:
        dist.all_gather_object(entries, entry, group=head.group)
    if rank == 0:
        optimizer = None if head.optimizer is None else type(head.optimizer).__name__
        meta = {**_head_meta(head), "world_size": world, "optimizer": optimizer, "shards": entries}
        _write_atomically(
            os.path.join(directory, "meta.json"), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2))
        )
    if sharded:
        dist.barrier(group=head.group)


_META_FIELDS = {
    "num_classes": int,
    "embedding_size": int,
    "subcenters": int,
    "bias": bool,
    "margin": str,
    "world_size": int,
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_meta(directory: str) -> dict:
    meta_path = os.path.join(directory, "meta.json")
    if not os.path.exists(meta_path):
        raise ValueError(f"{directory} holds no marginops checkpoint (no meta.json)")
    damaged = f"{meta_path} is damaged"
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{damaged}: not valid JSON ({e}); the checkpoint cannot be read") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{damaged}: expected a JSON object, got {type(meta).__name__}")
    for key, kind in _META_FIELDS.items():
        value, wanted = meta.get(key), "a positive int" if kind is int else kind.__name__
        if not (_is_int(value) and value >= 1 if kind is int else isinstance(value, kind)):
            raise ValueError(f"{damaged}: {key} must be {wanted}, got {value!r}")
    entries, world = meta.get("shards"), meta["world_size"]
    if entries is None:
        return meta
    names = [_SHARD.format(rank=r, world=world) for r in range(world)]
    if not (
        isinstance(entries, list)
        and len(entries) == world
        and all(
            isinstance(e, dict) and e.get("file") == n and isinstance(e.get("sha256"), str) and _is_int(e.get("bytes"))
            for e, n in zip(entries, names)
        )
    ):
        raise ValueError(f"{damaged}: shards must list {{file, bytes, sha256}} of {names}, got {entries!r}")
    return meta


def _verify_file(path: str, entry: dict) -> None:
    """The shard file's size and SHA-256 against meta.json's record of them."""
    digest, size = _file_digest(path)
    if size != entry["bytes"]:
        raise ValueError(
            f"{path} is damaged: {size} bytes, but meta.json records {entry['bytes']} "
            "(truncated, or overwritten after the checkpoint was written)"
        )
    if digest != entry["sha256"]:
        raise ValueError(
            f"{path} is damaged: its sha256 {digest[:16]}... differs from {entry['sha256'][:16]}... recorded in "
            "meta.json (its bytes changed after the checkpoint was written, or it comes from another checkpoint)"
        )


def _floating(t, shape: tuple) -> bool:
    return isinstance(t, torch.Tensor) and tuple(t.shape) == shape and t.dtype in FLOAT_DTYPES


def _shape(t):
    """For a message: t's shape if it is a tensor, else its type's name."""
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _tensors(d, rows: Optional[int] = None) -> bool:
    """d maps names to tensors (of ``rows`` rows, if given: an optimizer's per-row state)."""
    return isinstance(d, dict) and all(
        isinstance(k, str) and isinstance(t, torch.Tensor) and (rows is None or t.shape[:1] == (rows,))
        for k, t in d.items()
    )


def _check_shard(path: str, shard, meta: dict, rank: int, first: int) -> int:
    """A loaded shard holds what meta.json says it should: a class range that continues the
    previous shard's (from ``first``; the last one ends at num_classes), weight [(end − start)·K, D],
    bias [end − start] (or None), margin state tensors, the optimizer's per-row state (or None).
    Returns its end."""
    bad = lambda what: ValueError(f"{path} does not match meta.json: {what}")  # noqa: E731
    keys = ("class_start", "class_end", "weight", "bias", "margin_state")
    if not isinstance(shard, dict) or any(k not in shard for k in keys):
        got = sorted(shard) if isinstance(shard, dict) else type(shard).__name__
        raise bad(f"a shard holds {list(keys)}, got {got}")
    C, world, K, D = meta["num_classes"], meta["world_size"], meta["subcenters"], meta["embedding_size"]
    start, end, last = shard["class_start"], shard["class_end"], rank == world - 1
    if not (_is_int(start) and _is_int(end) and start == first and (end == C if last else first < end < C)):
        want = f"[{first}, {C})" if last else f"[{first}, e) with {first} < e < {C}"
        raise bad(f"classes [{start}, {end}), expected {want} (shard {rank} of {world}, {C} classes)")
    n, weight, bias = end - start, shard["weight"], shard["bias"]
    if not _floating(weight, (n * K, D)):
        dtype = f" {dtype_name(weight.dtype)}" if isinstance(weight, torch.Tensor) else ""
        raise bad(
            f"weight is {_shape(weight)}{dtype}, expected a floating tensor of shape {(n * K, D)} "
            f"(classes [{start}, {end}) x {K} sub-centers, D = {D})"
        )
    if meta["bias"] != (bias is not None):
        raise bad(f"bias is {'absent' if bias is None else 'present'}, but meta.json says bias={meta['bias']}")
    if bias is not None and not _floating(bias, (n,)):
        raise bad(f"bias has shape {_shape(bias)}, expected ({n},)")
    if not _tensors(shard["margin_state"]):
        raise bad("margin_state must map names to tensors")
    opt = shard.get("optimizer")
    if opt is not None and not (
        isinstance(opt, dict)
        and all(k in opt for k in ("kind", "hyper", "step", "weight", "bias"))
        and _tensors(opt["weight"], n * K)
        and (
            opt["bias"] is None
            if bias is None
            else _tensors(opt["bias"], n) and opt["bias"].keys() == opt["weight"].keys()
        )
    ):
        raise bad(f"optimizer state must hold kind, hyper, step and per-row tensors of its {n} classes")
    return end


def _read_shards(directory: str) -> Tuple[dict, List[dict]]:
    """meta.json and every shard, verified (checksums, then contents against meta.json) before
    anything is returned: a damaged checkpoint is a ValueError naming the file."""
    meta = _read_meta(directory)
    world, entries = meta["world_size"], meta.get("shards")
    if entries is None:
        warnings.warn(
            f"checkpoint {directory} records no checksums (written before marginops recorded them): its shard "
            "files are checked for shape only, not for damage; save it again to add them",
            stacklevel=3,
        )
    shards, first = [], 0
    for r in range(world):
        path = os.path.join(directory, _SHARD.format(rank=r, world=world))
        if not os.path.exists(path):
            raise ValueError(f"checkpoint {directory} is missing {os.path.basename(path)} of its {world} shards")
        if entries is not None:
            _verify_file(path, entries[r])
        try:
            shard = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or damaged zip, unpickling errors: all one story for the user
            raise ValueError(f"{path} is damaged: torch.load cannot read it ({type(e).__name__}: {e})") from None
        first = _check_shard(path, shard, meta, r, first)
        shards.append(shard)
    return meta, shards


_OVERRIDABLE = ("num_classes", "margin")


def _check_meta(meta: dict, head, strict: bool) -> List[str]:
    """Raises when the checkpoint cannot load into head; returns the differences strict=False lets through."""
    diffs = {k: f"{k}: checkpoint {meta[k]!r}, head {v!r}" for k, v in _head_meta(head).items() if meta[k] != v}
    message = "checkpoint does not fit this head: " + "; ".join(diffs.values())
    if any(k not in _OVERRIDABLE for k in diffs):
        raise ValueError(message)
    if diffs and strict:
        raise ValueError(
            f"{message} (load_sharded(..., strict=False) loads it anyway: the classes both have, whatever the margin)"
        )
    return list(diffs.values())


def _gather_range(shards: List[dict], get, start: int, end: int, per_class: int) -> Optional[torch.Tensor]:
    """Rows of classes [start, end) from the shards that hold them (None: no shard does); get: a
    shard's key, or a function of the shard giving the tensor."""
    get = get if callable(get) else (lambda s, key=get: s[key])
    parts = []
    for s in shards:
        lo, hi, off = max(start, s["class_start"]), min(end, s["class_end"]), s["class_start"]
        if lo < hi and get(s) is not None:
            parts.append(get(s)[(lo - off) * per_class : (hi - off) * per_class])
    return torch.cat(parts) if parts else None


def _gather_optimizer(shards: List[dict], names, start: int, end: int, K: int) -> Tuple[dict, Optional[dict]]:
    """The optimizer's per-row state ``names`` of classes [start, end): {name: weight rows} and
    {name: bias rows} (None without a bias)."""

    def rows(part: str, per_class: int) -> dict:
        return {n: _gather_range(shards, lambda s, n=n: s["optimizer"][part][n], start, end, per_class) for n in names}

    return rows("weight", K), None if shards[0]["optimizer"]["bias"] is None else rows("bias", 1)


def _optimizer_rows(head, shards: List[dict], directory: str, start: int, stop: int):
    """The head optimizer's entry and per-row state for classes [start, stop), or None when the
    head has no optimizer; raises when the checkpoint's state cannot restore it."""
    opt = head.optimizer
    if opt is None:
        return None
    entries = [s.get("optimizer") for s in shards]
    kind, names = type(opt).__name__, opt.row_state_names()
    if any(e is None for e in entries):
        raise ValueError(
            f"{directory} holds no optimizer state, but the head has a marginops.optim.{kind}: load it into a head "
            "without one, or restore the optimizer from its own state_dict"
        )
    found = {(e.get("kind"), e.get("sparse")) for e in entries}
    if found != {(kind, opt.sparse)}:
        raise ValueError(f"{directory} holds {sorted(found)} optimizer state, but the head's is {(kind, opt.sparse)}")
    missing = [n for n in names if any(n not in e["weight"] for e in entries)]
    if missing:
        raise ValueError(f"{directory}: the optimizer state lacks {missing} (the head's {kind} keeps {list(names)})")
    return entries[0], *_gather_optimizer(shards, names, start, stop, head.subcenters)


@torch.no_grad()
def load_sharded(head: torch.nn.Module, directory: str, *, strict: bool = True) -> None:
    """Loads a checkpoint written by :func:`save_sharded` at any world size into this rank's
    shard (or a whole MarginHead). Everything is verified before any tensor of the head changes
    (meta.json, each shard file's size and SHA-256, its class range and shapes): a damaged
    checkpoint is a ValueError naming the file, and the head is left as it was. Another
    embedding_size, sub-center count or bias is always an error.

    ``strict`` (default True): the checkpoint's num_classes and margin (the spec's repr) must
    equal the head's, else a ValueError lists the differences. ``strict=False`` loads it anyway,
    with a warning naming them: the classes both have, and the margin state if its entries have
    the same names and shapes (docs/design.md, "Sharding the class dimension")."""
    meta, shards = _read_shards(directory)
    differences = _check_meta(meta, head, strict)
    start, end = (head.class_start, head.class_end) if hasattr(head, "class_start") else (0, head.num_classes)
    stop = min(end, meta["num_classes"])
    weight = _gather_range(shards, "weight", start, stop, head.subcenters)
    bias = _gather_range(shards, "bias", start, stop, 1)
    optimizer = _optimizer_rows(head, shards, directory, start, stop)
    state, mine = shards[0]["margin_state"], head.margin_state.state_dict()
    state_fits = sorted(state) == sorted(mine) and all(tuple(state[k].shape) == tuple(mine[k].shape) for k in mine)
    if not state_fits and not differences:
        shapes = lambda d: "{" + ", ".join(f"{k}: {tuple(v.shape)}" for k, v in d.items()) + "}"  # noqa: E731
        raise ValueError(f"{directory}: the margin state {shapes(state)} does not fit the head's {shapes(mine)}")
    if differences:
        kept = [] if state_fits else ["margin state"]
        if stop < end:
            kept.append(f"classes [{max(start, stop)}, {end})")
        warnings.warn(
            f"load_sharded(strict=False) of {directory}: "
            + "; ".join(differences)
            + (f"; the head keeps its own {' and '.join(kept)}" if kept else ""),
            stacklevel=3,
        )
    # nothing above touched the head: now copy
    if weight is not None:
        head.weight[: weight.shape[0]].copy_(weight)
    if bias is not None:
        head.bias[: bias.shape[0]].copy_(bias)
    if state_fits:
        head.margin_state.load_state_dict(state)  # kept alike on every rank
    if optimizer is not None:
        head.optimizer.load_shard_state(*optimizer)


def consolidate(directory: str) -> Dict[str, Optional[torch.Tensor]]:
    """The whole head of a sharded checkpoint: {"weight": [C·K, D], "bias": [C] or None,
    "optimizer": None, or the head optimizer's {"kind", "step", "weight": {name: [C·K, ...]},
    "bias": {name: [C]} or None}}. Verifies the files as :func:`load_sharded` does."""
    meta, shards = _read_shards(directory)
    C, K = meta["num_classes"], meta["subcenters"]
    out = {"weight": _gather_range(shards, "weight", 0, C, K), "bias": _gather_range(shards, "bias", 0, C, 1)}
    out["optimizer"] = None
    if all(s.get("optimizer") is not None for s in shards):
        entry = shards[0]["optimizer"]
        weight, bias = _gather_optimizer(shards, entry["weight"], 0, C, K)
        out["optimizer"] = {"kind": entry["kind"], "step": entry["step"], "weight": weight, "bias": bias}
    return out


def split(weight: torch.Tensor, world_size: int, subcenters: int = 1) -> List[torch.Tensor]:
    """A whole weight [C·K, D] (or bias [C]) cut into the shards of a world_size-rank head."""
    C = weight.shape[0] // subcenters
    if C * subcenters != weight.shape[0]:
        raise ValueError(f"weight has {weight.shape[0]} rows, not a multiple of subcenters = {subcenters}")
    return [
        weight[s * subcenters : e * subcenters] for s, e in (class_range(C, world_size, r) for r in range(world_size))
    ]


def import_insightface(paths: Union[str, Sequence[str]], momentum: bool = False):
    """The class weight [C, D] of an insightface Partial FC run from its per-rank files: either
    ``checkpoint_gpu_{rank}.pt`` (the shard under ``state_dict_softmax_fc``) or
    ``softmax_fc_gpu_{rank}.pt`` (the shard's state dict). ``paths``: a directory or the files.
    Checks that the shard sizes follow insightface's split. Load the result with
    ``head.weight.copy_(...)`` or, for a ShardedMarginHead, its ``split(...)[rank]``.

    ``momentum=True`` returns ``(weight, momentum)``: the SGD momentum of the weight [C, D] from
    each checkpoint's ``state_optimizer`` (train_v2.py's optimizer: the head's weight is its last
    parameter group's), for ``marginops.optim.SGD``'s ``momentum_buffer`` (split like the weight)."""
    if isinstance(paths, str):
        found = sorted(glob.glob(os.path.join(paths, "checkpoint_gpu_*.pt"))) or sorted(
            glob.glob(os.path.join(paths, "softmax_fc_gpu_*.pt"))
        )
        if not found:
            raise ValueError(f"{paths} holds no insightface checkpoint_gpu_*.pt or softmax_fc_gpu_*.pt files")
        paths = found
    rank_of = lambda p: int(os.path.basename(p).rsplit("_", 1)[1].split(".")[0])  # noqa: E731
    paths = sorted(paths, key=rank_of)
    if [rank_of(p) for p in paths] != list(range(len(paths))):
        raise ValueError(
            f"insightface shards must be ranks 0..{len(paths) - 1}, got {[os.path.basename(p) for p in paths]}"
        )
    shards, buffers = [], []
    for p in paths:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
        state = ckpt.get("state_dict_softmax_fc", ckpt)
        if "weight" not in state:
            raise ValueError(f"{p} has no softmax-fc weight (keys: {sorted(state)})")
        shards.append(state["weight"])
        if momentum:
            buffers.append(_insightface_momentum(p, ckpt, state["weight"].shape))
    C = sum(s.shape[0] for s in shards)
    expected = [e - s for s, e in (class_range(C, len(shards), r) for r in range(len(shards)))]
    if [s.shape[0] for s in shards] != expected or len({s.shape[1] for s in shards}) != 1:
        raise ValueError(
            f"shard shapes {[tuple(s.shape) for s in shards]} do not follow insightface's split of {C} classes over "
            f"{len(shards)} ranks"
        )
    return (torch.cat(shards), torch.cat(buffers)) if momentum else torch.cat(shards)


def _insightface_momentum(path: str, ckpt: dict, shape) -> torch.Tensor:
    """The head weight's momentum buffer in an insightface checkpoint's optimizer state."""
    opt = ckpt.get("state_optimizer")
    try:
        index = opt["param_groups"][-1]["params"][0]
        buf = opt["state"][index]["momentum_buffer"]
    except (TypeError, KeyError, IndexError):
        raise ValueError(f"{path} holds no SGD momentum of the head's weight (state_optimizer)") from None
    if not isinstance(buf, torch.Tensor) or tuple(buf.shape) != tuple(shape):
        raise ValueError(f"{path}: the head's momentum has shape {_shape(buf)}, its weight {tuple(shape)}")
    return buf
