"""Sequence-parallel attention: weak/strong scaling, communication time and how much of it is hidden.

One process per GPU (NCCL), or per CPU rank (gloo) for a functional run:

    python benchmarks/sequence_parallel.py --nprocs 2                  # spawns 2 ranks itself
    torchrun --nproc-per-node 2 benchmarks/sequence_parallel.py        # or under torchrun
    python benchmarks/sequence_parallel.py --device cpu --nprocs 2 --tokens-per-gpu 256 \
        --heads 2 --dim 16 --window 32 --stride 8 --global-first 4 --dtype float32   # CPU smoke run

Default: Window(4096) | Strided(64) | Global(first=128), bf16, H=16, D=128, 512k
tokens per GPU.  Measured (attention forward+backward, median of --iters after
--warmup, barrier before each):

- ``1 rank``: the whole sequence of one GPU's share (N = tokens per GPU) through
  ``sparse_attention`` without sequence parallelism (each rank alone);
- ``weak``: N = tokens per GPU x P over P ranks; ``strong``: N = tokens per GPU over P ranks;
- for each, the pattern exchange (total), the same with the transfers replaced by
  local tensors of the same shapes (compute only), the transfers alone (forward
  and backward of the first exchange round) and the all-to-all (Ulysses) exchange;
- bytes per rank from ``comm_volume`` (forward + backward, the busiest rank in the
  table; this rank's in the JSON), checked against the bytes this rank really sent.

hidden communication = 1 - (total - compute only) / transfers alone (clamped to [0, 1]).
weak-scaling efficiency = time(1 rank, N = T) / time(P ranks, N = P x T).
Writes a table to stdout and JSON to --out (rank 0).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import sparse_parallel as sp
from sparse_parallel.parallel import attention as sp_attention
from sparse_parallel.parallel.exchange import Pending, start_exchange

DTYPES = {"bf16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nprocs", type=int, default=None, help="ranks to spawn (default: GPUs, or 2 on CPU); "
                    "ignored under torchrun")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens-per-gpu", type=int, default=512 * 1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--stride", type=int, default=64)
    ap.add_argument("--global-first", type=int, default=128)
    ap.add_argument("--global-queries", action=argparse.BooleanOptionalAction, default=True,
                    help="Global(queries=...): global tokens also attend to every key")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--backend", choices=("auto", "reference", "triton"), default="auto")
    ap.add_argument("--modes", default="weak,strong", help="comma list of weak, strong")
    ap.add_argument("--skip-ulysses", action="store_true")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/sequence_parallel.json")
    args = ap.parse_args(argv)
    for m in args.modes.split(","):
        if m not in ("weak", "strong"):
            raise ValueError(f"--modes entries must be weak or strong, got {m!r}")
    return args


def pattern_of(args) -> sp.Pattern:
    return sp.Window(args.window) | sp.Strided(args.stride) | sp.Global(first=args.global_first,
                                                                        queries=args.global_queries)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, iters: int, group=None) -> float:
    """Median seconds of ``fn()`` (barrier first, device synchronised)."""
    times = []
    for i in range(warmup + iters):
        if group is not False and dist.is_initialized():
            dist.barrier(group=group)
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_inputs(n, args, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hkv = args.kv_heads or args.heads
    dtype = DTYPES[args.dtype]
    shape = lambda h: (1, n, h, args.dim)  # noqa: E731
    q, k, v, do = (torch.randn(shape(h), generator=g).to(device=device, dtype=dtype)
                   for h in (args.heads, hkv, hkv, args.heads))
    return [t.requires_grad_() for t in (q, k, v)], do


def fwd_bwd(call, tensors, do):
    for t in tensors:
        t.grad = None
    out, _ = call()
    out.backward(do)


def _fake_exchange(sp_, sends, recvs, device, anchor):
    """Same shapes as a real exchange, no transfer: isolates the compute of the pattern exchange."""
    outs = [torch.zeros(s.shape, dtype=s.dtype, device=device).requires_grad_() for _, s in recvs]
    return Pending(None, None, tensors=outs, token=(anchor.flatten()[:1] * 0).sum())


def measure_p(args, device, ctx, n, pattern, mode):
    """All measurements at total length n over ctx's ranks -> dict (same on every rank but timings)."""
    (q, k, v), do = make_inputs(n, args, device, seed=0)
    qs, ks, vs = (sp.shard(t.detach(), ctx).clone().requires_grad_() for t in (q, k, v))
    dos = sp.shard(do, ctx)
    del q, k, v, do
    row = {"mode": mode, "n": n, "ranks": ctx.world_size}
    ctx.seq_len = n  # no all-reduce (and host wait) per call to find N

    def run(exchange):
        return lambda: fwd_bwd(lambda: sp_attention.sequence_parallel_attention(
            qs, ks, vs, pattern, ctx, backend=args.backend, exchange=exchange), (qs, ks, vs), dos)

    ctx.bytes_sent = {"forward": 0, "backward": 0}
    run("pattern")()
    sent = dict(ctx.bytes_sent)
    vol = sp.comm_volume(pattern, n, ctx.world_size, (args.heads, args.kv_heads or args.heads), args.dim,
                         DTYPES[args.dtype], rank=ctx.rank, exchange="pattern")
    row["bytes_fwd"], row["bytes_bwd"] = vol["forward"], vol["backward"]
    row["max_rank_bytes"] = max(map(sum, zip(vol["per_rank"]["forward"], vol["per_rank"]["backward"])))
    row["bytes_match"] = sent == {"forward": vol["forward"], "backward": vol["backward"]}
    row["total_s"] = timed(run("pattern"), device, args.warmup, args.iters)
    real = sp_attention.start_exchange
    sp_attention.start_exchange = _fake_exchange
    try:
        row["compute_s"] = timed(run("pattern"), device, args.warmup, args.iters)
    finally:
        sp_attention.start_exchange = real
    row["comm_s"] = timed(lambda: transfers_alone(qs, ks, vs, pattern, ctx, n), device, args.warmup, args.iters)
    exposed = row["total_s"] - row["compute_s"]
    row["hidden"] = min(1.0, max(0.0, 1.0 - exposed / row["comm_s"])) if row["comm_s"] > 0 else None
    if not args.skip_ulysses:
        try:
            uvol = sp.comm_volume(pattern, n, ctx.world_size, (args.heads, args.kv_heads or args.heads), args.dim,
                                  DTYPES[args.dtype], rank=ctx.rank, exchange="ulysses")
            row["ulysses_s"] = timed(run("ulysses"), device, args.warmup, args.iters)
            row["ulysses_bytes_fwd"], row["ulysses_bytes_bwd"] = uvol["forward"], uvol["backward"]
            row["ulysses_max_rank_bytes"] = max(map(sum, zip(uvol["per_rank"]["forward"],
                                                             uvol["per_rank"]["backward"])))
        except (ValueError, RuntimeError, torch.OutOfMemoryError) as e:  # reported, never hidden
            row["ulysses_error"] = f"{type(e).__name__}: {e}"
    return row


