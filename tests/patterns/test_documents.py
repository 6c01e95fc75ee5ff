"""Patterns within packed documents: the same-document rule against brute force, exact counting, the value."""
import random

import pytest
import torch

import sparse_parallel as sp
from sparse_parallel.patterns import Documents, Pattern


def same_document(docs: Documents, n: int) -> torch.Tensor:
    """``[B, n, n]``: i and j in one document of batch element b, from the offsets one document at a time."""
    out = torch.zeros(docs.batch, n, n, dtype=torch.bool)
    for b, row in enumerate(docs.offsets):
        for start, end in zip(row, row[1:]):
            out[b, start:end, start:end] = True
    return out


def random_documents(rng: random.Random, n: int, batch: int) -> Documents:
    """Fresh lengths per batch element, a 1-token document in each row and one document of >= n/3 tokens."""
    rows = []
    for _ in range(batch):
        long = rng.randint(max(1, n // 3), max(1, n // 2))
        at = rng.randint(0, n - long)
        cuts = {at, at + long}
        cuts |= {c for c in range(1, n) if rng.random() < 0.2 and not at < c < at + long}
        one = rng.choice([c for c in range(n) if not at <= c < at + long] or [at])
        cuts |= {one, one + 1} if one != at else set()
        rows.append(sorted({0, n} | {c for c in cuts if 0 < c < n}))
    return Documents.from_offsets(rows)


def families(n: int):
    """One pattern of every family, causal and not."""
    layout = sp.BlockLayout.from_rows(16, [[0], [0, 1], [2], [], [1, 4], [3, 5]])
    causal = {
        "window": Pattern(sp.Window(6)),
        "strided": sp.Window(2) | sp.Strided(5, offset=2),
        "strided_span": Pattern(sp.Strided(3, offset=1, span=17)),
        "dilated": sp.Dilated(window=3, levels=2),
        "global_first": sp.Window(2) | sp.Global(first=3, queries=False),
        "global_positions_queries": sp.Window(1) | sp.Global(first=2, positions=(11, 40, n - 1)),
        "random_blocks": sp.Window(3) | sp.RandomBlocks(16, 2, seed=5, per_head=True),
        "block_layout": sp.Window(1) | layout | sp.Global(positions=(21,), queries=False),
    }
    cases = dict(causal)
    for name, p in causal.items():
        cases[f"{name}_noncausal"] = p.with_causal(False)
    return cases


@pytest.mark.parametrize("trial", range(4))
def test_allows_describe_and_candidates_against_brute_force(trial):
    seed = random.randrange(1 << 30)  # fresh document lengths every run; printed on failure
    rng = random.Random(seed)
    n, heads = rng.randint(60, 100), 3
    docs = random_documents(rng, n, batch=2)
    for name, p in families(n).items():
        want = p.mask(n, heads=heads)[None] & same_document(docs, n)[:, None]  # [B, H, n, n]
        within = p.within(docs)
        bound = within.bind(n, heads)
        i = torch.arange(n)
        got = bound.allows(i, i).expand(docs.batch, heads, n, n)
        assert torch.equal(got, want), f"seed {seed} {name}: allows"
        d = within.describe(n, heads=heads, dim=8)
        per_query = want.sum(-1)
        assert d["pairs"] == int(want.sum()) and d["batch"] == 2, f"seed {seed} {name}: {d['pairs']}"
        assert (d["keys_per_query"]["min"], d["keys_per_query"]["max"]) == (int(per_query.min()),
                                                                           int(per_query.max()))
        assert d["exact"]
        for start in range(0, n, 13):
            end = min(n, start + 13)
            reachable = torch.nonzero(want[..., start:end, :].any(0).any(0).any(0)).flatten()
            assert bool(torch.isin(reachable, bound.candidates(start, end)).all()), f"seed {seed} {name}"


def _topk_within(q, k, block, kk, same):
    """Brute force of TopKBlocks within documents: per batch element, KV head and query block, the own
    block and the kk - 1 best-scoring others among the causal key blocks holding at least one key in the
    same document as one of the block's queries (``same [B, n, n]``) -> selected ``[B, Hkv, nqb, nkb]``."""
    from sparse_parallel.patterns.blocks import pool_blocks

    b, n, hq, _ = q.shape
    hkv = k.shape[2]
    nb = -(-n // block)
    qp = pool_blocks(q, block).view(b, nb, hkv, hq // hkv, -1).sum(3)
    kp = pool_blocks(k, block)
    chosen = torch.zeros(b, hkv, nb, nb, dtype=torch.bool)
    for bi in range(b):
        for h in range(hkv):
            for qb in range(nb):
                shares = [bool(same[bi, qb * block:(qb + 1) * block, kb * block:(kb + 1) * block].any())
                          for kb in range(qb + 1)]
                others = [kb for kb in range(qb) if shares[kb]]
                scores = torch.stack([qp[bi, qb, h] @ kp[bi, kb, h] for kb in others]) if others else None
                best = [] if scores is None else [others[j] for j in torch.argsort(scores, descending=True,
                                                                                   stable=True)[:kk - 1]]
                chosen[bi, h, qb, [qb] + best] = True
    return chosen


def test_topk_blocks_within_documents_gqa():
    """Data-dependent blocks (per key/value head, per batch element) within per-row documents: only key
    blocks sharing a document with the query block compete, so no slot goes to a block whose pairs are
    all masked; the pairs are the selection's, intersected with the documents."""
    gen = torch.Generator().manual_seed(3)
    n, hq, hkv, block, kk = 70, 4, 2, 16, 2
    q = torch.randn(2, n, hq, 8, generator=gen)
    k = torch.randn(2, n, hkv, 8, generator=gen)
    docs = Documents.from_lengths([[1, 30, 1, 38], [45, 25]])
    same = same_document(docs, n)
    chosen = _topk_within(q, k, block, kk, same)  # [B, Hkv, nqb, nkb]
    i = torch.arange(n)
    blocks = chosen.repeat_interleave(hq // hkv, dim=1)[:, :, i // block][..., i // block]  # [B, H, n, n]
    window = (i[:, None] - i[None, :] <= 2) & (i[None, :] <= i[:, None])
    p = sp.TopKBlocks(block, kk) | sp.Window(2)
    want = (blocks | window) & (i[None, :] <= i[:, None]) & same[:, None]
    got = p.within(docs).bind(n, hq, q=q, k=k).allows(i, i)
    assert torch.equal(got.expand_as(want), want)
    # Without documents the selection differs here (a block of another document scores higher).
    plain = p.bind(n, hq, q=q, k=k).allows(i, i) & same[:, None]
    assert not torch.equal(plain.expand_as(want), want)
    d = p.within(docs).describe(n, heads=hq, q=q, k=k)
    assert d["pairs"] == int(want.sum()) and d["exact"]
    assert not p.within(docs).describe(n, heads=hq)["exact"]  # without the data: a bound


def test_describe_at_a_million_tokens_is_the_sum_over_documents():
    """1M tokens in documents of mean length 32k: the count within documents equals the sum of each
    document counted alone, where a strided lattice keeps its absolute phase (offset -start mod stride)
    and only the first document holds the global tokens.  No mask at either size."""
    rng = random.Random(7)
    n = 1 << 20
    lengths = []
    while sum(lengths) < n:
        lengths.append(min(n - sum(lengths), rng.randint(1, 64 << 10)))
    window, stride, first = sp.Window(4096), 64, 128
    p = window | sp.Strided(stride) | sp.Global(first=first, queries=False)
    got = p.within(Documents.from_lengths([lengths])).describe(n, heads=2)
    want, start = 0, 0
    for length in lengths:
        alone = window | sp.Strided(stride, offset=-start % stride)
        if start == 0:
            alone = alone | sp.Global(first=min(first, length), queries=False)
        want += alone.describe(length, heads=2)["pairs"]
        start += length
    assert got["pairs"] == want < p.describe(n, heads=2)["pairs"]


def test_documents_value():
    docs = Documents.from_lengths([[3, 1, 4], [8]])
    assert docs.offsets == ((0, 3, 4, 8), (0, 8)) and (docs.batch, docs.n) == (2, 8)
    assert Documents.from_offsets([[0, 3, 4, 8], [0, 8]]) == docs
    assert Documents.from_offsets(torch.tensor([[0, 2, 8], [0, 5, 8]])).offsets == ((0, 2, 8), (0, 5, 8))
    assert Documents.from_offsets([0, 2, 8]).offsets == ((0, 2, 8),)  # one row: every batch element
    assert hash(Documents.from_lengths([[3, 1, 4], [8]])) == hash(docs)
    start, end = docs.bounds(8)
    assert start.dtype == end.dtype == torch.int32 and start.is_contiguous() and end.is_contiguous()
    assert start.tolist() == [[0, 0, 0, 3, 4, 4, 4, 4], [0] * 8]
    assert end.tolist() == [[3, 3, 3, 4, 8, 8, 8, 8], [8] * 8]
    assert docs.reach(3, 4) == (0, 8) and Documents.from_lengths([3, 1, 4]).reach(3, 4) == (3, 4)
    docs.validate(8, 2)
    docs.validate(8)
    Documents.from_lengths([[8]]).validate(8, 5)  # one row for all


@pytest.mark.parametrize("make, field", [
    (lambda: Documents.from_offsets([[1, 4, 8]]), r"Documents.offsets\[0\] must start at 0"),
    (lambda: Documents.from_offsets([[0, 4, 4, 8]]), r"Documents.offsets\[0\] must be strictly increasing"),
    (lambda: Documents.from_offsets([[0, 8], [0, 9]]), "must all end at the same sequence length"),
    (lambda: Documents.from_offsets([[0]]), "at least one document"),
    (lambda: Documents.from_offsets([]), "non-empty sequence of rows"),
    (lambda: Documents.from_offsets(torch.tensor([[0.0, 8.0]])), "integer tensor"),
    (lambda: Documents.from_offsets([[0, 2.5, 8]]), r"Documents.offsets\[0\] must be a sequence of integers"),
    (lambda: Documents.from_lengths([[3, 0, 5]]), r"Documents.lengths\[0\] must be integers >= 1"),
    (lambda: Documents.from_lengths([[4], [4, 4]]).validate(8, 2), "must all end"),
    (lambda: Documents.from_lengths([[4, 4]]).validate(9, 1), "end at 8.*n=9"),
    (lambda: Documents.from_lengths([[4, 4], [8], [8]]).validate(8, 2), "3 rows for a batch of 2"),
    (lambda: sp.Window(2).within([[0, 8]]), "Pattern.within takes a Documents"),
    (lambda: Pattern(sp.Window(2)).within(Documents.from_lengths([4, 4])).bind(9), "n=9"),
    (lambda: (Pattern(sp.Window(2)).within(Documents.from_lengths([4, 4]))
              | Pattern(sp.Window(1)).within(Documents.from_lengths([8]))), "different documents"),
    (lambda: Pattern(sp.Window(2)).within(Documents.from_lengths([[4, 4], [8]])).mask(8), "one sample"),
])
def test_invalid_documents_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_pattern_within_documents_is_a_value():
    docs = Documents.from_lengths([[5, 1, 10], [16]])
    p = (sp.Window(4) | sp.Strided(3) | sp.RandomBlocks(16, 1)).within(docs)
    assert p.documents == docs and p.plain == Pattern(p.components) and p.plain.documents is None
    plain = p.plain
    assert plain.plain is plain and p.within(None) == plain
    assert p != p.plain and hash(p) == hash(p.plain.within(Documents.from_offsets(docs.offsets)))
    assert {p: 1}[p.plain.within(docs)] == 1
    assert p.with_causal(False).documents == docs
    # Documents restrict the whole union, whichever side of | they come from.
    assert (p | sp.Global(first=1)).documents == docs and (sp.Global(first=1) | p).documents == docs
    assert (p | p.plain).documents == docs and Pattern(p, causal=False).documents == docs
    assert Pattern.from_dict(p.to_dict()) == p and Pattern.from_dict(p.plain.to_dict()).documents is None
    assert p.bind(16).documents == docs and "within=Documents(batch=2" in str(p)
