"""Planning: bound pattern + key spaces -> terms, passes and per-tile key ranges.

A *term* is one structured piece of a pattern (window, strided level, the
first-``F`` global keys): keys ``lo(i) <= j <= hi(i)`` with ``j = r (mod m)``,
both bounds affine in the query position; each component gives its own
(``Component.terms``).  Block-list components become one *block term* (their
tables merged, ``BoundPattern.merged_table``), ordered after the structured
terms, and the listed keys (``BoundPattern.explicit_keys``) one last term.  Any
order of the components counts every allowed pair once as long as each
component's keys lie in a space serving it (see ``spaces.py``), so this order is
free to choose; the structured terms are taken by ``m``, coarser lattices last,
which keeps their owned keys contiguous ranges (``build_terms``).

A *pass* walks one key space for a subset of the terms it serves.  For a range
pass, ``range_plan`` gives each query tile its key-tile range (a superset) and
its *full* range (tiles where every pair is owned, so no mask is evaluated);
``transpose_plan`` turns the ranges into query-tile ranges per key tile for
the backward.  Everything is O(N / block) torch work on the device.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import torch

from ..patterns.pattern import UNBOUNDED as BIG
from ..patterns.pattern import Term


class PassKind(enum.IntEnum):
    """How a pass walks its key space; the kernels read the same values as compile-time constants."""

    RANGE = 1  # a range of key tiles of an arithmetic space (positions pos0 + kstr * index)
    EXPLICIT = 2  # a range of key tiles of a space with explicit positions
    BLOCK = 3  # the key blocks listed by the block table, arithmetic space
    BLOCK_EXPLICIT = 4  # the same over an explicit space

    @property
    def is_block(self) -> bool:
        return self >= PassKind.BLOCK


@dataclass
class Terms:
    """The pattern in kernel form, on the device."""

    rows: list  # (lo_rel, lo_c, hi_rel, hi_c, m, r) per structured term
    comp: list  # component index of each structured term
    causal: bool
    n: int
    block_comps: tuple = ()  # component indices merged into the block term
    table: torch.Tensor | None = None  # [Bt, Ht, n_cb, W] int64, -1 padded
    block: int = 0
    explicit: dict = field(default_factory=dict)  # component index -> its listed keys
    tensor: torch.Tensor | None = None  # int32 [NT * 6] on the device
    global_rows: torch.Tensor | None = None  # the bound's global query rows

    @property
    def block_bit(self) -> int:
        return 1 << len(self.rows)


def build_terms(bound, device, all_rows_global: bool = False) -> Terms:
    """Terms of a bound pattern; ``all_rows_global``: every query row is a global query row."""
    pattern = bound.pattern
    if bound.n >= BIG:
        raise ValueError(f"sequence length must be < 2^30 for the Triton kernels, got {bound.n}")
    rows, comp, explicit = [], [], {}
    for index, c in enumerate(pattern.components):
        if all_rows_global and bound.component_rows[index] is not None:
            # Every row here is one of this component's global query rows: it allows every key.
            rows.append(Term(0, 0, 0, BIG).row)
            comp.append(index)
            continue
        for term in c.terms():
            rows.append(term.row)
            comp.append(index)
        keys = bound.explicit_keys[index]
        if keys is not None:
            explicit[index] = keys.to(device)
    # Coarser lattices last (stable): a term's pass can then trim the keys of every earlier term from its
    # key range exactly (an earlier term takes every key of the lattice it reads, or a band of them),
    # where the other order leaves it all boundary tiles (a window behind Strided(64) on K, or the
    # first-G keys behind it: each tile masked).  Which term owns a pair does not change the result.
    order = sorted(range(len(rows)), key=lambda t: rows[t][4])
    rows, comp = [rows[t] for t in order], [comp[t] for t in order]
    t = Terms(rows, comp, pattern.causal, bound.n, explicit=explicit, global_rows=bound.global_rows.to(device))
    table, block = bound.merged_table()
    if table is not None:
        t.block_comps = tuple(i for i, c in enumerate(pattern.components) if c.block_based)
        t.table, t.block = table.to(device), block
    flat = [x for r in rows for x in r] or [0] * 6
    t.tensor = torch.tensor(flat, dtype=torch.int32, device=device)
    return t


def covers(term, pos0: int, kstr: int) -> bool:
    """Whether every key of the lattice ``pos0 + kstr * t`` satisfies the term's congruence."""
    m, r = term[4], term[5]
    return m == 1 or (kstr % m == 0 and (pos0 - r) % m == 0)


