"""Exact pair counting for ``Pattern.describe``, without a mask.

Every structured component is, for a query i, an arithmetic progression on an
interval: keys ``j in [lo(i), hi(i)]`` with ``j = r (mod m)`` (a window is m = 1).
The intersection of such sets is again one (Chinese remainder theorem), so the
size of their union is an inclusion-exclusion sum of closed-form counts,
vectorised over queries: O(n * 2^terms) work and O(chunk) memory.  Explicit
global positions and block-list keys are added where no structured term covers
them.  Global query rows see every (not later) key.  Everything is read from the
bound pattern (``bound.py``) and the components' terms, so this module imports no
component type.

Within documents every key range of a query is cut to its document: the lower
bound to at least the document's start, the upper one to at most its end - 1,
per batch element, so the terms stay intervals and the count stays exact; no
n x n structure is built for that either.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import torch

_CHUNK = 1 << 16


def _crt(m1: int, r1: int, m2: int, r2: int):
    """Solve j = r1 (mod m1), j = r2 (mod m2) -> (m, r) or None."""
    g = math.gcd(m1, m2)
    if (r2 - r1) % g:
        return None
    lcm = m1 // g * m2
    t = ((r2 - r1) // g * pow(m1 // g, -1, m2 // g)) % (m2 // g) if m2 // g > 1 else 0
    return lcm, (r1 + m1 * t) % lcm


def _ap_count(lo, hi, m: int, r: int):
    """Number of j in [lo, hi] with j = r (mod m); 0 for empty intervals."""
    c = torch.div(hi - r, m, rounding_mode="floor") - torch.div(lo - 1 - r, m, rounding_mode="floor")
    return torch.where(hi >= lo, c, torch.zeros_like(c))


class _Terms:
    """The structured terms of a pattern for one chunk of queries ``i [C]``, as key intervals
    ``[floor, top]`` per (batch element, query): ``[Bd, 1, C]`` (Bd = 1 without documents)."""

    def __init__(self, pattern, i: torch.Tensor, n: int, bound=None):
        self.terms = []  # (lo, hi, m, r)
        top = i if pattern.causal else torch.full_like(i, n - 1)
        top = top.clamp(max=n - 1)[None, None]
        floor = torch.zeros_like(top)
        if bound is not None and bound.doc_start is not None:
            floor = bound.doc_start[:, i].long()[:, None]
            top = torch.minimum(top, bound.doc_end[:, i].long()[:, None] - 1)
        self.floor, self.top = floor, top
        zero = torch.zeros_like(top)
        for c in pattern.components:
            for term in c.terms():
                lo, hi = term.bounds(i)
                self._add(zero + lo, zero + hi, term.m, term.r)  # _add clamps to [floor, top]
        self.subsets = []
        for size in range(1, len(self.terms) + 1):
            for combo in itertools.combinations(range(len(self.terms)), size):
                m, r = 1, 0
                for t in combo:
                    sol = _crt(m, r, self.terms[t][2], self.terms[t][3])
                    if sol is None:
                        break
                    m, r = sol
                else:
                    self.subsets.append((combo, m, r, 1 if size % 2 else -1))

    def _add(self, lo, hi, m, r):
        self.terms.append((torch.maximum(lo, self.floor), torch.minimum(hi, self.top), m, r))

    @property
    def size(self):
        """Keys in ``[floor, top]``: what a global query row sees."""
        return (self.top - self.floor + 1).clamp(min=0)

    def count(self, lo=None, hi=None):
        """|union of terms| per query, optionally within keys [lo, hi]."""
        total = torch.zeros_like(self.top)
        for combo, m, r, sign in self.subsets:
            a = functools.reduce(torch.maximum, [self.terms[t][0] for t in combo])
            b = functools.reduce(torch.minimum, [self.terms[t][1] for t in combo])
            if lo is not None:
                a, b = torch.maximum(a, lo), torch.minimum(b, hi)
            total = total + sign * _ap_count(a, b, m, r)
        return total

    def covers(self, p):
        """Whether key(s) ``p`` (broadcast with the queries) lie in some term."""
        hit = torch.zeros(torch.broadcast_shapes(self.top.shape, torch.as_tensor(p).shape), dtype=torch.bool)
        for lo, hi, m, r in self.terms:
            hit |= (p >= lo) & (p <= hi) & (torch.remainder(torch.as_tensor(p) - r, m) == 0)
        return hit


def _listed(terms: _Terms, pos: torch.Tensor, lo, hi):
    """Listed keys ``pos`` (sorted) in ``[lo, hi]`` that no structured term covers, per query."""
    inside = (torch.searchsorted(pos, hi.contiguous(), right=True) - torch.searchsorted(pos, lo.contiguous()))
    inside = inside.clamp(min=0)
    if terms.terms and inside.numel():
        # Only the listed keys within this chunk's key ranges can be covered twice.
        for p in pos[(pos >= int(lo.min())) & (pos <= int(hi.max()))].tolist():
            inside = inside - ((lo <= p) & (p <= hi) & terms.covers(p)).long()
    return inside


def per_query_counts(pattern, n: int, heads: int = 1, q=None, k=None):
    """Allowed keys per query -> int64 ``[B, Ht, n]`` and whether the count is exact; ``B`` is 1 or the
    number of batch elements whose counts differ (rows of the documents, TopKBlocks' data)."""
    chosen = [c for c in pattern.components if c.data_dependent]
    if chosen and (q is None or k is None):
        # Without the data, a data-dependent component's count is its own bound (exact when alone).
        others = tuple(c for c in pattern.components if not c.data_dependent)
        base = per_query_counts(dataclasses.replace(pattern, components=others), n, heads)[0] if others else None
        i = torch.arange(n)
        top = (i if pattern.causal else torch.full_like(i, n - 1))[None, None]
        reach = top + 1
        if pattern.documents is not None:
            start, end = pattern.documents.bounds(n)
            reach = torch.minimum(top, end.long()[:, None] - 1) - start.long()[:, None] + 1
        cnt = torch.minimum(chosen[0].counts_without_data(n, pattern.causal)[None, None], reach)
        if base is not None:
            cnt = torch.minimum(base + cnt, reach)
        return cnt, len(pattern.components) == 1 and pattern.documents is None
    bound = pattern.bind(n, heads, q=q, k=k)
    table, block = bound.merged_table()
    listed = [keys for keys in bound.explicit_keys if keys is not None]
    pos = torch.unique(torch.cat(listed)) if listed else torch.zeros(0, dtype=torch.long)
    chunks = []
    for s in range(0, n, _CHUNK):
        i = torch.arange(s, min(n, s + _CHUNK))
        terms = _Terms(pattern, i, n, bound)
        cnt = terms.count()  # [Bd, 1, C]
        if len(pos):
            cnt = cnt + _listed(terms, pos, terms.floor, terms.top)
        if table is not None:
            rows = table[:, :, i // block]  # [Bt, Ht, C, w]
            # Each listed key block, cut to the query's reach (causal, its document).
            lo = torch.maximum(rows * block, terms.floor[..., None])
            hi = torch.minimum(rows * block + block - 1, terms.top[..., None])
            valid = (rows >= 0) & (hi >= lo)
            size = torch.where(valid, hi - lo + 1, 0)
            inside = torch.zeros_like(size)
            for w in range(rows.shape[-1]):
                a, b = lo[..., w], hi[..., w]
                got = terms.count(a, b) if terms.subsets else torch.zeros_like(a)
                inside[..., w] = got + _listed(terms, pos, a, b) if len(pos) else got
            cnt = cnt + torch.where(valid, size - inside, 0).sum(-1)
        if len(bound.global_rows):
            cnt = torch.where(torch.isin(i, bound.global_rows), terms.size, cnt)
        chunks.append(cnt)
    return torch.cat(chunks, dim=-1), True


def describe(pattern, n: int, heads: int = 1, dim: int = 128, q=None, k=None) -> dict:
    counts, exact = per_query_counts(pattern, n, heads, q=q, k=k)
    per_head = counts.shape[1] > 1
    batch = counts.shape[0]  # the sequences counted: rows of the documents or of TopKBlocks' data
    pairs = int(counts.sum()) * (1 if per_head else heads)
    causal_pairs = n * (n + 1) // 2 if pattern.causal else n * n
    fwd = 4 * pairs * dim
    c = counts.double()
    return {
        "n": n,
        "heads": heads,
        "dim": dim,
        "batch": batch,
        "causal": pattern.causal,
        "keys_per_query": {"min": int(counts.min()), "mean": float(c.mean()), "max": int(counts.max())},
        "pairs": pairs,
        "density": pairs / (batch * heads * n * n),
        "density_of_causal": pairs / (batch * heads * causal_pairs),
        "useful_flops_fwd": fwd,
        "useful_flops_fwd_bwd": int(3.5 * fwd),
        "exact": exact,
    }
