"""``BoundPattern``: a pattern compiled for one sequence length and head count.

``Pattern.bind`` builds it once; candidates, counting, the kernel planner, the
sequence-parallel rank plans and the whole-sequence split (``spaces.py``) read
it rather than the components.  Besides the block tables it holds, computed
once on the host, each component's listed keys, the global query rows and the
global keys (the keys of components that every query shares).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def _union(parts) -> torch.Tensor:
    parts = [p for p in parts if p is not None]
    return torch.unique(torch.cat(parts)) if parts else torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True)
class BoundPattern:
    """A pattern at a fixed length and head count, with its block tables built.

    ``explicit_keys[c]``: the keys component ``c`` lists one by one (None if none);
    ``component_rows[c]``: its global query rows (None if it has none at any length);
    ``global_rows``: their union, the rows that see every key; ``global_keys``: the keys of every
    component with ``shared_keys``.  All sorted int64 on the host; the tables are on ``device``.
    ``doc_start`` / ``doc_end``: int32 ``[Bd, n]`` on ``device``, the bounds of each position's document
    (None without documents); a global query row sees every key of its document only.
    """

    pattern: object  # a Pattern (pattern.py imports this module, not the other way round)
    n: int
    heads: int
    tables: tuple[torch.Tensor, ...] = field(repr=False)
    device: object = None
    explicit_keys: tuple = field(init=False, repr=False, compare=False)
    component_rows: tuple = field(init=False, repr=False, compare=False)
    global_rows: torch.Tensor = field(init=False, repr=False, compare=False)
    global_keys: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        n, comps = self.n, self.pattern.components
        if self.documents is not None:
            self.documents.validate(n)
        explicit = tuple(c.explicit_keys(n) for c in comps)
        rows = tuple(c.global_rows(n, self.pattern.causal) for c in comps)
        shared = []
        for c, keys in zip(comps, explicit):
            if c.shared_keys:
                shared += [t.keys(0, n, n) for t in c.terms()] + [keys]
        object.__setattr__(self, "explicit_keys", explicit)
        object.__setattr__(self, "component_rows", rows)
        object.__setattr__(self, "global_rows", _union(rows))
        object.__setattr__(self, "global_keys", _union(shared))

    @property
    def documents(self):
        """The pattern's ``Documents`` (None: the whole sequence is one document)."""
        return self.pattern.documents

    @property
    def doc_start(self) -> torch.Tensor | None:
        # Made on first use (``Documents.bounds`` keeps them): the rank plans read only the offsets.
        return self.documents.bounds(self.n, self.device)[0] if self.documents is not None else None

    @property
    def doc_end(self) -> torch.Tensor | None:
        return self.documents.bounds(self.n, self.device)[1] if self.documents is not None else None

    def check_batch(self, batch: int) -> None:
        """Raise ValueError unless the documents (if any) fit a batch of ``batch`` sequences."""
        if self.documents is not None:
            self.documents.validate(self.n, batch)

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Allowed pairs for query positions ``i [C]`` and keys ``j [K]`` -> bool ``[Bt, Ht, C, K]``
        (``Bt`` the batch size when the tables or the documents differ between batch elements)."""
        ok = torch.zeros(1, 1, len(i), len(j), dtype=torch.bool, device=i.device)
        for index in range(len(self.pattern.components)):
            ok = ok | self.component_allows(index, i, j, bounds=False)
        return ok & self._bounds(i, j)

    def component_allows(self, index: int, i: torch.Tensor, j: torch.Tensor, bounds: bool = True,
                         listed: bool = True) -> torch.Tensor:
        """Pairs allowed by component ``index`` alone (causality included) -> ``[Bt, Ht, C, K]``;
        ``listed=False`` leaves out those it allows only through its listed keys."""
        comp = self.pattern.components[index]
        if comp.block_based:
            table = self.tables[self.pattern.block_components.index(comp)]
            ok = _table_allows(table, comp.block, i, j)
        else:
            ii, jj = i[:, None], j[None, :]
            ok = comp.allows(ii, jj)
            only = None if listed else comp.listed_only(ii, jj)
            ok = (ok if only is None else ok & ~only)[None, None]
        return ok & self._bounds(i, j) if bounds else ok

    def owned_by(self, components, i: torch.Tensor, j: torch.Tensor, listed: bool = True) -> torch.Tensor:
        """Allowed pairs whose first allowing component (in pattern order) is in ``components``.

        Splitting the components of a pattern over several key sets this way counts
        every allowed pair exactly once, however many components allow it.  ``listed=False``:
        not the pairs their owner allows only through its listed keys (``spaces.KeySpace.listed``).
        """
        seen = torch.zeros(1, 1, len(i), len(j), dtype=torch.bool, device=i.device)
        ok = seen
        for index in range(len(self.pattern.components)):
            a = self.component_allows(index, i, j, bounds=False)
            if index in components:
                mine = a if listed else self.component_allows(index, i, j, bounds=False, listed=False)
                ok = ok | (mine & ~seen)
            seen = seen | a
        return ok & self._bounds(i, j)

    def _bounds(self, i, j):
        """Keys in the sequence, not later when causal, in the query's document -> ``[C, K]`` or
        ``[Bd, 1, C, K]`` with documents."""
        ii, jj = i[:, None], j[None, :]
        ok = (jj < self.n) & (jj >= 0)
        if self.pattern.causal:
            ok = ok & (jj <= ii)
        if self.doc_start is None:
            return ok
        start = self.doc_start.to(i.device)[:, i][:, None, :, None]  # [Bd, 1, C, 1]
        end = self.doc_end.to(i.device)[:, i][:, None, :, None]
        return ok & (jj >= start) & (jj < end)

    def key_reach(self, start: int, end: int) -> tuple[int, int]:
        """[first, stop): the keys that queries in ``[start, end)`` may see lie in this range: the whole
        sequence (causal: up to ``end``), cut to the documents of those queries."""
        first, stop = 0, end if self.pattern.causal else self.n
        if self.documents is not None:
            lo, hi = self.documents.reach(start, end)
            first, stop = lo, min(stop, hi)
        return first, stop

    def candidates(self, start: int, end: int) -> torch.Tensor:
        """Sorted key positions that queries in ``[start, end)`` may see (a superset)."""
        dev = self.device
        first, stop = self.key_reach(start, end)
        rows = self.global_rows
        if len(rows) and bool(((rows >= start) & (rows < end)).any()):
            return torch.arange(first, stop, device=dev)
        parts = []
        for c, keys in zip(self.pattern.components, self.explicit_keys):
            parts += [term.keys(start, end, stop, dev, floor=first) for term in c.terms()]
            if keys is not None:
                parts.append(keys[(keys >= first) & (keys < stop)].to(dev))
        for comp, table in zip(self.pattern.block_components, self.tables):
            qb = torch.arange(start // comp.block, (end - 1) // comp.block + 1, device=table.device)
            kb = table[:, :, qb].unique()
            kb = kb[kb >= 0].to(dev)
            keys = (kb[:, None] * comp.block + torch.arange(comp.block, device=dev)).flatten()
            parts.append(keys[(keys >= first) & (keys < stop)])
        if not parts:
            return torch.zeros(0, dtype=torch.long, device=dev)
        return torch.cat(parts).unique()

    def merged_table(self):
        """All block tables as one, at the finest block size -> (table ``[Bt, Ht, nqb, w]``, block);
        (None, None) without block-list components."""
        comps = self.pattern.block_components
        if not comps:
            return None, None
        if len(comps) == 1:
            return self.tables[0], comps[0].block
        block = min(c.block for c in comps)
        n_qb = math.ceil(self.n / block)
        parts = []
        for comp, table in zip(comps, self.tables):
            f = comp.block // block
            rows = table[:, :, torch.arange(n_qb) // f]  # each fine query block takes its coarse row
            fine = rows[..., None] * f + torch.arange(f, device=rows.device)  # coarse key block -> f fine ones
            fine = torch.where(rows[..., None] < 0, -1, fine).flatten(-2)
            parts.append(fine)
        bt = max(p.shape[0] for p in parts)
        ht = max(p.shape[1] for p in parts)
        cat = torch.cat([p.expand(bt, ht, -1, -1) for p in parts], dim=-1)
        big = torch.iinfo(torch.int64).max
        s, _ = torch.sort(torch.where(cat < 0, big, cat), dim=-1)
        dup = torch.zeros_like(s, dtype=torch.bool)
        dup[..., 1:] = s[..., 1:] == s[..., :-1]
        s = torch.where(dup | (s == big), -1, s)
        return s, block


def _table_allows(table: torch.Tensor, block: int, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Membership of key blocks of ``j`` in the rows of the query blocks of ``i``."""
    qb, kb = i // block, j // block
    q0 = int(qb.min())
    rows = table[:, :, q0:int(qb.max()) + 1].to(i.device)  # [Bt, Ht, nq, w]
    member = (rows[..., None] == kb).any(dim=-2)  # [Bt, Ht, nq, K]
    return member[:, :, qb - q0]
