"""Autograd Functions over the kernels and the two public entry points.

``space_attention`` is the sequence-parallel contract (same signature as
``spaces.reference_space_attention``); ``triton_attention`` is whole-sequence
attention on one device over the same split into key spaces that sequence
parallelism uses for a whole sequence (``spaces.whole_sequence``): full K/V for
windows, global-first keys and block lists, a strided view ``K[o::s]`` per
strided level (no copy), a gathered explicit space for ``Global.positions``, and
a separate, split-K launch for global query rows.  Both turn key spaces into
passes the same way (``_passes``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..patterns.pattern import as_pattern
from ..spaces import whole_sequence
from . import core
from . import plan as P

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Planned terms, tables and tile plans of recent (pattern, shape, device, config) keys.
_PLANS: dict = {}
def _documents(documents, n: int, b: int, device, problems) -> None:
    """Give ``problems`` the int32 ``[B, n]`` start/end of each position's document (None: none)."""
    if documents is None:
        return
    documents.validate(n, b)
    start, end = documents.bounds(n, device)
    for prob in problems:
        prob.doc_start, prob.doc_end = start, end


def _check_dtype(q):
    if q.dtype not in DTYPES:
        raise ValueError(f"the Triton kernels take q/k/v in float16, bfloat16 or float32, got {q.dtype}")
    if q.shape[-1] not in (16, 32, 64, 128):
        raise ValueError(f"head dim must be one of 16, 32, 64, 128 for the Triton kernels, got {q.shape[-1]}")


def _descriptor_ready(t):
    """``t``, or a fresh contiguous copy where the kernels' tensor descriptors could not read it."""
    return t if core.descriptor_ready(t) else t.clone(memory_format=torch.contiguous_format)


def _kv(k, v):
    k, v = _descriptor_ready(k), _descriptor_ready(v)
    if k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    return k, v


def _split_for(n_qtiles: int, bh: int, nk: int, bn: int, sms: int) -> int:
    """Key splits for long (global) rows: enough programs for two per multiprocessor."""
    want = math.ceil(2 * sms / max(1, n_qtiles * bh))
    return max(1, min(want, math.ceil(nk / (4 * bn))))


@dataclass
class Part:
    """One Problem of a launch plan: the query rows it owns (None = all) and, per key space of the
    problem, where its dk/dv go: (gradient buffer name, first row, row stride)."""

    prob: core.Problem
    rows: torch.Tensor | None
    targets: list

    def grads(self, buffers: dict) -> list:
        """The ``SpaceGrad`` of each key space, given the gradient buffers by name."""
        return [buffers[name].rows(first, stride) for name, first, stride in self.targets]


@dataclass
class LaunchPlan:
    """What one attention call launches: its parts (the first owns every row not owned by a later
    one) and the float32 gradient buffers by name, each a pair of positions in the list of the
    call's k/v inputs followed by ``copies`` (gathered keys whose gradients ``fold`` adds back)."""

    parts: list
    buffers: dict
    copies: list = field(default_factory=list)
    fold: Callable[[dict], None] | None = None

    def sole_writers(self, cfg: core.Config, hq: int) -> set:
        """Names of the buffers that exactly one dk/dv launch writes, every row of them: those can be
        written in the inputs' dtype (no float32 buffer, no cast).  Folding adds into buffers, so a
        plan that folds keeps them all float32."""
        if self.fold is not None:
            return set()
        launches, whole = {}, {}
        for part in self.parts:
            for i, launch in core.kv_launches(part.prob, cfg, part.prob.spaces[0].k.device, hq).items():
                name, first, stride = part.targets[part.prob.passes[i].space]
                launches[name] = launches.get(name, 0) + 1
                whole[name] = launch.writes_every_row and first == 0 and stride == 1
        return {name for name, count in launches.items() if count == 1 and whole[name]}


