"""Sequence parallelism on GPUs over NCCL with the Triton kernels (skipped without 2 GPUs).

Each rank draws the same full inputs, computes the float64 eager reference and
the bf16 eager reference on one GPU, and its shard through the exchange in bf16.
Tolerance: the exchange's error against float64 may be at most twice the bf16
eager error against float64 (plus a bf16 ulp of the largest value), the usual
kernel bar.
"""
from __future__ import annotations

import pytest
import torch

from dist_utils import run_ranks
from tolerance import reference_tolerance
from sparse_parallel import Global, Pattern, SequenceParallel, Strided, Window, shard

pytestmark = pytest.mark.gpu
DTYPE = torch.bfloat16

CASES = [  # (name, pattern, exchange, N)
    ("window_strided_global", Window(256) | Strided(16) | Global(first=32), "pattern", 4099),
    ("global_query_rows", Window(128) | Global(first=16, positions=(1000, 3000)), "pattern", 4096),
    ("all_to_all", Window(256) | Strided(16) | Global(first=32), "ulysses", 4096),
]


def _reference(pattern, q, k, v, do):
    from sparse_parallel.reference import reference_attention

    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, _ = reference_attention(q, k, v, Pattern((pattern,)).bind(q.shape[1], q.shape[2]))
    out.backward(do)
    return [out.detach(), q.grad, k.grad, v.grad]


def _worker(rank, world):
    from sparse_parallel.parallel import sequence_parallel_attention

    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    ctx = SequenceParallel()
    errs = {}
    for name, pattern, exchange, n in CASES:
        gen = torch.Generator().manual_seed(7)
        q, k, v, do = (torch.randn(1, n, 4, 64, generator=gen, dtype=torch.float64).to(dev) for _ in range(4))
        ref = _reference(pattern, q, k, v, do)
        eager = _reference(pattern, *(t.to(DTYPE) for t in (q, k, v, do)))
        qs, ks, vs = (shard(t, ctx).to(DTYPE).clone().requires_grad_() for t in (q, k, v))
        ctx.seq_len = n
        out, _ = sequence_parallel_attention(qs, ks, vs, pattern, ctx, backend="triton", exchange=exchange)
        out.backward(shard(do, ctx).to(DTYPE))
        for what, g, e, r in zip(("out", "dq", "dk", "dv"), (out, qs.grad, ks.grad, vs.grad), eager, ref):
            r, e = shard(r, ctx), shard(e, ctx).double()
            tol = reference_tolerance(r, e, r.abs().max().item() * torch.finfo(DTYPE).eps)
            errs[f"{name} {what}"] = ((g.double() - r).abs().max().item(), tol)
    return errs


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs (NCCL sequence parallelism)")
def test_nccl_triton_matches_reference(tmp_path):
    results = run_ranks(_worker, 2, tmp_path, timeout=300, backend="nccl")
    for rank, errs in enumerate(results):
        for name, (err, tol) in errs.items():
            assert err <= tol, f"rank {rank} {name}: error {err:.3g} > {tol:.3g}"