def _never_above(f, g, n: int) -> bool:
    """Whether ``f(i) <= g(i)`` for every query position ``i`` in ``[0, n)``; f, g = (slope, constant)."""
    slope, const = g[0] - f[0], g[1] - f[1]
    return const >= 0 and slope * (n - 1) + const >= 0


def owned_band(rows: list, s: int, n: int, causal: bool):
    """The keys term ``s`` owns -- it allows them and no earlier term does -- as one band row
    ``(lo_rel, lo_c, hi_rel, hi_c, 1, 0)``, or None when that is not one band at every position.

    Every term up to ``s`` must be a band (no congruence left on the space read).  Bounds past what
    the kernels keep anyway (keys in ``[0, n)``, and ``j <= i`` when causal) are first brought to
    those limits.  An earlier band that covers the upper (lower) end of term ``s``'s band at every
    position moves its upper (lower) bound below (above) itself; one that never meets it changes
    nothing; one that can fall strictly inside would cut the band in two: None.
    """
    if any(r[4] != 1 for r in rows[:s + 1]):
        return None
    top = (1, 0) if causal else (0, n - 1)

    def limits(r):
        lo, hi = (r[0], r[1]), (r[2], r[3])
        return ((0, 0) if _never_above(lo, (0, 0), n) else lo), (top if _never_above(top, hi, n) else hi)

    lo, hi = limits(rows[s])
    for r in rows[:s]:
        e_lo, e_hi = limits(r)
        below_e, above_e = (e_lo[0], e_lo[1] - 1), (e_hi[0], e_hi[1] + 1)
        if _never_above(hi, below_e, n) or _never_above(above_e, lo, n):
            continue  # disjoint at every position
        if _never_above(hi, e_hi, n) and _never_above(below_e, hi, n):
            hi = below_e  # the earlier band holds the upper end
        elif _never_above(e_lo, lo, n) and _never_above(lo, above_e, n):
            lo = above_e  # the earlier band holds the lower end
        else:
            return None
    return (lo[0], lo[1], hi[0], hi[1], 1, 0)


def term_bounds(terms: Terms, x: torch.Tensor):
    """Key-position bounds of every structured term at query positions ``x`` -> (lo, hi) ``[T, len(x)]``."""
    r = torch.tensor(terms.rows or [(0, 0, 0, -1, 1, 0)], dtype=torch.long, device=x.device)
    lo = (r[:, 0:1] * x + r[:, 1:2]).clamp(min=0)
    hi = (r[:, 2:3] * x + r[:, 3:4]).clamp(max=terms.n - 1)
    if terms.causal:
        hi = torch.minimum(hi, x)
    return lo, hi


def _exact_interval(terms: Terms, t: int, bounds, pos0: int, kstr: int):
    """Owned keys of term ``t`` at rows ``x`` as an interval, trimmed by earlier terms.

    Returns (L, H, case) where ``case`` records how each earlier term was handled
    (to check that a whole query tile is handled the same way) and is -1 where the
    owned set is not an interval of the space.
    """
    lo_all, hi_all = bounds
    L, H = lo_all[t], hi_all[t]
    case = torch.zeros_like(L)
    bad = torch.zeros_like(L, dtype=torch.bool)
    for u in range(t):
        el, eh = lo_all[u], hi_all[u]
        overlap = (eh >= L) & (el <= H) & (el <= eh) & (L <= H)
        case = case * 3
        if not covers(terms.rows[u], pos0, kstr):  # term u takes some keys of the range, not a prefix/suffix
            bad |= overlap
            continue
        trim_lo = overlap & (el <= L)
        trim_hi = overlap & (eh >= H) & ~trim_lo
        bad |= overlap & ~(trim_lo | trim_hi)
        L = torch.where(trim_lo, torch.maximum(L, eh + 1), L)
        H = torch.where(trim_hi, torch.minimum(H, el - 1), H)
        case = case + trim_lo + 2 * trim_hi
    return L, H, torch.where(bad, -1, case)


def _ceil_div(a, b: int):
    """ceil(a / b) for integer tensors ``a`` and a positive int ``b``."""
    return torch.div(a + (b - 1), b, rounding_mode="floor")


