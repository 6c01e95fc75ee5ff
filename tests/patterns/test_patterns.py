"""Pattern language: predicates against brute force, describe against masks, validation, serialisation."""
import math

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_parallel as sp
from sparse_parallel.patterns import MAX_MASK_N, Component, Pattern
from sparse_parallel.patterns.blocks import random_block_rows

SETTINGS = settings(max_examples=40, deadline=None)


def brute_allowed(comp, i, j, n, head=0, table=None):
    """The documented semantics, one pair at a time, written independently of the library."""
    if isinstance(comp, sp.Window):
        return i - comp.left <= j <= i + comp.right
    if isinstance(comp, sp.Strided):
        return j % comp.stride == comp.offset and (comp.span is None or abs(i - j) < comp.span)
    if isinstance(comp, sp.Global):
        glob = set(range(comp.first)) | set(comp.positions)
        return j in glob or (comp.queries and i in glob)
    if table is not None:
        return (j // comp.block) in table[head][i // comp.block]
    raise AssertionError(comp)


def brute_mask(pattern, n, heads=1, tables=None):
    m = torch.zeros(heads, n, n, dtype=torch.bool)
    for h in range(heads):
        for i in range(n):
            for j in range(n):
                if pattern.causal and j > i:
                    continue
                m[h, i, j] = any(brute_allowed(c, i, j, n, h, (tables or {}).get(c)) for c in pattern.components)
    return m


windows = st.builds(sp.Window, st.integers(0, 12), st.integers(0, 5))


@st.composite
def strided(draw):
    s = draw(st.integers(1, 9))
    return sp.Strided(s, draw(st.integers(0, s - 1)), draw(st.one_of(st.none(), st.integers(1, 40))))


globals_ = st.builds(sp.Global, st.integers(1, 5), st.lists(st.integers(0, 60), max_size=3).map(tuple),
                     st.booleans())
structured = st.lists(st.one_of(windows, strided(), globals_), min_size=1, max_size=4)


@SETTINGS
@given(comps=structured, n=st.integers(1, 48), causal=st.booleans())
def test_structured_mask_matches_brute_force(comps, n, causal):
    p = Pattern(tuple(comps), causal=causal)
    assert torch.equal(p.mask(n), brute_mask(p, n))


@SETTINGS
@given(comps=structured, n=st.integers(1, 300), causal=st.booleans(), dil=st.booleans())
def test_describe_counts_equal_mask(comps, n, causal, dil):
    if dil:
        comps = comps + [sp.Dilated(window=3, levels=2)]
    p = Pattern(tuple(comps), causal=causal)
    d = p.describe(n, heads=2, dim=16)
    per_query = p.mask(n)[0].sum(-1)
    assert d["pairs"] == 2 * int(per_query.sum())
    assert d["keys_per_query"]["min"] == int(per_query.min())
    assert d["keys_per_query"]["max"] == int(per_query.max())
    assert d["useful_flops_fwd"] == 4 * d["pairs"] * 16
    assert d["exact"]


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 110), causal=st.booleans(), r=st.integers(1, 4), seed=st.integers(0, 1000),
       w=st.integers(0, 20), per_head=st.booleans())
def test_block_components_mask_and_describe(n, causal, r, seed, w, per_head):
    rb = sp.RandomBlocks(16, r, seed=seed, per_head=per_head)
    layout = sp.BlockLayout.from_rows(32, [[0], [0, 1], [2], [], [1, 4]])
    p = Pattern((sp.Window(w), sp.Global(first=2, positions=(17,)), rb, layout), causal=causal)
    heads = 3
    bound = p.bind(n, heads)
    tables = {c: t[0].tolist() for c, t in zip(p.block_components, bound.tables)}
    for c in list(tables):
        if len(tables[c]) == 1:
            tables[c] = tables[c] * heads
    assert torch.equal(p.mask(n, heads=heads), brute_mask(p, n, heads, tables))
    d = p.describe(n, heads=heads, dim=8)
    assert d["pairs"] == int(p.mask(n, heads=heads).sum())


def test_random_blocks_draw_rules():
    comp = sp.RandomBlocks(64, 3, seed=7)
    qb = torch.arange(200)
    rows = random_block_rows(comp, qb, 200 * 64, causal=True)
    for b, row in enumerate(rows.tolist()):
        picked = [x for x in row if x >= 0]
        assert len(picked) == min(3, b + 1) and len(set(picked)) == len(picked)
        assert all(0 <= x <= b for x in picked) and picked == sorted(picked)
    # Any process can compute one block's draw alone: a single row equals its row in the full table.
    alone = random_block_rows(comp, torch.tensor([123]), 200 * 64, causal=True)
    assert torch.equal(alone[0], rows[123])
    other = random_block_rows(sp.RandomBlocks(64, 3, seed=8), qb, 200 * 64, causal=True)
    assert not torch.equal(other, rows)
    # Draws are spread over the allowed range (a biased generator would cluster them).
    late = rows[150:]
    assert (late[late >= 0] < 75).float().mean() > 0.3
    non_causal = random_block_rows(comp, qb, 200 * 64, causal=False)
    assert (non_causal > qb[:, None]).any()


