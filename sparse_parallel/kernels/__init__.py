"""Triton kernels for sparse attention (forward and backward).

``triton_attention`` (whole sequence on one device) and ``space_attention``
(queries over explicit key spaces: the sequence-parallel contract) share one
planner (``plan.py``), one set of kernels (``triton_kernels.py``) and their
launchers (``core.py``).  The kernel module is imported only when a kernel runs,
so that ``TRITON_INTERPRET=1`` set before that moment takes effect.
"""
from __future__ import annotations

import os


def available(device=None) -> tuple[bool, str]:
    """Whether the Triton backend can run on ``device``, and why not."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not installed ({e})"
    import torch

    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                           else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        return True, ""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, f"the Triton kernels run on CUDA devices (or on CPU with TRITON_INTERPRET=1), not {device.type}"


def _require(device):
    ok, why = available(device)
    if not ok:
        raise RuntimeError(f"backend='triton' is not available: {why}")


def triton_attention(q, k, v, pattern, scale=None, config=None, saved=None):
    """q ``[B, N, Hq, D]``, k/v ``[B, N, Hkv, D]`` -> (out ``[B, N, Hq, D]``, lse ``[B, Hq, N]`` float32).

    ``saved``: (out, lse) of an earlier call on equal inputs, returned with the op's backward."""
    _require(q.device)
    from .function import triton_attention as run

    return run(q, k, v, pattern, scale=scale, config=config, saved=saved)


def space_attention(q, q_pos, spaces, bound, scale=None, config=None):
    """Triton twin of ``spaces.reference_space_attention`` -> (out, lse); see ``function.space_attention``."""
    _require(q.device)
    from .function import space_attention as run

    return run(q, q_pos, spaces, bound, scale=scale, config=config)


__all__ = ["available", "space_attention", "triton_attention"]