class _Function(torch.autograd.Function):
    """Runs a ``LaunchPlan`` on q and the k/v inputs; gradients for q and every input."""

    @staticmethod
    def forward(ctx, plan: LaunchPlan, scale, cfg, saved, q, *inputs):
        if saved is not None:  # (out, lse) of an earlier forward on these inputs: only the backward runs
            out, lse = saved
        else:
            out, lse = core.forward(plan.parts[0].prob, q, scale, cfg)
            for part in plan.parts[1:]:
                o, l = core.forward(part.prob, q[:, part.rows].contiguous(), scale, cfg)
                out[:, part.rows] = o
                lse[:, :, part.rows] = l
        ctx.plan, ctx.scale, ctx.cfg = plan, scale, cfg
        ctx.save_for_backward(q, out, lse, *inputs)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, out, lse, *inputs = ctx.saved_tensors
        plan, scale, cfg = ctx.plan, ctx.scale, ctx.cfg
        if dout is None:
            dout = torch.zeros_like(out)
        sole = plan.sole_writers(cfg, q.shape[2])
        kinds = list(inputs) + plan.copies
        dtypes = {i: (kinds[i].dtype if name in sole else torch.float32)
                  for name, pair in plan.buffers.items() for i in pair}
        flat = [torch.empty(t.shape, dtype=dtypes.get(i, torch.float32), device=t.device) for i, t in enumerate(kinds)]
        buffers = {name: core.GradBuffers(flat[a], flat[b]) for name, (a, b) in plan.buffers.items()}
        main, rest = plan.parts[0], plan.parts[1:]
        do_main, dlse_main = dout, dlse
        if rest:  # rows owned by a later part get their gradients there
            do_main = dout.clone()
            dlse_main = dlse.clone() if dlse is not None else None
            for part in rest:
                do_main[:, part.rows] = 0
                if dlse_main is not None:
                    dlse_main[:, :, part.rows] = 0
        dq = core.backward(main.prob, q, out, lse, do_main, dlse_main, scale, cfg, main.grads(buffers))
        for part in rest:
            rows = part.rows
            dq[:, rows] = core.backward(part.prob, q[:, rows].contiguous(), out[:, rows].contiguous(),
                                        lse[:, :, rows].contiguous(), dout[:, rows].contiguous(),
                                        None if dlse is None else dlse[:, :, rows].contiguous(), scale, cfg,
                                        part.grads(buffers))
        for b in buffers.values():
            b.finish()
        if plan.fold is not None:
            plan.fold(buffers)
        return (None, None, None, None, dq) + tuple(b.to(t.dtype) for b, t in zip(flat, inputs))


def _block_pieces(q_pos: torch.Tensor, block: int) -> list:
    """[start, end) index ranges of contiguous runs of ``q_pos``; a run starting off a multiple of 16
    is cut at the next table-block boundary so that each piece's query tiles stay inside one block."""
    breaks = torch.nonzero(q_pos[1:] != q_pos[:-1] + 1).flatten().add(1).tolist()
    bounds = [0] + breaks + [len(q_pos)]
    pieces = []
    for a, b in zip(bounds, bounds[1:]):
        start = int(q_pos[a])
        if start % 16:
            cut = min(b, a + (-start) % block)
            pieces.append((a, cut))
            a = cut
        if a < b:
            pieces.append((a, b))
    return pieces


def space_attention(q, q_pos, spaces, bound, scale=None, config: core.Config | None = None):
    """Attention of queries at global positions ``q_pos`` over key spaces, on the Triton kernels.

    q ``[B, Nq, Hq, D]``, ``q_pos [Nq]`` sorted; each space's k/v ``[B, Nk, Hkv, D]``.
    Returns (out ``[B, Nq, Hq, D]``, lse ``[B, Hq, Nq]`` float32), differentiable in q and
    every space's k and v, with gradients from both out and lse.  Semantics as in
    ``spaces.reference_space_attention``.

    ``config`` (tile sizes, backward scheduling) defaults to ``core.default_config(q.device)``.

    Not supported (NotImplementedError): query positions that are not increasing;
    query rows of ``Global(queries=True)`` mixed with ordinary rows (pass the global
    rows alone); block-list components served by a strided space or only partly by
    one space; an arithmetic space holding listed ``Global.positions`` keys of a component
    it serves, unless its ``listed`` is False (the kernels read listed keys from explicit spaces).
    """
    _check_dtype(q)
    b, nq, hq, d = q.shape
    device = q.device
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q_pos = torch.as_tensor(q_pos, device=device).to(torch.long)
    if q_pos.dim() != 1 or len(q_pos) != nq:
        raise ValueError(f"q_pos must be 1-D with {nq} entries, got shape {tuple(q_pos.shape)}")
    if nq > 1 and not bool((q_pos[1:] > q_pos[:-1]).all()):
        raise NotImplementedError("space_attention needs increasing query positions")
    special = torch.isin(q_pos, bound.global_rows.to(device))
    all_global = bool(special.all()) and nq > 0 and bool(special.any())
    if special.any() and not all_global:
        raise NotImplementedError("query rows of Global(queries=True) mixed with ordinary rows: call "
                                  "space_attention with the global query rows alone")
    if all_global and sum(rows is not None for rows in bound.component_rows) > 1:
        raise NotImplementedError("global query rows with more than one Global(queries=True) component")
    terms = P.build_terms(bound, device, all_rows_global=all_global)
    contiguous = nq > 0 and int(q_pos[-1] - q_pos[0]) == nq - 1
    use_blocks = terms.table is not None and not all_global  # for global rows the Global term owns all
    if use_blocks and not contiguous and any(set(ks.components) & set(terms.block_comps) for ks in spaces):
        # Block passes need contiguous query tiles: run each contiguous piece alone.
        pieces = _block_pieces(q_pos, terms.block)
        parts = [space_attention(q[:, a:b], q_pos[a:b], spaces, bound, scale, config) for a, b in pieces]
        return torch.cat([o for o, _ in parts], 1), torch.cat([lse for _, lse in parts], 2)
    kspaces, passes, firsts = _passes(q, terms, spaces, use_blocks)
    if not kspaces or not passes or nq == 0:
        raise ValueError("space_attention needs at least one non-empty key space serving a component")
    prob = core.Problem(terms, kspaces, passes, q_pos, int(q_pos[0]) if contiguous else None)
    bound.check_batch(b)
    prob.doc_start, prob.doc_end = bound.doc_start, bound.doc_end

    plan = LaunchPlan([Part(prob, None, [(i, first, 1) for i, first in enumerate(firsts)])],
                      {i: (2 * i, 2 * i + 1) for i in range(len(kspaces))})
    cfg = config if config is not None else core.default_config(device)
    return _Function.apply(plan, scale, cfg, None, _descriptor_ready(q), *[t for ks in spaces for t in (ks.k, ks.v)])