def test_topk_selection_rule():
    torch.manual_seed(0)
    b, n, hq, hkv, d, blk, k = 2, 150, 4, 2, 8, 16, 3
    q = torch.randn(b, n, hq, d, dtype=torch.float64)
    kk = torch.randn(b, n, hkv, d, dtype=torch.float64)
    comp = sp.TopKBlocks(blk, k)
    table = Pattern(comp).bind(n, hq, q=q, k=kk).tables[0]
    nb = math.ceil(n / blk)
    for bi in range(b):
        for h in range(hq):
            g = h // (hq // hkv)
            for qb in range(nb):
                qs = q[bi, qb * blk:(qb + 1) * blk, g * 2:(g + 1) * 2].mean(0).sum(0)
                scores = [float(qs @ kk[bi, kb * blk:(kb + 1) * blk, g].mean(0)) for kb in range(qb + 1)]
                others = sorted((-s, kb) for kb, s in enumerate(scores) if kb != qb)[:k - 1]
                want = sorted([qb] + [kb for _, kb in others])
                got = [x for x in table[bi, h, qb].tolist() if x >= 0]
                assert got == want
    with pytest.raises(ValueError, match="TopKBlocks"):
        Pattern(comp).mask(64, heads=2)


def test_dilated_is_a_shorthand_for_its_components():
    levels = (sp.Window(100), sp.Strided(3, span=300), sp.Strided(9, span=900), sp.Strided(27, span=2700))
    p = sp.Dilated(window=100, levels=3, growth=3)
    assert isinstance(p, Pattern) and p == Pattern(levels) and Pattern(p) == p
    assert (sp.Dilated(4, 1) | sp.Global(first=1)).components == (sp.Window(4), sp.Strided(2, span=8),
                                                                  sp.Global(first=1))
    assert (sp.Global(first=1) | sp.Dilated(4, 1)).components == (sp.Global(first=1), sp.Window(4),
                                                                  sp.Strided(2, span=8))
    spelt = {"causal": False, "components": [{"type": "dilated", "window": 4, "levels": 1},
                                             {"type": "window", "left": 1}]}
    assert Pattern.from_dict(spelt) == Pattern((sp.Window(4), sp.Strided(2, span=8), sp.Window(1)), causal=False)
    with pytest.raises(ValueError, match="grow"):
        Pattern.from_dict({"components": [{"type": "dilated", "window": 4, "levels": 1, "grow": 2}]})


def test_per_head_is_one_property():
    """Every component answers ``per_head``; RandomBlocks takes it as an argument, the others know it."""
    assert isinstance(Component.__dict__["per_head"], property)
    answers = {sp.Window(3): False, sp.Global(first=1): False, sp.RandomBlocks(16, 1): False,
               sp.RandomBlocks(16, 1, per_head=True): True, sp.BlockLayout.from_rows(16, [[0]]): False,
               sp.BlockLayout.from_rows(16, [[[0]], [[0]]]): True, sp.TopKBlocks(16, 1): True}
    for comp, per_head in answers.items():
        assert comp.per_head is per_head, comp
        assert Pattern(comp).per_head is per_head
    assert sp.RandomBlocks(16, 1, per_head=True).to_dict()["per_head"] is True
    assert "per_head" not in sp.TopKBlocks(16, 1).to_dict()


def test_bound_pattern_holds_global_rows_and_keys():
    """Computed once by ``bind``: listed keys per component, global keys, and the global query rows (which see
    every key; when causal the first rows are ordinary rows: all they can see are global keys anyway)."""
    p = sp.Window(2) | sp.Global(first=3, positions=(9, 2)) | sp.Global(positions=(5, 9), queries=False)
    b = p.bind(8)
    assert [None if x is None else x.tolist() for x in b.explicit_keys] == [None, None, [5]]  # 9 is past n
    assert b.global_keys.tolist() == [0, 1, 2, 5] and b.global_rows.tolist() == []
    assert b.component_rows[0] is None and b.component_rows[2] is None
    b = p.with_causal(False).bind(12)
    assert b.global_keys.tolist() == [0, 1, 2, 5, 9] and b.global_rows.tolist() == [0, 1, 2, 9]
    assert bool(p.with_causal(False).mask(12)[0][b.global_rows].all())
    assert torch.equal(p.with_causal(False).bind(12).candidates(9, 10), torch.arange(12))