def transfers_alone(qs, ks, vs, pattern, ctx, n):
    """Forward and backward of the first exchange round of the pattern exchange, nothing else."""
    from sparse_parallel.parallel.plan import rank_plan, shard_bounds

    bounds = shard_bounds(n, ctx.world_size)
    plans = [rank_plan(pattern, n, bounds, r) for r in range(ctx.world_size)]
    sends, recvs = sp_attention.round1_lists(qs, ks, vs, plans, bounds, ctx.rank)
    pending = start_exchange(ctx, sends, recvs, qs.device, qs)
    got = pending.wait()
    loss = pending.token + sum(t.float().sum() for t in got) if got else pending.token
    loss.backward()


def one_rank(args, device, n, pattern):
    (q, k, v), do = make_inputs(n, args, device, seed=0)
    t = timed(lambda: fwd_bwd(lambda: sp.sparse_attention(q, k, v, pattern, backend=args.backend,
                                                          return_lse=True), (q, k, v), do),
              device, args.warmup, args.iters, group=False)
    return {"mode": "1 rank", "n": n, "ranks": 1, "total_s": t}


def check_small(args, device, ctx, pattern) -> dict:
    """Largest differences of the P-rank result from one rank computing the whole (short) sequence."""
    n = max(2 * (args.window + args.global_first) * ctx.world_size, 4 * ctx.world_size)
    (q, k, v), do = make_inputs(n, args, device, seed=1)
    out, lse = sp.sparse_attention(q, k, v, pattern, backend=args.backend, return_lse=True)
    out.backward(do)
    ref = [out.detach(), lse.detach(), q.grad, k.grad, v.grad]
    qs, ks, vs = (sp.shard(t.detach(), ctx).clone().requires_grad_() for t in (q, k, v))
    ctx.seq_len = n
    out_s, lse_s = sp_attention.sequence_parallel_attention(qs, ks, vs, pattern, ctx, backend=args.backend)
    out_s.backward(sp.shard(do, ctx))
    got = [out_s, lse_s, qs.grad, ks.grad, vs.grad]
    errs = {"n": n}
    for name, g, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        r = sp.shard(r, ctx, dim=2 if name == "lse" else 1).float()
        fin = torch.isfinite(r)
        errs[name] = (g.float()[fin] - r[fin]).abs().max().item() / max(r[fin].abs().max().item(), 1e-30)
    return errs


