"""Tile plans (sparse_parallel/kernels/plan.py) against a brute-force reading of the terms.

A range plan gives each query tile a key-tile range that must hold every key the pass owns, and a
*full* range whose tiles the kernels walk without evaluating any mask, so every pair there must be
owned by the pass's term.  A pair (i, j) is owned by term t when t allows it and no earlier term does.
The checks read only the term rows, so they hold whatever pattern produced them; random patterns,
lengths, tile sizes and key lattices (strided spaces with offsets) are drawn fresh each run.
"""
from __future__ import annotations

import random

import pytest
import torch

from sparse_parallel.kernels import core
from sparse_parallel.kernels import plan as P
from sparse_parallel.patterns import Global, Pattern, Strided, Window, as_pattern


def _allowed(row, causal: bool, n: int, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """[len(i), len(j)]: keys at positions j that term ``row`` allows to queries at positions i."""
    lo_rel, lo_c, hi_rel, hi_c, m, r = row
    i, j = i[:, None], j[None, :]
    ok = (j >= lo_rel * i + lo_c) & (j <= hi_rel * i + hi_c) & (j % m == r) & (j >= 0) & (j < n)
    return ok & (j <= i) if causal else ok


def _owned_per_space(terms, n: int):
    """(term t, pos0, stride, [n, n] pairs t owns) for every term and every lattice space the kernels
    could read it from (the sequence, or a strided view whose keys all satisfy t's congruence)."""
    qpos = keys = torch.arange(n)
    allows = [_allowed(row, terms.causal, n, qpos, keys) for row in terms.rows]
    lattices = {(0, 1)} | {(row[5], row[4]) for row in terms.rows if row[4] > 1}
    for t in range(len(terms.rows)):
        owned = allows[t].clone()
        for u in range(t):
            owned &= ~allows[u]
        for pos0, kstr in sorted(lattices):
            if P.covers(terms.rows[t], pos0, kstr):
                yield t, pos0, kstr, owned


def _random_pattern(rng: random.Random) -> Pattern:
    comps = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["window", "strided", "strided_span", "global"])
        if kind == "window":
            comps.append(Window(rng.randint(0, 40), right=rng.choice([0, 0, rng.randint(1, 9)])))
        elif kind == "strided":
            s = rng.randint(2, 9)
            comps.append(Strided(s, offset=rng.randint(0, s - 1)))
        elif kind == "strided_span":
            s = rng.randint(2, 9)
            comps.append(Strided(s, offset=rng.randint(0, s - 1), span=rng.randint(s, 120)))
        else:
            comps.append(Global(first=rng.randint(1, 12), queries=False))
    return Pattern(tuple(comps), causal=rng.random() < 0.75)


def test_range_plans_cover_owned_keys_and_full_tiles_are_owned():
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    checked_full = 0
    for trial in range(60):
        pattern = _random_pattern(rng)
        n = rng.randint(1, 300)
        terms = P.build_terms(pattern.bind(n, 1), "cpu")
        bm, bn = rng.choice([16, 32]), rng.choice([16, 32])
        q0 = rng.randint(0, n - 1)
        nq = rng.randint(1, n - q0)
        first, last = P.tile_rows(None, q0, nq, bm, "cpu")
        bounds = P.term_bounds(terms, torch.cat([first, last]))
        qpos = torch.arange(q0, q0 + nq)
        allows = [_allowed(row, terms.causal, n, qpos, torch.arange(n)) for row in terms.rows]
        for t in range(len(terms.rows)):
            owned_pos = allows[t].clone()
            for u in range(t):
                owned_pos &= ~allows[u]
            # the contiguous space, and the strided lattices of the pattern's own levels
            lattices = {(0, 1)} | {(row[5], row[4]) for row in terms.rows if row[4] > 1}
            for pos0, kstr in sorted(lattices):
                if not P.covers(terms.rows[t], pos0, kstr):
                    continue  # such a space cannot serve term t (the kernels never pair them)
                kpos = torch.arange(pos0, max(pos0, n), kstr)
                nk = len(kpos)
                owned = owned_pos[:, kpos] if nk else owned_pos[:, :0]
                plan = P.range_plan(terms, [t], False, first, last, pos0, kstr, nk, None, bn, bounds)
                where = f"seed {seed} trial {trial}: {pattern} n={n} q0={q0} nq={nq} bm={bm} bn={bn} " \
                        f"term {t} space ({pos0}, {kstr})"
                for qt in range(len(first)):
                    rows = owned[qt * bm:(qt + 1) * bm]
                    kb_lo, kb_hi, kf_lo, kf_hi = plan[qt].tolist()
                    keys = torch.nonzero(rows.any(0)).flatten()
                    if len(keys):
                        assert kb_lo * bn <= keys[0] and keys[-1] < (kb_hi + 1) * bn, where + f" tile {qt}"
                    assert kb_lo <= kf_lo or kf_lo > kf_hi, where + f" tile {qt}: full range outside the range"
                    assert kf_hi <= kb_hi or kf_lo > kf_hi, where + f" tile {qt}: full range outside the range"
                    for kt in range(kf_lo, kf_hi + 1):
                        block = rows[:, kt * bn:min((kt + 1) * bn, nk)]
                        assert block.numel() and bool(block.all()), where + f" tile {qt}: key tile {kt} " \
                                                                            "is walked unmasked but not owned"
                        checked_full += 1
    assert checked_full > 0, f"seed {seed}: no full tile was drawn, so the unmasked ranges went unchecked"