def _to_index(lo, hi, pos0, kstr, nk, positions):
    """Key positions [lo, hi] -> space indices [ilo, ihi] (empty when ihi < ilo)."""
    if positions is not None:
        ilo = torch.searchsorted(positions, lo)
        ihi = torch.searchsorted(positions, hi, right=True) - 1
        return ilo, ihi
    if kstr == 1:
        return (lo - pos0).clamp(min=0), (hi - pos0).clamp(max=nk - 1)
    ilo = torch.div(lo + (kstr - 1 - pos0), kstr, rounding_mode="floor").clamp(min=0)  # ceil((lo - pos0) / kstr)
    ihi = torch.div(hi - pos0, kstr, rounding_mode="floor").clamp(max=nk - 1)
    return ilo, ihi


def tile_rows(q_pos, q_pos0, nq: int, bm: int, device):
    """First and last query position of every query tile of ``bm`` rows (O(n_tiles) when contiguous)."""
    starts = torch.arange(0, nq, bm, device=device)
    if q_pos is None:
        return q_pos0 + starts, (q_pos0 + starts + bm - 1).clamp(max=q_pos0 + nq - 1)
    return q_pos[starts], q_pos[(starts + bm - 1).clamp(max=nq - 1)]


def range_plan(terms: Terms, served: list, member: bool, first, last, pos0: int, kstr: int, nk: int,
               positions, bn: int, bounds=None) -> torch.Tensor:
    """int32 ``[n_qtiles, 4]``: key-tile range and full (mask-free) key-tile range per query tile.

    ``bounds`` = ``term_bounds(terms, torch.cat([first, last]))``, shared by passes: the first and the
    last row of every tile are evaluated together, so each step below is one device operation.
    """
    n, causal = terms.n, terms.causal
    m = len(first)
    lo_b, hi_b = bounds if bounds is not None else term_bounds(terms, torch.cat([first, last]))
    los = [lo_b[t, :m] for t in served]
    his = [hi_b[t, m:] for t in served]
    if member:
        los.append(torch.zeros_like(first))
        his.append(last.clamp(max=n - 1) if causal else torch.full_like(last, n - 1))
    lo = torch.stack(los).amin(0)
    hi = torch.stack(his).amax(0)
    kf_lo = torch.ones_like(first)
    kf_hi = torch.zeros_like(first)
    if len(served) == 1 and not member and positions is None and covers(terms.rows[served[0]], pos0, kstr):
        L, H, case = _exact_interval(terms, served[0], (lo_b, hi_b), pos0, kstr)
        la, lb, ha, hb = L[:m], L[m:], H[:m], H[m:]
        exact = (case[:m] == case[m:]) & (case[:m] >= 0)
        lo = torch.where(exact, la, lo)
        hi = torch.where(exact, hb, hi)
        flo, fhi = _to_index(lb, ha, pos0, kstr, nk, None)
        kf_lo = torch.where(exact, _ceil_div(flo, bn), kf_lo)
        kf_hi = torch.where(exact, torch.div(fhi + 1, bn, rounding_mode="floor") - 1, kf_hi)
    ilo, ihi = _to_index(lo, hi, pos0, kstr, nk, positions)
    kb_lo = torch.div(ilo, bn, rounding_mode="floor")
    kb_hi = torch.where(ihi >= ilo, torch.div(ihi, bn, rounding_mode="floor"), kb_lo - 1)
    return torch.stack([kb_lo, kb_hi, kf_lo, kf_hi], 1).to(torch.int32).contiguous()


def transpose_plan(plan: torch.Tensor, n_ktiles: int) -> torch.Tensor:
    """int32 ``[n_ktiles, 2]``: the query tiles whose key range may hold each key tile.

    A contiguous superset of the query tiles ``qt`` with ``lo[qt] <= kt <= hi[qt]``: it starts at
    the later of the first tile with ``hi >= kt`` and the first with ``lo <= kt``, and ends at the
    earlier of the last tile with ``lo <= kt`` and the last with ``hi >= kt``.  Exact for monotone
    ranges (a window, a strided level); for ranges that are not (a term that owns keys only once an
    earlier term has passed them, as the first-``G`` keys behind a window), the second bound on each
    side keeps a key tile from walking every query tile after the first that saw it.  Empty ranges
    hold nothing and bound nothing.
    """
    lo = plan[:, 0].long()
    hi = plan[:, 1].long()
    empty = hi < lo
    lo = torch.where(empty, BIG, lo)
    hi = torch.where(empty, -1, hi)
    kb = torch.arange(n_ktiles, device=plan.device)

    def first(running, kb):  # first index where a non-decreasing ``running`` reaches kb
        return torch.searchsorted(running, kb)

    def last(running, kb):  # last index where a non-decreasing ``running`` is at most kb
        return torch.searchsorted(running, kb, right=True) - 1

    def suffix(op, x):  # running op from the last tile backwards
        return torch.flip(op(torch.flip(x, (0,)), 0).values, (0,))

    q_lo = torch.maximum(first(torch.cummax(hi, 0).values, kb),  # first tile with hi >= kb
                         first(-torch.cummin(lo, 0).values, -kb))  # first tile with lo <= kb
    q_hi = torch.minimum(last(suffix(torch.cummin, lo), kb),  # last tile with lo <= kb
                         last(-suffix(torch.cummax, hi), -kb))  # last tile with hi >= kb
    return torch.stack([q_lo, q_hi], 1).to(torch.int32).contiguous()