def test_serialisation_round_trip():
    p = (sp.Window(64, 2) | sp.Strided(16, 3, span=512) | sp.Global(first=4, positions=(99, 7), queries=False)
         | sp.RandomBlocks(32, 2, seed=5, per_head=True) | sp.BlockLayout.from_rows(16, [[[0], [0, 1]], [[0], [1]]])
         | sp.TopKBlocks(64, 4)).with_causal(False)
    d = p.to_dict()
    again = Pattern.from_dict(yaml.safe_load(yaml.safe_dump(d)))
    assert again == p and hash(again) == hash(p) and not again.causal
    assert {p: 1}[again] == 1


@pytest.mark.parametrize("make, field", [
    (lambda: sp.Window(-1), "Window.left"),
    (lambda: sp.Window(3, right=-2), "Window.right"),
    (lambda: sp.Strided(0), "Strided.stride"),
    (lambda: sp.Strided(4, offset=4), "Strided.offset"),
    (lambda: sp.Strided(4, span=0), "Strided.span"),
    (lambda: sp.Dilated(0, 2), "Dilated.window"),
    (lambda: sp.Global(), "Global needs"),
    (lambda: sp.Global(first=-1), "Global.first"),
    (lambda: sp.RandomBlocks(48, 2), "RandomBlocks.block"),
    (lambda: sp.RandomBlocks(8, 2), "RandomBlocks.block"),
    (lambda: sp.RandomBlocks(64, 0), "RandomBlocks.per_query_block"),
    (lambda: sp.TopKBlocks(64, 0), "TopKBlocks.k"),
    (lambda: sp.BlockLayout.from_rows(16, [[1, 0]]), "BlockLayout.indices"),
    (lambda: Pattern(sp.BlockLayout.from_rows(16, [[0], [5]])).bind(32, 1), "key block 5.*key blocks 0..1"),
    (lambda: Pattern.from_dict({"components": [{"type": "window", "left": 3, "size": 2}]}), "size"),
    (lambda: Pattern.from_dict({"components": [{"type": "ring"}]}), "unknown component type"),
    (lambda: Pattern.from_dict({"components": [], "causal": True}), "at least one"),
    (lambda: Pattern.from_dict({"components": [{"type": "window", "left": 1}], "casual": True}), "casual"),
    (lambda: Pattern(sp.Window(4)).mask(MAX_MASK_N + 1), "n <= 8192"),
    (lambda: Pattern(sp.RandomBlocks(16, 1, per_head=True)).mask(32), "heads="),
    (lambda: Pattern(sp.Window(1)) | Pattern(sp.Window(2), causal=False), "causal"),
])
def test_invalid_parameters_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_describe_without_mask_at_a_million_tokens():
    p = sp.Window(4096) | sp.Strided(64) | sp.Global(first=128, queries=False)
    d = p.describe(1 << 20, heads=16, dim=128)
    n = 1 << 20
    # Closed form: window keys + strided keys before the window + global keys before both.
    i = torch.arange(n)
    win = torch.clamp(i, max=4096) + 1
    strided_before = torch.div(torch.clamp(i - 4097, min=-1), 64, rounding_mode="floor") + 1
    glob = torch.clamp(i - 4096, min=0).clamp(max=128) - (torch.clamp(i - 4096, min=0).clamp(max=128) + 63) // 64
    assert d["pairs"] == 16 * int((win + strided_before + glob).sum())


def test_component_terms_and_explicit_keys_are_its_geometry():
    """Every structured component's terms plus explicit keys allow exactly the pairs ``allows`` allows
    (a brute-force check over fresh random components); block-list components have no terms."""
    import random

    from sparse_parallel.patterns import Global, RandomBlocks, Strided, Window
    from sparse_parallel.patterns.components import UNBOUNDED

    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    n = 97
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    for _ in range(40):
        s = rng.randint(1, 9)
        comp = rng.choice([Window(rng.randint(0, 30), rng.randint(0, 5)),
                           Strided(s, rng.randint(0, s - 1), rng.choice([None, rng.randint(1, 60)])),
                           Global(first=rng.randint(0, 5), positions=(rng.randint(6, 90),), queries=False)])
        got = torch.zeros(n, n, dtype=torch.bool)
        for t in comp.terms():
            lo, hi = t.bounds(i)
            assert (hi if isinstance(hi, int) else int(hi.max())) <= UNBOUNDED
            got |= (j >= lo) & (j <= hi) & ((j - t.r) % t.m == 0)
        keys = comp.explicit_keys(n)
        if keys is not None:
            got |= torch.isin(j, keys).expand(n, n)
        assert torch.equal(got, comp.allows(i, j).expand(n, n)), f"seed {seed}: {comp}"
        if comp.lattice is not None:
            offset, stride = comp.lattice
            assert bool((torch.nonzero(got)[:, 1] % stride == offset).all()), f"seed {seed}: {comp}"
    assert RandomBlocks(block=16, per_query_block=1).terms() == ()
