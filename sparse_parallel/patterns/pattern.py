"""The pattern language's core: what a component is (``Term``, ``Component``) and their union, ``Pattern``.

A (query i, key j, head h) pair is allowed iff (not causal or j <= i) and at
least one component allows it -- and, for a pattern ``within`` documents, i and j
lie in the same document of their batch element; each allowed pair counts once
in the softmax.  ``Pattern`` is immutable, hashable and serialisable.  ``Pattern.bind`` fixes the
sequence length and head count (and, for ``TopKBlocks``, the data) and compiles
it into a ``BoundPattern`` (``bound.py``): what the eager reference, the kernel
planner and the sequence-parallel plans read.

The concrete components live in ``components.py``; this module holds only the
interface they implement, so that ``Component | Component`` can build a
``Pattern`` without either module importing the other.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, replace
from typing import Callable, ClassVar

import torch

from .bound import BoundPattern
from .counting import describe
from .documents import Documents

#: ``Pattern.mask`` refuses sequences longer than this (an n x n bool per head).
MAX_MASK_N = 8192
#: An upper key bound that no position reaches ("no bound"); positions stay below it.
UNBOUNDED = 1 << 30


@dataclass(frozen=True)
class Term:
    """Keys ``j`` with ``lo_rel*i + lo_c <= j <= hi_rel*i + hi_c`` and ``j = r (mod m)`` of query ``i``.

    The key geometry of a structured component, read by counting, candidates, the kernel planner
    and the sequence-parallel plans alike; ``lo_rel`` and ``hi_rel`` are 0 or 1.
    """

    lo_rel: int
    lo_c: int
    hi_rel: int
    hi_c: int
    m: int = 1
    r: int = 0

    @property
    def row(self) -> tuple[int, int, int, int, int, int]:
        return (self.lo_rel, self.lo_c, self.hi_rel, self.hi_c, self.m, self.r)

    def bounds(self, i):
        """Unclamped (lo, hi) key bounds at query positions ``i`` (ints or tensors)."""
        return self.lo_rel * i + self.lo_c, self.hi_rel * i + self.hi_c

    def key_range(self, start: int, end: int, top: int, floor: int = 0) -> tuple[int, int]:
        """(first, stop): the keys in ``[floor, top)`` that some query in ``[start, end)`` may see are
        ``range(first, stop, m)`` (empty when stop <= first)."""
        lo = max(floor, self.lo_rel * start + self.lo_c)
        stop = min(top, self.hi_rel * (end - 1) + self.hi_c + 1)
        return lo + (self.r - lo) % self.m, stop

    def keys(self, start: int, end: int, top: int, device=None, floor: int = 0) -> torch.Tensor:
        """Sorted key positions in ``[floor, top)`` that some query in ``[start, end)`` may see."""
        first, stop = self.key_range(start, end, top, floor)
        return torch.arange(first, max(first, stop), self.m, device=device)


class Component:
    """Base of all pattern components; subclasses are frozen dataclasses.

    A component answers ``allows(i, j, h)`` and describes its own key geometry, which is all
    that counting, candidates, the kernel planner and the sequence-parallel plans read:
    ``terms`` (affine key ranges), ``explicit_keys`` (keys listed one by one), ``global_rows``
    (query rows that see every key), ``lattice`` / ``halo`` (how sequence parallelism fetches
    its keys) and, for block-list components, ``table``.  The defaults say "none".
    """

    kind: ClassVar[str]
    #: True when ``allows`` needs a block table (see ``table``).
    block_based: ClassVar[bool] = False
    #: True when its keys are the same for every query (gathered once by every rank: global keys).
    shared_keys: ClassVar[bool] = False
    #: True when its keys depend on the data (q and k), so no plan can know them in advance.
    data_dependent: ClassVar[bool] = False

    @property
    def per_head(self) -> bool:
        """True when the component differs between query heads."""
        return False

    def allows(self, i, j, h=None):
        """Whether query positions ``i`` may see key positions ``j`` (broadcasting index tensors)."""
        raise NotImplementedError(f"{type(self).__name__} is a block-list component: its pairs come from its "
                                  "table (BoundPattern.component_allows)")

    def to_dict(self) -> dict:
        out = {"type": self.kind}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            name = f.name
            value = getattr(self, name)
            out[name] = [list(v) for v in value] if name in ("indptr", "indices") else (
                list(value) if isinstance(value, tuple) else value)
        return out

    def __or__(self, other):
        return Pattern((self,)) | other

    def within(self, documents) -> "Pattern":
        """This component alone as a pattern restricted to ``documents`` (``Pattern.within``)."""
        return Pattern((self,)).within(documents)

    def terms(self) -> tuple[Term, ...]:
        """The component's keys as affine terms (empty for block-list components)."""
        return ()

    def explicit_keys(self, n: int, device=None) -> torch.Tensor | None:
        """Key positions listed one by one (below ``n``), beyond what ``terms`` covers; None if none."""
        return None

    def global_rows(self, n: int, causal: bool) -> torch.Tensor | None:
        """Sorted query rows below ``n`` that see every key through this component, beyond what its
        terms give them; None when it has no such rows at any length."""
        return None

    def listed_only(self, i, j, h=None):
        """The pairs it allows only through ``explicit_keys`` (a key space with ``listed=False``
        leaves them to another); None when there are none."""
        return None

    def table(self, n: int, causal: bool, heads: int, q=None, k=None, device=None,
              documents=None) -> torch.Tensor:
        """The block table ``[Bt, Ht, n_query_blocks, width]`` of a block-list component (``blocks.py``);
        ``documents``: those of the pattern the component is bound in (None: no documents)."""
        raise TypeError(f"{type(self).__name__} is not a block-list component")

    def counts_without_data(self, n: int, causal: bool) -> torch.Tensor:
        """Keys per query ``[n]`` of a data-dependent component, counted without the data."""
        raise NotImplementedError(f"{type(self).__name__} cannot be counted without q and k")

    @property
    def lattice(self) -> tuple[int, int] | None:
        """(offset, stride) when its keys are a lattice read through ``K[offset::stride]``; else None."""
        return None

    @property
    def halo(self) -> tuple[int, int] | None:
        """(left, right) when its keys are those within that distance of the query; else None."""
        return None


