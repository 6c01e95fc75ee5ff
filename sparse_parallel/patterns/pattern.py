"""``Pattern``: a union of components plus a causal flag, and its bound form.

A (query i, key j, head h) pair is allowed iff (not causal or j <= i) and at
least one component allows it; each allowed pair counts once in the softmax.
``Pattern`` is immutable, hashable and serialisable.  ``Pattern.bind`` fixes the
sequence length and head count (and, for ``TopKBlocks``, the data) and gives a
``BoundPattern`` that answers ``allows`` on index tensors and lists the candidate
keys of a range of queries: what the eager reference and the planners use.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .blocks import build_table
from .components import Component, Global, component_from_dict

#: ``Pattern.mask`` refuses sequences longer than this (an n x n bool per head).
MAX_MASK_N = 8192


@dataclass(frozen=True)
class Pattern:
    components: tuple[Component, ...]
    causal: bool = True

    def __post_init__(self):
        comps = self.components
        if isinstance(comps, list):
            comps = tuple(comps)
        if isinstance(comps, (Component, Pattern)):
            comps = (comps,)
        flat: list[Component] = []
        for c in comps:
            if isinstance(c, Pattern):
                flat.extend(c.components)
            elif isinstance(c, Component):
                flat.append(c)
            else:
                raise ValueError(f"Pattern components must be pattern components, got {c!r}")
        if not flat:
            raise ValueError("Pattern needs at least one component")
        if not isinstance(self.causal, bool):
            raise ValueError(f"Pattern.causal must be True or False, got {self.causal!r}")
        object.__setattr__(self, "components", tuple(dict.fromkeys(flat)))

    def __or__(self, other) -> "Pattern":
        if isinstance(other, Pattern):
            if other.causal != self.causal:
                raise ValueError("cannot join a causal and a non-causal Pattern; set causal= on the result "
                                 "with Pattern(a | b, causal=...) or .with_causal()")
            return Pattern(self.components + other.components, self.causal)
        if isinstance(other, Component):
            return Pattern(self.components + (other,), self.causal)
        return NotImplemented

    __ror__ = __or__

    def with_causal(self, causal: bool) -> "Pattern":
        return replace(self, causal=causal)

    # -- inspection -------------------------------------------------------
    def of_type(self, cls) -> tuple:
        return tuple(c for c in self.components if isinstance(c, cls))

    @property
    def per_head(self) -> bool:
        return any(c.per_head for c in self.components)

    @property
    def data_dependent(self) -> bool:
        return any(c.data_dependent for c in self.components)

    @property
    def block_components(self) -> tuple[Component, ...]:
        return tuple(c for c in self.components if c.block_based)

    @property
    def global_queries(self) -> tuple[Global, ...]:
        return tuple(g for g in self.of_type(Global) if g.queries)

    def global_query_rows(self, n: int, device=None) -> torch.Tensor:
        """Sorted query rows of ``Global(queries=True)`` that see keys beyond the pattern's other parts.

        The explicit positions, and the first ``first`` rows when not causal.  When causal a row
        i < first sees only keys j <= i < first, all of them global keys, so it is an ordinary row.
        Kernels and sequence parallelism give these rows their own attention over every key.
        """
        parts = [torch.zeros(0, dtype=torch.long, device=device)]
        for g in self.global_queries:
            parts.append(g.positions_tensor(device))
            if not self.causal and g.first:
                parts.append(torch.arange(g.first, device=device))
        rows = torch.unique(torch.cat(parts))
        return rows[rows < n]

    def global_keys(self, n: int, device=None) -> torch.Tensor:
        """Sorted key positions of every ``Global`` component below ``n``."""
        parts = [torch.zeros(0, dtype=torch.long, device=device)]
        for g in self.of_type(Global):
            parts.append(torch.arange(min(g.first, n), device=device))
            parts.append(g.positions_tensor(device))
        keys = torch.unique(torch.cat(parts))
        return keys[keys < n]

    def draw(self, n: int, out: str, heads: int | None = None) -> None:
        """A PNG of the mask at length ``n`` (small n: it uses ``mask``), components in the title."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        mask = self.mask(n, heads=heads)[0]
        fig, ax = plt.subplots(figsize=(6, 6))
        ax.imshow(mask.numpy(), cmap="Blues", interpolation="nearest")
        ax.set_xlabel("key position j")
        ax.set_ylabel("query position i")
        ax.set_title("\n".join(repr(c) for c in self.components), fontsize=7)
        fig.tight_layout()
        fig.savefig(out, dpi=120)
        plt.close(fig)

    # -- serialisation ----------------------------------------------------
    def to_dict(self) -> dict:
        return {"causal": self.causal, "components": [c.to_dict() for c in self.components]}

    @classmethod
    def from_dict(cls, d: dict) -> "Pattern":
        if not isinstance(d, dict):
            raise ValueError(f"a pattern must be a dict with keys 'components' and 'causal', got {d!r}")
        unknown = set(d) - {"components", "causal"}
        if unknown:
            raise ValueError(f"unknown pattern key(s) {sorted(unknown)}; allowed: ['causal', 'components']")
        if "components" not in d or not isinstance(d["components"], list):
            raise ValueError("pattern.components must be a list of component dicts")
        return cls(tuple(component_from_dict(c) for c in d["components"]), d.get("causal", True))

    # -- binding ----------------------------------------------------------
    def bind(self, n: int, heads: int = 1, q=None, k=None, device=None) -> "BoundPattern":
        """Fix sequence length ``n`` and query-head count; build the block tables."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"sequence length n must be an integer >= 1, got {n!r}")
        if device is None and q is not None:
            device = q.device
        tables = tuple(build_table(c, n, self.causal, heads, q=q, k=k, device=device)
                       for c in self.block_components)
        return BoundPattern(self, n, heads, tables, device)

    def mask(self, n: int, heads: int | None = None, q=None, k=None) -> torch.Tensor:
        """Dense bool mask ``[H or 1, n, n]`` for small n (tests, plots)."""
        if n > MAX_MASK_N:
            raise ValueError(f"Pattern.mask is for n <= {MAX_MASK_N} (an n x n tensor); got n={n}. "
                             "Use Pattern.describe for long sequences.")
        if self.per_head and heads is None:
            raise ValueError("this pattern differs between heads: pass heads= to Pattern.mask")
        bound = self.bind(n, heads or 1, q=q, k=k)
        i = torch.arange(n)
        m = bound.allows(i, i)
        if m.shape[0] != 1:
            raise ValueError("Pattern.mask is per batch element for TopKBlocks with batch > 1; pass one sample")
        return m[0].expand(heads or 1, n, n).clone() if m.shape[1] == 1 else m[0]

    def describe(self, n: int, heads: int = 1, dim: int = 128, q=None, k=None) -> dict:
        """Keys per query (min/mean/max), density and useful FLOPs, without a mask."""
        from .counting import describe

        return describe(self, n, heads, dim, q=q, k=k)

    def __str__(self) -> str:
        inner = " | ".join(repr(c) for c in self.components)
        return f"Pattern({inner}, causal={self.causal})"


@dataclass(frozen=True)
class BoundPattern:
    """A pattern at a fixed length and head count, with its block tables built."""

    pattern: Pattern
    n: int
    heads: int
    tables: tuple[torch.Tensor, ...] = field(repr=False)
    device: object = None

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Allowed pairs for query positions ``i [C]`` and keys ``j [K]`` -> bool ``[Bt, Ht, C, K]``."""
        ok = torch.zeros(1, 1, len(i), len(j), dtype=torch.bool, device=i.device)
        for index in range(len(self.pattern.components)):
            ok = ok | self.component_allows(index, i, j, bounds=False)
        return ok & self._bounds(i, j)

    def component_allows(self, index: int, i: torch.Tensor, j: torch.Tensor, bounds: bool = True) -> torch.Tensor:
        """Pairs allowed by component ``index`` alone (causality included) -> ``[Bt, Ht, C, K]``."""
        comp = self.pattern.components[index]
        if comp.block_based:
            table = self.tables[self.pattern.block_components.index(comp)]
            ok = _table_allows(table, comp.block, i, j)
        else:
            ok = comp.allows(i[:, None], j[None, :])[None, None]
        return ok & self._bounds(i, j) if bounds else ok

    def owned_by(self, components, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Allowed pairs whose first allowing component (in pattern order) is in ``components``.

        Splitting the components of a pattern over several key sets this way counts
        every allowed pair exactly once, however many components allow it.
        """
        seen = torch.zeros(1, 1, len(i), len(j), dtype=torch.bool, device=i.device)
        ok = seen
        for index in range(len(self.pattern.components)):
            a = self.component_allows(index, i, j, bounds=False)
            if index in components:
                ok = ok | (a & ~seen)
            seen = seen | a
        return ok & self._bounds(i, j)

    def _bounds(self, i, j):
        ii, jj = i[:, None], j[None, :]
        ok = (jj < self.n) & (jj >= 0)
        return ok & (jj <= ii) if self.pattern.causal else ok

    def candidates(self, start: int, end: int) -> torch.Tensor:
        """Sorted key positions that queries in ``[start, end)`` may see (a superset)."""
        n, dev = self.n, self.device
        hi_causal = end if self.pattern.causal else n
        if any(g.is_global(torch.arange(start, end)).any() for g in self.pattern.global_queries):
            return torch.arange(0, hi_causal, device=dev)
        parts = []
        for c in self.pattern.components:
            parts += [term.keys(start, end, hi_causal, dev) for term in c.terms()]
            keys = c.explicit_keys(hi_causal, dev)
            if keys is not None:
                parts.append(keys)
        for comp, table in zip(self.pattern.block_components, self.tables):
            qb = torch.arange(start // comp.block, (end - 1) // comp.block + 1, device=table.device)
            kb = table[:, :, qb].unique()
            kb = kb[kb >= 0].to(dev)
            keys = (kb[:, None] * comp.block + torch.arange(comp.block, device=dev)).flatten()
            parts.append(keys[keys < hi_causal])
        if not parts:
            return torch.zeros(0, dtype=torch.long, device=dev)
        return torch.cat(parts).unique()


def _table_allows(table: torch.Tensor, block: int, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Membership of key blocks of ``j`` in the rows of the query blocks of ``i``."""
    qb, kb = i // block, j // block
    q0 = int(qb.min())
    rows = table[:, :, q0:int(qb.max()) + 1].to(i.device)  # [Bt, Ht, nq, w]
    member = (rows[..., None] == kb).any(dim=-2)  # [Bt, Ht, nq, K]
    return member[:, :, qb - q0]


def as_pattern(p) -> Pattern:
    if isinstance(p, Pattern):
        return p
    if isinstance(p, Component):
        return Pattern((p,))
    if isinstance(p, dict):
        return Pattern.from_dict(p)
    raise ValueError(f"expected a Pattern, a component or a pattern dict, got {type(p).__name__}")