def _passes(q, terms: P.Terms, spaces, use_blocks: bool):
    """Key spaces in kernel form and the passes over them -> (core spaces, passes, first key of each
    given space that its kernel form holds).

    An arithmetic space gets one range pass per term it serves (and a block pass); an explicit one
    one pass for all of its terms and its listed keys (and a block pass over it).  An arithmetic
    space without block passes starts at the first key its terms can own
    (``core.first_owned_index``): leading keys that only earlier terms own are left out.
    """
    b, _, hq, d = q.shape
    device = q.device
    kspaces, passes, firsts = [], [], []
    for si, ks in enumerate(spaces):
        if ks.k.dtype != q.dtype or ks.k.shape[0] != b or ks.k.shape[3] != d or hq % ks.k.shape[2]:
            raise ValueError(f"space {si}: k {tuple(ks.k.shape)} {ks.k.dtype} does not fit q {tuple(q.shape)} "
                             f"{q.dtype} (same batch, head dim, dtype; Hq a multiple of Hkv)")
        k, v = _kv(ks.k, ks.v)
        served = set(ks.components)
        blocks = served & set(terms.block_comps) if use_blocks else set()
        if blocks and blocks != set(terms.block_comps):
            raise NotImplementedError("a key space serving only some of several block-list components")
        positions = None
        member = None
        listed = [terms.explicit[c] for c in served if c in terms.explicit] if ks.listed else []
        if ks.positions is not None:
            positions = ks.positions.to(device=device, dtype=torch.long)
            if len(positions) > 1 and not bool((positions[1:] > positions[:-1]).all()):
                raise ValueError(f"space {si}: KeySpace.positions must be increasing")
            if listed:
                member = torch.isin(positions, torch.cat(listed)).to(torch.int8)
        elif any(len(ks.indices_of(keys)) for keys in listed):
            raise NotImplementedError("an arithmetic key space holding listed keys (Global.positions) of a "
                                      "component it serves; give them an explicit-positions space, or "
                                      "pass listed=False and serve them from one")
        mine = [t for t, c in enumerate(terms.comp) if c in served]
        first = 0
        if positions is None and not blocks and mine:
            first = min(core.first_owned_index(terms, mine, ks.pos0, ks.stride), k.shape[1])
            k, v = k[:, first:], v[:, first:]
        firsts.append(first)
        sp = core.Space(k, v, ks.pos0 + first * ks.stride if positions is None else 0,
                        ks.stride if positions is None else 1, positions, member)
        kspaces.append(sp)
        if sp.nk == 0:
            continue
        if positions is None:
            passes += [core.Pass(si, P.PassKind.RANGE, [t]) for t in mine]
            if blocks:
                passes.append(core.Pass(si, P.PassKind.BLOCK, []))
        else:
            if mine or member is not None:
                passes.append(core.Pass(si, P.PassKind.EXPLICIT, mine, member is not None))
            if blocks:
                passes.append(core.Pass(si, P.PassKind.BLOCK_EXPLICIT, []))
    return kspaces, passes, firsts


