"""Triton kernels against the float64 eager reference (CPU: TRITON_INTERPRET=1, small sizes).

Tolerance rule: the kernel's max error against float64 must be <= 2x the error
of the eager reference run in the same dtype (also against float64), plus a
floor of a few units in the last place of the dtype, because at these tiny sizes
the same-dtype reference can be exact by luck on some tensor while any other
summation order is off by an ulp.  Outputs, lse and every gradient are checked,
with gradients flowing from both out and lse (the sequence-parallel merge needs
the lse gradient).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from tolerance import assert_within_reference_error  # noqa: E402

from sparse_parallel.patterns import (Dilated, Global, Pattern, RandomBlocks, Strided, TopKBlocks,  # noqa: E402
                                      Window, as_pattern)
from sparse_parallel.reference import reference_attention  # noqa: E402
from sparse_parallel.spaces import KeySpace, reference_space_attention  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or TRITON_INTERPRET=1")
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3}


def kernels():
    from sparse_parallel import kernels as K

    return K


def _finite(x):
    return torch.where(torch.isinf(x), torch.zeros_like(x), x)


def _run(fn, inputs, dout, dlse):
    """Forward + backward of fn(*inputs) -> (out, lse, grads) in float64."""
    ts = [t.detach().clone().requires_grad_() for t in inputs]
    out, lse = fn(*ts)
    loss = (out.double() * dout).sum() + (_finite(lse).double() * dlse).sum()
    loss.backward()
    return out.double(), lse.double(), [t.grad.double() for t in ts]


def _compare(name, got, ref64, ref_lo, dtype):
    assert_within_reference_error(name, got, ref64, ref_lo, FLOOR[dtype])


def _check_spaces(name, q_rows, q_pos, k, v, spaces, bound, dout, dlse):
    """space_attention (float32) against reference_space_attention in float64; the float32 reference
    gives the error scale.  ``spaces(k, v)`` builds the key spaces from the (differentiated) k and v."""
    def via(fn):
        return lambda a, b_, c: fn(a, q_pos, spaces(b_, c), bound)

    args = (q_rows, k, v)
    args32 = [t.float() for t in args]
    ref = _run(via(reference_space_attention), args, dout, dlse)
    low = _run(via(reference_space_attention), args32, dout, dlse)
    got = _run(via(kernels().space_attention), args32, dout, dlse)
    for label, a, r, lo in zip(("out", "lse", "dq", "dk", "dv"), [*got[:2], *got[2]], [*ref[:2], *ref[2]],
                               [*low[:2], *low[2]]):
        if label in ("out", "lse"):  # rows with no keys: lse -inf in all three
            a, r, lo = _finite(a), _finite(r), _finite(lo)
        _compare(f"{name}: {label}", a, r, lo, torch.float32)


def check(pattern, n, hq=2, hkv=1, b=1, d=16, dtype=torch.float32, seed=0, config=None, head_major=False):
    """The kernels against the reference; ``head_major`` hands them q/k/v stored ``[B, H, N, D]`` and
    seen as ``[B, N, H, D]`` (the clones ``_run`` makes keep those strides)."""
    pattern = as_pattern(pattern)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
    dout = torch.randn(b, n, hq, d, generator=g, dtype=torch.float64).to(DEV)
    dlse = torch.randn(b, hq, n, generator=g, dtype=torch.float64).to(DEV)
    q, k, v = q.to(DEV), k.to(DEV), v.to(DEV)
    bound = pattern.bind(n, hq, q=q if pattern.data_dependent else None, k=k if pattern.data_dependent else None)
    ref = _run(lambda *t: reference_attention(*t, bound), (q, k, v), dout, dlse)
    low = _run(lambda *t: reference_attention(*t, bound), [t.to(dtype) for t in (q, k, v)], dout, dlse)
    inputs = [t.to(dtype) for t in (q, k, v)]
    if head_major:
        inputs = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in inputs]
    got = _run(lambda *t: kernels().triton_attention(*t, pattern, config=config), inputs, dout, dlse)
    assert got[0].dtype == torch.float64 and torch.isfinite(got[0]).all()
    assert torch.equal(torch.isinf(got[1]), torch.isinf(ref[1])), "fully masked rows must have lse -inf"
    _compare("out", got[0], ref[0], low[0], dtype)
    _compare("lse", _finite(got[1]), _finite(ref[1]), _finite(low[1]), dtype)
    for name, a, r, lo in zip(("dq", "dk", "dv"), got[2], ref[2], low[2]):
        _compare(name, a, r, lo, dtype)
    return got


def test_window_global_strided_gqa():
    # Two KV heads of two query heads each: a kernel reading another KV head's k or v (the launcher's
    # descriptors are indexed by batch, row and head) fails here, where one KV head could not tell.
    check(Window(20) | Global(first=5, queries=False) | Strided(8), n=70, hq=4, hkv=2)


def test_head_major_inputs_in_a_batch():
    # dk/dv reads one query head's q/do rows through a view of q as [B, N, H*D], which a head-major q
    # does not have (the launcher reads a copy); two batch elements check the batch coordinate of
    # that view and of the stacked-heads one (4 query heads over 2 KV heads).
    check(Window(12) | Strided(5), n=45, b=2, hq=2, hkv=2, head_major=True)
    check(Window(12) | Strided(5), n=45, b=2, hq=4, hkv=2, head_major=True)


def test_dilated_float16():
    check(Dilated(window=6, levels=2), n=60, hq=1, dtype=torch.float16)


def test_noncausal_window_and_strided_span():
    check(Pattern(Window(10, 5) | Strided(7, 3, span=40), causal=False), n=50, hq=1)


def test_overlapping_lattices_need_masks():
    # Strided(3) and Strided(2) do not nest: the stride-2 level owns every other key of its range.
    check(Strided(3, 1, span=30) | Strided(2) | Window(3, 2), n=48, hq=1)


def test_random_blocks_and_window_per_head():
    check(Window(9) | RandomBlocks(block=16, per_query_block=2, per_head=True), n=64, hq=2)


def test_topk_blocks_batch():
    check(TopKBlocks(block=16, k=2), n=48, b=2, hq=2, hkv=1)


def test_global_query_rows_and_explicit_global_keys():
    check(Window(5) | Global(first=3, positions=(40, 61), queries=True) | RandomBlocks(16, 1), n=70, hq=1)


def test_fully_masked_rows_have_zero_output_and_gradients():
    got = check(Strided(8, 5), n=40, hq=1)
    out, lse, (dq, dk, dv) = got
    assert (out[:, :5] == 0).all() and torch.isinf(lse[:, :, :5]).all() and (dq[:, :5] == 0).all()


def test_head_dim_64_odd_length():
    check(Window(16) | Strided(4), n=33, hq=1, d=64)


def test_space_attention_matches_reference_spaces():
    """A shard's queries over halo, compact strided and gathered global key spaces (the SP contract)."""
    pattern = Pattern(Window(10) | Global(first=4, positions=(37,), queries=False) | Strided(8, 3))
    n, hq, hkv, d, start, end = 64, 2, 1, 16, 24, 48
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, n, h, d, generator=g, dtype=torch.float64).to(DEV) for h in (hq, hkv, hkv))
    bound = pattern.bind(n, hq)
    q_pos = torch.arange(start, end, device=DEV)
    gpos = torch.tensor([0, 1, 2, 3, 37], device=DEV)

    def spaces(kk, vv):
        return [KeySpace(kk[:, 14:end], vv[:, 14:end], (0,), pos0=14),
                KeySpace(kk[:, gpos], vv[:, gpos], (1,), positions=gpos),
                KeySpace(kk[:, 3:end:8], vv[:, 3:end:8], (2,), pos0=3, stride=8)]

    dout = torch.randn(1, end - start, hq, d, generator=g, dtype=torch.float64).to(DEV)
    dlse = torch.randn(1, hq, end - start, generator=g, dtype=torch.float64).to(DEV)
    _check_spaces("shard", q[:, start:end], q_pos, k, v, spaces, bound, dout, dlse)


