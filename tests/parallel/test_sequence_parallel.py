"""Sequence-parallel attention equals one process computing the whole sequence (gloo ranks on CPU).

Each rank draws the same full float64 q, k, v and upstream gradients, computes
the single-process reference and its own shard through the exchange, and
returns the largest differences of out, lse, dq, dk, dv.  Float64 sums of a few
dozen O(1) terms differ from each other by ~1e-15 (different order of
summation and of the log-sum-exp merge), so 1e-10 leaves six orders of margin
while any missed or double-counted pair shows up as an O(1e-2) error.

Every family also runs within packed documents of fresh random lengths (drawn
from the same seed on every rank), and each case checks that the bytes put on
the wire are those ``comm_volume`` computes.

All cases of one world size run in one spawned group: process start-up, not
the arithmetic, is what costs time on the 2-core CI machine.
"""
from __future__ import annotations

import random

import pytest
import torch

from dist_utils import run_ranks
from tolerance import reference_tolerance
from sparse_parallel import (BlockLayout, Dilated, Global, Pattern, RandomBlocks, SequenceParallel, Strided,
                             TopKBlocks, Window, comm_volume, shard, sparse_attention)
from sparse_parallel.parallel.context import shard_bounds
from sparse_parallel.patterns import Documents

TOL = 1e-10


def _case(name, pattern, n, b=1, hq=2, hkv=1, d=8, exchange="auto", api=False, scale=None):
    return dict(name=name, pattern=pattern, n=n, b=b, hq=hq, hkv=hkv, d=d, exchange=exchange, api=api,
                scale=scale)


#: Key 1 is listed by one Global and among the other's first keys; key 9 is listed by both.
TWO_GLOBALS = (Window(2) | Strided(3, offset=1) | Global(first=2, positions=(9,))
               | Global(positions=(1, 9, 14), queries=False))


def _cases(world):
    """Every component and mixtures; lengths not divisible by P, shards of one token, GQA, batch 2."""
    causal = Pattern((Window(4), Strided(3, offset=1), Global(first=2, queries=False)))
    layout = BlockLayout.from_rows(16, [[0], [0, 1], [0, 2], [1, 3]])
    heads = 2 * world  # the head-sharded exchange needs key/value heads divisible by P
    return [
        _case("window", Window(5), 13),
        _case("window_bidir_long", Pattern(Window(7, 3), causal=False), 9 + world),
        _case("window_strided_global", causal, 23, b=2, hq=4, hkv=2),
        _case("dilated", Dilated(window=3, levels=2), 19),
        _case("strided_span_noncausal", Pattern((Window(1, 1), Strided(4, offset=2, span=9)), causal=False), 21),
        _case("global_queries", Window(3) | Global(first=2, positions=(7,)), 17, hq=3, hkv=1),
        _case("global_queries_noncausal", Pattern((Window(2, 2), Global(positions=(0, 5, 12))), causal=False), 15),
        _case("global_first_is_shard", Window(2) | Strided(2) | Global(first=3), world + 3, b=2),
        _case("two_globals", TWO_GLOBALS, 19),
        _case("two_globals_ulysses", TWO_GLOBALS, 19, hq=heads, hkv=heads, exchange="ulysses"),
        _case("one_token_shards", Window(2) | Strided(3) | Global(first=1), world),
        _case("one_token_shards_global_q", Pattern((Window(1, 1), Global(first=1)), causal=False), world),
        _case("random_blocks_fetch", Window(8) | RandomBlocks(16, 2, seed=3, per_head=True), 61, exchange="pattern"),
        _case("random_blocks_ulysses", Window(8) | RandomBlocks(16, 2, seed=3, per_head=True), 61,
              hq=2 * heads, hkv=heads, exchange="ulysses"),
        _case("layout_auto", Window(3) | layout, 57, hq=heads, hkv=heads),
        _case("topk_ulysses", Window(4) | TopKBlocks(16, 2), 50, hq=2 * heads, hkv=heads),
        _case("window_global_ulysses", Window(6) | Global(first=2), 29, b=2, hq=heads, hkv=heads,
              exchange="ulysses"),
        _case("public_api_scale", Window(3) | Strided(5) | Global(first=1), 26, hq=4, hkv=2, api=True, scale=0.3),
    ]


