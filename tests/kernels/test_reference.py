"""The eager reference against a dense float64 softmax built from ``Pattern.mask``."""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported (it decorates its own helpers then)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sparse_parallel as sp
from sparse_parallel import kernels
from sparse_parallel.patterns import Pattern


def dense_attention(q, k, v, mask, scale=None):
    """Textbook masked softmax over the full n x n scores, float64, GQA by repeating k/v."""
    b, n, hq, d = q.shape
    g = hq // k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    kk = k.repeat_interleave(g, dim=2)
    vv = v.repeat_interleave(g, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, kk) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.where(mask, torch.exp(s - torch.where(torch.isinf(lse), 0, lse)[..., None]), 0.0)
    return torch.einsum("bhij,bjhd->bihd", p, vv), lse


PATTERNS = {
    "window": Pattern(sp.Window(7, 2)),
    "window_strided_global": sp.Window(5) | sp.Strided(8, 3) | sp.Global(first=4, positions=(50,), queries=False),
    "dilated_global_queries": sp.Dilated(window=4, levels=3) | sp.Global(first=2, positions=(33,)),
    "bigbird": sp.Window(3) | sp.Global(first=3) | sp.RandomBlocks(16, 2, seed=3, per_head=True),
    "layout_noncausal": Pattern((sp.BlockLayout.from_rows(16, [[1], [0, 2], [], [3, 5]]), sp.Window(2, 2)),
                                causal=False),
    "strided_span": Pattern(sp.Strided(5, 1, span=23)),
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("n, hq, hkv", [(97, 4, 2), (33, 2, 2)])
def test_reference_matches_dense(name, n, hq, hkv):
    pattern = PATTERNS[name]
    q = torch.randn(2, n, hq, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, n, hkv, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, n, hkv, 16, dtype=torch.float64, requires_grad=True)
    mask = pattern.mask(n, heads=hq)[None]
    out, lse = sp.sparse_attention(q, k, v, pattern, backend="reference", return_lse=True)
    ref, ref_lse = dense_attention(q, k, v, mask)
    # Both are float64 over the same pairs; only summation order differs.
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    assert lse.dtype == torch.float64
    do = torch.randn_like(out)
    grads = torch.autograd.grad((out * do).sum() + lse.nan_to_num(neginf=0).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * do).sum() + ref_lse.nan_to_num(neginf=0).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


def test_topk_through_reference_matches_dense():
    torch.manual_seed(1)
    n, hq, hkv = 80, 4, 2
    q = torch.randn(1, n, hq, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, n, hkv, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, n, hkv, 8, dtype=torch.float64, requires_grad=True)
    pattern = sp.TopKBlocks(16, 2) | sp.Window(3)
    mask = pattern.mask(n, heads=hq, q=q.detach(), k=k.detach())[None]
    out = sp.sparse_attention(q, k, v, pattern, backend="reference")
    ref, _ = dense_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_fully_masked_rows_give_zero_and_no_nan():
    # Strided(8, offset=5), causal: queries 0..4 see no key at all.
    pattern = Pattern(sp.Strided(8, 5))
    q = torch.randn(1, 20, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 20, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 20, 2, 8, dtype=torch.float64, requires_grad=True)
    out, lse = sp.sparse_attention(q, k, v, pattern, backend="reference", return_lse=True)
    assert torch.all(out[:, :5] == 0) and torch.all(torch.isneginf(lse[..., :5]))
    assert torch.isfinite(lse[..., 5:]).all()
    (out.sum() + lse[..., 5:].sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :5] == 0)


def test_a_chunk_without_any_key():
    """Every query of a chunk may see no key at all (here the whole sequence): 0 / -inf, not an error,
    also within documents, where a short document can hold no key of a strided level."""
    q = torch.randn(1, 5, 2, 8, dtype=torch.float64, requires_grad=True)
    out, lse = sp.sparse_attention(q, q, q, sp.Strided(8, 5), backend="reference", return_lse=True)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    docs = sp.patterns.Documents.from_lengths([3, 2])
    out, lse = sp.sparse_attention(q, q, q, sp.Strided(4, 3).within(docs), backend="reference", return_lse=True)
    assert torch.all(out[:, :3] == 0) and torch.isfinite(lse[..., 3]).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_reference_close_to_float64(dtype):
    pattern = sp.Window(16) | sp.Strided(4)
    q, k, v = (torch.randn(1, 64, 2, 32, dtype=torch.float64) for _ in range(3))
    ref = sp.sparse_attention(q, k, v, pattern, backend="reference")
    out, lse = sp.sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), pattern, backend="reference",
                                   return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    rel = (out.double() - ref).norm() / ref.norm()
    # float32 arithmetic lands far under 1e-5 here; bf16 inputs carry ~4e-3 rounding each.
    assert rel < (1e-5 if dtype == torch.float32 else 2e-2)