class Reporter:
    """Prints each row as it is measured (rank 0) and rewrites the JSON after each."""

    def __init__(self, args, world, device):
        self.args, self.rows, self.extra = args, [], {}
        self.meta = {"world": world, "torch": torch.__version__, "args": vars(args),
                     "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "pattern": pattern_of(args).to_dict()}
        try:
            import triton
            self.meta["triton"] = triton.__version__
        except ImportError:
            pass
        print(f"pattern {pattern_of(args)}; {args.dtype}, H={args.heads}, D={args.dim}, {world} ranks on "
              f"{self.meta['device']}", flush=True)

    def note(self, key, value):
        self.extra[key] = value
        print(f"{key}: {value}", flush=True)
        self.write()

    def row(self, r):
        if not self.rows:
            print(f"{'mode':<8}{'N':>10}{'P':>3}{'total s':>10}{'compute s':>11}{'comm s':>9}{'hidden':>8}"
                  f"{'eff/spdup':>10}{'max MB/rank':>13}{'ulysses s':>11}{'ulysses MB':>12}", flush=True)
        base = self.rows[0]["total_s"] if self.rows else r["total_s"]
        eff = base / r["total_s"]
        r["efficiency" if r["mode"] == "weak" else "speedup"] = eff
        mb = r.get("max_rank_bytes", 0) / 1e6  # forward + backward, the busiest rank
        umb = r.get("ulysses_max_rank_bytes", 0) / 1e6
        hidden = f"{r['hidden']:.0%}" if r.get("hidden") is not None else "-"
        print(f"{r['mode']:<8}{r['n']:>10}{r['ranks']:>3}{r['total_s']:>10.4f}{r.get('compute_s', 0):>11.4f}"
              f"{r.get('comm_s', 0):>9.4f}{hidden:>8}{eff:>10.3f}{mb:>13.3f}{r.get('ulysses_s', 0):>11.4f}"
              f"{umb:>12.3f}", flush=True)
        if "ulysses_error" in r:
            print(f"  ulysses: {r['ulysses_error']}", flush=True)
        if "bytes_match" in r and not r["bytes_match"]:
            print("  WARNING: bytes sent differ from comm_volume", flush=True)
        self.rows.append(r)
        self.write()

    def write(self):
        Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(self.args.out).write_text(json.dumps({"meta": self.meta, "rows": self.rows, **self.extra}, indent=2))


def worker(rank, world, args, store_path):
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if store_path is None:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    else:
        store = dist.FileStore(store_path, world)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    try:
        dist.barrier()
        ctx = sp.SequenceParallel()
        pattern = pattern_of(args)
        t = args.tokens_per_gpu
        rep = Reporter(args, world, device) if rank == 0 else None
        if world > 1:
            errs = check_small(args, device, ctx, pattern)
            if rep:
                rep.note("check (max |P ranks - 1 rank| / max |1 rank|)", errs)
        windows = {n: sp.comm_volume(sp.Window(args.window), n, ctx.world_size, args.heads, args.dim,
                                     DTYPES[args.dtype], rank=ctx.rank)["forward"]
                   for n in (t * world, 4 * t * world)}
        if rep:
            rep.note("window-only halo bytes (forward, this rank) by total N", windows)
        row = one_rank(args, device, t, pattern)
        if rep:
            rep.row(row)
        if world > 1:
            for mode in args.modes.split(","):
                row = measure_p(args, device, ctx, t * world if mode == "weak" else t, pattern, mode)
                if rep:
                    rep.row(row)
        if rep:
            print(f"wrote {args.out}", flush=True)
    finally:
        dist.destroy_process_group()


def main(argv=None):
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, None)
        return
    world = args.nprocs or (torch.cuda.device_count() if args.device == "cuda" else 2)
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(worker, args=(world, args, os.path.join(tmp, "store")), nprocs=world)


if __name__ == "__main__":
    main()
