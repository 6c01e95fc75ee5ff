"""What every rank needs from every other rank, from the pattern and the shard rule alone.

Each rank computes the plan of *every* rank (cheap: position lists, no data),
so a sender knows what its peers will ask for without a handshake.  A rank's
plan lists the key sets it needs beyond its own shard's window part:

- ``halo_left`` / ``halo_right``: the last ``max left`` keys before the shard
  and the first ``max right`` after it (Window components); any length, so a
  halo may span several ranks, and its size does not depend on N;
- one strided set per ``Strided`` component: ``offset + stride * t`` within the
  level's span of the shard (all of it without a span), never past the shard's
  end when causal;
- the global keys (every ``Global`` component), never past the shard's end when causal;
- for static block-list components (``RandomBlocks``, ``BlockLayout``), the key
  blocks that the shard's query blocks list ("fetch only the needed blocks").

and the global query rows (``Global(queries=True)``, see
``BoundPattern.global_rows``) it computes partial results for against its own
keys: all of them when not causal, else those at or after its shard start
(earlier ones cannot see its keys).

Within documents (``Pattern.within``) a shard needs no key before the earliest
start, over the batch, of its first row's documents, nor (not causal) past the
latest end of its last row's: every key set above is cut to that reach
(``BoundPattern.key_reach``), so a window's halo shrinks to the part of the
previous document that reaches into the shard and strided, global and block keys
come only from the documents the shard's queries lie in.  A global query row
then sees only its own document, and only ranks whose shard that document
reaches compute partial results for it.

``comm_volume`` adds up the bytes each rank sends, forward and backward, for
this plan or for the all-to-all (head-sharded) plan.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..patterns import BoundPattern, Documents, Pattern, as_pattern
from .context import shard_bounds  # noqa: F401  (the shard rule; benchmarks import it from here too)
from ..reference import lse_dtype

EXCHANGES = ("auto", "pattern", "ulysses")


@dataclass
class KeyRequest:
    """A sorted set of global key positions needed by one rank, and the components it serves."""

    name: str
    positions: torch.Tensor
    components: tuple[int, ...]
    pos0: int | None = None  # set for arithmetic progressions (pos0 + stride * t)
    stride: int = 1


@dataclass
class RankPlan:
    rank: int
    start: int
    end: int
    requests: list[KeyRequest]
    window_components: tuple[int, ...]
    global_rows: torch.Tensor  # global query positions in this shard
    global_q: torch.Tensor  # global query positions this rank computes partials for


def _arange(a: int, b: int, step: int = 1) -> torch.Tensor:
    return torch.arange(a, max(a, b), step, dtype=torch.long)


def _block_keys(bound: BoundPattern, index: int, start: int, end: int, hi: int) -> torch.Tensor:
    comp = bound.pattern.components[index]
    table = bound.tables[bound.pattern.block_components.index(comp)]
    qb = torch.arange(start // comp.block, (end - 1) // comp.block + 1, device=table.device)
    kb = table[:, :, qb].unique().cpu()
    kb = kb[kb >= 0]
    keys = (kb[:, None] * comp.block + torch.arange(comp.block)).flatten()
    return keys[keys < hi]


def rank_plan(pattern: Pattern, n: int, bounds: list[tuple[int, int]], rank: int,
              bound: BoundPattern | None = None) -> RankPlan:
    """The key sets and global query rows of ``rank`` (see module docstring), read from ``bound``
    (``pattern`` bound at length ``n``; it may be left out when there are no block-list components)."""
    if bound is None:
        if pattern.block_components:
            raise ValueError("block-list keys can be fetched only for static layouts (RandomBlocks, "
                             "BlockLayout) with a bound pattern; TopKBlocks needs exchange='ulysses'")
        bound = pattern.bind(n)
    s, e = bounds[rank]
    comps = pattern.components
    # Keys outside [lo, hi) are never allowed for this shard: causality, and its queries' documents.
    lo, hi = bound.key_reach(s, e)
    windows = [i for i, c in enumerate(comps) if c.halo is not None]
    reqs: list[KeyRequest] = []
    if windows:
        left = max(comps[i].halo[0] for i in windows)
        right = 0 if pattern.causal else max(comps[i].halo[1] for i in windows)
        a, b = max(lo, s - left), min(hi, e + right)
        reqs.append(KeyRequest("halo_left", _arange(a, s), tuple(windows), pos0=a))
        reqs.append(KeyRequest("halo_right", _arange(e, b), tuple(windows), pos0=e))
    for i, c in enumerate(comps):
        if c.lattice is None:
            continue
        (term,) = c.terms()  # a lattice component is one term: its keys within the term's reach of the shard
        first, top = term.key_range(s, e, hi, floor=lo)
        reqs.append(KeyRequest(f"strided{i}", _arange(first, top, term.m), (i,), pos0=first, stride=term.m))
    globals_ = tuple(i for i, c in enumerate(comps) if c.shared_keys)
    if globals_:
        g = bound.global_keys
        reqs.append(KeyRequest("global", g[(g >= lo) & (g < hi)], globals_))
    blocks = tuple(i for i, c in enumerate(comps) if c.block_based)
    if blocks:
        if any(comps[i].data_dependent for i in blocks):
            raise ValueError("block-list keys can be fetched only for static layouts (RandomBlocks, "
                             "BlockLayout); TopKBlocks needs exchange='ulysses'")
        keys = torch.cat([_block_keys(bound, i, s, e, hi) for i in blocks]).unique()
        reqs.append(KeyRequest("blocks", keys[keys >= lo], blocks))
    gq = bound.global_rows
    own = gq[(gq >= s) & (gq < e)]
    return RankPlan(rank, s, e, reqs, tuple(windows), own, _rows_reaching(bound, gq, s, e))


def _rows_reaching(bound: BoundPattern, rows: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """The global query rows that may see some key of shard [s, e): all of them when not causal, else
    those at or after s; within documents only those whose documents reach into the shard."""
    if bound.pattern.causal:
        rows = rows[rows >= s]
    if bound.documents is None or not len(rows):
        return rows
    keep = []
    for r in rows.tolist():
        first, stop = bound.key_reach(r, r + 1)
        keep.append(first < e and stop > s)
    return rows[torch.tensor(keep, dtype=torch.bool)]


def owned_slice(pos: torch.Tensor, lo: int, hi: int) -> slice:
    """The slice of sorted ``pos`` that lies in [lo, hi)."""
    a = int(torch.searchsorted(pos, lo))
    b = int(torch.searchsorted(pos, hi))
    return slice(a, b)


def choose_exchange(pattern: Pattern, n: int, world: int, hq: int, hkv: int, exchange: str,
                    bound: BoundPattern | None = None, dim: int = 128, dtype=torch.bfloat16) -> str:
    """'pattern' or 'ulysses' for ``exchange`` in ("auto", "pattern", "ulysses")."""
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    needs_heads = pattern.data_dependent
    if exchange == "pattern" and needs_heads:
        raise ValueError("exchange='pattern' cannot serve TopKBlocks (its blocks depend on all of q and k); "
                         "use exchange='ulysses' or 'auto'")
    if exchange == "ulysses" or needs_heads:
        if hkv % world:
            raise ValueError(f"the all-to-all (Ulysses) exchange shards heads over the {world} ranks: key/value "
                             f"heads ({hkv}) must be divisible by the sequence-parallel size ({world})"
                             + ("; TopKBlocks needs this exchange" if needs_heads else ""))
        return "ulysses"
    if exchange == "pattern" or not pattern.block_components or hkv % world:
        return "pattern"
    # Static block lists: whichever gives the busiest rank fewer bytes (the same choice on every rank).
    busiest = {}
    for method in ("pattern", "ulysses"):
        vol = volume_per_rank(pattern, n, world, hq, hkv, dim, 1, dtype, method, bound)
        busiest[method] = max(f + b for f, b in zip(vol["forward"], vol["backward"]))
    return "pattern" if busiest["pattern"] <= busiest["ulysses"] else "ulysses"


def volume_per_rank(pattern: Pattern, n: int, world: int, hq: int, hkv: int, dim: int, batch: int,
                    dtype: torch.dtype, exchange: str, bound: BoundPattern | None = None) -> dict:
    """Bytes each rank sends -> {"forward": [P ints], "backward": [P ints]}."""
    elt, lse_elt = dtype.itemsize, lse_dtype(dtype).itemsize
    bounds = shard_bounds(n, world)
    fwd = [0] * world
    recv = [0] * world  # forward bytes received = backward bytes sent
    if exchange == "ulysses":
        hl, kl = hq // world, hkv // world
        for r, (s, e) in enumerate(bounds):
            for p, (sp_, ep) in enumerate(bounds):
                if p == r:
                    continue
                fwd[r] += batch * (e - s) * (hl + 2 * kl) * dim * elt  # my tokens, p's heads
                fwd[r] += batch * (ep - sp_) * hl * (dim * elt + lse_elt)  # p's tokens, my heads' result
                recv[r] += batch * (ep - sp_) * (hl + 2 * kl) * dim * elt
                recv[r] += batch * (e - s) * hl * (dim * elt + lse_elt)
        return {"forward": fwd, "backward": recv}
    if bound is None and not pattern.data_dependent:
        bound = pattern.bind(n, hq)
    plans = [rank_plan(pattern, n, bounds, r, bound) for r in range(world)]
    kv_row = batch * 2 * hkv * dim * elt
    q_row = batch * hq * dim * elt
    part_row = batch * hq * (dim * elt + lse_elt)
    for r, plan in enumerate(plans):
        for o, (s, e) in enumerate(bounds):
            if o == r:
                continue
            rows = sum(_count(req.positions, s, e) for req in plan.requests)
            gq = _count(plan.global_q, s, e)
            fwd[o] += rows * kv_row + gq * q_row  # round 1: owner o sends to r
            recv[r] += rows * kv_row + gq * q_row
            fwd[r] += gq * part_row  # round 2: r returns partial results to owner o
            recv[o] += gq * part_row
    return {"forward": fwd, "backward": recv}


def _count(pos: torch.Tensor, lo: int, hi: int) -> int:
    sl = owned_slice(pos, lo, hi)
    return sl.stop - sl.start


def comm_volume(pattern, n: int, world: int, heads, dim: int, dtype=torch.bfloat16, *, rank: int = 0,
                batch: int = 1, exchange: str = "auto", documents: Documents | None = None) -> dict:
    """Bytes ``rank`` of ``world`` sequence-parallel ranks sends per attention layer:
    {"forward", "backward", "exchange", "per_rank"}.

    ``heads`` is the query-head count or a pair (query heads, key/value heads).
    Counts exactly what ``sequence_parallel_attention`` puts on the wire (one
    layer, forward and backward; a world size of 1 sends nothing).  ``documents``
    (or a pattern already ``within`` them) counts the exchange of packed documents,
    which sends only keys of the documents that reach into each shard.
    """
    pattern = as_pattern(pattern)
    if documents is not None:
        if pattern.documents is not None and pattern.documents != documents:
            raise ValueError("comm_volume got documents and a pattern within other documents; pass one of them")
        pattern = pattern.within(documents)
    if pattern.documents is not None:
        pattern.documents.validate(n, batch)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    for name, value in (("n", n), ("world", world), ("dim", dim), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be an integer in [0, world={world}), got {rank!r}")
    hq, hkv = (heads, heads) if isinstance(heads, int) else tuple(heads)
    if hkv < 1 or hq % hkv:
        raise ValueError(f"heads: query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if world == 1:
        return {"forward": 0, "backward": 0, "exchange": "none", "per_rank": {"forward": [0], "backward": [0]}}
    bound = pattern.bind(n, hq) if pattern.block_components and not pattern.data_dependent else None
    method = choose_exchange(pattern, n, world, hq, hkv, exchange, bound, dim, dtype)
    vol = volume_per_rank(pattern, n, world, hq, hkv, dim, batch, dtype, method, bound)
    return {"forward": vol["forward"][rank], "backward": vol["backward"][rank], "exchange": method,
            "per_rank": vol}
