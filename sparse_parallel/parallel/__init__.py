"""Sequence parallelism: the context sharded over a process group."""
from .context import SequenceParallel, shard

__all__ = ["SequenceParallel", "shard"]
