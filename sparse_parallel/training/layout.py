"""The layout of a run: how its ranks share sequences and batches, from the config and the world size.

Ranks are laid out data-parallel-major: rank = dp_rank * SP + sp_rank, so the
ranks sharing a sequence are neighbours (one node, the fast links).  Each of
them holds one contiguous shard of every sequence, by the one shard rule
(:func:`~sparse_parallel.parallel.context.shard_bounds`).

:func:`build_layout` is the one place these sizes are computed and checked; it
has no side effects, so the launcher uses it before anything runs.  A training
rank then creates the sequence-parallel process groups once,
with :meth:`Layout.with_groups`.
"""
from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch.distributed as dist

from ..parallel.context import SequenceParallel, shard_bounds

if TYPE_CHECKING:
    from .config import TrainConfig

#: The sizes that follow from the config and the world size alone (:meth:`Layout.sizes`).
SIZES = ("world_size", "sequence_parallel", "data_parallel", "context_length", "global_batch", "tokens_per_step")


@dataclass(frozen=True)
class Layout:
    """One rank's place in the SP x DP layout, the sizes it implies, and its process group."""

    world_size: int
    sequence_parallel: int          #: ranks sharing one sequence (SP)
    data_parallel: int              #: sequences trained side by side (DP = world_size / SP)
    context_length: int             #: tokens per sequence = train.tokens_per_gpu x SP
    micro_batch: int                #: sequences per rank per micro step (train.micro_batch)
    grad_accum: int                 #: micro steps per optimizer step (train.grad_accum)
    global_batch: int               #: sequences per optimizer step = micro_batch x grad_accum x DP
    tokens_per_step: int            #: global_batch x context_length
    rank: int
    sp_rank: int                    #: rank % SP: which shard of its sequences this rank holds
    dp_rank: int                    #: rank // SP: which sequences of a batch this rank reads
    start: int                      #: this rank's shard of every sequence is [start, end)
    end: int
    #: this rank's sequence-parallel context, once :meth:`with_groups` made the groups (None at SP=1)
    sp: SequenceParallel | None = field(default=None, compare=False, repr=False)

    def sizes(self) -> dict:
        """The world's sizes (:data:`SIZES`): what ``config show``, ``train --dry-run`` and summary.json report."""
        return {name: getattr(self, name) for name in SIZES}

    def with_groups(self, timeout_s: float = 1800) -> "Layout":
        """Collective: create the sequence-parallel process groups; this layout with its own group's context.

        Every rank creates every group, in the same order (``new_group`` requires it).  At SP=1 there are
        none.  ``timeout_s`` bounds every collective of the groups.
        """
        if self.sp is not None:
            raise ValueError("the process groups of this layout are already made")
        if self.sequence_parallel == 1:
            return self
        sp, ctx = self.sequence_parallel, None
        timeout = datetime.timedelta(seconds=timeout_s)
        for g in range(self.data_parallel):
            group = dist.new_group(list(range(g * sp, (g + 1) * sp)), timeout=timeout)
            if g == self.dp_rank:
                ctx = SequenceParallel(group, seq_len=self.context_length)  # no per-call length all-reduce
        return dataclasses.replace(self, sp=ctx)


def build_layout(cfg: TrainConfig, world_size: int, rank: int = 0) -> Layout:
    """The layout of ``rank`` among ``world_size`` ranks under ``cfg``, checked once.  No side effects.

    A world size that ``parallel.sequence_parallel`` does not divide is an error naming the values
    allowed at that world size.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    sp = cfg.parallel.size(world_size)
    if world_size % sp:
        allowed = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(f"world size {world_size} is not a multiple of parallel.sequence_parallel={sp}; "
                         f"allowed at this world size: one of {allowed} or 'all'")
    dp = world_size // sp
    train = cfg.train
    context = train.tokens_per_gpu * sp
    global_batch = train.micro_batch * train.grad_accum * dp
    start, end = shard_bounds(context, sp)[rank % sp]
    return Layout(world_size=world_size, sequence_parallel=sp, data_parallel=dp, context_length=context,
                  micro_batch=train.micro_batch, grad_accum=train.grad_accum, global_batch=global_batch,
                  tokens_per_step=global_batch * context, rank=rank, sp_rank=rank % sp, dp_rank=rank // sp,
                  start=start, end=end)
