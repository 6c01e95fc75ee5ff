"""Sequence parallelism: the context sharded over a process group."""
from .attention import sequence_parallel_attention
from .context import SequenceParallel, shard
from .plan import comm_volume

__all__ = ["SequenceParallel", "comm_volume", "sequence_parallel_attention", "shard"]
