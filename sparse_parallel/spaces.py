"""Attention over explicit key spaces: the contract between kernels and sequence parallelism.

A ``KeySpace`` is a set of keys/values with known global positions: either an
arithmetic progression (``pos0 + stride * index``: a contiguous shard or halo,
or the compact keys of a ``Strided`` level) or an explicit sorted position list
(global tokens).  Each space serves some of the pattern's components; a pair
(i, j) is counted in a space iff j is in it and the first component of the
pattern that allows (i, j) is one the space serves.  When every component's
reachable keys are in exactly one space serving it, every allowed pair is
counted exactly once -- the rule both the Triton kernels and the
sequence-parallel exchange rely on.  A space with ``listed=False`` leaves out
the pairs its components allow only through their listed keys
(``Component.explicit_keys``, the positions of ``Global``): those then need a
space of their own.

``whole_sequence`` is the one split of a whole sequence into key spaces, used by
the one-device kernels and by sequence parallelism's whole-sequence paths alike.
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
    #: False: not the pairs a served component allows only through its listed keys (another space holds them).
    listed: bool = True

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
    bound.check_batch(b)
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
            masks.append(bound.owned_by(sp.components, pos, j.to(q.device), listed=sp.listed))
        bt = max(m.shape[0] for m in masks)
        ht = max(m.shape[1] for m in masks)
        allowed = torch.cat([m.expand(bt, ht, -1, -1) for m in masks], dim=-1)
        o, l = attend_keys(q[:, start:start + step], torch.cat(ks, 1), torch.cat(vs, 1), allowed, scale)
        outs.append(o)
        lses.append(l)
        start += step
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)


@dataclass
class WholeSequence:
    """Whole-sequence attention as key spaces (see ``whole_sequence``)."""

    spaces: list[KeySpace]  # the keys of every row but the global query rows
    global_rows: torch.Tensor  # sorted, on the host: rows that see every key instead
    every_key: KeySpace  # the whole sequence, for the global query rows


def whole_sequence(bound: BoundPattern, k: torch.Tensor, v: torch.Tensor) -> WholeSequence:
    """The key spaces of attention over a whole sequence ``k``/``v [B, N, Hkv, D]`` of ``bound``.

    - the sequence itself, serving every component without a key lattice;
    - per lattice (offset, stride) of a component (a ``Strided`` level) the view ``K[offset::stride]``
      serving the components on it, whose keys are contiguous there (no copy);
    - per component with listed keys (``Global.positions``) those keys, gathered, serving it; a key
      listed by several components goes to the first of them.

    The arithmetic spaces leave the listed keys to the gathered ones (``listed=False``), so each
    component's keys are in exactly one space serving it, and its listed keys in an explicit one,
    which is how the kernels read them.  The global query rows (``bound.global_rows``)
    see every key instead: ``every_key``, the whole sequence as one explicit space serving every
    component.  The one-device kernels and sequence parallelism's whole-sequence paths (world size
    1, the all-to-all) both attend over this split.
    """
    comps = bound.pattern.components
    dev = k.device
    views: dict[tuple[int, int], list[int]] = {}
    for index, c in enumerate(comps):
        if c.lattice is not None and c.lattice != (0, 1):
            views.setdefault(c.lattice, []).append(index)
    on_lattice = {index for served in views.values() for index in served}
    rest = tuple(index for index in range(len(comps)) if index not in on_lattice)
    spaces = [KeySpace(k, v, rest, listed=False)] if rest else []
    for (offset, stride), served in views.items():
        spaces.append(KeySpace(k[:, offset::stride], v[:, offset::stride], tuple(served), pos0=offset,
                               stride=stride, listed=False))
    taken = torch.zeros(0, dtype=torch.long)
    for index, keys in enumerate(bound.explicit_keys):
        if keys is None:
            continue
        keys = keys[~torch.isin(keys, taken)]
        taken = torch.cat([taken, keys])
        if len(keys):
            keys = keys.to(dev)
            spaces.append(KeySpace(k[:, keys], v[:, keys], (index,), positions=keys))
    every_key = KeySpace(k, v, tuple(range(len(comps))), positions=torch.arange(k.shape[1], device=dev))
    return WholeSequence(spaces, bound.global_rows, every_key)


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
