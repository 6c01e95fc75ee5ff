"""A pytest-native multi-rank harness: spawn N processes on gloo and collect what each rank returns.

    from dist_utils import run_ranks

    def _worker(rank, world_size, scale):     # module level: it is pickled by name
        ...                                    # torch.distributed is initialised (gloo)
        return {"err": 0.0}                    # anything picklable

    def test_something(tmp_path):
        results = run_ranks(_worker, 3, tmp_path, args=(2.0,))   # one entry per rank

Rendezvous is a ``FileStore`` in ``tmp_path`` (no port at all, so no clashes
between concurrent runs).  An exception in any rank fails the test with every
failing rank's traceback; a rank that hangs fails it after ``timeout`` seconds
(the harness kills only the processes it started).  Ranks run with one intra-op
thread each: the CI machine has 2 cores and tests start up to 4 ranks.
"""
from __future__ import annotations

import os
import queue
import time
import traceback

import torch
import torch.multiprocessing as mp


def _entry(fn, rank, world_size, store_path, args, results, threads, backend):
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, "ok", value))
    except BaseException:  # noqa: BLE001 - every failure goes back to the test
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(fn, world_size: int, tmp_path, args: tuple = (), timeout: float = 120.0, threads: int = 1,
              backend: str = "gloo"):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks -> list of results by rank.

    ``backend`` "gloo" (CPU, the default) or "nccl" (rank r on GPU r % device count).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend='nccl' needs CUDA (skip the test without it)")
    spawn = mp.get_context("spawn")
    results = spawn.Queue()
    store_path = os.path.join(str(tmp_path), f"store-{os.getpid()}-{time.monotonic_ns()}")
    procs = [spawn.Process(target=_entry, args=(fn, r, world_size, store_path, args, results, threads, backend),
                           daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    got: dict[int, tuple[str, object]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, status, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in got]
                if dead:  # a rank died without reporting (e.g. killed by a signal)
                    for r in dead:
                        got[r] = ("error", f"rank {r} exited with code {procs[r].exitcode} without a result")
                    break
                continue
            got[rank] = (status, value)
            if status == "error":
                # The others may wait forever on the failed rank: give them a moment, then stop.
                deadline = min(deadline, time.monotonic() + 5.0)
    finally:
        for p in procs:
            p.join(timeout=0.5 if len(got) < world_size else 10.0)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
    errors = [f"--- rank {r} ---\n{v}" for r, (s, v) in sorted(got.items()) if s == "error"]
    missing = [r for r in range(world_size) if r not in got]
    if errors or missing:
        msg = "\n".join(errors)
        if missing:
            msg += f"\nranks {missing} gave no result within {timeout:.0f} s (hung or killed)"
        raise RuntimeError(f"distributed run of {getattr(fn, '__name__', fn)} on {world_size} ranks failed:\n{msg}")
    return [got[r][1] for r in range(world_size)]