@pytest.mark.parametrize("n", [1, 5, 64, 97])
def test_transposed_plan_lists_every_query_tile_of_a_key_tile(n):
    terms = P.build_terms(Pattern((Window(20), Strided(7, offset=3))).bind(n, 1), "cpu")
    first, last = P.tile_rows(None, 0, n, 16, "cpu")
    for t in range(len(terms.rows)):
        plan = P.range_plan(terms, [t], False, first, last, 0, 1, n, None, 16)
        n_kt = P.n_tiles(n, 16)
        qplan = P.transpose_plan(plan, n_kt)
        for kt in range(n_kt):
            want = [qt for qt in range(len(first)) if plan[qt, 0] <= kt <= plan[qt, 1]]
            q_lo, q_hi = qplan[kt].tolist()
            assert want == list(range(q_lo, q_hi + 1)), (t, kt, want, (q_lo, q_hi))


def test_transposed_plan_of_any_ranges_holds_every_query_tile_that_lists_a_key_tile():
    """Ranges that are not monotone (empty ones among them): each key tile's query range must hold
    every query tile whose range lists it, whatever the shape."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for trial in range(200):
        n_qt, n_kt = rng.randint(1, 40), rng.randint(1, 40)
        rows = []
        for _ in range(n_qt):
            lo = rng.randrange(n_kt)
            rows.append([lo, lo + rng.randint(-3, 6), 1, 0])  # hi < lo: an empty range
        plan = torch.tensor(rows, dtype=torch.int32)
        qplan = P.transpose_plan(plan, n_kt)
        for kt in range(n_kt):
            want = [qt for qt in range(n_qt) if rows[qt][0] <= kt <= rows[qt][1]]
            q_lo, q_hi = qplan[kt].tolist()
            assert all(q_lo <= qt <= q_hi for qt in want), f"seed {seed} trial {trial} key tile {kt}: " \
                                                           f"{want} not within [{q_lo}, {q_hi}] of {rows}"


def test_keys_behind_a_window_are_walked_only_by_the_query_tiles_that_list_them():
    """The first keys behind a window are owned by the global term only once the window has passed
    them, so its per-query-tile ranges rise and fall back; the transposed plan must not send every key
    tile those ranges ever reached to every later query tile (a dk/dv launch then walks thousands of
    masked tiles): each key tile gets the first to the last query tile listing it, and those past the
    global keys none."""
    n, bm, bn, g = 4096, 32, 64, 128
    terms = P.build_terms((Window(1024) | Strided(64) | Global(first=g, queries=False)).bind(n, 1), "cpu")
    first, last = P.tile_rows(None, 0, n, bm, "cpu")
    t = next(t for t, row in enumerate(terms.rows) if row[:4] == (0, 0, 0, g - 1))  # the global keys
    assert terms.rows[0][0] == 1, "the window comes first"
    plan = P.range_plan(terms, [t], False, first, last, 0, 1, n, None, bn)
    qplan = P.transpose_plan(plan, P.n_tiles(n, bn))
    for kt in range(len(qplan)):
        listing = [qt for qt in range(len(plan)) if plan[qt, 0] <= kt <= plan[qt, 1]]
        q_lo, q_hi = qplan[kt].tolist()
        if kt * bn >= g:
            assert not listing and q_lo > q_hi, (kt, listing, (q_lo, q_hi))
        else:
            assert (q_lo, q_hi) == (listing[0], listing[-1]), (kt, (q_lo, q_hi))


def test_the_order_of_the_components_does_not_change_the_unmasked_tiles():
    """Terms are taken coarser lattices last, so a window written after a strided level still runs its
    inner tiles unmasked (in pattern order it would own only the keys off the strided lattice: every
    tile masked)."""
    import itertools

    n, bm, bn = 400, 16, 16
    first, last = P.tile_rows(None, 0, n, bm, "cpu")
    full = set()
    for comps in itertools.permutations((Window(60), Strided(8), Global(first=20, queries=False))):
        terms = P.build_terms(Pattern(comps).bind(n, 1), "cpu")
        count = 0
        for t, row in enumerate(terms.rows):
            kstr = row[4]  # each term read on its own lattice, as the kernels' key spaces do
            nk = (n - row[5] + kstr - 1) // kstr
            plan = P.range_plan(terms, [t], False, first, last, row[5], kstr, nk, None, bn)
            count += int((plan[:, 3] - plan[:, 2] + 1).clamp(min=0).sum())
        full.add(count)
    assert len(full) == 1 and full.pop() > 0


def test_transposed_full_range_is_exactly_the_query_tiles_that_walk_a_key_tile_unmasked():
    """``transpose_full`` against a brute-force reading of the range plans of random patterns: a key
    tile's full query range must hold only query tiles whose full range holds it (else dk/dv would
    skip a needed mask), and, where those tiles are contiguous, all of them."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    exact = 0
    for trial in range(60):
        pattern = _random_pattern(rng)
        n = rng.randint(1, 400)
        if trial % 10 == 0:  # windows wider than two tiles: full tiles are certain, not left to the draw
            pattern = Pattern((Window(rng.randint(64, 150)),) + pattern.components, causal=pattern.causal)
            n = rng.randint(200, 400)
        terms = P.build_terms(pattern.bind(n, 1), "cpu")
        bm, bn = rng.choice([16, 32]), rng.choice([16, 32])
        first, last = P.tile_rows(None, 0, n, bm, "cpu")
        for t in range(len(terms.rows)):
            plan = P.range_plan(terms, [t], False, first, last, 0, 1, n, None, bn)
            n_kt = P.n_tiles(n, bn)
            full = P.transpose_full(plan, n_kt)
            for kt in range(n_kt):
                want = [qt for qt in range(len(first)) if plan[qt, 2] <= kt <= plan[qt, 3]]
                f_lo, f_hi = full[kt].tolist()
                got = list(range(f_lo, f_hi + 1))
                where = f"seed {seed} trial {trial}: {pattern} n={n} bm={bm} bn={bn} term {t} key tile {kt}"
                assert set(got) <= set(want), where + f": {got} not all full ({want})"
                if want == list(range(want[0], want[-1] + 1)) if want else False:
                    assert got == want, where + f": {got} != {want}"
                    exact += 1
    assert exact > 0, f"seed {seed}: no key tile had full query tiles"


