"""The class dimension sharded across processes: ShardedMarginHead (each rank owns a contiguous
range of classes), its collectives (sharding), and checkpoints at any world size (checkpoint).

Faults: construction compares the options across ranks and raises the same ValueError on every
rank when they differ; each forward exchanges a small header first, so a rank with bad input
makes every rank raise instead of leaving the others waiting, and so does a call that differs
between ranks. A rank that does not call the head at all cannot be told from a slow one: the
others wait in the first collective for the process group's timeout and then raise."""

from .checkpoint import consolidate, import_insightface, load_sharded, save_sharded, split
from .head import ShardedMarginHead
from .sharding import Shard, class_range
