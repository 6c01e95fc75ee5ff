"""Block tables for the block-list components.

A block table is an int64 tensor ``[Bt, Ht, n_query_blocks, width]`` holding,
for each query block, the sorted key blocks it may see, padded with -1.
``Bt`` is 1 or the batch size (``TopKBlocks`` depends on the data), ``Ht`` is 1
or the number of query heads.  Building a table costs O(N/block * width); no
(N/block)^2 structure is ever made, except the scores of ``TopKBlocks``, which
are computed in chunks of query blocks.  Each block-list component builds its
own table through these functions (``Component.table``).
"""
from __future__ import annotations

import math

import torch

_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_K_BLOCK = _signed(0xD6E8FEB86659FD93)
_K_HEAD = _signed(0xA0761D6478BD642F)
_K_DRAW = _signed(0xE7037ED1A0B428DB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def hash64(seed: int, block: torch.Tensor, head: int, draw: int) -> torch.Tensor:
    """splitmix64 of (seed, block, head, draw): the same on every device and process."""
    x = block.to(torch.int64) * _K_BLOCK + _signed(seed * _GOLDEN + head * _K_HEAD + draw * _K_DRAW)
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    x = x ^ _shr(x, 31)
    return _shr(x, 1)  # non-negative


def random_block_rows(comp, query_blocks: torch.Tensor, n: int, causal: bool,
                      head: int = 0) -> torch.Tensor:
    """Key blocks drawn for each of ``query_blocks``: ``[len(query_blocks), per_query_block]``.

    Floyd's sampling without replacement over the allowed blocks; each row only
    depends on (seed, query block, head, number of allowed blocks).
    """
    r = comp.per_query_block
    n_kb = math.ceil(n / comp.block)
    qb = query_blocks.to(torch.int64)
    m = qb + 1 if causal else torch.full_like(qb, n_kb)
    m = m.clamp(max=n_kb)
    chosen = torch.full((qb.numel(), r), -1, dtype=torch.int64, device=qb.device)
    for u in range(r):
        t = m - r + u  # Floyd: draw from [0, t]; if taken, take t
        x = torch.remainder(hash64(comp.seed, qb, head, u), (t + 1).clamp(min=1))
        taken = (chosen[:, :u] == x[:, None]).any(dim=1) if u else torch.zeros_like(qb, dtype=torch.bool)
        pick = torch.where(taken, t, x)
        chosen[:, u] = torch.where(t >= 0, pick, -1)
    # Rows with fewer allowed blocks than r take all of them.
    small = m <= r
    if small.any():
        allb = torch.arange(r, device=qb.device).expand(int(small.sum()), r)
        chosen[small] = torch.where(allb < m[small, None], allb, -1)
    return _sort_rows(chosen)


def _sort_rows(t: torch.Tensor) -> torch.Tensor:
    """Sort each row ascending with the -1 padding at the end."""
    big = torch.iinfo(torch.int64).max
    s, _ = torch.sort(torch.where(t < 0, big, t), dim=-1)
    return torch.where(s == big, -1, s)


def random_table(comp, n: int, causal: bool, heads: int, device=None) -> torch.Tensor:
    n_qb = math.ceil(n / comp.block)
    qb = torch.arange(n_qb, device=device)
    hs = range(heads) if comp.per_head else range(1)
    return torch.stack([random_block_rows(comp, qb, n, causal, h) for h in hs])[None]


def layout_table(comp, n: int, heads: int, device=None) -> torch.Tensor:
    if comp.per_head and len(comp.indptr) != heads:
        raise ValueError(f"BlockLayout has {len(comp.indptr)} per-head layouts but the attention has "
                         f"{heads} query heads")
    n_qb = n_kb = math.ceil(n / comp.block)
    width = max(1, max(max((b - a for a, b in zip(p, p[1:])), default=0) for p in comp.indptr))
    table = torch.full((len(comp.indptr), n_qb, width), -1, dtype=torch.int64)
    for g, (ptr, idx) in enumerate(zip(comp.indptr, comp.indices)):
        for r in range(min(n_qb, len(ptr) - 1)):
            row = list(idx[ptr[r]:ptr[r + 1]])
            if row and max(row) >= n_kb:
                raise ValueError(f"BlockLayout{f' layout {g}' if comp.per_head else ''} row {r} lists key block "
                                 f"{max(row)}, but a sequence of {n} tokens has key blocks 0..{n_kb - 1} "
                                 f"(block {comp.block})")
            table[g, r, :len(row)] = torch.tensor(row, dtype=torch.int64)
    return table[None].to(device)


def pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of ``x [B, N, H, D]`` over each block of tokens -> ``[B, ceil(N/block), H, D]`` float."""
    b, n, h, d = x.shape
    nb = math.ceil(n / block)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    padded = torch.zeros(b, nb * block, h, d, dtype=acc, device=x.device)
    padded[:, :n] = x.to(acc)
    counts = torch.full((nb,), float(block), dtype=acc, device=x.device)
    counts[-1] = n - (nb - 1) * block
    return padded.view(b, nb, block, h, d).sum(2) / counts[None, :, None, None]


def topk_rows(comp, q_pooled: torch.Tensor, k_pooled: torch.Tensor, query_blocks: torch.Tensor,
              causal: bool, reach: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Selected key blocks for ``query_blocks`` -> ``[B, Hkv, len(query_blocks), k]``.

    ``q_pooled`` is ``[B, len(query_blocks), Hkv, D]`` (already summed over the
    group's query heads); ``k_pooled`` is ``[B, n_kb, Hkv, D]``.  ``reach``: (first, last) key block
    ``[B, len(query_blocks)]`` that shares a document with each query block; the others do not compete.
    """
    n_kb = k_pooled.shape[1]
    scores = torch.einsum("bqhd,bkhd->bhqk", q_pooled, k_pooled)
    kb = torch.arange(n_kb, device=scores.device)
    qb = query_blocks.to(scores.device)
    if causal:
        scores = scores.masked_fill(kb[None, :] > qb[:, None], float("-inf"))
    if reach is not None:
        first, last = (r.to(scores.device) for r in reach)
        outside = (kb[None, None, :] < first[..., None]) | (kb[None, None, :] > last[..., None])
        scores = scores.masked_fill(outside[:, None], float("-inf"))
    own = (kb[None, :] == qb[:, None]).expand_as(scores)
    scores = scores.masked_fill(own, float("inf"))
    s, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    width = min(comp.k, n_kb)
    top = torch.where(s[..., :width] == float("-inf"), -1, idx[..., :width])
    return _sort_rows(top)


def document_reach(documents, n: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, last) key block ``[B, n_query_blocks]`` overlapping the documents of each query block:
    from the block of its first row's document start to that of its last row's document end."""
    start, end = documents.bounds(n)
    rows = torch.arange(0, n, block)
    last_rows = torch.clamp(rows + block - 1, max=n - 1)
    return start[:, rows].long() // block, (end[:, last_rows].long() - 1) // block


def topk_table(comp, q: torch.Tensor, k: torch.Tensor, causal: bool,
               chunk_blocks: int = 1024, documents=None) -> torch.Tensor:
    hq, hkv = q.shape[2], k.shape[2]
    with torch.no_grad():
        qp = pool_blocks(q, comp.block)
        qp = qp.view(qp.shape[0], qp.shape[1], hkv, hq // hkv, qp.shape[-1]).sum(3)
        kp = pool_blocks(k, comp.block)
        reach = None if documents is None else document_reach(documents, q.shape[1], comp.block)
        rows = []
        for start in range(0, qp.shape[1], chunk_blocks):
            qbs = torch.arange(start, min(start + chunk_blocks, qp.shape[1]), device=q.device)
            part = None if reach is None else tuple(r[:, start:start + chunk_blocks] for r in reach)
            rows.append(topk_rows(comp, qp[:, start:start + chunk_blocks], kp, qbs, causal, part))
        table = torch.cat(rows, dim=2)
    return table.repeat_interleave(hq // hkv, dim=1)