def test_reference_at_long_length_keeps_memory_bounded():
    """8k tokens with global query rows: the chunks never hold an n x n tile (TILE_BUDGET)."""
    n = 8192
    pattern = sp.Window(64) | sp.Strided(128) | sp.Global(first=16)
    q, k, v = (torch.randn(1, n, 2, 16) for _ in range(3))
    from torch.utils._python_dispatch import TorchDispatchMode

    from sparse_parallel.reference import TILE_BUDGET

    class Largest(TorchDispatchMode):
        """The largest tensor any operation produces (a dense n x n score tile would be 2 * n * n)."""

        elements = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.elements = max(self.elements, t.numel())
            return out

    with Largest() as largest:
        out = sp.sparse_attention(q, k, v, pattern, backend="reference")
    assert out.shape == (1, n, 2, 16) and torch.isfinite(out).all()
    assert largest.elements <= TILE_BUDGET < 2 * n * n, f"a tensor of {largest.elements} elements was built"
    # Spot-check a few rows, global ones included, against the dense formula on just those rows.
    rows = torch.tensor([0, 15, 16, 5000, n - 1])
    bound = pattern.bind(n, 2)
    allowed = bound.allows(rows, torch.arange(n))[0]
    s = torch.einsum("rhd,jhd->hrj", q[0, rows].double(), k[0].double()) / 4
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    want = torch.einsum("hrj,jhd->rhd", p, v[0].double())
    torch.testing.assert_close(out[0, rows].double(), want, rtol=1e-4, atol=1e-5)


def test_backend_selection_is_explicit(monkeypatch):
    q = k = v = torch.randn(1, 8, 1, 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        sp.sparse_attention(q, k, v, sp.Window(2), backend="flash")
    monkeypatch.setattr(kernels, "available", lambda device=None: (False, "no GPU"))
    with pytest.raises(RuntimeError, match="no GPU"):
        sp.sparse_attention(q, k, v, sp.Window(2), backend="triton")
    # auto on CPU is the reference, never an error.
    assert sp.sparse_attention(q, k, v, sp.Window(2)).shape == q.shape


@pytest.mark.parametrize("shapes, match", [
    (((1, 8, 3, 4), (1, 8, 2, 4), (1, 8, 2, 4)), "multiple"),
    (((1, 8, 2, 4), (1, 9, 2, 4), (1, 9, 2, 4)), "agree"),
    (((1, 8, 2, 4), (1, 8, 2, 4), (1, 8, 1, 4)), "same shape"),
    (((8, 2, 4), (1, 8, 2, 4), (1, 8, 2, 4)), "4-D"),
])
def test_bad_shapes(shapes, match):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        sp.sparse_attention(q, k, v, sp.Window(2))


def _same_document(docs, n):
    """``[B, n, n]``: i and j in one document of batch element b, one document at a time."""
    out = torch.zeros(docs.batch, n, n, dtype=torch.bool)
    for b, row in enumerate(docs.offsets):
        for start, end in zip(row, row[1:]):
            out[b, start:end, start:end] = True
    return out


def _random_lengths(rng, n):
    """Lengths summing to n: a 1-token document, one of n/3 tokens or more, the rest short."""
    out = [1, rng.randint(n // 3, n // 2)]
    while sum(out) < n:
        out.append(min(n - sum(out), rng.choice([1, 1, 2, 5, 9, 17])))
    rng.shuffle(out)
    return out


DOCUMENT_PATTERNS = dict(PATTERNS, **{
    "strided_noncausal": Pattern((sp.Strided(4, 1), sp.Window(1, 1)), causal=False),
    "global_queries_noncausal": Pattern((sp.Window(2, 2), sp.Global(first=2, positions=(40, 70))), causal=False),
    "topk": sp.TopKBlocks(16, 2) | sp.Window(3),
})


@pytest.mark.parametrize("name", sorted(DOCUMENT_PATTERNS))
def test_reference_within_documents_matches_dense(name):
    """Per-row documents (fresh lengths, 1-token documents among them): the dense softmax under the
    pattern's mask and the same-document mask, for outputs, lse and every gradient."""
    import random

    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    n, hq, hkv = 97, 4, 2
    docs = sp.patterns.Documents.from_lengths([_random_lengths(rng, n), _random_lengths(rng, n)])
    pattern = DOCUMENT_PATTERNS[name]
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, n, h, 16, generator=gen, dtype=torch.float64, requires_grad=True)
               for h in (hq, hkv, hkv))
    if pattern.data_dependent:  # TopKBlocks chooses per batch element, among its documents' blocks
        mask = torch.stack([pattern.within(sp.patterns.Documents.from_offsets([docs.offsets[b]])).mask(
            n, heads=hq, q=q[b:b + 1].detach(), k=k[b:b + 1].detach()) for b in range(2)])
    else:
        mask = pattern.mask(n, heads=hq)[None]
    mask = mask & _same_document(docs, n)[:, None]
    out, lse = sp.sparse_attention(q, k, v, pattern.within(docs), backend="reference", return_lse=True)
    ref, ref_lse = dense_attention(q, k, v, mask)
    where = f"{name}, seed {seed}, documents {docs.offsets}"
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12, msg=where)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12, msg=where)
    do = torch.randn_like(out)
    grads = torch.autograd.grad((out * do).sum() + lse.nan_to_num(neginf=0).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * do).sum() + ref_lse.nan_to_num(neginf=0).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11, msg=where)


