"""Autograd Functions over the kernels and the two public entry points.

``space_attention`` is the sequence-parallel contract (same signature as
``spaces.reference_space_attention``); ``triton_attention`` is whole-sequence
attention on one device, built from the same machinery: full K/V for windows,
global-first keys and block lists, a strided view ``K[o::s]`` per strided level
(no copy), a gathered explicit space for ``Global.positions``, and a separate,
split-K launch for global query rows.
"""
from __future__ import annotations

import math

import torch

from ..patterns.components import Global, Strided
from ..patterns.pattern import as_pattern
from . import core
from . import plan as P

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Planned terms, tables and tile plans of recent (pattern, shape, device, config) keys.
_PLANS: dict = {}


def _check_dtype(q):
    if q.dtype not in DTYPES:
        raise ValueError(f"the Triton kernels take q/k/v in float16, bfloat16 or float32, got {q.dtype}")
    if q.shape[-1] not in (16, 32, 64, 128):
        raise ValueError(f"head dim must be one of 16, 32, 64, 128 for the Triton kernels, got {q.shape[-1]}")


def _lastdim(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _kv(k, v):
    k, v = _lastdim(k), _lastdim(v)
    if k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    return k, v


def _special_rows(pattern, q_pos: torch.Tensor) -> torch.Tensor:
    """Rows that are Global(queries=True) rows not already covered as global keys."""
    special = torch.zeros(len(q_pos), dtype=torch.bool, device=q_pos.device)
    for g in pattern.global_queries:
        pos = g.positions_tensor(q_pos.device)
        special |= torch.isin(q_pos, pos)
        if not pattern.causal and g.first:
            special |= q_pos < g.first
    return special


def _global_row_positions(bound, device) -> torch.Tensor:
    """Sorted global query rows that need their own path (see ``_special_rows``)."""
    parts = [torch.zeros(0, dtype=torch.long, device=device)]
    for g in bound.pattern.global_queries:
        parts.append(g.positions_tensor(device))
        if not bound.pattern.causal and g.first:
            parts.append(torch.arange(g.first, device=device))
    rows = torch.unique(torch.cat(parts))
    return rows[rows < bound.n]


def _split_for(n_qtiles: int, bh: int, nk: int, bn: int, sms: int) -> int:
    """Key splits for long (global) rows: enough programs for two per multiprocessor."""
    want = math.ceil(2 * sms / max(1, n_qtiles * bh))
    return max(1, min(want, math.ceil(nk / (4 * bn))))


class _Function(torch.autograd.Function):
    """Runs ``problems`` (a main one and, optionally, global rows) and maps gradients.

    ``layout`` gives, per problem: its Problem, the query rows it owns (None = all),
    and per space the (input index, view) of the gradient buffers it accumulates into.
    """

    @staticmethod
    def forward(ctx, layout, scale, cfg, q, *inputs):
        main = layout["problems"][0]
        out, lse = core.forward(main["prob"], q, scale, cfg)
        extra = []
        for item in layout["problems"][1:]:
            rows = item["rows"]
            o, l = core.forward(item["prob"], q[:, rows].contiguous(), scale, cfg)
            out[:, rows] = o
            lse[:, :, rows] = l
            extra.append((o, l))
        ctx.layout, ctx.scale, ctx.cfg = layout, scale, cfg
        ctx.save_for_backward(q, out, lse, *inputs)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, out, lse, *inputs = ctx.saved_tensors
        layout, scale, cfg = ctx.layout, ctx.scale, ctx.cfg
        if dout is None:
            dout = torch.zeros_like(out)
        bufs = [torch.empty(t.shape, dtype=torch.float32, device=t.device)
                for t in list(inputs) + list(layout.get("extra", []))]
        states = {}
        for key in set(layout["buffer_of"]):
            states[key] = {"init": False, "base": tuple(bufs[i] for i in layout["buffer_of"][key])}
        problems = layout["problems"]
        special = [it["rows"] for it in problems[1:]]
        do_main, dlse_main = dout, dlse
        if special:
            do_main = dout.clone()
            dlse_main = dlse.clone() if dlse is not None else None
            for rows in special:
                do_main[:, rows] = 0
                if dlse_main is not None:
                    dlse_main[:, :, rows] = 0
        grads = [item["grads"](bufs, states) for item in problems]
        dq = core.backward(problems[0]["prob"], q, out, lse, do_main, dlse_main, scale, cfg, grads[0])
        for item, g in zip(problems[1:], grads[1:]):
            rows = item["rows"]
            dq_rows = core.backward(item["prob"], q[:, rows].contiguous(), out[:, rows].contiguous(),
                                    lse[:, :, rows].contiguous(), dout[:, rows].contiguous(),
                                    None if dlse is None else dlse[:, :, rows].contiguous(), scale, cfg, g)
            dq[:, rows] = dq_rows
        for st in states.values():
            if not st["init"]:
                for t in st["base"]:
                    t.zero_()
        for fix in layout.get("finish", []):
            fix(bufs)
        return (None, None, None, dq) + tuple(b.to(t.dtype) for b, t in zip(bufs, inputs))


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
    one space; an arithmetic space holding
    explicit ``Global.positions`` keys it serves (give them an explicit space).
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
    pattern = bound.pattern
    special = _special_rows(pattern, q_pos)
    all_global = bool(special.all()) and nq > 0 and bool(special.any())
    if special.any() and not all_global:
        raise NotImplementedError("query rows of Global(queries=True) mixed with ordinary rows: call "
                                  "space_attention with the global query rows alone")
    if all_global and len(pattern.global_queries) > 1:
        raise NotImplementedError("global query rows with more than one Global(queries=True) component")
    terms = P.build_terms(bound, device, all_rows_global=all_global)
    contiguous = nq > 0 and int(q_pos[-1] - q_pos[0]) == nq - 1
    use_blocks = terms.table is not None and not all_global  # for global rows the Global term owns all
    if use_blocks and not contiguous and any(set(ks.components) & set(terms.block_comps) for ks in spaces):
        # Block passes need contiguous query tiles: run each contiguous piece alone.
        pieces = _block_pieces(q_pos, terms.block)
        parts = [space_attention(q[:, a:b], q_pos[a:b], spaces, bound, scale, config) for a, b in pieces]
        return torch.cat([o for o, _ in parts], 1), torch.cat([lse for _, lse in parts], 2)
    kspaces, passes, inputs = [], [], []
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
        if ks.positions is not None:
            positions = ks.positions.to(device=device, dtype=torch.long)
            if len(positions) > 1 and not bool((positions[1:] > positions[:-1]).all()):
                raise ValueError(f"space {si}: KeySpace.positions must be increasing")
            glob = [terms.explicit[c] for c in served if c in terms.explicit]
            if glob:
                member = torch.isin(positions, torch.cat(glob)).to(torch.int8)
        else:
            for c in served:
                if c in terms.explicit and len(ks.indices_of(terms.explicit[c])):
                    raise NotImplementedError(f"an arithmetic key space holding explicit Global.positions keys "
                                              f"(component {c}); give them an explicit-positions space")
        sp = core.Space(k, v, ks.pos0 if positions is None else 0, ks.stride if positions is None else 1,
                        positions, member)
        inputs += [ks.k, ks.v]
        kspaces.append(sp)
        if sp.nk == 0:
            continue
        mine = [t for t, c in enumerate(terms.comp) if c in served]
        if positions is None:
            passes += [core.Pass(si, P.PassKind.RANGE, [t]) for t in mine]
            if blocks:
                passes.append(core.Pass(si, P.PassKind.BLOCK, []))
        else:
            if mine or member is not None:
                passes.append(core.Pass(si, P.PassKind.EXPLICIT, mine, member is not None))
            if blocks:
                passes.append(core.Pass(si, P.PassKind.BLOCK_EXPLICIT, []))
    if not kspaces or not passes or nq == 0:
        raise ValueError("space_attention needs at least one non-empty key space serving a component")
    prob = core.Problem(terms, kspaces, passes, q_pos, int(q_pos[0]) if contiguous else None)

    def grads(bufs, states):
        return [(bufs[2 * i], bufs[2 * i + 1], states[i]) for i in range(len(kspaces))]

    layout = {"problems": [{"prob": prob, "rows": None, "grads": grads}],
              "buffer_of": {i: (2 * i, 2 * i + 1) for i in range(len(kspaces))}}
    cfg = config if config is not None else core.default_config(device)
    return _Function.apply(layout, scale, cfg, q, *inputs)


def triton_attention(q, k, v, pattern, scale=None, config: core.Config | None = None):
    """Whole-sequence sparse attention: q ``[B, N, Hq, D]``, k/v ``[B, N, Hkv, D]`` -> (out, lse).

    ``config`` (tile sizes, backward scheduling) defaults to ``core.default_config(q.device)``.
    """
    layout, scale, cfg = prepare(q, k, v, pattern, scale, config=config)
    return _Function.apply(layout, scale, cfg, q, *_kv(k, v))


def prepare(q, k, v, pattern, scale=None, plans: bool = False, config: core.Config | None = None):
    """Plan ``triton_attention`` (tables, terms, passes); ``plans`` also builds every tile plan now."""
    _check_dtype(q)
    pattern = as_pattern(pattern)
    b, n, hq, d = q.shape
    device = q.device
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    cfg = config if config is not None else core.default_config(device)
    # Plans depend on the pattern and the shapes only (not on the data, except TopKBlocks): reuse them.
    key = None if pattern.data_dependent else (pattern, n, hq, k.shape[2], str(device), tuple(vars(cfg).items()))
    cached = _PLANS.get(key) if key is not None else None
    if cached is None:
        with torch.no_grad():
            bound = pattern.bind(n, hq, q=q if pattern.data_dependent else None,
                                 k=k if pattern.data_dependent else None, device=device)
        cached = {"bound": bound, "terms": P.build_terms(bound, device), "main": {}, "global": {},
                  "rows": _global_row_positions(bound, device)}
        if key is not None:
            if len(_PLANS) >= 32:
                _PLANS.pop(next(iter(_PLANS)))
            _PLANS[key] = cached
    bound, terms = cached["bound"], cached["terms"]
    k, v = _kv(k, v)
    spaces = [core.Space(k, v)]
    passes, views = [], {}
    for t, c in enumerate(terms.comp):
        comp = pattern.components[c]
        if isinstance(comp, Strided) and comp.stride > 1:
            key = (comp.stride, comp.offset)
            if key not in views:
                views[key] = len(spaces)
                spaces.append(core.Space(k[:, comp.offset::comp.stride], v[:, comp.offset::comp.stride],
                                         comp.offset, comp.stride))
            passes.append(core.Pass(views[key], P.PassKind.RANGE, [t]))
        else:
            passes.append(core.Pass(0, P.PassKind.RANGE, [t]))
    passes.sort(key=lambda ps: ps.space != 0)  # full-K range passes first: they initialise dk/dv
    if terms.table is not None:
        passes.append(core.Pass(0, P.PassKind.BLOCK, []))
    gpos = None
    if terms.explicit:
        gpos = torch.unique(torch.cat(list(terms.explicit.values())))
        ones = torch.ones(len(gpos), dtype=torch.int8, device=device)
        spaces.append(core.Space(k.detach()[:, gpos], v.detach()[:, gpos], 0, 1, gpos, ones))
        passes.append(core.Pass(len(spaces) - 1, P.PassKind.EXPLICIT, [], True))
    main = core.Problem(terms, spaces, [ps for ps in passes if spaces[ps.space].nk > 0],
                        None, 0, cache=cached["main"], nq=n)
    explicit_space = len(spaces) - 1 if gpos is not None else None

    def main_grads(bufs, states):
        out = []
        for si, sp in enumerate(spaces):
            if si == explicit_space:
                out.append((bufs[2], bufs[3], states["g"]))
            elif si == 0:
                out.append((bufs[0], bufs[1], states["kv"]))
            else:
                off, st = sp.pos0, sp.kstr
                out.append((bufs[0][:, off::st], bufs[1][:, off::st], states["kv"]))
        return out

    problems = [{"prob": main, "rows": None, "grads": main_grads}]
    rows = cached["rows"]
    if len(rows):
        gterms = P.Terms([(0, 0, 0, P.BIG, 1, 0)], [0], pattern.causal, n,
                         tensor=torch.tensor([0, 0, 0, P.BIG, 1, 0], dtype=torch.int32, device=device))
        split = _split_for(P.n_tiles(len(rows), cfg.bm), b * hq, n, cfg.bn, core.multiprocessors(cfg, device))
        gprob = core.Problem(gterms, [core.Space(k, v)], [core.Pass(0, P.PassKind.RANGE, [0])], rows, None, split,
                             cache=cached["global"])
        problems.append({"prob": gprob, "rows": rows,
                         "grads": lambda bufs, states: [(bufs[0], bufs[1], states["kv"])]})
    buffer_of = {"kv": (0, 1)}
    layout = {"problems": problems, "buffer_of": buffer_of, "extra": [], "finish": []}
    if gpos is not None:
        # The gathered global keys are a copy: their gradients are added back into K/V's.
        layout["extra"] = [spaces[explicit_space].k, spaces[explicit_space].v]
        buffer_of["g"] = (2, 3)

        def finish(bufs):
            bufs[0].index_add_(1, gpos, bufs[2])
            bufs[1].index_add_(1, gpos, bufs[3])

        layout["finish"].append(finish)
    if plans:
        for item in problems:
            core.build_plans(item["prob"], cfg)
    return layout, scale, cfg