def transpose_full(plan: torch.Tensor, n_ktiles: int) -> torch.Tensor:
    """int32 ``[n_ktiles, 2]``: the query tiles for which each key tile lies in the *full* range.

    Exact: a key tile gets the contiguous range of query tiles whose full range holds it, or an
    empty range (1, 0) when those query tiles are not contiguous (the kernels then mask them all).
    The candidate range comes from running extrema of the per-tile full bounds and is accepted
    only when it holds exactly as many query tiles as hold the key tile (counted by sorting).
    """
    flo, fhi = plan[:, 2].long(), plan[:, 3].long()
    some = flo <= fhi
    hi_m = torch.cummax(torch.where(some, fhi, -1), 0).values
    lo_m = torch.flip(torch.cummin(torch.flip(torch.where(some, flo, BIG), (0,)), 0).values, (0,))
    kb = torch.arange(n_ktiles, device=plan.device)
    a = torch.searchsorted(hi_m, kb)
    b = torch.searchsorted(lo_m, kb, right=True) - 1
    holding = (torch.searchsorted(torch.sort(flo[some]).values, kb, right=True)
               - torch.searchsorted(torch.sort(fhi[some]).values, kb))
    ok = (b >= a) & (holding == b - a + 1)
    return torch.stack([torch.where(ok, a, 1), torch.where(ok, b, 0)], 1).to(torch.int32).contiguous()


def block_starts(table: torch.Tensor, block: int, pos0: int, kstr: int, positions) -> torch.Tensor:
    """Index in the space of the first key of every listed key block (same shape as ``table``)."""
    first = table.clamp(min=0) * block
    if positions is not None:
        s = torch.searchsorted(positions, first.flatten()).view_as(first)
    else:
        if kstr != 1:
            raise NotImplementedError("a block-list component served by a strided key space (stride "
                                      f"{kstr}); serve it from a contiguous or an explicit-positions space")
        s = first - pos0
    return s.to(torch.int32).contiguous()


def key_blocks(block: int, pos0: int, nk: int, positions):
    """Listed-block candidates of a space for the dk/dv of a block pass -> (blocks, first index)."""
    if positions is not None:
        e = torch.unique(torch.div(positions, block, rounding_mode="floor"))
        return e.to(torch.int32), torch.searchsorted(positions, e * block).to(torch.int32)
    e = torch.arange(pos0 // block, (pos0 + nk - 1) // block + 1, device=torch.device("cpu"))
    return e.to(torch.int32), (e * block - pos0).to(torch.int32)


def transposed_table(table: torch.Tensor, n_kblocks: int):
    """CSR of query blocks listing each key block, per table row -> (indptr, indices, strides)."""
    bt, ht, nqb, w = table.shape
    dev = table.device
    valid = table >= 0
    rowid = torch.arange(bt * ht, device=dev).view(bt, ht, 1, 1).expand_as(table)
    qbs = torch.arange(nqb, device=dev).view(1, 1, nqb, 1).expand_as(table)
    key = (rowid * n_kblocks + table)[valid]
    order = torch.sort(key, stable=True).indices
    key = key[order]
    indices = qbs[valid][order].to(torch.int32).contiguous()
    indptr = torch.searchsorted(key, torch.arange(bt * ht * n_kblocks + 1, device=dev)).to(torch.int32)
    ctb = ht * n_kblocks if bt > 1 else 0
    cth = n_kblocks if ht > 1 else 0
    return indptr.contiguous(), indices if len(indices) else torch.zeros(1, dtype=torch.int32, device=dev), ctb, cth


def n_tiles(n: int, b: int) -> int:
    return max(1, math.ceil(n / b))
