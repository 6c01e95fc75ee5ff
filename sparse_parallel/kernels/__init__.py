"""Triton kernels for sparse attention (forward and backward)."""
from __future__ import annotations


def available(device=None) -> tuple[bool, str]:
    """Whether the Triton backend can run on ``device``, and why not."""
    return False, "the Triton kernels are not part of this build"


def triton_attention(q, k, v, pattern, scale=None):
    ok, why = available(q.device)
    raise RuntimeError(f"backend='triton' is not available: {why}")
