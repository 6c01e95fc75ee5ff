"""Attention over explicit key spaces: the contract between kernels and sequence parallelism.

A ``KeySpace`` is a set of keys/values with known global positions: either an
arithmetic progression (``pos0 + stride * index``: a contiguous shard or halo,
or the compact keys of a ``Strided`` level) or an explicit sorted position list
(global tokens).  Each space serves some of the pattern's components; a pair
(i, j) is counted in a space iff j is in it and the first component of the
pattern that allows (i, j) is one the space serves.  When every component's
reachable keys are in exactly one space serving it, every allowed pair is
counted exactly once -- the rule both the Triton kernels and the
sequence-parallel exchange rely on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .patterns import BoundPattern
from .reference import TILE_BUDGET, attend_keys


@dataclass
class KeySpace:
    """k, v ``[B, Nk, Hkv, D]`` with global positions ``pos0 + stride * idx`` or ``positions``."""

    k: torch.Tensor
    v: torch.Tensor
    components: tuple[int, ...]
    pos0: int = 0
    stride: int = 1
    positions: torch.Tensor | None = None

    def __post_init__(self):
        if self.k.shape != self.v.shape:
            raise ValueError(f"KeySpace k and v shapes differ: {tuple(self.k.shape)} vs {tuple(self.v.shape)}")
        if self.positions is not None and len(self.positions) != self.k.shape[1]:
            raise ValueError(f"KeySpace.positions has {len(self.positions)} entries for {self.k.shape[1]} keys")
        if self.stride < 1:
            raise ValueError(f"KeySpace.stride must be >= 1, got {self.stride}")

    @property
    def size(self) -> int:
        return self.k.shape[1]

    def global_positions(self) -> torch.Tensor:
        if self.positions is not None:
            return self.positions.to(torch.long)
        return self.pos0 + self.stride * torch.arange(self.size, device=self.k.device)

    def indices_of(self, pos: torch.Tensor) -> torch.Tensor:
        """Indices in this space of the global positions ``pos`` that it holds."""
        if self.positions is not None:
            sp = self.global_positions().to(pos.device)
            idx = torch.searchsorted(sp, pos).clamp(max=max(0, self.size - 1))
            hit = (sp[idx] == pos) if self.size else torch.zeros_like(pos, dtype=torch.bool)
            return idx[hit]
        rel = pos - self.pos0
        hit = (rel >= 0) & (rel % self.stride == 0) & (rel // self.stride < self.size)
        return rel[hit] // self.stride


def reference_space_attention(q: torch.Tensor, q_pos: torch.Tensor, spaces: list[KeySpace],
                              bound: BoundPattern, scale: float | None = None, chunk: int = 256):
    """Eager attention of queries at global positions ``q_pos [Nq]`` over key spaces.

    q ``[B, Nq, Hq, D]`` -> (out ``[B, Nq, Hq, D]``, lse ``[B, Hq, Nq]``); differentiable
    in q and every space's k and v.
    """
    b, nq, hq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q_pos = q_pos.to(torch.long)
    outs, lses = [], []
    start = 0
    while start < nq:
        end = min(nq, start + chunk)
        pos = q_pos[start:end]
        cand = bound.candidates(int(pos.min()), int(pos.max()) + 1).to(q.device)
        step = max(1, min(end - start, TILE_BUDGET // max(1, b * hq * len(cand))))
        pos = q_pos[start:start + step].to(q.device)
        ks, vs, masks = [], [], []
        for sp in spaces:
            idx = sp.indices_of(cand)
            j = sp.global_positions()[idx] if len(idx) else idx
            ks.append(sp.k[:, idx])
            vs.append(sp.v[:, idx])
            masks.append(bound.owned_by(sp.components, pos, j.to(q.device)))
        bt = max(m.shape[0] for m in masks)
        ht = max(m.shape[1] for m in masks)
        allowed = torch.cat([m.expand(bt, ht, -1, -1) for m in masks], dim=-1)
        o, l = attend_keys(q[:, start:start + step], torch.cat(ks, 1), torch.cat(vs, 1), allowed, scale)
        outs.append(o)
        lses.append(l)
        start += step
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)


def merge_partials(outs: list[torch.Tensor], lses: list[torch.Tensor]):
    """Exact merge of partial attentions over disjoint key sets by log-sum-exp.

    outs ``[B, N, H, D]`` and lses ``[B, H, N]`` -> (out, lse); empty partials
    (lse -inf) contribute nothing and an all-empty row stays 0 / -inf.
    """
    lse_stack = torch.stack(lses)
    m = lse_stack.amax(0)
    m_safe = torch.where(torch.isinf(m), 0.0, m)
    w = torch.exp(lse_stack - m_safe)  # 0 for -inf partials
    total = w.sum(0)
    empty = total == 0
    lse = torch.where(empty, float("-inf"), m_safe + torch.log(torch.where(empty, 1.0, total)))
    frac = w / torch.where(empty, 1.0, total)  # [P, B, H, N]
    out = sum(o * f.permute(0, 2, 1)[..., None].to(o.dtype) for o, f in zip(outs, frac))
    return out, lse
