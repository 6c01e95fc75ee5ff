"""The multi-rank harness itself: results come back by rank, failures and hangs fail the test."""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks


def _sum_ranks(rank, world, base):
    t = torch.tensor([float(rank + base)])
    dist.all_reduce(t)
    return (rank, dist.get_world_size(), t.item())


def _fail_on_one(rank, world):
    if rank == 1:
        raise ValueError("rank one refuses")
    return rank


def _hang_on_one(rank, world):
    if rank == 1:
        time.sleep(120)
    return rank


def test_results_by_rank(tmp_path):
    out = run_ranks(_sum_ranks, 2, tmp_path, args=(10,))
    assert out == [(r, 2, 21.0) for r in range(2)]


def test_exception_carries_traceback(tmp_path):
    with pytest.raises(RuntimeError) as info:
        run_ranks(_fail_on_one, 2, tmp_path)
    msg = str(info.value)
    assert "--- rank 1 ---" in msg and "ValueError: rank one refuses" in msg and "_fail_on_one" in msg


def test_hang_times_out(tmp_path):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"ranks \[1\] gave no result within 12 s"):
        run_ranks(_hang_on_one, 2, tmp_path, timeout=12)
    assert time.monotonic() - start < 40