def triton_attention(q, k, v, pattern, scale=None, config: core.Config | None = None, saved=None):
    """Whole-sequence sparse attention: q ``[B, N, Hq, D]``, k/v ``[B, N, Hkv, D]`` -> (out, lse).

    ``config`` (tile sizes, backward scheduling) defaults to ``core.default_config(q.device)``.
    ``saved``: the (out, lse) an earlier call on equal q, k, v returned (a checkpointed layer's first
    forward): they are returned as they are, with this op's backward, and no forward kernel runs.
    """
    plan, scale, cfg = prepare(q, k, v, pattern, scale, config=config)
    if saved is not None:
        out, lse = saved
        b, n, hq, d = q.shape
        if out.shape != q.shape or lse.shape != (b, hq, n) or out.device != q.device:
            raise ValueError(f"saved (out, lse) of shapes {tuple(out.shape)}, {tuple(lse.shape)} on {out.device} "
                             f"do not belong to q of shape {tuple(q.shape)} on {q.device}")
    return _Function.apply(plan, scale, cfg, saved, _descriptor_ready(q), *_kv(k, v))


def prepare(q, k, v, pattern, scale=None, plans: bool = False, config: core.Config | None = None):
    """Plan ``triton_attention`` -> (LaunchPlan, scale, Config); ``plans`` also builds every tile plan now."""
    _check_dtype(q)
    pattern = as_pattern(pattern)
    b, n, hq, d = q.shape
    device = q.device
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    cfg = config if config is not None else core.default_config(device)
    # Plans depend on the pattern and the shapes only (not on the data, except TopKBlocks, nor on the
    # documents, which the kernels read at run time): reuse them.  A data-dependent selection is bound
    # with the documents, among whose blocks it chooses (TopKBlocks.table).
    documents, within, pattern = pattern.documents, pattern, pattern.plain
    key = None if pattern.data_dependent else (pattern, n, hq, k.shape[2], str(device), tuple(vars(cfg).items()))
    cached = _PLANS.get(key) if key is not None else None
    if cached is None:
        with torch.no_grad():
            if pattern.data_dependent:
                bound = within.bind(n, hq, q=q, k=k, device=device)
            else:
                bound = pattern.bind(n, hq, device=device)
        cached = {"bound": bound, "terms": P.build_terms(bound, device), "main": {}, "global": {}}
        if key is not None:
            if len(_PLANS) >= 32:
                _PLANS.pop(next(iter(_PLANS)))
            _PLANS[key] = cached
    bound, terms = cached["bound"], cached["terms"]
    k, v = _kv(k, v)
    # The gathered listed keys are copies, made outside autograd: their gradients are folded back below.
    split = whole_sequence(bound, k.detach(), v.detach())
    spaces, passes, _ = _passes(q, terms, split.spaces, terms.table is not None)

    def order(ps):  # range passes over the full K first (they initialise dk/dv), then the strided views'
        return (spaces[ps.space].positions is not None, ps.mode.is_block, spaces[ps.space].kstr != 1,
                ps.served[0] if ps.served else 0)

    passes.sort(key=order)
    main = core.Problem(terms, spaces, passes, None, 0, cache=cached["main"], nq=n)
    gathered = [si for si, sp in enumerate(spaces) if sp.positions is not None]

    # a gathered space has its own buffers; every other space is K/V or a strided view of it
    main_targets = [(si, 0, 1) if si in gathered else ("kv", sp.pos0, sp.kstr) for si, sp in enumerate(spaces)]
    parts = [Part(main, None, main_targets)]
    rows = terms.global_rows
    if len(rows):
        gterms = P.Terms([(0, 0, 0, P.BIG, 1, 0)], [0], pattern.causal, n,
                         tensor=torch.tensor([0, 0, 0, P.BIG, 1, 0], dtype=torch.int32, device=device))
        split_k = _split_for(P.n_tiles(len(rows), cfg.bm), b * hq, n, cfg.bn, core.multiprocessors(cfg, device))
        gprob = core.Problem(gterms, [core.Space(k, v)], [core.Pass(0, P.PassKind.RANGE, [0])], rows, None,
                             split_k, cache=cached["global"])
        parts.append(Part(gprob, rows, [("kv", 0, 1)]))
    plan = LaunchPlan(parts, {"kv": (0, 1)})
    for si in gathered:
        plan.buffers[si] = (2 + len(plan.copies), 3 + len(plan.copies))
        plan.copies += [spaces[si].k, spaces[si].v]
    if gathered:
        def fold(buffers):
            for si in gathered:
                buffers["kv"].dk.index_add_(1, spaces[si].positions, buffers[si].dk)
                buffers["kv"].dv.index_add_(1, spaces[si].positions, buffers[si].dv)

        plan.fold = fold
    _documents(documents, n, b, device, [part.prob for part in parts])
    if plans:
        for part in parts:
            core.build_plans(part.prob, cfg, q.shape[2])
    return plan, scale, cfg