#: What a pattern dict's ``type`` names: a component class, or a shorthand (a function of the same
#: keys returning a ``Pattern`` of several components, such as ``Dilated``).  ``components.py``
#: registers every type it defines.
KINDS: dict[str, Callable] = {}


def component_from_dict(d: dict) -> Component | Pattern:
    """The component (or, for a shorthand, the components as a ``Pattern``) that a dict describes."""
    if not isinstance(d, dict) or "type" not in d:
        raise ValueError(f"a component must be a dict with a 'type' key, one of {sorted(KINDS)}; got {d!r}")
    kind = d["type"]
    if kind not in KINDS:
        raise ValueError(f"unknown component type {kind!r}; allowed: {sorted(KINDS)}")
    make = KINDS[kind]
    keys = set(inspect.signature(make).parameters)
    unknown = set(d) - keys - {"type"}
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} for component {kind!r}; allowed: {sorted(keys)}")
    kwargs = {k: v for k, v in d.items() if k != "type"}
    for key in ("positions", "indptr", "indices"):
        if key in kwargs and isinstance(kwargs[key], list):
            kwargs[key] = tuple(tuple(x) if isinstance(x, list) else x for x in kwargs[key])
    try:
        return make(**kwargs)
    except TypeError as e:
        raise ValueError(f"component {kind!r}: {e}") from None


def _same_documents(a: Documents | None, b: Documents | None) -> Documents | None:
    """The documents of a union: a pattern is restricted to its documents as a whole, so joining
    a pattern within documents and one without restricts the union; two different ones conflict."""
    if a is not None and b is not None and a != b:
        raise ValueError("cannot join patterns within different documents; join them first, then call "
                         ".within(documents) on the result")
    return a if a is not None else b


