"""The class dimension sharded across processes: ShardedMarginHead (each rank owns a contiguous
range of classes), its collectives (sharding), and checkpoints at any world size (checkpoint).
Faults and the header exchange: docs/design.md, "Sharding the class dimension"."""

from .checkpoint import consolidate, import_insightface, load_sharded, save_sharded, split
from .head import ShardedMarginHead
from .sharding import Shard, class_range