def test_space_attention_global_query_rows_alone():
    pattern = Window(4) | Global(first=2, positions=(40,), queries=True)
    n, d = 64, 16
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, n, 1, d, generator=g).to(DEV) for _ in range(3))
    bound = pattern.bind(n, 1)
    q_pos = torch.tensor([40], device=DEV)
    sp = [KeySpace(k[:, 32:], v[:, 32:], (0, 1), pos0=32)]
    ref = reference_space_attention(q[:, 40:41].double(), q_pos, [KeySpace(k[:, 32:].double(), v[:, 32:].double(),
                                                                           (0, 1), pos0=32)], bound)
    out, lse = kernels().space_attention(q[:, 40:41], q_pos, sp, bound)
    assert (out.double() - ref[0]).abs().max() < 1e-5 and (lse.double() - ref[1]).abs().max() < 1e-5
    with pytest.raises(NotImplementedError, match="mixed with ordinary rows"):
        kernels().space_attention(q[:, 39:41], torch.tensor([39, 40], device=DEV), sp, bound)


def test_bad_inputs_raise():
    q = torch.randn(1, 8, 1, 16, dtype=torch.float64, device=DEV)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        kernels().triton_attention(q, q, q, Window(2))


def test_space_attention_block_lists_from_halo_and_fetched_blocks():
    """Block lists served by a contiguous space (with a window) and by an explicit space of fetched blocks."""
    rb = RandomBlocks(block=16, per_query_block=2, seed=3)
    pattern = Pattern(Window(12) | rb)
    n, d, start, end = 80, 16, 32, 64
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, n, 1, d, generator=g, dtype=torch.float64).to(DEV) for _ in range(3))
    bound = pattern.bind(n, 1)
    q_pos = torch.arange(start, end, device=DEV)
    table = bound.tables[0][0, 0, start // 16:end // 16]
    blocks = table[table >= 0].unique()
    fetched = (blocks[:, None] * 16 + torch.arange(16)).flatten().to(DEV)
    fetched = fetched[fetched < end]
    dout = torch.randn(1, end - start, 1, d, generator=g, dtype=torch.float64).to(DEV)
    dlse = torch.randn(1, 1, end - start, generator=g, dtype=torch.float64).to(DEV)
    layouts = {
        "halo serves both": lambda kk, vv: [KeySpace(kk[:, :end], vv[:, :end], (0, 1))],
        "fetched blocks": lambda kk, vv: [KeySpace(kk[:, start - 12:end], vv[:, start - 12:end], (0,),
                                                   pos0=start - 12),
                                          KeySpace(kk[:, fetched], vv[:, fetched], (1,), positions=fetched)],
    }
    for name, spaces in layouts.items():
        _check_spaces(name, q[:, start:end], q_pos, k, v, spaces, bound, dout, dlse)


def test_public_entry_dispatches_to_triton():
    from sparse_parallel.api import sparse_attention

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 40, 2, 16, generator=g).to(DEV) for _ in range(3))
    pat = Window(8) | Strided(5)
    out, lse = sparse_attention(q, k, v, pat, backend="triton", return_lse=True)
    ref, ref_lse = sparse_attention(q.double(), k.double(), v.double(), pat, backend="reference", return_lse=True)
    assert (out.double() - ref).abs().max() < 1e-5 and (lse.double() - ref_lse).abs().max() < 1e-5


