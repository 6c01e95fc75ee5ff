"""Pattern components: small immutable descriptions of which keys a query may see.

Every component answers one question, ``allows(i, j, h)``, for global query
positions ``i``, key positions ``j`` and query heads ``h``, and describes its own
key geometry through the ``Component`` interface (``pattern.py``).  Structured
components (``Window``, ``Strided``, ``Global``) answer arithmetically; the
block-list components (``RandomBlocks``, ``BlockLayout``, ``TopKBlocks``) answer
through a per-query-block table of key blocks that is built in O(N/block)
(see ``blocks.py``).  Components never hold an N x N structure.  ``Dilated`` is
not a component but a shorthand for a window and strided levels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from . import blocks
from .pattern import KINDS, UNBOUNDED, Component, Pattern, Term

__all__ = ["BlockLayout", "COMPONENT_TYPES", "Component", "Dilated", "Global", "RandomBlocks", "Strided", "Term",
           "TopKBlocks", "UNBOUNDED", "Window"]


def _check_int(name: str, value, low: int, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer ({allowed}), got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return value


def _check_block(name: str, block) -> int:
    _check_int(name, block, 16, "a power of two >= 16")
    if block & (block - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {block}")
    return block


@dataclass(frozen=True)
class Window(Component):
    """Keys ``j`` with ``i - left <= j <= i + right`` (a sliding window)."""

    left: int
    right: int = 0
    kind: ClassVar[str] = "window"

    def __post_init__(self):
        _check_int("Window.left", self.left, 0, ">= 0")
        _check_int("Window.right", self.right, 0, ">= 0")

    def allows(self, i, j, h=None):
        d = i - j
        return (d <= self.left) & (d >= -self.right)

    def terms(self) -> tuple[Term, ...]:
        return (Term(1, -self.left, 1, self.right),)

    @property
    def halo(self) -> tuple[int, int] | None:
        return (self.left, self.right)


@dataclass(frozen=True)
class Strided(Component):
    """Keys with ``j % stride == offset``, and ``|i - j| < span`` when span is set."""

    stride: int
    offset: int = 0
    span: int | None = None
    kind: ClassVar[str] = "strided"

    def __post_init__(self):
        _check_int("Strided.stride", self.stride, 1, ">= 1")
        _check_int("Strided.offset", self.offset, 0, f"in [0, stride={self.stride})")
        if self.offset >= self.stride:
            raise ValueError(f"Strided.offset must be in [0, stride={self.stride}), got {self.offset}")
        if self.span is not None:
            _check_int("Strided.span", self.span, 1, ">= 1 or None")

    def allows(self, i, j, h=None):
        ok = torch.remainder(j, self.stride) == self.offset
        if self.span is not None:
            ok = ok & ((i - j).abs() < self.span)
        return ok

    def terms(self) -> tuple[Term, ...]:
        if self.span is None:
            return (Term(0, 0, 0, UNBOUNDED, self.stride, self.offset),)
        return (Term(1, 1 - self.span, 1, self.span - 1, self.stride, self.offset),)

    @property
    def lattice(self) -> tuple[int, int] | None:
        return (self.offset, self.stride)


@dataclass(frozen=True)
class Global(Component):
    """Global tokens: the first ``first`` positions plus ``positions``.

    Every query may attend to the global keys; with ``queries=True`` the global
    positions also attend, as queries, to every key (symmetric global attention).
    """

    first: int = 0
    positions: tuple[int, ...] = ()
    queries: bool = True
    kind: ClassVar[str] = "global"
    shared_keys: ClassVar[bool] = True

    def __post_init__(self):
        _check_int("Global.first", self.first, 0, ">= 0")
        try:
            pos = tuple(sorted(set(int(p) for p in self.positions)))
        except TypeError:
            raise ValueError(f"Global.positions must be a sequence of integers >= 0, got {self.positions!r}")
        if pos and pos[0] < 0:
            raise ValueError(f"Global.positions must be integers >= 0, got {pos[0]}")
        if not isinstance(self.queries, bool):
            raise ValueError(f"Global.queries must be True or False, got {self.queries!r}")
        if self.first == 0 and not pos:
            raise ValueError("Global needs first > 0 or at least one entry in positions")
        object.__setattr__(self, "positions", pos)

    def positions_tensor(self, device=None) -> torch.Tensor:
        """The explicit positions, beyond ``first``, as a sorted int64 tensor."""
        return torch.tensor([p for p in self.positions if p >= self.first], dtype=torch.long, device=device)

    def is_global(self, x):
        ok = x < self.first
        for p in self.positions:
            if p >= self.first:
                ok = ok | (x == p)
        return ok

    def allows(self, i, j, h=None):
        ok = self.is_global(j)
        if self.queries:
            ok = ok | self.is_global(i)
        return ok

    def terms(self) -> tuple[Term, ...]:
        """The first-``first`` keys; the global query rows' "every key" is not a key term."""
        return (Term(0, 0, 0, self.first - 1),) if self.first else ()

    def explicit_keys(self, n: int, device=None) -> torch.Tensor | None:
        pos = self.positions_tensor(device)
        pos = pos[pos < n]
        return pos if len(pos) else None

    def global_rows(self, n: int, causal: bool) -> torch.Tensor | None:
        """The explicit positions, and the first ``first`` rows when not causal.  When causal a row
        i < first sees only keys j <= i < first, all of them global keys, so it is an ordinary row."""
        if not self.queries:
            return None
        rows = self.positions_tensor()
        if not causal and self.first:
            rows = torch.cat([torch.arange(self.first), rows])
        return rows[rows < n]

    def listed_only(self, i, j, h=None):
        pos = self.positions_tensor()
        if not len(pos):
            return None
        listed = torch.isin(j, pos.to(j.device))
        return listed & ~self.is_global(i) if self.queries else listed


