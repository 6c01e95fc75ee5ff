"""Key spaces and the log-sum-exp merge: splitting keys must not change the result."""
import pytest
import torch

import sparse_parallel as sp
from sparse_parallel.reference import reference_attention
from sparse_parallel.spaces import KeySpace, merge_partials, reference_space_attention, whole_sequence

PATTERN = sp.Window(5) | sp.Strided(4, span=20) | sp.Global(first=3, positions=(40,)) | sp.RandomBlocks(16, 2, seed=1)


def qkv(n, hq=4, hkv=2, d=8):
    return (torch.randn(2, n, h, d, dtype=torch.float64, requires_grad=True) for h in (hq, hkv, hkv))


def test_compact_spaces_equal_full_attention():
    n = 77
    q, k, v = qkv(n)
    bound = PATTERN.bind(n, 4)
    ref, ref_lse = reference_attention(q, k, v, bound)
    # Window, Global and RandomBlocks from the full keys; the strided level from its compact keys K[0::4].
    spaces = [KeySpace(k, v, (0, 2, 3)), KeySpace(k[:, 0::4], v[:, 0::4], (1,), pos0=0, stride=4),
              KeySpace(k[:, [40]], v[:, [40]], (), positions=torch.tensor([40]))]
    out, lse = reference_space_attention(q, torch.arange(n), spaces, bound)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("cut", [1, 40, 76])
def test_lse_merge_of_disjoint_key_halves(cut):
    n = 77
    q, k, v = qkv(n)
    bound = PATTERN.bind(n, 4)
    ref, ref_lse = reference_attention(q, k, v, bound)
    pos = torch.arange(n)
    parts = [reference_space_attention(q, pos, [KeySpace(k[:, :cut], v[:, :cut], (0, 1, 2, 3))], bound),
             reference_space_attention(q, pos, [KeySpace(k[:, cut:], v[:, cut:], (0, 1, 2, 3), pos0=cut)], bound)]
    out, lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad((out * 1.5).sum() + lse.sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * 1.5).sum() + ref_lse.sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_listed_keys_left_to_their_own_space():
    """``listed=False``: the full keys leave Global's listed position 40 to a gathered space serving Global;
    without that space the pairs only position 40 allows are missing, with it nothing is counted twice."""
    n = 77
    q, k, v = qkv(n)
    bound = PATTERN.bind(n, 4)
    ref, ref_lse = reference_attention(q, k, v, bound)
    full = KeySpace(k, v, (0, 1, 2, 3), listed=False)
    listed = KeySpace(k[:, [40]], v[:, [40]], (2,), positions=torch.tensor([40]))
    out, lse = reference_space_attention(q, torch.arange(n), [full, listed], bound)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    out, _ = reference_space_attention(q, torch.arange(n), [full], bound)
    assert (out[:, 41:] - ref[:, 41:]).abs().amax() > 1e-3 and torch.equal(out[:, :40], ref[:, :40])


WHOLE = {
    "mixed": PATTERN,
    "dilated_global_queries": sp.Dilated(window=3, levels=2) | sp.Global(first=2, positions=(7, 30)),
    # a key listed by two components, and one listed by one that another's first keys cover
    "two_globals": (sp.Window(2) | sp.Strided(3, offset=1) | sp.Global(first=4, positions=(20,))
                    | sp.Global(positions=(2, 20, 33), queries=False)),
    "noncausal": sp.Pattern((sp.Window(3, 2), sp.Strided(5, 2, span=30), sp.Global(first=2, positions=(50,)),
                             sp.Global(positions=(9, 50), queries=False)), causal=False),
}


@pytest.mark.parametrize("name", sorted(WHOLE))
def test_whole_sequence_split_equals_full_attention(name):
    """The one whole-sequence split (the kernels' and sequence parallelism's): its spaces for the ordinary
    rows and the whole sequence for the global query rows give exactly the full attention."""
    n = 61
    q, k, v = qkv(n)
    bound = WHOLE[name].bind(n, 4)
    ref, ref_lse = reference_attention(q, k, v, bound)
    split = whole_sequence(bound, k, v)
    special = torch.isin(torch.arange(n), split.global_rows)
    assert torch.equal(split.global_rows, bound.global_rows)
    parts = [(torch.arange(n)[~special], split.spaces), (split.global_rows, [split.every_key])]
    grads_of = []
    for rows, spaces in parts:
        if not len(rows):
            continue
        out, lse = reference_space_attention(q[:, rows], rows, spaces, bound)
        torch.testing.assert_close(out, ref[:, rows], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse, ref_lse[:, :, rows], rtol=1e-12, atol=1e-12)
        grads_of.append(out.sum() + lse.sum())
    g = torch.autograd.grad(sum(grads_of), (q, k, v))
    g_ref = torch.autograd.grad(ref.sum() + ref_lse.sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    # Strided levels are read from their views, listed keys from gathered spaces; nothing else is gathered.
    assert all(sp.positions is None or sp.size <= 3 for sp in split.spaces)
    assert {sp.stride for sp in split.spaces} == {1} | {c.stride for c in bound.pattern.components
                                                        if c.lattice is not None}


def test_merge_keeps_empty_rows_empty():
    out = torch.zeros(1, 3, 1, 2, dtype=torch.float64)
    lse = torch.full((1, 1, 3), float("-inf"), dtype=torch.float64)
    o, l = merge_partials([out, out], [lse, lse])
    assert torch.all(o == 0) and torch.all(torch.isneginf(l))


def test_space_validation():
    k = torch.randn(1, 4, 1, 2)
    with pytest.raises(ValueError, match="positions"):
        KeySpace(k, k, (0,), positions=torch.arange(3))
    with pytest.raises(ValueError, match="shapes"):
        KeySpace(k, k[:, :2], (0,))
