"""Triton kernels with packed documents against a brute-force mask (pattern mask & same document).

Dense float64 attention under that mask is the reference; the same dense attention in the kernels'
dtype gives the error scale (the 2x rule of tests/tolerance.py).  Document lengths are drawn fresh
from a seed printed in every failure message (set DOC_SEED to replay one), and always include
1-token documents and a document boundary on a tile boundary.
"""
import os
import time

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from tolerance import reference_tolerance  # noqa: E402

from sparse_parallel.patterns import (BlockLayout, Dilated, Documents, Global, Pattern, RandomBlocks,  # noqa: E402
                                      Strided, TopKBlocks, Window, as_pattern)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or TRITON_INTERPRET=1")
SEED = int(os.environ.get("DOC_SEED", time.time_ns() % (1 << 31)))


def _lengths(n: int, g: torch.Generator) -> list:
    """Random document lengths summing to n: 1-token documents, one that ends at 16, long ones."""
    out, left = [1, 15], n - 16
    while left > 0:
        choice = int(torch.randint(0, 4, (1,), generator=g))
        size = 1 if choice == 0 else int(torch.randint(2, max(3, n // 2), (1,), generator=g))
        size = min(size, left)
        out.append(size)
        left -= size
    perm = torch.randperm(len(out) - 2, generator=g).tolist()
    return out[:2] + [out[2 + i] for i in perm]


def _dense(q, k, v, allowed, scale):
    """Masked attention with explicit probabilities -> (out, lse); rows with no key: out 0, lse -inf."""
    hq, hkv = q.shape[2], k.shape[2]
    kk, vv = k.repeat_interleave(hq // hkv, 2), v.repeat_interleave(hq // hkv, 2)
    s = torch.einsum("bihd,bjhd->bhij", q, kk) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("bhij,bjhd->bihd", p, vv), lse


def _grads(fn, inputs, dout, dlse):
    ts = [t.detach().clone().requires_grad_() for t in inputs]
    out, lse = fn(*ts)
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    ((out.double() * dout).sum() + (finite.double() * dlse).sum()).backward()
    return [out.double(), finite.double()] + [t.grad.double() for t in ts]


def check(pattern, n, hq=2, hkv=1, b=2, d=16, dtype=torch.float32):
    from sparse_parallel.kernels import triton_attention

    pattern = as_pattern(pattern)
    g = torch.Generator().manual_seed(SEED)
    lengths = [_lengths(n, g) for _ in range(b)]
    docs = Documents.from_lengths(lengths)
    q, k, v = (torch.randn(b, n, h, d, generator=g, dtype=torch.float64).to(DEV) for h in (hq, hkv, hkv))
    dout = torch.randn(b, n, hq, d, generator=g, dtype=torch.float64).to(DEV)
    dlse = torch.randn(b, hq, n, generator=g, dtype=torch.float64).to(DEV)
    heads = hq if pattern.per_head else None
    masks = []
    for i in range(b):  # a data-dependent selection differs per batch element (and chooses in its documents)
        own = pattern.within(Documents.from_lengths([lengths[i]]))
        m = own.mask(n, heads, q=q[i:i + 1] if pattern.data_dependent else None,
                     k=k[i:i + 1] if pattern.data_dependent else None).to(DEV)
        masks.append(m.expand(hq, n, n) if m.dim() == 3 else m[None].expand(hq, n, n))
    start, _ = docs.bounds(n, DEV)
    same = start[:, :, None] == start[:, None, :]  # [B, n, n]: one document
    allowed = torch.stack(masks) & same[:, None]
    scale = d ** -0.5
    ref = _grads(lambda *t: _dense(*t, allowed, scale), (q, k, v), dout, dlse)
    low = _grads(lambda *t: _dense(*t, allowed, scale), [t.to(dtype) for t in (q, k, v)], dout, dlse)
    got = _grads(lambda *t: triton_attention(*t, pattern.within(docs)), [t.to(dtype) for t in (q, k, v)],
                 dout, dlse)
    for label, a, r, lo in zip(("out", "lse", "dq", "dk", "dv"), got, ref, low):
        err = (a - r).abs().max().item()
        # The backward forms ds = p * (dp - delta), delta = rowsum(do * o) - dlse, as flash attention
        # does; in a row whose document holds one or two keys dp and delta nearly cancel, leaving a few
        # units in the last place of |dp| that the eager softmax backward (exact for a single key) does
        # not make.  The floor allows 8 such units of the gradient's own magnitude.
        floor = max(8 * torch.finfo(dtype).eps * r.abs().max().item(), 1e-6 if dtype == torch.float32 else 1e-3)
        tol = reference_tolerance(r, lo, floor)
        assert err <= tol, f"{label}: {err:.2e} > {tol:.2e} (DOC_SEED={SEED}, documents {docs.offsets})"


@pytest.mark.parametrize("name, pattern, hq, hkv", [
    ("window+strided+global, GQA", Window(20) | Strided(8) | Global(first=4, queries=False), 4, 2),
    # a window several tiles wide: whole tiles inside one document run unmasked, and a key tile that a
    # boundary cuts must mask every later query tile of the other document
    ("wide window", Window(60) | Strided(16, 3), 2, 1),
    ("dilated", Dilated(window=6, levels=2), 2, 2),
    ("non-causal window+strided", Pattern(Window(10, 5) | Strided(7, 3, span=40), causal=False), 2, 1),
    ("global query rows and listed keys", Window(8) | Global(first=2, positions=(50,)), 2, 1),
    ("random blocks+window", RandomBlocks(block=16, per_query_block=2, seed=1) | Window(8), 2, 1),
    ("block layout", BlockLayout.from_rows(16, [[0], [0, 1], [1, 2], [0, 3], [2, 4]]), 2, 1),
    ("top-k", TopKBlocks(block=16, k=2), 2, 1),
])
def test_documents_every_family(name, pattern, hq, hkv):
    check(pattern, n=160 if name == "wide window" else 80, hq=hq, hkv=hkv)


def test_one_document_equals_no_documents():
    """A single document spanning the sequence changes nothing (bitwise: the same tiles, same order)."""
    from sparse_parallel.kernels import triton_attention

    p = as_pattern(Window(20) | Strided(8))
    g = torch.Generator().manual_seed(SEED)
    q, k, v = (torch.randn(1, 70, 2, 16, generator=g).to(DEV) for _ in range(3))
    a = triton_attention(q, k, v, p)
    b = triton_attention(q, k, v, p.within(Documents.from_lengths([[70]])))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_documents_must_fit_the_batch():
    from sparse_parallel.kernels import triton_attention

    q = torch.randn(2, 32, 1, 16, device=DEV)
    with pytest.raises(ValueError, match="Documents.offsets has 3 rows for a batch of 2"):
        triton_attention(q, q, q, as_pattern(Window(4)).within(Documents.from_lengths([[16, 16]] * 3)))