def Dilated(window: int, levels: int, growth: int = 2) -> Pattern:  # noqa: N802  (named as the components are)
    """``Window(window)`` plus ``Strided(growth**k, span=window*growth**k)`` for k = 1..levels.

    A shorthand, not a component: it returns those components as a (causal) ``Pattern``, which
    joins others with ``|`` or ``Pattern((..., Dilated(...)), causal=...)`` like any pattern, and a
    pattern dict spells it ``{type: dilated, window: ..., levels: ...}``.
    """
    _check_int("Dilated.window", window, 1, ">= 1")
    _check_int("Dilated.levels", levels, 0, ">= 0")
    _check_int("Dilated.growth", growth, 2, ">= 2")
    strided = tuple(Strided(stride=growth**k, span=window * growth**k) for k in range(1, levels + 1))
    return Pattern((Window(window),) + strided)


@dataclass(frozen=True)
class RandomBlocks(Component):
    """BigBird random attention: ``per_query_block`` key blocks per query block.

    The draw for a query block depends only on (seed, query block[, head]) and
    the number of allowed blocks, so any process computes any block's choice alone.
    """

    block: int
    per_query_block: int
    seed: int = 0
    per_head: bool = False  # a constructor argument here: the field stands in for Component.per_head
    kind: ClassVar[str] = "random_blocks"
    block_based: ClassVar[bool] = True

    def __post_init__(self):
        _check_block("RandomBlocks.block", self.block)
        _check_int("RandomBlocks.per_query_block", self.per_query_block, 1, ">= 1")
        _check_int("RandomBlocks.seed", self.seed, 0, ">= 0")
        if not isinstance(self.per_head, bool):
            raise ValueError(f"RandomBlocks.per_head must be True or False, got {self.per_head!r}")

    def table(self, n: int, causal: bool, heads: int, q=None, k=None, device=None, documents=None) -> torch.Tensor:
        return blocks.random_table(self, n, causal, heads, device)