def test_documents_one_row_for_the_batch_and_one_document_for_the_sequence():
    pattern = sp.Window(5) | sp.Strided(4) | sp.Global(first=2)
    q, k, v = (torch.randn(3, 40, 2, 8, dtype=torch.float64) for _ in range(3))
    docs = sp.patterns.Documents.from_lengths([7, 1, 32])
    shared = sp.sparse_attention(q, k, v, pattern.within(docs), backend="reference")
    per_row = sp.sparse_attention(q, k, v, pattern.within(sp.patterns.Documents.from_offsets(docs.offsets * 3)),
                                  backend="reference")
    assert torch.equal(shared, per_row)
    whole = sp.patterns.Documents.from_lengths([40])
    assert torch.equal(sp.sparse_attention(q, k, v, pattern.within(whole), backend="reference"),
                       sp.sparse_attention(q, k, v, pattern, backend="reference"))


def test_documents_must_fit_the_inputs():
    q = torch.randn(2, 16, 1, 4)
    docs = sp.patterns.Documents.from_lengths([[8, 8], [16], [4, 12]])
    with pytest.raises(ValueError, match="3 rows for a batch of 2"):
        sp.sparse_attention(q, q, q, sp.Window(2).within(docs), backend="reference")
    with pytest.raises(ValueError, match="n=16"):
        sp.sparse_attention(q, q, q, Pattern(sp.Window(2)).within(sp.patterns.Documents.from_lengths([20])))


def test_triton_backend_within_documents():
    """The public op passes documents through to the kernels (float32 against the float64 reference)."""
    pytest.importorskip("triton")
    ok, why = kernels.available()
    if not ok:
        pytest.skip(why)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    docs = sp.patterns.Documents.from_lengths([[1, 30, 1, 32], [64]])
    pattern = (sp.Window(8) | sp.Strided(5) | sp.Global(first=2, queries=False)).within(docs)
    q, k, v = (torch.randn(2, 64, 2, 16, dtype=torch.float64) for _ in range(3))
    ref = sp.sparse_attention(q, k, v, pattern, backend="reference")
    low = sp.sparse_attention(q.float(), k.float(), v.float(), pattern, backend="reference")
    got = sp.sparse_attention(*(t.float().to(dev) for t in (q, k, v)), pattern, backend="triton")
    err = (got.double().cpu() - ref).abs().max().item()
    assert err <= 2 * (low.double() - ref).abs().max().item() + 1e-6