def _documents(rng, n, world, batch, every_shard_bound=False):
    """Fresh document lengths: 1-token documents in every row; row 0 has a document boundary on the first
    shard boundary (on every one with ``every_shard_bound``), row 1 a document longer than a shard."""
    bounds = shard_bounds(n, world)
    rows = []
    for b in range(batch):
        cuts = {s for s, _ in bounds[1:None if every_shard_bound else 2]} if b == 0 else set()
        span = (0, 0)
        if b == 1:
            length = min(n - 1, bounds[0][1] + rng.randint(1, 3))  # (world size 1: the longest that fits)
            at = rng.randint(0, n - length)
            span, cuts = (at, at + length), {at, at + length}
        inside = lambda c: span[0] < c < span[1]  # noqa: E731
        cuts |= {c for c in range(1, n) if rng.random() < 0.2 and not inside(c)}
        one = rng.choice([c for c in range(n) if not inside(c) and not inside(c + 1)])
        cuts |= {one, one + 1}
        rows.append(sorted({0, n} | {c for c in cuts if 0 < c < n}))
    return Documents.from_offsets(rows)


def _document_cases(world, seed):
    """Every family within fresh documents (see ``_documents``), causal and not, GQA, both exchanges."""
    rng = random.Random(seed)
    heads = 2 * world
    layout = BlockLayout.from_rows(16, [[0], [0, 1], [1, 2], [0, 3]])
    cases = [
        ("window", Window(5), 29, {}),
        ("window_noncausal", Pattern(Window(6, 3), causal=False), 27, {}),
        ("strided_global_first_gqa", Window(3) | Strided(3, offset=1) | Global(first=2, queries=False), 31,
         dict(hq=4, hkv=2)),
        ("dilated", Dilated(window=3, levels=2), 30, {}),
        ("strided_span_noncausal", Pattern((Window(1, 1), Strided(4, offset=2, span=9)), causal=False), 29, {}),
        ("global_positions_queries", Window(2) | Global(first=2, positions=(9, 20)), 27, dict(hq=3, hkv=1)),
        ("global_queries_noncausal", Pattern((Window(2, 2), Global(first=1, positions=(5, 14, 22))),
                                             causal=False), 26, {}),
        ("random_blocks_fetch", Window(4) | RandomBlocks(16, 2, seed=5, per_head=True), 61,
         dict(exchange="pattern")),
        ("layout_auto", Window(2) | layout, 57, dict(hq=heads, hkv=heads)),
        ("topk_ulysses", Window(3) | TopKBlocks(16, 2), 50, dict(hq=2 * heads, hkv=heads)),
        ("global_queries_ulysses", Window(4) | Strided(3) | Global(first=2, positions=(17,)), 29,
         dict(hq=heads, hkv=heads, exchange="ulysses")),
        ("public_api", Window(3) | Strided(5) | Global(first=1), 26, dict(hq=4, hkv=2, api=True, scale=0.3)),
    ]
    out = [_case(f"documents_{name}", p.within(_documents(rng, n, world, 2)), n, b=2, **kw)
           for name, p, n, kw in cases]
    # Every shard boundary a document boundary: no document reaches into another shard, nothing moves.
    n = 37
    isolated = (Window(6) | Strided(3, offset=1) | Global(first=2, positions=(n - 3,))
                | RandomBlocks(16, 1, seed=2))
    out.append(_case("documents_on_every_shard_bound", isolated.within(_documents(rng, n, world, 1, True)), n,
                     exchange="pattern"))
    return out


def _reference(pattern, q, k, v, g_out, g_lse, scale=None):
    from sparse_parallel.reference import reference_attention

    pattern = pattern if isinstance(pattern, Pattern) else Pattern((pattern,))
    bound = pattern.bind(q.shape[1], q.shape[2], q=q, k=k)
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = reference_attention(q, k, v, bound, scale=scale)
    _loss(out, lse, g_out, g_lse).backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def _loss(out, lse, g_out, g_lse):
    return (out * g_out).sum() + (torch.where(torch.isinf(lse), 0.0, lse) * g_lse).sum()


