"""Eager sparse attention: the exact reference every kernel and parallel path is checked against.

Queries are processed in chunks; a chunk gathers only its candidate keys (the
union of what its components can reach), evaluates the pattern predicate on
that chunk x candidates tile, and does a masked softmax.  Nothing N x N is ever
held.  Works in any dtype on any device, float64 included; autograd runs through
it, chunk by chunk under activation checkpointing so that backward memory stays
at one chunk's tile.  Within documents the candidates stop at the chunk's
documents and the predicate applies the same-document rule per batch element
(``BoundPattern``), so a chunk's tile is no larger than without them.
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from .patterns import BoundPattern

#: Elements of one chunk's score tile (B * Hq * chunk * candidates) before it is split.
TILE_BUDGET = 1 << 24


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp is float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def attend_keys(q_c, k_c, v_c, allowed, scale):
    """Masked softmax attention of a query tile over gathered keys.

    q_c ``[B, C, Hq, D]``, k_c/v_c ``[B, K, Hkv, D]``, allowed bool broadcastable
    to ``[B, Hq, C, K]`` -> (out ``[B, C, Hq, D]``, lse ``[B, Hq, C]``).
    Rows with no allowed key give out 0 and lse -inf, with zero (not NaN) gradients.
    """
    b, c, hq, d = q_c.shape
    hkv = k_c.shape[2]
    g = hq // hkv
    acc = lse_dtype(q_c.dtype)
    if k_c.shape[1] == 0:  # no candidate key at all (a chunk inside documents that hold none)
        return q_c.new_zeros(b, c, hq, v_c.shape[3]), torch.full((b, hq, c), float("-inf"), dtype=acc,
                                                                   device=q_c.device)
    s = torch.einsum("bchgd,bkhd->bhgck", q_c.view(b, c, hkv, g, d), k_c).reshape(b, hq, c, -1)
    s = s.to(acc) * scale
    allowed = allowed.expand_as(s)
    s = torch.where(allowed, s, float("-inf"))
    row_max = s.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isinf(row_max), 0.0, row_max)
    e = torch.exp(s - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    empty = denom == 0
    p = e / torch.where(empty, 1.0, denom)
    lse = torch.where(empty, float("-inf"), row_max + torch.log(torch.where(empty, 1.0, denom)))
    out = torch.einsum("bhgck,bkhd->bchgd", p.to(v_c.dtype).view(b, hkv, g, c, -1), v_c)
    return out.reshape(b, c, hq, d), lse.squeeze(-1)


def _chunk(bound: BoundPattern, q_c, k, v, cand, start: int, scale: float):
    """Queries ``[start, start + len)`` over ``cand``, a superset of the keys they may see."""
    i = torch.arange(start, start + q_c.shape[1], device=q_c.device)
    allowed = bound.allows(i, cand)
    return attend_keys(q_c, k[:, cand], v[:, cand], allowed, scale)


def reference_attention(q, k, v, bound: BoundPattern, scale: float | None = None, chunk: int = 256):
    """q ``[B, N, Hq, D]``, k/v ``[B, N, Hkv, D]`` -> out ``[B, N, Hq, D]``, lse ``[B, Hq, N]``."""
    b, n, hq, d = q.shape
    bound.check_batch(b)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs, lses = [], []
    start = 0
    while start < n:
        end = min(n, start + chunk)
        cand = bound.candidates(start, end).to(q.device)
        # A chunk with long candidate lists (global query rows) is split to keep the tile bounded;
        # the chunk's candidates remain a superset for every piece of it.
        step = max(1, min(end - start, TILE_BUDGET // max(1, b * hq * len(cand))))
        q_c = q[:, start:start + step]
        if grad:
            o, l = checkpoint(_chunk, bound, q_c, k, v, cand, start, scale, use_reentrant=False)
        else:
            o, l = _chunk(bound, q_c, k, v, cand, start, scale)
        outs.append(o)
        lses.append(l)
        start += step
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)