def test_space_attention_bigbird_shard_with_a_global_row():
    """A shard holding a global query row: ordinary rows (not contiguous) and the global row alone."""
    pattern = Pattern(Window(8) | RandomBlocks(block=16, per_query_block=2, seed=1) | Global(positions=(50,)))
    n, d, start, end = 96, 16, 32, 96
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, n, 1, d, generator=g, dtype=torch.float64).to(DEV) for _ in range(3))
    bound = pattern.bind(n, 1)
    rows = torch.tensor([p for p in range(start, end) if p != 50], device=DEV)
    gp = torch.tensor([50], device=DEV)
    cases = {
        "ordinary rows": (rows, lambda kk, vv: [KeySpace(kk, vv, (0, 1)),
                                                KeySpace(kk[:, gp], vv[:, gp], (2,), positions=gp)]),
        "global row": (gp, lambda kk, vv: [KeySpace(kk[:, start:], vv[:, start:], (0, 1, 2),
                                                    positions=torch.arange(start, end, device=DEV))]),
    }
    for name, (pos, spaces) in cases.items():
        dout = torch.randn(1, len(pos), 1, d, generator=g, dtype=torch.float64).to(DEV)
        dlse = torch.randn(1, 1, len(pos), generator=g, dtype=torch.float64).to(DEV)
        _check_spaces(name, q[:, pos], pos, k, v, spaces, bound, dout, dlse)


