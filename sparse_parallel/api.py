"""The public attention entry point: one function, an explicit backend."""
from __future__ import annotations

from .backends import BACKENDS, check_qkv, resolve_backend  # noqa: F401  (re-exported: the API names them)
from .patterns.pattern import Pattern, as_pattern
from .reference import reference_attention


def sparse_attention(q, k, v, pattern, *, backend: str = "auto", return_lse: bool = False,
                     scale: float | None = None, sequence_parallel=None, saved=None):
    """Sparse attention of ``q`` over ``k``/``v`` under ``pattern``.

    q: ``[B, N, Hq, D]``; k, v: ``[B, N, Hkv, D]`` with Hq a multiple of Hkv (GQA).
    Returns out ``[B, N, Hq, D]`` and, with ``return_lse``, the log-sum-exp
    ``[B, Hq, N]`` (float32; float64 for float64 inputs).  A query that may see no
    key gets output 0, lse -inf and zero gradients.

    With ``sequence_parallel`` (a ``SequenceParallel`` of world size P > 1) the
    tensors are this rank's contiguous shards of the sequence, positions stay
    global, and the result is this rank's shard of the output.

    A pattern ``within`` documents (``Pattern.within(Documents)``, offsets over the
    whole sequence, one row per batch element or one for all) keeps every query
    inside its own document, on every backend and under sequence parallelism.

    ``saved``: the (out, lse) that an earlier call on equal inputs returned (with ``return_lse``), such
    as the first forward of a checkpointed layer.  The Triton backend on one device returns them as
    they are, with the op's backward, and runs no forward; the other backends and sequence
    parallelism compute the forward again (their backward needs what their own forward keeps).
    """
    check_qkv(q, k, v)
    pattern = as_pattern(pattern)
    if sequence_parallel is not None and sequence_parallel.world_size > 1:
        from .parallel.attention import sequence_parallel_attention

        out, lse = sequence_parallel_attention(q, k, v, pattern, sequence_parallel, backend=backend, scale=scale)
        return (out, lse) if return_lse else out
    out, lse = local_attention(q, k, v, pattern, backend=backend, scale=scale, saved=saved)
    return (out, lse) if return_lse else out


def replays_saved(device, backend: str = "auto", sequence_parallel=None) -> bool:
    """Whether ``sparse_attention(..., saved=...)`` on ``device`` returns ``saved`` instead of a new forward."""
    one = sequence_parallel is None or sequence_parallel.world_size <= 1
    return one and resolve_backend(backend, device) == "triton"


def local_attention(q, k, v, pattern: Pattern, *, backend: str = "auto", scale=None, saved=None):
    """Whole-sequence attention on one device -> (out, lse); ``saved``: see ``sparse_attention``."""
    if pattern.documents is not None:
        pattern.documents.validate(q.shape[1], q.shape[0])
    backend = resolve_backend(backend, q.device)
    if backend == "triton":
        from .kernels import triton_attention

        return triton_attention(q, k, v, pattern, scale=scale, saved=saved)
    bound = pattern.bind(q.shape[1], q.shape[2], q=q if pattern.data_dependent else None,
                         k=k if pattern.data_dependent else None, device=q.device)
    return reference_attention(q, k, v, bound, scale=scale)