def _run_case(ctx, case, seed):
    from sparse_parallel.parallel import sequence_parallel_attention

    gen = torch.Generator().manual_seed(seed)
    b, n, hq, hkv, d = case["b"], case["n"], case["hq"], case["hkv"], case["d"]
    full = lambda h: torch.randn(b, n, h, d, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v, g_out = full(hq), full(hkv), full(hkv), full(hq)
    g_lse = torch.randn(b, hq, n, generator=gen, dtype=torch.float64)
    ref = _reference(case["pattern"], q, k, v, g_out, g_lse, case["scale"])
    qs, ks, vs = (shard(t, ctx).clone().requires_grad_() for t in (q, k, v))
    ctx.bytes_sent = {"forward": 0, "backward": 0}
    if case["api"]:
        out, lse = sparse_attention(qs, ks, vs, case["pattern"], backend="reference", return_lse=True,
                                    scale=case["scale"], sequence_parallel=ctx)
    else:
        out, lse = sequence_parallel_attention(qs, ks, vs, case["pattern"], ctx, backend="reference",
                                               exchange=case["exchange"])
    sent_fwd = ctx.bytes_sent["forward"]
    _loss(out, lse, shard(g_out, ctx), shard(g_lse, ctx, dim=2)).backward()
    vol = comm_volume(case["pattern"], n, ctx.world_size, (hq, hkv), d, torch.float64, rank=ctx.rank, batch=b,
                      exchange=case["exchange"])
    got = (out, lse, qs.grad, ks.grad, vs.grad)
    want = (shard(ref[0], ctx), shard(ref[1], ctx, dim=2), shard(ref[2], ctx), shard(ref[3], ctx),
            shard(ref[4], ctx))
    errs = {}
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        same_inf = torch.equal(torch.isinf(g), torch.isinf(w))
        fin = ~torch.isinf(w)
        errs[name] = (g[fin] - w[fin]).abs().max().item() if same_inf and fin.any() else (0.0 if same_inf else 1.0)
    sent = (sent_fwd, ctx.bytes_sent["backward"])
    with torch.no_grad():  # inference: no graph, same result
        out_ng, _ = sequence_parallel_attention(qs, ks, vs, case["pattern"], ctx, backend="reference",
                                                scale=case["scale"], exchange=case["exchange"])
    errs["out without grad"] = (out_ng - out.detach()).abs().max().item() if out.numel() else 0.0
    return dict(errs=errs, sent=sent, vol=(vol["forward"], vol["backward"]),
                exchange=vol["exchange"])


def _event_order(ctx):
    """Events of one forward/backward: transfers launched/finished and gradients reaching attention calls."""
    from sparse_parallel.parallel import attention, exchange

    log, launch, attend = [], exchange._launch, attention._attend

    def logged_launch(*args):
        finish = launch(*args)
        log.append(f"launch {args[-1]}")
        return lambda: (log.append("finish"), finish())[1]

    def logged_attend(fn, q, q_pos, spaces, bound, scale):
        log.append(f"attention over {len(spaces)} space(s)")
        out, lse = attend(fn, q, q_pos, spaces, bound, scale)
        out.register_hook(lambda g: log.append(f"grad of attention over {len(spaces)} space(s)"))
        return out, lse

    exchange._launch, attention._attend = logged_launch, logged_attend
    try:
        q = torch.randn(1, 10 * ctx.world_size, 2, 8, dtype=torch.float64, requires_grad=True)
        out, _ = attention.sequence_parallel_attention(q, q, q, Window(8) | Strided(4), ctx, backend="reference")
        out.sum().backward()
    finally:
        exchange._launch, attention._attend = launch, attend
    return log


def _worker(rank, world, seed):
    ctx = SequenceParallel()
    res = {}
    for i, c in enumerate(_cases(world) + _document_cases(world, seed)):
        ctx.seq_len = c["n"] if i % 2 else None  # both ways of knowing N: given, or one all-reduce
        res[c["name"]] = _run_case(ctx, c, seed + i)
    ctx.seq_len = None
    if world == 4:  # two sequence-parallel groups of 2 (data parallel x sequence parallel), as a trainer builds
        import torch.distributed as dist

        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        sub = SequenceParallel(groups[rank // 2])
        assert (sub.rank, sub.world_size, sub.global_ranks) == (rank % 2, 2, (rank // 2 * 2, rank // 2 * 2 + 1))
        res["subgroup"] = _run_case(sub, _case("subgroup", Window(5) | Strided(3) | Global(first=2), 15), seed)
    if world == 2:
        res["errors"] = _error_messages(ctx)
    return res, (_event_order(ctx) if world > 1 else None)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_matches_single_process(world, tmp_path):
    seed = int(torch.randint(0, 2**30, ()).item())  # fresh inputs each run; printed on failure
    results = run_ranks(_worker, world, tmp_path, args=(seed,), timeout=150)
    if world > 1:
        # Overlap: the local-window attention runs between launching and finishing each transfer,
        # in forward (it is computed before the wait) and in backward (its gradient is computed
        # after the reverse transfer is launched and before it is collected).
        for rank, (_, log) in enumerate(results):
            assert log == ["launch forward", "attention over 1 space(s)", "finish", "attention over 3 space(s)",
                           "grad of attention over 3 space(s)", "launch backward",
                           "grad of attention over 1 space(s)", "finish"], f"rank {rank}: {log}"
    results = [res for res, _ in results]
    if world == 2:  # clear errors, raised before anything moves
        for res in results:
            messages = res.pop("errors")
            assert len(messages) == 4
            assert "key/value heads (3) must be divisible by the sequence-parallel size (2)" in messages[0]
            assert "TopKBlocks" in messages[0]
            assert "divisible" in messages[1]
            assert "exchange must be one of" in messages[2]
            assert "holds 8 tokens but seq_len=20 gives it 10" in messages[3]
    for rank, res in enumerate(results):
        for name, r in res.items():
            for what, err in r["errs"].items():
                assert err <= TOL, f"world {world} rank {rank} case {name}: {what} error {err:.3g} (seed {seed})"
            assert r["sent"] == r["vol"], (f"world {world} rank {rank} case {name}: bytes sent (fwd, bwd) "
                                           f"{r['sent']} but comm_volume says {r['vol']}")
            if world > 1 and name.endswith("ulysses"):
                assert r["exchange"] == "ulysses"
            if world > 1 and name.endswith("fetch"):
                assert r["exchange"] == "pattern"
    if world > 1:  # something really moved, except where no document crosses a shard boundary
        assert sum(r["window"]["sent"][0] for r in results) > 0
        assert sum(r["documents_window"]["sent"][0] for r in results) > 0
        assert all(r["documents_on_every_shard_bound"]["sent"] == (0, 0) for r in results)


def _error_messages(ctx):
    """Messages of bad calls on 2 ranks (each fails before any transfer, on every rank)."""
    from sparse_parallel.parallel import sequence_parallel_attention

    q = torch.randn(1, 8, 3, 4, dtype=torch.float64)
    k = torch.randn(1, 8, 3, 4, dtype=torch.float64)
    messages = []
    for pattern, exchange in ((Window(2) | TopKBlocks(16, 1), "auto"), (Window(2), "ulysses")):
        try:
            sequence_parallel_attention(q, k, k, pattern, ctx, backend="reference", exchange=exchange)
        except ValueError as e:
            messages.append(str(e))
    try:
        sequence_parallel_attention(q, k, k, Window(2), ctx, exchange="ring")
    except ValueError as e:
        messages.append(str(e))
    ctx.seq_len = 20  # each rank would hold 10 tokens, not 8
    try:
        sequence_parallel_attention(q, k, k, Window(2), ctx)
    except ValueError as e:
        messages.append(str(e))
    ctx.seq_len = None
    return messages


def test_window_bytes_do_not_grow_with_n():
    """A window's halo is the same size whatever the total length (no process group needed)."""
    sizes = {n: comm_volume(Window(64), n, 4, 4, 16, torch.bfloat16, rank=1) for n in (1024, 4096, 65536)}
    fwd = {v["forward"] for v in sizes.values()}
    assert len(fwd) == 1 and fwd.pop() == 64 * 2 * 4 * 16 * 2  # 64 rows of k and v, 4 heads, dim 16, bf16
    strided = [comm_volume(Window(64) | Strided(64), n, 4, 4, 16, torch.bfloat16, rank=1)["forward"]
               for n in (1024, 65536)]
    assert strided[1] > strided[0]  # an unbounded strided level does grow with N


def test_documents_shrink_what_is_sent():
    """Only keys of documents that reach into a shard move: a window's halo shrinks to the part of the
    previous document inside it, and strided and global keys come only from the shard's documents."""
    n, world, heads, dim = 4096, 4, 4, 16  # shards of 1024
    row = 2 * heads * dim * 2  # k and v of one position in bfloat16
    docs = Documents.from_offsets([[0, 1014, 2048, 3072, 4096]])
    plain = comm_volume(Window(64), n, world, heads, dim)["per_rank"]
    assert plain["forward"] == [64 * row] * 3 + [0]
    within = comm_volume(Window(64), n, world, heads, dim, documents=docs)["per_rank"]
    # Rank 1's first document starts 10 tokens before it; ranks 2 and 3 start on document boundaries.
    assert within == {"forward": [10 * row, 0, 0, 0], "backward": [0, 10 * row, 0, 0]}
    assert comm_volume(Window(64).within(docs), n, world, heads, dim)["per_rank"] == within
    # Two rows: a shard needs the keys of both rows' documents, from the earliest start on.
    two = Documents.from_offsets([[0, 1014, 4096], [0, 1000, 4096]])
    assert comm_volume(Window(64), n, world, heads, dim, batch=2, documents=two)["forward"] == 2 * 24 * row
    p = Window(64) | Strided(64) | Global(first=128, queries=False)
    lengths = [[300] * 13 + [196], [700] * 5 + [596]]  # boundaries off the shard boundaries
    for causal in (True, False):
        q = p.with_causal(causal)
        without = comm_volume(q, n, world, heads, dim, batch=2)["per_rank"]
        with_docs = comm_volume(q, n, world, heads, dim, batch=2, documents=Documents.from_lengths(lengths))
        for direction in ("forward", "backward"):
            assert all(a < b for a, b in zip(with_docs["per_rank"][direction], without[direction]) if b), causal
    with pytest.raises(ValueError, match="3 rows for a batch of 2"):
        comm_volume(p, n, world, heads, dim, batch=2, documents=Documents.from_lengths([[n]] * 3))


TRITON_CASES = [  # (name, pattern, exchange, N, Hq, Hkv)
    ("window_strided_global", Window(5) | Strided(4, offset=1) | Global(first=2), "pattern", 37, 2, 1),
    ("global_query_rows", Window(3) | Global(first=2, positions=(9,)), "pattern", 20, 2, 2),
    ("global_query_rows_ulysses", Window(3) | Global(first=2, positions=(9,)), "ulysses", 20, 2, 2),
    ("two_globals_ulysses", TWO_GLOBALS, "ulysses", 20, 2, 2),
]


def _triton_worker(rank, world):
    from sparse_parallel import kernels
    from sparse_parallel.parallel import sequence_parallel_attention

    ok, why = kernels.available(torch.device("cpu"))
    if not ok:
        return {"skip": f"kernels.available(cpu) under TRITON_INTERPRET=1 says: {why}"}
    ctx = SequenceParallel()
    errs = {}
    for name, pattern, exchange, n, hq, hkv in TRITON_CASES:
        gen = torch.Generator().manual_seed(1234)
        q, k, v, g_out = (torch.randn(1, n, h, 16, generator=gen, dtype=torch.float64) for h in (hq, hkv, hkv, hq))
        g_lse = torch.zeros(1, hq, n, dtype=torch.float64)
        ref = _reference(pattern, q, k, v, g_out, g_lse)
        eager32 = _reference(pattern, q.float(), k.float(), v.float(), g_out.float(), g_lse.float())
        qs, ks, vs = (shard(t, ctx).float().clone().requires_grad_() for t in (q, k, v))
        out, lse = sequence_parallel_attention(qs, ks, vs, pattern, ctx, backend="triton", exchange=exchange)
        (out * shard(g_out, ctx).float()).sum().backward()
        for what, g, e32, w in zip(("out", "dq", "dk", "dv"), (out, qs.grad, ks.grad, vs.grad),
                                   (eager32[0], eager32[2], eager32[3], eager32[4]),
                                   (ref[0], ref[2], ref[3], ref[4])):
            # Kernel error <= 2x the float32 eager error against float64, floored at a few float32
            # ulps of O(1) values.
            tol = max(reference_tolerance(shard(w, ctx), shard(e32, ctx)), 8e-7)
            errs[f"{name} {what}"] = ((g.double() - shard(w, ctx)).abs().max().item(), tol)
    return {"errs": errs}


def test_triton_backend_interpreted(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned ranks
    results = run_ranks(_triton_worker, 2, tmp_path, timeout=170)
    if "skip" in results[0]:
        pytest.skip(results[0]["skip"])
    for rank, res in enumerate(results):
        for name, (err, tol) in res["errs"].items():
            assert err <= tol, f"rank {rank}: triton {name} error {err:.3g} > {tol:.3g}"


def test_auto_exchange_takes_fewer_bytes_for_block_lists():
    """For static block lists 'auto' picks whichever exchange gives the busiest rank fewer bytes."""
    for per_block, expected in ((1, "pattern"), (8, "ulysses")):
        pattern = Window(16) | RandomBlocks(16, per_block)
        busiest = {}
        for ex in ("pattern", "ulysses"):
            v = comm_volume(pattern, 4096, 8, 8, 16, torch.bfloat16, exchange=ex)["per_rank"]
            busiest[ex] = max(f + b for f, b in zip(v["forward"], v["backward"]))
        assert min(busiest, key=busiest.get) == expected
        assert comm_volume(pattern, 4096, 8, 8, 16, torch.bfloat16)["exchange"] == expected
    # Not divisible key/value heads: only the pattern exchange can serve it.
    assert comm_volume(Window(16) | RandomBlocks(16, 8), 4096, 8, 12, 16)["exchange"] == "pattern"