def test_transposed_full_range_of_non_contiguous_query_tiles_is_empty():
    # Query tiles 0 and 2 walk key tile 0 unmasked, tile 1 does not: no contiguous range is exact.
    plan = torch.tensor([[0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 0, 1]], dtype=torch.int32)
    full = P.transpose_full(plan, 2).tolist()
    assert full[0][0] > full[0][1], full
    assert full[1] == [2, 2], full


def test_an_owned_band_is_exactly_what_its_term_owns_on_the_space_it_reads():
    """``owned_band`` replaces a pass's term list by one band where that is exact: on fresh random
    patterns, lengths and the lattices the kernels read, the band allows a key iff term t allows it
    and no earlier term does (causality, applied by the kernel apart, applied to both)."""
    from sparse_parallel.patterns import Dilated

    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    found = 0
    # Dilated's levels and the strided level of window+strided+global: each reads as one band
    patterns = [as_pattern(Dilated(window=16, levels=4)), Window(8) | Strided(4) | Global(first=5, queries=False)]
    for trial in range(80):
        pattern = patterns[trial] if trial < len(patterns) else _random_pattern(rng)
        n = 297 if trial < len(patterns) else rng.randint(1, 300)
        terms = P.build_terms(pattern.bind(n, 1), "cpu")
        before = found
        for t, pos0, kstr, owned in _owned_per_space(terms, n):
            band = P.owned_band(core._on_lattice(terms.rows[:t + 1], pos0, kstr), t, n, terms.causal)
            if band is None:
                continue
            found += 1
            kpos = torch.arange(pos0, max(pos0, n), kstr)
            got = _allowed(band, terms.causal, n, torch.arange(n), kpos)
            assert torch.equal(got, owned[:, kpos]), f"seed {seed} trial {trial}: {pattern} n={n} term {t} " \
                                                      f"space ({pos0}, {kstr}) band {band}"
        if trial < len(patterns):
            assert found - before >= len(terms.rows) - 1, f"{pattern}: {found - before} bands, {len(terms.rows)} terms"
    assert found > 100, f"seed {seed}: only {found} bands drawn"


def test_an_arithmetic_space_starts_at_the_first_key_its_terms_can_own():
    """``core.first_owned_index``: no key of the space before the index it gives is owned by the term at
    any query (fresh random patterns, lengths and lattices), and behind ``Global(first=128)`` the
    stride-64 view starts at key 128 (its first tile then holds no global key)."""
    terms = P.build_terms((Window(1024) | Strided(64) | Global(first=128, queries=False)).bind(8192, 1), "cpu")
    strided = next(t for t, row in enumerate(terms.rows) if row[4] == 64)
    assert core.first_owned_index(terms, [strided], 0, 64) == 2
    assert core.first_owned_index(terms, [0], 0, 1) == 0  # the window's keys start at every position
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    trimmed = 0
    for trial in range(80):
        n = rng.randint(1, 300)
        terms = P.build_terms(_random_pattern(rng).bind(n, 1), "cpu")
        for t, pos0, kstr, owned in _owned_per_space(terms, n):
            first = core.first_owned_index(terms, [t], pos0, kstr)
            skipped = torch.arange(pos0, max(pos0, min(n, pos0 + first * kstr)), kstr)
            assert not owned[:, skipped].any(), f"seed {seed} trial {trial}: term {t} space ({pos0}, {kstr})"
            trimmed += first > 0
    assert trimmed > 0, f"seed {seed}: no space was trimmed"
