"""Sequence-parallel sparse attention: each rank holds a contiguous shard; only what the pattern needs moves.

Two exchanges (see ``plan.py`` for what is needed and ``exchange.py`` for how
it moves, forward and backward):

- ``"pattern"``: every rank gets the key sets its shard's queries can reach
  (window halos, strided levels, global keys, static block lists) by planned
  point-to-point transfers.  Queries attend to their own shard (window part)
  while the transfers are in flight, then to the received key spaces; the two
  partial results are merged exactly by log-sum-exp.  Global query rows
  (``Global(queries=True)``) are fetched by every rank that holds keys they can
  see, computed against those local keys, sent back to their owner and merged
  there by log-sum-exp.
- ``"ulysses"``: all-to-all from sequence-sharded to head-sharded, whole-
  sequence attention on P-th of the heads, and back.  Needed for TopKBlocks
  (its blocks depend on all of q and k), and the anchor the pattern exchange
  is measured against.

Every rank must call this with the same pattern, and every rank must run
backward through it (the backward exchanges are collective).
"""
from __future__ import annotations

import torch

from ..backends import check_qkv, resolve_backend
from ..patterns import BoundPattern, Pattern, as_pattern
from ..reference import lse_dtype
from ..spaces import KeySpace, merge_partials, reference_space_attention, whole_sequence
from .exchange import Spec, start_exchange
from .plan import choose_exchange, owned_slice, rank_plan, shard_bounds


def space_attention_fn(backend: str, device):
    """The space-attention implementation of ``backend`` (an explicit request never falls back)."""
    backend = resolve_backend(backend, device)
    if backend == "reference":
        return reference_space_attention
    from ..kernels import space_attention

    return space_attention