@dataclass(frozen=True)
class BlockLayout(Component):
    """An explicit block-sparse layout in compressed rows (CSR).

    ``indptr[g]`` / ``indices[g]`` hold, for layout ``g``, the sorted key blocks of
    every query block: query block ``r`` sees ``indices[g][indptr[g][r]:indptr[g][r+1]]``.
    One layout is shared by all heads; one per query head makes it per-head.
    Query blocks past the last row see no keys through this component.
    Build it with ``BlockLayout.from_rows(block, rows)``.
    """

    block: int
    indptr: tuple[tuple[int, ...], ...]
    indices: tuple[tuple[int, ...], ...]
    kind: ClassVar[str] = "block_layout"
    block_based: ClassVar[bool] = True

    def __post_init__(self):
        _check_block("BlockLayout.block", self.block)
        indptr = tuple(tuple(int(x) for x in p) for p in self.indptr)
        indices = tuple(tuple(int(x) for x in c) for c in self.indices)
        if not indptr or len(indptr) != len(indices):
            raise ValueError("BlockLayout.indptr and BlockLayout.indices must hold one entry per layout "
                             f"(got {len(indptr)} and {len(indices)})")
        for g, (p, c) in enumerate(zip(indptr, indices)):
            if not p or p[0] != 0 or p[-1] != len(c) or any(b < a for a, b in zip(p, p[1:])):
                raise ValueError(f"BlockLayout.indptr[{g}] must start at 0, never decrease and end at "
                                 f"len(indices[{g}])={len(c)}")
            for r in range(len(p) - 1):
                row = c[p[r]:p[r + 1]]
                if any(x < 0 for x in row) or any(b <= a for a, b in zip(row, row[1:])):
                    raise ValueError(f"BlockLayout.indices[{g}] row {r} must be sorted, unique key "
                                     f"blocks >= 0, got {list(row)}")
        object.__setattr__(self, "indptr", indptr)
        object.__setattr__(self, "indices", indices)

    @classmethod
    def from_rows(cls, block: int, rows: Sequence) -> "BlockLayout":
        """``rows[r]`` = key blocks of query block r, or ``rows[h][r]`` per head."""
        per_head = bool(rows) and bool(rows[0]) and not isinstance(rows[0][0], int)
        layouts = rows if per_head else [rows]
        indptr, indices = [], []
        for layout in layouts:
            ptr, idx = [0], []
            for row in layout:
                idx.extend(int(x) for x in row)
                ptr.append(len(idx))
            indptr.append(tuple(ptr))
            indices.append(tuple(idx))
        return cls(block, tuple(indptr), tuple(indices))

    @property
    def per_head(self) -> bool:
        return len(self.indptr) > 1

    def table(self, n: int, causal: bool, heads: int, q=None, k=None, device=None, documents=None) -> torch.Tensor:
        return blocks.layout_table(self, n, heads, device)


@dataclass(frozen=True)
class TopKBlocks(Component):
    """Learned selection (MoBA style), computed from q and k at run time.

    For each query block and KV head, every allowed (causal: not-later) key block
    is scored by mean-pooled q of the block (summed over the group's query heads)
    dotted with the mean-pooled k of the key block.  The query's own block is
    always kept and counts towards ``k``; the other ``k - 1`` are the best scores,
    ties going to the lower block index.  The selection is not differentiated.
    """

    block: int
    k: int
    kind: ClassVar[str] = "topk_blocks"
    data_dependent: ClassVar[bool] = True
    block_based: ClassVar[bool] = True

    def __post_init__(self):
        _check_block("TopKBlocks.block", self.block)
        _check_int("TopKBlocks.k", self.k, 1, ">= 1")

    @property
    def per_head(self) -> bool:
        return True

    def table(self, n: int, causal: bool, heads: int, q=None, k=None, device=None, documents=None) -> torch.Tensor:
        """Within ``documents`` only key blocks that share a document with the query block compete (the
        others' pairs are all masked: choosing one would spend a slot on nothing)."""
        if q is None or k is None:
            raise ValueError("TopKBlocks selects blocks from q and k: pass q and k (for example "
                             "Pattern.bind(n, heads, q=q, k=k))")
        return blocks.topk_table(self, q, k, causal, documents=documents)

    def counts_without_data(self, n: int, causal: bool) -> torch.Tensor:
        """The own block and ``k - 1`` full ones (fewer where fewer blocks are allowed); exact except
        when the sequence's last block is picked."""
        i = torch.arange(n)
        qb = i // self.block
        n_kb = math.ceil(n / self.block)
        avail = (qb + 1) if causal else torch.full_like(qb, n_kb)
        own = (i - qb * self.block + 1) if causal else n - qb * self.block
        return own.clamp(max=self.block) + (avail.clamp(max=self.k) - 1) * self.block


#: The component classes by ``kind``.
COMPONENT_TYPES: dict[str, type[Component]] = {
    cls.kind: cls for cls in (Window, Strided, Global, RandomBlocks, BlockLayout, TopKBlocks)
}
KINDS.update(COMPONENT_TYPES, dilated=Dilated)