@dataclass(frozen=True)
class Pattern:
    """A union of components, causal or not, optionally restricted to packed ``documents``."""

    components: tuple[Component, ...]
    causal: bool = True
    #: With documents, a pair is allowed only inside one document of its batch element (``within``).
    documents: Documents | None = None

    def __post_init__(self):
        comps = self.components
        if isinstance(comps, list):
            comps = tuple(comps)
        if isinstance(comps, (Component, Pattern)):
            comps = (comps,)
        if self.documents is not None and not isinstance(self.documents, Documents):
            raise ValueError(f"Pattern.documents must be a Documents or None, got {type(self.documents).__name__}"
                             " (build one with Documents.from_lengths or Documents.from_offsets)")
        docs = self.documents
        flat: list[Component] = []
        for c in comps:
            if isinstance(c, Pattern):
                flat.extend(c.components)
                docs = _same_documents(docs, c.documents)
            elif isinstance(c, Component):
                flat.append(c)
            else:
                raise ValueError(f"Pattern components must be pattern components, got {c!r}")
        if not flat:
            raise ValueError("Pattern needs at least one component")
        if not isinstance(self.causal, bool):
            raise ValueError(f"Pattern.causal must be True or False, got {self.causal!r}")
        object.__setattr__(self, "components", tuple(dict.fromkeys(flat)))
        object.__setattr__(self, "documents", docs)

    def __or__(self, other) -> "Pattern":
        if isinstance(other, Pattern):
            if other.causal != self.causal:
                raise ValueError("cannot join a causal and a non-causal Pattern; set causal= on the result "
                                 "with Pattern(a | b, causal=...) or .with_causal()")
            return Pattern(self.components + other.components, self.causal,
                           _same_documents(self.documents, other.documents))
        if isinstance(other, Component):
            return Pattern(self.components + (other,), self.causal, self.documents)
        return NotImplemented

    __ror__ = __or__

    def with_causal(self, causal: bool) -> "Pattern":
        return replace(self, causal=causal)

    def within(self, documents: Documents | None) -> "Pattern":
        """The same pattern restricted to ``documents``: a pair (i, j) of batch element b is allowed iff the
        pattern allows it and i, j lie in one document of b (None: no restriction)."""
        if documents is not None and not isinstance(documents, Documents):
            raise ValueError(f"Pattern.within takes a Documents or None, got {type(documents).__name__} "
                             "(build one with Documents.from_lengths or Documents.from_offsets)")
        return replace(self, documents=documents)

    @property
    def plain(self) -> "Pattern":
        """The pattern without documents: its structure, which plans keyed by the pattern depend on."""
        return self if self.documents is None else replace(self, documents=None)

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
        out = {"causal": self.causal, "components": [c.to_dict() for c in self.components]}
        if self.documents is not None:
            out["documents"] = [list(row) for row in self.documents.offsets]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Pattern":
        if not isinstance(d, dict):
            raise ValueError(f"a pattern must be a dict with keys 'components' and 'causal', got {d!r}")
        unknown = set(d) - {"components", "causal", "documents"}
        if unknown:
            raise ValueError(f"unknown pattern key(s) {sorted(unknown)}; allowed: ['causal', 'components', "
                             "'documents']")
        if "components" not in d or not isinstance(d["components"], list):
            raise ValueError("pattern.components must be a list of component dicts")
        docs = d.get("documents")
        return cls(tuple(component_from_dict(c) for c in d["components"]), d.get("causal", True),
                   None if docs is None else Documents.from_offsets(docs))

    # -- binding ----------------------------------------------------------
    def bind(self, n: int, heads: int = 1, q=None, k=None, device=None) -> BoundPattern:
        """Fix sequence length ``n`` and query-head count: build the block tables and compile the rest
        (the documents are checked against ``n``)."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"sequence length n must be an integer >= 1, got {n!r}")
        if self.documents is not None:
            self.documents.validate(n, None if q is None else q.shape[0])
        if device is None and q is not None:
            device = q.device
        tables = tuple(c.table(n, self.causal, heads, q=q, k=k, device=device, documents=self.documents)
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
            raise ValueError("Pattern.mask is per batch element for TopKBlocks or documents with batch > 1; "
                             "pass one sample (for documents: one row of offsets)")
        return m[0].expand(heads or 1, n, n).clone() if m.shape[1] == 1 else m[0]

    def describe(self, n: int, heads: int = 1, dim: int = 128, q=None, k=None) -> dict:
        """Keys per query (min/mean/max), density and useful FLOPs, without a mask; pairs and FLOPs are
        summed over the batch's sequences (one, unless the documents or TopKBlocks' data have more)."""
        return describe(self, n, heads, dim, q=q, k=k)

    def __str__(self) -> str:
        inner = " | ".join(repr(c) for c in self.components)
        docs = "" if self.documents is None else f", within={self.documents}"
        return f"Pattern({inner}, causal={self.causal}{docs})"


def as_pattern(p) -> Pattern:
    if isinstance(p, Pattern):
        return p
    if isinstance(p, Component):
        return Pattern((p,))
    if isinstance(p, dict):
        return Pattern.from_dict(p)
    raise ValueError(f"expected a Pattern, a component or a pattern dict, got {type(p).__name__}")
