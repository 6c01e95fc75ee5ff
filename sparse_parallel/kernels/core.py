"""Launchers of the kernels: passes over key spaces -> (out, lse) and their gradients.

``Problem`` holds everything that does not change between forward and backward:
the queries' positions, the key spaces, the terms and the passes.  ``forward``
fuses up to ``MAX_SLOTS`` passes per launch (more are merged by log-sum-exp);
``backward`` runs the dq kernel over the same passes and one dk/dv launch per
pass, accumulating into float32 gradient buffers in a fixed order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from ..spaces import merge_partials
from . import plan as P

#: passes one query-major launch fuses (the kernel has six slots' extent arguments); more are merged.
MAX_SLOTS = 6
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class Config:
    """Tile sizes and backward scheduling of the kernels.

    Forward tiles are ``bm x bn``, dk/dv tiles ``bm_kv x bn_kv`` and the tiles of the
    query-major dq kernel ``bm_dq x bn_dq``.  The CUDA defaults are the fastest candidates measured by
    ``benchmarks/kernel_variants.py`` on an H200 (bf16, D=128, 256k tokens; benchmarks/RESULTS.md).
    """

    bm: int = 128
    bn: int = 64
    #: forward key tile of a problem with a single pass (0: ``bn``): its runs of unmasked tiles are
    #: long, where a wider tile pays; several passes mean short runs and more boundary tiles.
    bn_single: int = 0
    bm_kv: int = 64
    bn_kv: int = 128
    warps: int = 8
    stages: int = 3
    warps_kv: int = 8
    stages_kv: int = 2
    bm_dq: int = 64
    bn_dq: int = 64
    warps_dq: int = 4
    stages_dq: int = 3
    #: dk/dv of range passes: every key tile's query range is split into chunks of at most
    #: total/(sms*kv_waves) iterations (GQA heads counted), so that a few long key tiles (global
    #: keys, the first tiles of a strided level, a GQA group looping over its heads) do not leave
    #: the GPU idle behind them.
    kv_waves: int = 4
    #: smallest chunk of a split (iterations); ``sms`` = 0: the device's multiprocessor count.
    kv_min_chunk: int = 64
    sms: int = 0
    #: most bytes of float32 dk/dv partials a split may allocate.
    kv_split_bytes: int = 1 << 30

    def replace(self, **changes) -> "Config":
        return replace(self, **changes)


#: Defaults per device type; pass a Config to the entry points to use another.
_DEFAULTS = {"cuda": Config(bm=128, bn=64, bn_single=128, warps=8, stages=3, bm_kv=32, bn_kv=64, warps_kv=4,
                            stages_kv=3, bm_dq=128, bn_dq=64, warps_dq=8, stages_dq=3),
             "cpu": Config(bm=16, bn=16, bm_kv=16, bn_kv=16, warps=1, stages=1, warps_kv=1, stages_kv=1,
                           bm_dq=16, bn_dq=16, warps_dq=1, stages_dq=1, kv_min_chunk=1, sms=1)}


def default_config(device) -> Config:
    """The tile configuration used when none is given, for ``device`` (a torch.device or string)."""
    return _DEFAULTS["cuda" if torch.device(device).type == "cuda" else "cpu"]


def multiprocessors(cfg: Config, device) -> int:
    """``cfg.sms``, or the multiprocessor count read from the device."""
    if cfg.sms:
        return cfg.sms
    device = torch.device(device)
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


@dataclass
class Space:
    """A key space in kernel form: k, v ``[B, Nk, Hkv, D]`` (last dim contiguous)."""

    k: torch.Tensor
    v: torch.Tensor
    pos0: int = 0
    kstr: int = 1
    positions: torch.Tensor | None = None  # int64 sorted, on the device
    member: torch.Tensor | None = None  # int8 per key: an explicit global key of a served Global

    @property
    def nk(self) -> int:
        return self.k.shape[1]


@dataclass
class Pass:
    space: int
    mode: P.PassKind
    served: list  # structured term indices
    member: bool = False


class GradBuffers:
    """float32 dk/dv of one k/v input pair, shared by every key space that views it.

    The first dk/dv launch into them either writes every row (no zeroing needed) or finds
    them zeroed; later launches accumulate.
    """

    def __init__(self, dk: torch.Tensor, dv: torch.Tensor):
        self.dk, self.dv, self.written = dk, dv, False

    def before_launch(self, writes_all_rows: bool) -> bool:
        """Whether the next launch must accumulate (zeroing the buffers first where needed)."""
        if self.written:
            return True
        self.written = True
        if writes_all_rows:
            return False
        self.dk.zero_()
        self.dv.zero_()
        return True

    def rows(self, offset: int = 0, stride: int = 1) -> "SpaceGrad":
        """The gradients of a key space holding rows ``offset::stride`` of these buffers."""
        return SpaceGrad(self.dk[:, offset::stride], self.dv[:, offset::stride], self)

    def finish(self):
        """Gradients of keys no pass saw are zero."""
        if not self.written:
            self.dk.zero_()
            self.dv.zero_()
            self.written = True


@dataclass
class SpaceGrad:
    """Where the dk/dv of one key space go: views (rows of the space) into ``buffers``."""

    dk: torch.Tensor
    dv: torch.Tensor
    buffers: GradBuffers


@dataclass
class Problem:
    terms: P.Terms
    spaces: list
    passes: list
    q_pos: torch.Tensor | None  # int64 [Nq] on the device; None when contiguous (q_pos0 .. q_pos0 + nq)
    q_pos0: int | None  # set when the positions are contiguous
    split: int = 1
    cache: dict = field(default_factory=dict)
    nq: int = -1
    #: documents: int32 ``[B, N]`` start and end (exclusive) of the document holding each position
    #: (positions as in ``terms.n``); a pair is kept only inside one document.  None: no documents.
    doc_start: torch.Tensor | None = None
    doc_end: torch.Tensor | None = None

    def __post_init__(self):
        if self.q_pos is not None:
            self.nq = len(self.q_pos)
        if self.nq < 0:
            raise ValueError("Problem needs q_pos or nq")

    @property
    def has_block(self) -> bool:
        return self.terms.table is not None

    def served_bits(self, ps: Pass) -> int:
        bits = 0
        for t in ps.served:
            bits |= 1 << t
        return bits


def _dummy(device, dtype=torch.int32):
    return torch.zeros(1, dtype=dtype, device=device)


def _doc_args(prob: Problem, device) -> list:
    """DS, DE, batch stride of the document bounds (dummies without documents)."""
    if prob.doc_start is None:
        d = _dummy(device)
        return [d, d, 0]
    ds, de = prob.doc_start, prob.doc_end
    if ds.dtype != torch.int32 or de.dtype != torch.int32 or not (ds.is_contiguous() and de.is_contiguous()):
        raise ValueError("document bounds must be contiguous int32 [B, N]")
    return [ds, de, ds.stride(0) if ds.shape[0] > 1 else 0]


def _block_args(prob: Problem, device):
    t = prob.terms
    if t.table is None:
        d = _dummy(device)
        return d, 0, 0, 0, 0, 1
    key = "tbl"
    if key not in prob.cache:
        prob.cache[key] = t.table.to(torch.int32).contiguous()
    tbl = prob.cache[key]
    bt, ht, nqb, w = tbl.shape
    return tbl, (ht * nqb * w if bt > 1 else 0), (nqb * w if ht > 1 else 0), w, w, t.block


def _qpos32(prob: Problem):
    if prob.q_pos is None:
        return _dummy(prob.terms.tensor.device)
    if "qpos32" not in prob.cache:
        prob.cache["qpos32"] = prob.q_pos.to(torch.int32).contiguous()
    return prob.cache["qpos32"]


def _range_plan(prob: Problem, i: int, bm: int, bn: int) -> torch.Tensor:
    key = ("plan", i, bm, bn)
    if key not in prob.cache:
        ps = prob.passes[i]
        sp = prob.spaces[ps.space]
        bkey = ("bounds", bm)
        if bkey not in prob.cache:
            first, last = P.tile_rows(prob.q_pos, prob.q_pos0, prob.nq, bm, prob.terms.tensor.device)
            prob.cache[bkey] = (first, last, P.term_bounds(prob.terms, torch.cat([first, last])))
        first, last, bounds = prob.cache[bkey]
        prob.cache[key] = P.range_plan(prob.terms, ps.served, ps.member, first, last, sp.pos0, sp.kstr, sp.nk,
                                       sp.positions, bn, bounds)
    return prob.cache[key]


def _slot_args(prob: Problem, i: int, bm: int, bn: int, device):
    """Pass ``i`` as a slot of the query-major kernel: (its tensors, its key space's k and v descriptors,
    its key space's first position, stride and length) — the kernel takes the descriptors and the
    extents as separate top-level arguments (Triton passes a descriptor only there, and would
    specialise integers inside a tuple)."""
    ps = prob.passes[i]
    sp = prob.spaces[ps.space]
    d32 = _dummy(device)
    kpos = sp.positions.to(torch.int32).contiguous() if sp.positions is not None else d32
    kmem = sp.member if sp.member is not None else _dummy(device, torch.int8)
    if ps.mode in (P.PassKind.BLOCK, P.PassKind.BLOCK_EXPLICIT):
        key = ("starts", ps.space)
        if key not in prob.cache:
            prob.cache[key] = P.block_starts(prob.terms.table, prob.terms.block, sp.pos0, sp.kstr, sp.positions)
        plan, starts = d32, prob.cache[key]
    else:
        plan, starts = _range_plan(prob, i, bm, bn), d32
    terms, _, served = _pass_terms(prob, i, device)
    slot = (kpos, kmem, served, plan, starts, terms)
    return slot, (tile_descriptor(sp.k, bn), tile_descriptor(sp.v, bn)), (sp.pos0, sp.kstr, sp.nk)


def _pass_terms(prob: Problem, i: int, device) -> tuple[torch.Tensor, int, int]:
    """(terms in kernel form, their count, the bits of the served ones) that pass ``i``'s ownership
    mask evaluates (cached).

    A range pass over structured terms stops at its last served term (later terms cannot take a
    pair), and a term's congruence is dropped where every key of the pass's space satisfies it
    (a strided view of the term's own lattice); where what the served term owns is then one band
    (``plan.owned_band``: the earlier bands cut off its ends), that band is the only term.  The mask
    of a boundary tile then costs two comparisons per pair instead of a few per earlier term.
    """
    key = ("terms", i)
    if key not in prob.cache:
        ps = prob.passes[i]
        sp = prob.spaces[ps.space]
        rows = prob.terms.rows
        served = prob.terms.block_bit if ps.mode.is_block else prob.served_bits(ps)
        ranged = ps.mode == P.PassKind.RANGE and not ps.member and ps.served
        if ranged:
            rows = rows[:max(ps.served) + 1]
        if sp.positions is None:
            rows = _on_lattice(rows, sp.pos0, sp.kstr)
        band = None
        if ranged and len(ps.served) == 1:
            band = P.owned_band(rows, ps.served[0], prob.terms.n, prob.terms.causal)
        if band is not None:
            rows, served = [band], 1
        flat = [int(x) for r in rows for x in r] or [0] * 6
        prob.cache[key] = (torch.tensor(flat, dtype=torch.int32, device=device), len(rows), served)
    return prob.cache[key]


def _on_lattice(rows: list, pos0: int, kstr: int) -> list:
    """Term rows as seen from the arithmetic space ``pos0 + kstr * idx``: a congruence that every key of
    the space satisfies is dropped."""
    return [r if r[4] == 1 or not P.covers(r, pos0, kstr) else tuple(r[:4]) + (1, 0) for r in rows]


def first_owned_index(terms: P.Terms, served: list, pos0: int, kstr: int) -> int:
    """The first index of the arithmetic key space ``pos0 + kstr * idx`` holding a key that one of the
    structured terms ``served`` can own, at any query: where earlier terms own a fixed prefix of every
    served term's keys (``Global(first=F)`` before a strided level), the space can start after it, and
    its first key tile needs no mask.  0 where the owned keys do not start at a fixed position."""
    def first(t):
        band = P.owned_band(_on_lattice(terms.rows[:t + 1], pos0, kstr), t, terms.n, terms.causal)
        low = band[1] if band is not None and band[0] == 0 else 0  # a constant lower bound
        return max(0, -(-(low - pos0) // kstr))

    return min((first(t) for t in served), default=0)


def _check_block_alignment(prob: Problem, bm: int, bn: int):
    if not prob.has_block or not any(ps.mode.is_block for ps in prob.passes):
        return bm, bn
    cb = prob.terms.block
    if prob.q_pos0 is None:
        raise NotImplementedError("block-list components with explicit (non-contiguous) query positions")
    bm = min(bm, cb)
    if prob.q_pos0 // cb == (prob.q_pos0 + prob.nq - 1) // cb:
        return bm, min(bn, cb)  # all rows in one block of the table: every query tile is too
    while bm > 16 and prob.q_pos0 % bm:
        bm //= 2
    if prob.q_pos0 % bm:
        raise NotImplementedError(f"block-list components need the query shard to start at a multiple of 16; "
                                  f"it starts at {prob.q_pos0}")
    return bm, min(bn, cb)


def descriptor_ready(t: torch.Tensor) -> bool:
    """Whether the kernels' tensor descriptors can read ``t``: a contiguous last dim, 16-byte aligned
    start and row strides."""
    size = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all((s * size) % 16 == 0 for s in t.stride()[:-1])


def check_descriptor_alignment(name: str, t: torch.Tensor):
    """Refuse a tensor the kernels' descriptors cannot read (``descriptor_ready``)."""
    if not descriptor_ready(t):
        raise ValueError(f"{name} must have a contiguous last dim and 16-byte aligned start and strides "
                         f"for the kernels' tensor descriptors; got strides {tuple(t.stride())}")


def tile_descriptor(t: torch.Tensor, rows: int):
    """A tensor descriptor over the whole ``[B, N, H, D]`` tensor ``t`` (any view the alignment check
    accepts) whose block is ``rows`` rows of one head of one batch element: ``[1, rows, 1, D]``.

    Made on the host and passed to the query-major kernel: building its own, a program writes each
    descriptor (two per pass) to global memory and fences it before its first tile.
    """
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, [1, rows, 1, t.shape[3]])


def dkdv_descriptor(t: torch.Tensor, rows: int, stack: int):
    """The descriptor the dk/dv kernel reads its query-side tiles (q, do) through: ``rows`` positions of
    ``stack`` heads of one batch element.

    One head: ``t`` seen as ``[B, N, H*D]`` with a ``[1, rows, D]`` block, read at column ``h*D``
    (``t.stride(2) == D``, else a contiguous copy is read); stacked heads: ``[1, rows, stack, D]``
    blocks of ``[B, N, H, D]`` (a box side holds at most 256 elements, so ``stack*D`` columns cannot be
    one block).
    """
    from triton.tools.tensor_descriptor import TensorDescriptor

    b, n, h, d = t.shape
    if stack > 1:
        return TensorDescriptor.from_tensor(t, [1, rows, stack, d])
    if h > 1 and t.stride(2) != d:
        t = t.contiguous()
    return TensorDescriptor(t, [b, n, h * d], [t.stride(0), t.stride(1), 1], [1, rows, d])


def _forward_bn(prob: Problem, cfg: Config) -> int:
    return cfg.bn_single if cfg.bn_single and len(prob.passes) == 1 else cfg.bn


def _launch_query(prob: Problem, q, scale, cfg: Config, phase: int, do=None, lse2=None, delta=None):
    """Run the query-major kernel over every pass; returns (out, lse) or dq."""
    from .triton_kernels import query_kernel

    b, nq, hq, d = q.shape
    device = q.device
    hkv = prob.spaces[0].k.shape[2]
    tiles = (cfg.bm, _forward_bn(prob, cfg), cfg.warps, cfg.stages) if phase == 0 else (
        cfg.bm_dq, cfg.bn_dq, cfg.warps_dq, cfg.stages_dq)
    bm, bn = _check_block_alignment(prob, tiles[0], tiles[1])
    check_descriptor_alignment("q", q)
    for sp in prob.spaces:
        check_descriptor_alignment("k", sp.k)
        check_descriptor_alignment("v", sp.v)
    ieee = q.dtype == torch.float32
    tbl, stb, sth, stq, w, cb = _block_args(prob, device)
    split = prob.split
    chunk = 0
    if split > 1:
        longest = max(math.ceil(prob.spaces[ps.space].nk / bn) for ps in prob.passes)
        chunk = math.ceil(longest / split)
    groups = [list(range(s, min(len(prob.passes), s + MAX_SLOTS))) for s in range(0, len(prob.passes), MAX_SLOTS)]
    results = []
    qpos = _qpos32(prob)
    for group in groups:
        nparts = split
        many = nparts > 1 or len(groups) > 1
        if phase == 0:
            odt = torch.float32 if many else q.dtype
            out = torch.empty(nparts, b, nq, hq, d, dtype=odt, device=device)
            lse = torch.empty(nparts, b, hq, nq, dtype=torch.float32, device=device)
        else:
            out = torch.empty(nparts, b, nq, hq, d, dtype=torch.float32 if many else q.dtype, device=device)
            lse = _dummy(device, torch.float32)
        slots, descs, extents = zip(*(_slot_args(prob, i, bm, bn, device) for i in group))
        unused = MAX_SLOTS - len(group)
        descs = [x for e in descs for x in e] + [None] * (2 * unused)
        extents = [x for e in extents for x in e] + [0] * (3 * unused)
        modes = tuple(prob.passes[i].mode.value for i in group)
        nts = tuple(_pass_terms(prob, i, device)[1] for i in group)
        if phase == 1:
            dargs = [do, do.stride(0), do.stride(1), do.stride(2)]
            xargs = [lse2, delta, lse2.stride(0), lse2.stride(1)]
        else:
            dargs = [q, 0, 0, 0]
            xargs = [lse, lse, 0, 0]
        grid = (P.n_tiles(nq, bm), b * hq, nparts)
        query_kernel[grid](
            q, q.stride(0), q.stride(1), q.stride(2), *dargs, qpos, prob.q_pos0 or 0, nq, hq, hq // hkv,
            out, out.stride(1), out.stride(2), out.stride(3), out.stride(0),
            lse, lse.stride(1) if lse.dim() == 4 else 0, lse.stride(2) if lse.dim() == 4 else 0,
            lse.stride(0) if lse.dim() == 4 else 0, *xargs,
            prob.terms.n, scale * LOG2E, tbl, stb, sth, stq, w, cb, chunk, *_doc_args(prob, device),
            tuple(slots), *descs, *extents, MODES=modes, NTS=nts, CAUSAL=prob.terms.causal, HAS_BLOCK=prob.has_block,
            Q_EXPLICIT=prob.q_pos0 is None, SPLIT=split > 1, BM=bm, BN=bn, D=d, IEEE=ieee, PHASE=phase,
            HAS_DOC=prob.doc_start is not None, num_warps=tiles[2], num_stages=tiles[3])
        results.append((out, lse))
    if phase == 1:
        if len(results) == 1 and results[0][0].shape[0] == 1:
            return results[0][0][0]
        return torch.cat([r[0] for r in results]).sum(0).to(q.dtype)
    if len(results) == 1 and results[0][0].shape[0] == 1:
        return results[0][0][0], results[0][1][0]
    outs = torch.cat([r[0] for r in results])
    lses = torch.cat([r[1] for r in results])
    out, lse = merge_partials(list(outs), list(lses))
    return out.to(q.dtype), lse


def _kv_tiles(prob: Problem, cfg: Config):
    """dk/dv tile sizes (bm, bn): block passes need tiles inside one table block."""
    bm, bn = cfg.bm_kv, cfg.bn_kv
    if prob.has_block and any(ps.mode.is_block for ps in prob.passes):
        bm, bn = min(bm, prob.terms.block), min(bn, prob.terms.block)
    return bm, bn


def _kv_plans(prob: Problem, i: int, bm: int, bn: int):
    """(query-tile range, full query-tile range) per key tile of range pass ``i`` (cached)."""
    key = ("qplan", i, bm, bn)
    if key not in prob.cache:
        fplan = _range_plan(prob, i, bm, bn)
        n_kt = P.n_tiles(prob.spaces[prob.passes[i].space].nk, bn)
        prob.cache[key] = (P.transpose_plan(fplan, n_kt), P.transpose_full(fplan, n_kt))
    return prob.cache[key]


def build_plans(prob: Problem, cfg: Config, hq: int):
    """Every plan the forward and backward will use for ``hq`` query heads (they are otherwise built
    on first use)."""
    bm, bn = _check_block_alignment(prob, cfg.bm, _forward_bn(prob, cfg))
    bmq, bnq = _check_block_alignment(prob, cfg.bm_dq, cfg.bn_dq)
    for i, ps in enumerate(prob.passes):
        if not ps.mode.is_block:
            _range_plan(prob, i, bm, bn)
            _range_plan(prob, i, bmq, bnq)
    kv_launches(prob, cfg, prob.spaces[0].k.device, hq)


def forward(prob: Problem, q, scale, cfg: Config):
    return _launch_query(prob, q, scale, cfg, 0)


def _prepare_backward(out, dout, lse, dlse):
    """(delta, lse2) ``[B, H, N]`` float32: ``rowsum(dout * out) - dlse`` and ``lse * log2(e)``."""
    from .triton_kernels import bwd_prep_kernel

    b, nq, hq, d = out.shape
    lse = lse.contiguous()
    delta = torch.empty(b, hq, nq, dtype=torch.float32, device=out.device)
    lse2 = torch.empty_like(delta)
    dl = dlse.contiguous() if dlse is not None else lse
    bm = 64
    bwd_prep_kernel[(P.n_tiles(nq, bm), b * hq)](
        out, out.stride(0), out.stride(1), out.stride(2), dout, dout.stride(0), dout.stride(1), dout.stride(2),
        lse, dl, lse.stride(0), lse.stride(1), delta, lse2, nq, hq,
        HAS_DLSE=dlse is not None, BM=bm, D=d, num_warps=4)
    return delta, lse2


def backward(prob: Problem, q, out, lse, dout, dlse, scale, cfg: Config, grads: list):
    """dq (query-major: recomputes QK^T and dP, no atomics, bitwise reproducible); dk/dv are
    accumulated into ``grads[space]`` (a ``SpaceGrad`` per key space)."""
    dout = dout.contiguous()
    check_descriptor_alignment("dout", dout)
    delta, lse2 = _prepare_backward(out, dout, lse, dlse)
    dq = _launch_query(prob, q, scale, cfg, 1, do=dout, lse2=lse2, delta=delta)
    _launch_dkdv(prob, q, dout, lse2, delta, scale, cfg, grads)
    return dq


@dataclass
class KvLaunch:
    """The dk/dv launch of one pass: key tiles ``t0 .. t0 + grid0 - 1`` (all listed key-block sub-tiles
    for block passes), ``split`` query chunks of ``qchunk`` tiles, whether it writes every row of its
    key space, and its query tiles: ``stack`` heads of a KV group x ``rows`` positions each."""

    grid0: int
    t0: int
    split: int
    qchunk: int
    writes_every_row: bool
    stack: int = 1
    rows: int = 0


def _head_stack(prob: Problem, ps: Pass, bm: int, group: int) -> int:
    """How many query heads of a KV group one dk/dv query tile stacks: the largest power of two that
    divides the group and leaves at least one position per tile; 1 where the pass reads a block table
    that differs by head (its rows could not share the tile)."""
    table = prob.terms.table
    per_head = table is not None and table.shape[1] > 1 and (ps.mode.is_block or ps.mode == P.PassKind.EXPLICIT)
    stack = 1
    while not per_head and group % (2 * stack) == 0 and 2 * stack <= bm:
        stack *= 2
    return stack


def kv_launches(prob: Problem, cfg: Config, device, hq: int) -> dict:
    """{pass index: KvLaunch} of the passes whose dk/dv the backward launches, for ``hq`` query heads
    (cached with the plans: the launcher and ``LaunchPlan.sole_writers`` both read it every backward)."""
    key = ("kvlaunches", cfg, hq, prob.spaces[0].k.shape[0], str(device))  # the split counts the batch
    if key in prob.cache:
        return prob.cache[key]
    out = {}
    bm, bn = _kv_tiles(prob, cfg)
    for i, ps in enumerate(prob.passes):
        sp = prob.spaces[ps.space]
        if sp.nk == 0:
            continue
        hkv = sp.k.shape[2]
        stack = _head_stack(prob, ps, bm, hq // hkv)
        rows = bm // stack
        if ps.mode.is_block:
            kblk, _ = _key_blocks(prob, i, device)
            grid0 = len(kblk) * (prob.terms.block // bn)
            if grid0:
                out[i] = KvLaunch(grid0, 0, 1, 0, False, stack, rows)
            continue
        qplan, _ = _kv_plans(prob, i, rows, bn)
        t0, t1, total, longest = _kv_extent(prob, i, rows, bn, qplan)
        if longest == 0:
            continue  # no query sees this pass's keys
        grid0 = t1 - t0 + 1
        split, qchunk = _kv_split(cfg, device, total, longest, hq // hkv // stack, sp.k.shape[0] * hkv,
                                  min(sp.nk, (t1 + 1) * bn) - t0 * bn, sp.k.shape[3])
        out[i] = KvLaunch(grid0, t0, split, qchunk, t0 == 0 and grid0 == P.n_tiles(sp.nk, bn), stack, rows)
    prob.cache[key] = out
    return out


def _key_blocks(prob: Problem, i: int, device):
    """(listed key blocks, their first key index) of block pass ``i`` (cached)."""
    key = ("kblocks", i)
    if key not in prob.cache:
        sp = prob.spaces[prob.passes[i].space]
        kb_, ks_ = P.key_blocks(prob.terms.block, sp.pos0, sp.nk, sp.positions)
        prob.cache[key] = (kb_.to(device), ks_.to(device))
    return prob.cache[key]


def _launch_dkdv(prob: Problem, q, do, lse2, delta, scale, cfg: Config, grads: list):
    """One key-major launch per pass (``kv_launches``)."""
    from .triton_kernels import dkdv_kernel

    b, nq, hq, d = q.shape
    device = q.device
    ieee = q.dtype == torch.float32
    tbl, stb, sth, stq, w, cb = _block_args(prob, device)
    qpos = _qpos32(prob)
    bm, bn = _kv_tiles(prob, cfg)
    descriptors = {}
    for i, launch in kv_launches(prob, cfg, device, hq).items():
        tiles = (launch.rows, launch.stack)
        if tiles not in descriptors:
            descriptors[tiles] = (dkdv_descriptor(q, *tiles), dkdv_descriptor(do, *tiles))
        ps = prob.passes[i]
        sp = prob.spaces[ps.space]
        hkv = sp.k.shape[2]
        target = grads[ps.space]
        dk, dv = target.dk, target.dv
        d32 = _dummy(device)
        kpos = sp.positions.to(torch.int32).contiguous() if sp.positions is not None else d32
        kmem = sp.member if sp.member is not None else _dummy(device, torch.int8)
        t0, grid0, split, qchunk = launch.t0, launch.grid0, launch.split, launch.qchunk
        if ps.mode.is_block:
            kblk, kstart = _key_blocks(prob, i, device)
            n_kb = P.n_tiles(prob.terms.n, cb)
            key = ("csr", n_kb)
            if key not in prob.cache:
                prob.cache[key] = P.transposed_table(prob.terms.table, n_kb)
            cptr, cidx, ctb, cth = prob.cache[key]
            qplan = qfplan = d32
        else:
            qplan, qfplan = _kv_plans(prob, i, launch.rows, bn)
            kblk = kstart = cptr = cidx = d32
            ctb = cth = 0
        terms, nt, served = _pass_terms(prob, i, device)
        # A range pass over all key tiles of a space that is the whole buffer writes every row.
        accum = target.buffers.before_launch(launch.writes_every_row and dk.shape == target.buffers.dk.shape)
        # The launched key tiles' rows of dk/dv: [t0*bn, t0*bn + rows).
        rows = min(sp.nk, (t0 + grid0) * bn) - t0 * bn
        dk_rows, dv_rows = dk[:, t0 * bn:t0 * bn + rows], dv[:, t0 * bn:t0 * bn + rows]
        out_k, out_v, acc = dk_rows, dv_rows, accum
        if split > 1:
            out_k = torch.empty((split,) + tuple(dk_rows.shape), dtype=torch.float32, device=device)
            out_v = torch.empty_like(out_k)
            acc = False
        dkdv_kernel[(grid0, b * hkv, split)](
            *descriptors[launch.rows, launch.stack], qpos, prob.q_pos0 or 0, nq, hq, hq // hkv,
            hq // hkv // launch.stack, lse2, delta,
            lse2.stride(0), lse2.stride(1), terms, prob.terms.n, scale * LOG2E, tbl, stb, sth, stq, w, cb,
            ctb, cth, sp.k, sp.v, sp.k.stride(0), sp.k.stride(1), sp.k.stride(2), sp.pos0, sp.kstr, sp.nk,
            kpos, kmem, served, qplan, qfplan, kblk, kstart, cptr, cidx,
            out_k, out_v, out_k.stride(-4), out_k.stride(-3), out_k.stride(-2),
            out_k.stride(0) if split > 1 else 0, qchunk, t0, *_doc_args(prob, device),
            MODE=ps.mode.value, NT=nt, CAUSAL=prob.terms.causal, HAS_BLOCK=prob.has_block,
            Q_EXPLICIT=prob.q_pos0 is None, ACCUM=acc, SPLIT=split > 1, BM=bm, GS=launch.stack, BN=bn, D=d,
            IEEE=ieee, HAS_DOC=prob.doc_start is not None, num_warps=cfg.warps_kv, num_stages=cfg.stages_kv)
        if split > 1:  # partials summed in a fixed order
            if accum:
                dk_rows.add_(out_k.sum(0))
                dv_rows.add_(out_v.sum(0))
            else:
                dk_rows.copy_(out_k.sum(0))
                dv_rows.copy_(out_v.sum(0))


def _kv_extent(prob: Problem, i: int, bm: int, bn: int, qplan: torch.Tensor):
    """(first, last key tile seen by a query tile, query tiles summed over key tiles, longest range).

    One device-to-host read per plan (cached with it).
    """
    key = ("kvextent", i, bm, bn)
    if key not in prob.cache:
        cnt = (qplan[:, 1].long() - qplan[:, 0].long() + 1).clamp(min=0)
        seen = torch.nonzero(cnt).flatten()
        if len(seen) == 0:
            prob.cache[key] = (0, -1, 0, 0)
        else:
            t0, t1, total, longest = torch.stack([seen[0], seen[-1], cnt.sum(), cnt.max()]).tolist()
            prob.cache[key] = (t0, t1, total, longest)
    return prob.cache[key]


def _kv_split(cfg: Config, device, total: int, longest: int, group: int, programs: int, rows: int, d: int):
    """(splits, query tiles per chunk) so that no dk/dv program runs much longer than its share.

    A program walks ``group`` heads x its query tiles; the cap is the work of one
    of ``sms * kv_waves`` equal shares, at least ``kv_min_chunk`` iterations.
    """
    sms = multiprocessors(cfg, device) if device is not None else (cfg.sms or 1)
    cap = max(cfg.kv_min_chunk, math.ceil(total * group * programs / (sms * cfg.kv_waves)))
    qchunk = max(1, math.ceil(cap / group))
    split = math.ceil(longest / qchunk)
    per_split = 2 * 4 * rows * programs * d  # float32 dk and dv partials of the launched tiles
    split = max(1, min(split, 256, cfg.kv_split_bytes // max(1, per_split)))
    if split == 1:
        return 1, 0
    return split, math.ceil(longest / split)