def test_dkdv_with_query_ranges_split_across_programs_is_exact(monkeypatch):
    """dk/dv stay exact when the long query range of the global keys is split across programs."""
    from sparse_parallel.kernels import core, function

    pattern = Window(20) | Global(first=5, queries=False) | Strided(8)
    splits = []
    real = core._kv_split

    def spy(*a):
        splits.append(real(*a)[0])
        return real(*a)

    monkeypatch.setattr(core, "_kv_split", spy)
    monkeypatch.setattr(function, "_PLANS", {})  # launches are planned once per pattern and shape
    # Chunks of one iteration on "one multiprocessor", so that 70 tokens split on the GPU's tiles too.
    config = core.default_config(DEV).replace(kv_min_chunk=1, sms=1)
    check(pattern, n=70, hq=2, hkv=1, seed=3, config=config)
    assert max(splits) > 1, f"no dk/dv pass was split: {splits}"


def test_dkdv_split_caps_work_and_memory():
    from sparse_parallel.kernels import core

    cfg = core.Config(kv_min_chunk=64, sms=132, kv_waves=4)
    # Global keys: 2 key tiles seen by 8192 query tiles each, 4 heads per KV head, 4 KV heads.
    split, chunk = core._kv_split(cfg, None, 2 * 8192, 8192, 4, 4, 128, 128)
    assert split > 1 and chunk * split >= 8192 and 4 * chunk <= 2 * 8192 * 4 * 4 / (132 * 4) + 4
    # A window: short ranges, plenty of programs -> no split.
    assert core._kv_split(cfg, None, 4096 * 130, 130, 1, 16, 4096 * 64, 128) == (1, 0)
    # Partials never exceed kv_split_bytes.
    small = core.Config(kv_min_chunk=1, sms=132, kv_split_bytes=3 * 2 * 4 * 128 * 4 * 128)
    assert core._kv_split(small, None, 2 * 8192, 8192, 4, 4, 128, 128)[0] == 3


def test_inputs_the_descriptors_cannot_read_are_copied_and_the_launcher_refuses_them():
    """The kernels read q/k/v/dout through tensor descriptors (16-byte aligned start and row strides):
    the entry points copy an input that is not, and the launcher names one that slips through."""
    from sparse_parallel.kernels import core

    n, h, d = 40, 2, 16
    g = torch.Generator().manual_seed(5)
    flat = [torch.randn(1 + n * h * d, generator=g).to(DEV) for _ in range(3)]
    q, k, v = (f[1:].view(1, n, h, d) for f in flat)  # start 4 bytes past an aligned address
    assert q.data_ptr() % 16
    pattern = Window(9) | Strided(4)
    got = kernels().triton_attention(q, k, v, pattern)
    want = kernels().triton_attention(q.clone(), k.clone(), v.clone(), pattern)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="16-byte aligned"):
        core.check_descriptor_alignment("k", k)
    with pytest.raises(ValueError, match="16-byte aligned"):
        core.check_descriptor_alignment("q", torch.zeros(4, 6, dtype=torch.float16, device=DEV)[:, :5])


def test_a_buffer_one_launch_writes_whole_is_in_the_input_dtype_with_the_same_gradients(monkeypatch):
    """dk/dv that a single launch writes row by row need no float32 buffer: the kernel rounds its float32
    accumulators once either way, so the gradients are bitwise those of the float32-buffer path."""
    from sparse_parallel.kernels import core, function

    made = []
    real = core.GradBuffers.__init__

    def spy(self, dk, dv):
        made.append(dk.dtype)
        real(self, dk, dv)

    monkeypatch.setattr(core.GradBuffers, "__init__", spy)
    g = torch.Generator().manual_seed(11)
    n, d = 75, 16
    q, k, v = (torch.randn(1, n, h, d, generator=g).to(DEV, torch.float16) for h in (2, 1, 1))
    dout = torch.randn(1, n, 2, d, generator=g).to(DEV, torch.float16)

    def grads(pattern):
        ts = [t.clone().requires_grad_() for t in (q, k, v)]
        out, _ = kernels().triton_attention(*ts, pattern)
        out.backward(dout)
        return [t.grad for t in ts]

    sole = grads(Window(20))
    assert made == [torch.float16]
    two_passes = grads(Window(20) | Strided(8))
    assert made[1:] == [torch.float32]  # two launches add into K/V's buffer
    monkeypatch.setattr(function.LaunchPlan, "sole_writers", lambda self, cfg, hq: set())
    wide = grads(Window(20))
    assert made[2:] == [torch.float32]
    assert all(torch.equal(a, b) for a, b in zip(sole, wide))
    assert all(t.dtype == torch.float16 for t in sole + two_passes)
