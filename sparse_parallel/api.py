"""The public attention entry point: one function, an explicit backend."""
from __future__ import annotations

import torch

from .patterns.pattern import Pattern, as_pattern
from .reference import reference_attention

BACKENDS = ("auto", "reference", "triton")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shape, dtype and device checks shared by every backend."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, N, H, D], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, sequence and head dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[1] < 1:
        raise ValueError("sequence length must be >= 1")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    from . import kernels

    if backend == "auto":
        return "triton" if device.type == "cuda" and kernels.available(device)[0] else "reference"
    if backend == "triton":
        ok, why = kernels.available(device)
        if not ok:
            raise RuntimeError(f"backend='triton' is not available here: {why}")
    return backend


def sparse_attention(q, k, v, pattern, *, backend: str = "auto", return_lse: bool = False,
                     scale: float | None = None, sequence_parallel=None):
    """Sparse attention of ``q`` over ``k``/``v`` under ``pattern``.

    q: ``[B, N, Hq, D]``; k, v: ``[B, N, Hkv, D]`` with Hq a multiple of Hkv (GQA).
    Returns out ``[B, N, Hq, D]`` and, with ``return_lse``, the log-sum-exp
    ``[B, Hq, N]`` (float32; float64 for float64 inputs).  A query that may see no
    key gets output 0, lse -inf and zero gradients.

    With ``sequence_parallel`` (a ``SequenceParallel`` of world size P > 1) the
    tensors are this rank's contiguous shards of the sequence, positions stay
    global, and the result is this rank's shard of the output.
    """
    check_qkv(q, k, v)
    pattern = as_pattern(pattern)
    if sequence_parallel is not None and sequence_parallel.world_size > 1:
        from .parallel.attention import sequence_parallel_attention

        out, lse = sequence_parallel_attention(q, k, v, pattern, sequence_parallel, backend=backend, scale=scale)
        return (out, lse) if return_lse else out
    out, lse = local_attention(q, k, v, pattern, backend=backend, scale=scale)
    return (out, lse) if return_lse else out


def local_attention(q, k, v, pattern: Pattern, *, backend: str = "auto", scale=None):
    """Whole-sequence attention on one device -> (out, lse)."""
    backend = resolve_backend(backend, q.device)
    if backend == "triton":
        from .kernels import triton_attention

        return triton_attention(q, k, v, pattern, scale=scale)
    bound = pattern.bind(q.shape[1], q.shape[2], q=q if pattern.data_dependent else None,
                         k=k if pattern.data_dependent else None)
    return reference_attention(q, k, v, bound, scale=scale)
