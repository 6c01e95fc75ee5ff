"""``SequenceParallel``: the explicit process-group context of sharded attention.

Shards are contiguous and as even as possible: with N tokens over P ranks, the
first N % P ranks hold one token more.  Any N >= P works without padding.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class SequenceParallel:
    """Process group, rank, world size and the shard rule of a sequence-parallel run.

    ``group=None`` means the default process group; without an initialised
    process group the context is a single rank (world size 1).  ``seq_len``
    (optional, may be set later) is the total sequence length: when set,
    ``global_length`` checks the shard against it instead of an all-reduce
    whose result the host must wait for on every call.
    """

    def __init__(self, group=None, seq_len: int | None = None):
        self.group = group
        if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
            raise ValueError(f"seq_len must be None or an integer >= 1, got {seq_len!r}")
        self.seq_len = seq_len
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank(group)
            self.world_size = dist.get_world_size(group)
            self.global_ranks = tuple(dist.get_process_group_ranks(group or dist.group.WORLD))
        else:
            if group is not None:
                raise ValueError("SequenceParallel got a group but torch.distributed is not initialised")
            self.rank, self.world_size, self.global_ranks = 0, 1, (0,)
        #: Bytes this rank has put on the wire in sequence-parallel exchanges, by direction.
        self.bytes_sent = {"forward": 0, "backward": 0}

    def __repr__(self) -> str:
        return f"SequenceParallel(rank={self.rank}, world_size={self.world_size})"

    def shard_range(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """Global [start, end) of ``rank``'s shard (default: this rank)."""
        return shard_bounds(n, self.world_size)[self.rank if rank is None else rank]

    def global_length(self, n_local: int) -> int:
        """Total N from this rank's shard length (one all-reduce when P > 1, unless ``seq_len`` is set)."""
        if self.seq_len is not None:
            start, end = self.shard_range(self.seq_len)
            if end - start != n_local:
                raise ValueError(f"rank {self.rank} holds {n_local} tokens but seq_len={self.seq_len} gives "
                                 f"it {end - start} (contiguous shards, the first N % P ranks one token more)")
            return self.seq_len
        if self.world_size == 1:
            return n_local
        t = torch.tensor([n_local], dtype=torch.long)
        if dist.get_backend(self.group) == "nccl":
            t = t.cuda()
        dist.all_reduce(t, group=self.group)
        return int(t.item())


def shard_bounds(n: int, world: int) -> list[tuple[int, int]]:
    """The shard rule: contiguous [start, end) per rank, the first ``n % world`` ranks one token more."""
    if n < world:
        raise ValueError(f"sequence length {n} is shorter than the sequence-parallel size {world}")
    base, extra = divmod(n, world)
    out, start = [], 0
    for r in range(world):
        size = base + (r < extra)
        out.append((start, start + size))
        start += size
    return out


def shard(x: torch.Tensor, ctx: SequenceParallel, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous shard of a full tensor along ``dim``."""
    start, end = ctx.shard_range(x.shape[dim])
    return x.narrow(dim, start, end - start)
