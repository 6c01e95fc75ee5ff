"""The layout: one value from the config and the world size, checked once, agreeing with the shard rule
and with the sequence-parallel groups it makes."""
from __future__ import annotations

import pytest
from dist_utils import run_ranks

from sparse_parallel.parallel.context import shard_bounds
from sparse_parallel.training.config import load_config
from sparse_parallel.training.layout import SIZES, build_layout

TINY = "configs/tiny.yaml"


@pytest.mark.parametrize("world, sp, tokens", [(1, 1, 64), (4, 2, 33), (6, 3, 7), (8, 8, 5)])
def test_ranks_tile_every_sequence_data_parallel_major(world, sp, tokens):
    """Rank = dp_rank x SP + sp_rank; the SP ranks of a sequence hold shard_bounds' shards of it
    (odd token counts on purpose: the first N % SP ranks hold one token more)."""
    cfg = load_config(TINY, [f"parallel.sequence_parallel={sp}", f"train.tokens_per_gpu={tokens}",
                             "train.micro_batch=3", "train.grad_accum=2"])
    layouts = [build_layout(cfg, world, r) for r in range(world)]
    n = tokens * sp
    for r, lay in enumerate(layouts):
        assert (lay.dp_rank, lay.sp_rank) == divmod(r, sp)
        assert (lay.start, lay.end) == shard_bounds(n, sp)[lay.sp_rank]
        assert lay.sizes() == layouts[0].sizes()
    assert layouts[0].sizes() == {"world_size": world, "sequence_parallel": sp, "data_parallel": world // sp,
                                  "context_length": n, "global_batch": 3 * 2 * (world // sp),
                                  "tokens_per_step": 3 * 2 * (world // sp) * n}
    assert tuple(layouts[0].sizes()) == SIZES


@pytest.mark.parametrize("overrides, world, rank, match", [
    (["parallel.sequence_parallel=4"], 6, 0,
     r"world size 6 is not a multiple of parallel.sequence_parallel=4; allowed at this world size: one of "
     r"\[1, 2, 3, 6\] or 'all'"),
    ([], 0, 0, r"world_size must be an integer >= 1, got 0"),
    ([], 2, 2, r"rank must be an integer in \[0, 2\), got 2"),
    ([], 2, -1, r"rank must be an integer in \[0, 2\), got -1"),
])
def test_a_bad_layout_names_the_field_and_the_allowed_values(overrides, world, rank, match):
    with pytest.raises(ValueError, match=match):
        build_layout(load_config(TINY, overrides), world, rank)


def test_the_layout_is_a_frozen_value():
    lay = build_layout(load_config(TINY), 1)
    with pytest.raises(AttributeError):
        lay.context_length = 1
    assert lay.with_groups() is lay and lay.sp is None  # SP=1: no groups to make


def _groups_worker(rank, world, tokens):
    cfg = load_config(TINY, ["parallel.sequence_parallel=2", f"train.tokens_per_gpu={tokens}"])
    lay = build_layout(cfg, world, rank).with_groups(timeout_s=60)
    ctx = lay.sp
    try:
        lay.with_groups()
        twice = None
    except ValueError as e:
        twice = str(e)
    return {"ctx": (ctx.rank, ctx.world_size, ctx.global_ranks, ctx.seq_len), "shard": ctx.shard_range(ctx.seq_len),
            "layout": (lay.sp_rank, lay.dp_rank, lay.start, lay.end), "twice": twice}


def test_the_groups_agree_with_the_layout(tmp_path):
    """SP=2 x DP=2: each rank's sequence-parallel context is its layout's group, shard and length; the
    groups are made once."""
    got = run_ranks(_groups_worker, 4, tmp_path, args=(7,))
    for rank, r in enumerate(got):
        sp_rank, dp_rank, start, end = r["layout"]
        assert r["ctx"] == (sp_rank, 2, (2 * dp_rank, 2 * dp_rank + 1), 14), (rank, r)
        assert r["shard"] == (start, end), (rank, r)
        assert r["twice"] == "the process groups of this layout are already made"
