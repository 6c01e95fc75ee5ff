"""``Documents``: where the packed documents of each sequence of a batch begin and end.

Training packs documents of many lengths into one long sequence.  A pattern
restricted to them (``Pattern.within``) allows a pair (i, j) of batch element b
iff the pattern allows it and i and j lie in the same document of b.  The
boundaries are ``cu_seqlens``-style offsets per batch element, as flash-attn and
TransformerEngine take them: row b is ``0 = o_0 < o_1 < ... < o_k = n`` and
document t holds the positions ``[o_t, o_{t+1})``.  A single row applies to every
batch element.

The value is small (one int per document), immutable and hashable, so it
travels inside a ``Pattern``; everything per position (``bounds``) is computed
from it on demand, in O(B * n).
"""
from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass, field
from typing import Sequence

import torch


def _rows(value, what: str) -> tuple[tuple[int, ...], ...]:
    """Nested sequences (or a 1-D/2-D int tensor) -> a tuple of int tuples; one flat row is one row."""
    if isinstance(value, torch.Tensor):
        if value.dim() not in (1, 2) or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise ValueError(f"Documents.{what} must be an integer tensor [B, k] or [k], got "
                             f"{value.dtype} of shape {tuple(value.shape)}")
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"Documents.{what} must be a non-empty sequence of rows (one per batch element) "
                         f"of integers, got {value!r}")
    if all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        value = [value]
    rows = []
    for b, row in enumerate(value):
        if isinstance(row, torch.Tensor):
            row = row.tolist()
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in row):
            raise ValueError(f"Documents.{what}[{b}] must be a sequence of integers, got {row!r}")
        rows.append(tuple(row))
    return tuple(rows)


@dataclass(frozen=True)
class Documents:
    """Document boundaries per batch element: ``offsets[b] = (0, o_1, ..., n)``, strictly increasing.

    Build it with ``from_lengths`` or ``from_offsets``; 1-token documents are allowed.
    """

    offsets: tuple[tuple[int, ...], ...]
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        rows = _rows(self.offsets, "offsets")
        for b, row in enumerate(rows):
            if len(row) < 2 or row[0] != 0:
                raise ValueError(f"Documents.offsets[{b}] must start at 0 and end at the sequence length, "
                                 f"with at least one document; got {list(row)[:8]}")
            bad = next((t for t in range(1, len(row)) if row[t] <= row[t - 1]), None)
            if bad is not None:
                raise ValueError(f"Documents.offsets[{b}] must be strictly increasing (documents of >= 1 token); "
                                 f"got {row[bad - 1]} then {row[bad]} at index {bad}")
        ends = {row[-1] for row in rows}
        if len(ends) > 1:
            raise ValueError(f"Documents.offsets rows must all end at the same sequence length; got ends "
                             f"{sorted(ends)}")
        object.__setattr__(self, "offsets", rows)
        object.__setattr__(self, "_hash", hash(rows))

    def __hash__(self) -> int:  # cached: a pattern holding documents is a plan-cache key
        return self._hash

    @classmethod
    def from_offsets(cls, offsets) -> "Documents":
        """From rows of offsets ``[[0, o_1, ..., n], ...]`` (one per batch element) or a ``[B, k+1]`` tensor."""
        return cls(_rows(offsets, "offsets"))

    @classmethod
    def from_lengths(cls, lengths) -> "Documents":
        """From document lengths per batch element, ``[[l_0, l_1, ...], ...]`` (each >= 1, summing to n)."""
        rows = []
        for b, row in enumerate(_rows(lengths, "lengths")):
            if not row or any(x < 1 for x in row):
                raise ValueError(f"Documents.lengths[{b}] must be integers >= 1 (one per document), got "
                                 f"{list(row)[:8]}")
            out = [0]
            for x in row:
                out.append(out[-1] + x)
            rows.append(tuple(out))
        return cls(tuple(rows))

    @property
    def batch(self) -> int:
        """Rows: the batch size, or 1 for boundaries shared by every batch element."""
        return len(self.offsets)

    @property
    def n(self) -> int:
        """The sequence length the boundaries cover."""
        return self.offsets[0][-1]

    def validate(self, n: int, batch: int | None = None) -> None:
        """Raise ValueError unless the boundaries cover ``n`` tokens and fit a batch of ``batch``."""
        if self.n != n:
            raise ValueError(f"Documents.offsets end at {self.n}, but the sequence has n={n} tokens: the last "
                             f"offset of every row must be n")
        if batch is not None and self.batch not in (1, batch):
            raise ValueError(f"Documents.offsets has {self.batch} rows for a batch of {batch}: give one row per "
                             "batch element, or one row for all of them")

    def bounds(self, n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(start, end): int32 ``[B, n]``, the first and one past the last position of each position's
        document; made once per (documents, n, device): every layer of a step asks for the same."""
        return _bounds(self, n, str(torch.device(device)) if device is not None else "cpu")

    def _make_bounds(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        self.validate(n)
        starts, ends = [], []
        for row in self.offsets:
            o = torch.tensor(row, dtype=torch.int32)
            lengths = o[1:] - o[:-1]
            starts.append(torch.repeat_interleave(o[:-1], lengths))
            ends.append(torch.repeat_interleave(o[1:], lengths))
        return (torch.stack(starts).to(device).contiguous(), torch.stack(ends).to(device).contiguous())

    def reach(self, start: int, end: int) -> tuple[int, int]:
        """[first, stop): the keys a query in ``[start, end)`` may see under the same-document rule, over
        every batch element -- from the smallest start of position ``start``'s documents to the largest
        end of position ``end - 1``'s."""
        first = min(row[bisect.bisect_right(row, start) - 1] for row in self.offsets)
        stop = max(row[bisect.bisect_right(row, end - 1)] for row in self.offsets)
        return first, stop

    def __str__(self) -> str:
        docs = [len(row) - 1 for row in self.offsets]
        return f"Documents(batch={self.batch}, n={self.n}, documents per row={docs})"


@functools.lru_cache(maxsize=4)
def _bounds(documents: Documents, n: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return documents._make_bounds(n, device)