def _attend(fn, q, q_pos, spaces, bound, scale):
    """fn over the non-empty spaces; rows with no keys (or no spaces) give 0 / -inf."""
    spaces = [sp for sp in spaces if sp.size]
    b, nq, hq, d = q.shape
    if not spaces or nq == 0:
        out = torch.zeros_like(q)
        lse = torch.full((b, hq, nq), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
        return out, lse
    return fn(q, q_pos, spaces, bound, scale)


def _anchor(*tensors):
    """A tensor of the graph that ties the first exchange in (one that needs grad if any does)."""
    return next((t for t in tensors if t.requires_grad), tensors[0])


def _check_shards(q, k, v, ctx, n):
    n_local = q.shape[1]
    s, e = ctx.shard_range(n)
    if e - s != n_local:
        raise ValueError(f"rank {ctx.rank} holds {n_local} tokens but the shard rule gives [{s}, {e}) of "
                         f"N={n} (contiguous shards, the first N % P ranks one token more)")


def sequence_parallel_attention(q_shard, k_shard, v_shard, pattern, ctx, backend: str = "auto",
                                scale: float | None = None, exchange: str = "auto"):
    """Sparse attention on this rank's shards -> (out_shard ``[B, n, Hq, D]``, lse_shard ``[B, Hq, n]``).

    q_shard ``[B, n, Hq, D]``, k_shard/v_shard ``[B, n, Hkv, D]``: this rank's
    contiguous shard (``ctx.shard_range(N)``) of the sequence; positions are global, and
    so are the offsets of a pattern ``within`` documents (shards may cut through documents).
    ``exchange``: "pattern" (send only what the pattern needs), "ulysses"
    (all-to-all to head sharding; key/value heads must be divisible by P), or
    "auto" (ulysses for TopKBlocks; for static block lists whichever gives the
    busiest rank fewer bytes; pattern otherwise).
    """
    check_qkv(q_shard, k_shard, v_shard)
    pattern = as_pattern(pattern)
    n = ctx.global_length(q_shard.shape[1])
    _check_shards(q_shard, k_shard, v_shard, ctx, n)
    if pattern.documents is not None:  # offsets over the whole sequence, the same on every rank
        pattern.documents.validate(n, q_shard.shape[0])
    fn = space_attention_fn(backend, q_shard.device)
    hq, hkv = q_shard.shape[2], k_shard.shape[2]
    bound = pattern.bind(n, hq, device=q_shard.device) if not pattern.data_dependent else None
    method = choose_exchange(pattern, n, ctx.world_size, hq, hkv, exchange, bound, q_shard.shape[3],
                             q_shard.dtype)
    if ctx.world_size == 1:
        if bound is None:
            bound = pattern.bind(n, hq, q=q_shard, k=k_shard)
        return _whole_sequence(fn, q_shard, k_shard, v_shard, bound, scale)
    if method == "ulysses":
        return _ulysses(q_shard, k_shard, v_shard, pattern, ctx, n, fn, scale)
    return _pattern_exchange(q_shard, k_shard, v_shard, pattern, ctx, n, bound, fn, scale)


def round1_lists(q, k, v, plans, bounds, rank):
    """What this rank sends [(peer, rows)] and receives [(peer, Spec)] in the first exchange round.

    Per pair of ranks, both sides list the requests in plan order, k then v,
    then the global queries: the order ``start_exchange`` needs on both sides.
    """
    b, _, hq, d = q.shape
    hkv, dev = k.shape[2], q.device
    s, e = bounds[rank]
    sends, recvs = [], []
    for r, plan in enumerate(plans):
        if r == rank:
            continue
        for req in plan.requests:
            sl = owned_slice(req.positions, s, e)
            if sl.stop > sl.start:
                idx = (req.positions[sl] - s).to(dev)
                sends += [(r, k[:, idx]), (r, v[:, idx])]
        sl = owned_slice(plan.global_q, s, e)
        if sl.stop > sl.start:
            sends.append((r, q[:, (plan.global_q[sl] - s).to(dev)]))
    for o, (so, eo) in enumerate(bounds):
        if o == rank:
            continue
        for req in plans[rank].requests:
            m = _len(owned_slice(req.positions, so, eo))
            if m:
                recvs += [(o, Spec((b, m, hkv, d), k.dtype))] * 2
        m = _len(owned_slice(plans[rank].global_q, so, eo))
        if m:
            recvs.append((o, Spec((b, m, hq, d), q.dtype)))
    return sends, recvs


def _pattern_exchange(q, k, v, pattern: Pattern, ctx, n: int, bound: BoundPattern, fn, scale):
    rank, world, dev = ctx.rank, ctx.world_size, q.device
    b, n_local, hq, d = q.shape
    bounds = shard_bounds(n, world)
    plans = [rank_plan(pattern, n, bounds, r, bound) for r in range(world)]
    me = plans[rank]
    s, e = bounds[rank]
    all_comps = tuple(range(len(pattern.components)))

    # Round 1: keys/values of every request, and the global queries that can see local keys.
    sends, recvs = round1_lists(q, k, v, plans, bounds, rank)
    round1 = start_exchange(ctx, sends, recvs, dev, _anchor(q, k, v))

    # Queries of this shard that are not global rows; overlap: their window part on local keys.
    rows = torch.arange(s, e)
    is_global = torch.isin(rows, me.global_rows)
    ng_pos = rows[~is_global]
    q_ng = q if not is_global.any() else q[:, (ng_pos - s).to(dev)]
    ng_pos = ng_pos.to(dev)
    local = None
    if me.window_components:
        local = _attend(fn, q_ng, ng_pos, [KeySpace(k, v, me.window_components, pos0=s)], bound, scale)

    received = round1.wait()
    cursor_of: dict[int, int] = {}  # received tensors come grouped by owner, in ``recvs`` order
    for i, (peer, _) in enumerate(recvs):
        cursor_of.setdefault(peer, i)

    def gather(pos: torch.Tensor, local_x: torch.Tensor) -> torch.Tensor:
        """Rows at sorted global ``pos``: local ones indexed, remote ones taken from what was received."""
        parts = []
        for o, (so, eo) in enumerate(bounds):
            sl = owned_slice(pos, so, eo)
            if not _len(sl):
                continue
            if o == rank:
                parts.append(local_x[:, (pos[sl] - s).to(dev)])
            else:
                parts.append(received[cursor_of[o]])
                cursor_of[o] += 1
        return torch.cat(parts, dim=1) if parts else local_x[:, :0]

    spaces = []
    for req in me.requests:  # per owner: k then v of each request, in plan order (see round1_lists)
        kk, vv = gather(req.positions, k), gather(req.positions, v)
        if req.pos0 is not None:
            spaces.append(KeySpace(kk, vv, req.components, pos0=req.pos0, stride=req.stride))
        else:
            spaces.append(KeySpace(kk, vv, req.components, positions=req.positions.to(dev)))

    token = round1.token
    if any(len(p.global_q) for p in plans):  # the same decision on every rank
        q_g = gather(me.global_q, q)
        # The shard as an explicit space: it may hold explicit global keys, which the kernels want
        # in an explicit-positions space.
        shard_space = KeySpace(k, v, all_comps, positions=torch.arange(s, e, device=dev))
        part_out, part_lse = _attend(fn, q_g, me.global_q.to(dev), [shard_space], bound, scale)
        # Round 2: partial results of global rows go back to their owners (overlaps the remote part).
        sends, recvs = [], []
        for o, (so, eo) in enumerate(bounds):
            sl = owned_slice(me.global_q, so, eo)
            if o != rank and _len(sl):
                sends += [(o, part_out[:, sl]), (o, part_lse[:, :, sl])]
        for r, plan in enumerate(plans):
            m = _len(owned_slice(plan.global_q, s, e))
            if r != rank and m:
                recvs += [(r, Spec((b, m, hq, d), q.dtype)), (r, Spec((b, hq, m), part_lse.dtype))]
        round2 = start_exchange(ctx, sends, recvs, dev, token)
    else:
        round2 = None

    out_ng, lse_ng = _attend(fn, q_ng, ng_pos, spaces, bound, scale)
    if local is not None:
        out_ng, lse_ng = merge_partials([local[0], out_ng], [local[1], lse_ng])

    if round2 is None:
        out, lse = out_ng, lse_ng
    else:
        got = iter(round2.wait())
        token = round2.token
        own = owned_slice(me.global_q, s, e)
        outs, lses = [part_out[:, own]], [part_lse[:, :, own]]
        for r, plan in enumerate(plans):
            rows_r = plan.global_q[owned_slice(plan.global_q, s, e)]  # the rows of mine that r computed
            if r == rank or not len(rows_r):
                continue
            out_r, lse_r = next(got), next(got)
            if len(rows_r) < len(me.global_rows):  # within documents: only rows whose document reaches r
                out_r, lse_r = _widen(out_r, lse_r, torch.searchsorted(me.global_rows, rows_r).to(dev),
                                      len(me.global_rows))
            outs.append(out_r)
            lses.append(lse_r)
        out_g, lse_g = merge_partials(outs, lses)
        out, lse = _interleave(out_ng, lse_ng, out_g, lse_g, is_global)
    return out + token.to(out.dtype), lse + token.to(lse.dtype)


def _widen(out, lse, index: torch.Tensor, rows: int):
    """A partial result for some of ``rows`` rows (at ``index``) as one for all of them: the others
    empty (out 0, lse -inf), so that the log-sum-exp merge takes nothing from them."""
    b, _, h, d = out.shape
    full_out = out.new_zeros(b, rows, h, d).index_copy(1, index, out)
    full_lse = lse.new_full((b, h, rows), float("-inf")).index_copy(2, index, lse)
    return full_out, full_lse


def _interleave(out_a, lse_a, out_b, lse_b, is_b: torch.Tensor):
    """Rows of a (where ``is_b`` is False) and of b (where True) back in their original order."""
    if not is_b.any():
        return out_a, lse_a
    order = torch.cat([torch.nonzero(~is_b).flatten(), torch.nonzero(is_b).flatten()])
    inverse = torch.argsort(order).to(out_a.device)
    return torch.cat([out_a, out_b], 1)[:, inverse], torch.cat([lse_a, lse_b], 2)[:, :, inverse]


def _len(sl: slice) -> int:
    return sl.stop - sl.start


def bind_heads(pattern: Pattern, n: int, heads: int, h0: int, h1: int, q_local, k_local, device) -> BoundPattern:
    """The pattern bound for query heads [h0, h1) of ``heads``; q_local/k_local hold those heads."""
    tables = []
    for comp in pattern.block_components:
        if comp.data_dependent:
            # Computed per key/value head from that head's own query group: head-local.
            tables.append(comp.table(n, pattern.causal, h1 - h0, q=q_local, k=k_local, device=device,
                                     documents=pattern.documents))
        else:
            t = comp.table(n, pattern.causal, heads, device=device)
            tables.append(t[:, h0:h1] if t.shape[1] > 1 else t)
    return BoundPattern(pattern, n, h1 - h0, tuple(tables), device)


def _whole_sequence(fn, q, k, v, bound: BoundPattern, scale):
    """Attention over the whole sequence, split into key spaces as on one device (``spaces.whole_sequence``);
    the global query rows attend separately, to every key."""
    split = whole_sequence(bound, k, v)
    n, dev = q.shape[1], q.device
    rows = torch.arange(n)
    special = torch.isin(rows, split.global_rows)
    ordinary = rows[~special].to(dev)
    out, lse = _attend(fn, q if not special.any() else q[:, ordinary], ordinary, split.spaces, bound, scale)
    if special.any():
        g_rows = rows[special].to(dev)
        out_g, lse_g = _attend(fn, q[:, g_rows], g_rows, [split.every_key], bound, scale)
        out, lse = _interleave(out, lse, out_g, lse_g, special)
    return out, lse


def _ulysses(q, k, v, pattern: Pattern, ctx, n: int, fn, scale):
    rank, world, dev = ctx.rank, ctx.world_size, q.device
    b, n_local, hq, d = q.shape
    hkv = k.shape[2]
    hl, kl = hq // world, hkv // world
    bounds = shard_bounds(n, world)
    s, e = bounds[rank]
    sends, recvs = [], []
    for p, (sp_, ep) in enumerate(bounds):
        if p == rank:
            continue
        sends += [(p, q[:, :, p * hl:(p + 1) * hl]), (p, k[:, :, p * kl:(p + 1) * kl]),
                  (p, v[:, :, p * kl:(p + 1) * kl])]
        recvs += [(p, Spec((b, ep - sp_, hl, d), q.dtype)), (p, Spec((b, ep - sp_, kl, d), k.dtype)),
                  (p, Spec((b, ep - sp_, kl, d), k.dtype))]
    pending = start_exchange(ctx, sends, recvs, dev, _anchor(q, k, v))
    got = pending.wait()
    qs, ks, vs, i = [], [], [], 0
    for p in range(world):
        if p == rank:
            qs.append(q[:, :, p * hl:(p + 1) * hl])
            ks.append(k[:, :, p * kl:(p + 1) * kl])
            vs.append(v[:, :, p * kl:(p + 1) * kl])
        else:
            qs.append(got[i])
            ks.append(got[i + 1])
            vs.append(got[i + 2])
            i += 3
    q_h, k_h, v_h = torch.cat(qs, 1), torch.cat(ks, 1), torch.cat(vs, 1)
    bound = bind_heads(pattern, n, hq, rank * hl, (rank + 1) * hl, q_h, k_h, dev)
    out_h, lse_h = _whole_sequence(fn, q_h, k_h, v_h, bound, scale)
    sends, recvs = [], []
    for p, (sp_, ep) in enumerate(bounds):
        if p == rank:
            continue
        sends += [(p, out_h[:, sp_:ep]), (p, lse_h[:, :, sp_:ep])]
        recvs += [(p, Spec((b, e - s, hl, d), q.dtype)), (p, Spec((b, hl, e - s), lse_h.dtype))]
    back = start_exchange(ctx, sends, recvs, dev, pending.token)
    got = back.wait()
    outs, lses, i = [], [], 0
    for p in range(world):
        if p == rank:
            outs.append(out_h[:, s:e])
            lses.append(lse_h[:, :, s:e])
        else:
            outs.append(got[i])
            lses.append(got[i + 1])
            i += 2
    out, lse = torch.cat(outs, 2), torch.cat(lses, 1)
    return out + back.token.to(out.dtype), lse + back.token.to(lse.dtype)
