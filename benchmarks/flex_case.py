"""FlexAttention baselines for ``benchmarks/kernels.py``: one case, one fresh process.

    python3 benchmarks/flex_case.py '<json spec>'      # prints one line: FLEX_RESULT {json}

A process that has compiled many FlexAttention shapes can pass torch.compile's recompile limit and then
runs Flex on a degraded path without saying so; ``kernels.py`` therefore starts this script once per
case and variant.  The spec (built by ``kernels.flex_spec``) names the pattern (``Pattern.to_dict``),
the sizes and the variant:

- ``single``: one FlexAttention call whose mask_mod is the whole pattern.
- With ``documents`` (lengths of packed documents), every mask_mod also keeps a pair only inside one
  document (``and_masks``-style, a document id per position), in both variants.
- ``split``: what a user can write by hand for a union of windows, strided levels and leading global
  keys: one call per component key set, each on compact K/V (the window on all keys, a strided level
  on ``K[:, :, o::s]``, the global part on ``K[:, :, :G]``).  Ownership order: windows, then strided
  levels, then global keys; each part keeps only the pairs no earlier part allows, so every allowed pair
  is computed exactly once.  Timed unmerged (generous to Flex: the K/V slices are made before timing)
  and, as ``merged``, with the outputs merged by an eager log-sum-exp merge (autograd through it).

Each variant is checked at a small size (``verify_n``): the parts' dense masks, put back at their key
positions, must add up to the pattern's mask exactly (each pair once), and the pair count must equal
``Pattern.describe``.  The process also reports whether dynamo recompiled past its limit or broke the
graph (``torch._dynamo.config.fail_on_recompile_limit_hit`` turns the silent fallback into an error).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparse_parallel.patterns import Documents, Global, Pattern, Strided, Window  # noqa: E402

#: Optimistic FLOP rate of Flex's computed blocks (H200, bf16), used only to skip hopeless cases early.
FLEX_PEAK_FLOPS = 450e12


def bench(fn, guard_s: float, compiles: bool = True):
    """(median ms, first-call s) of ``fn``; (None, first) when a warm call still exceeds ``guard_s``.

    A first call over the guard gets one more: compiling many kernels (a pattern of five passes, a
    Flex split in five parts) may take longer than the guard, which is meant for calls that are slow
    themselves (one-mask Flex over a strided level computes the whole causal triangle).

    To keep long cases lean, calls over 0.25 s get the median of three plain timed runs instead of
    do_bench, and calls over 1 s one timed run after the first.
    On the CPU (``--smoke``, only the plumbing is exercised) one more call, or none when ``fn``
    has nothing to compile (the Triton interpreter): its first call is then the measurement.
    """
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t
    if first > guard_s:
        t = time.perf_counter()
        fn()
        sync()
        if time.perf_counter() - t > guard_s:
            return None, first
    if not cuda:
        if compiles:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1000, first
        return first * 1000, first
    t = time.perf_counter()
    fn()
    sync()
    once = time.perf_counter() - t
    if once > 1.0:
        return once * 1000, first
    if once > 0.25:
        return sorted([once * 1000, event_ms(fn), event_ms(fn)])[1], first
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"), first


def event_ms(fn) -> float:
    """One call of ``fn`` timed by CUDA events (ms)."""
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e)


# -- masks ---------------------------------------------------------------------------------------------
def allows(comp, qi, kv):
    """Does structured component ``comp`` allow (qi, kv), in full sequence coordinates."""
    if isinstance(comp, Window):
        return (qi - kv <= comp.left) & (kv - qi <= comp.right)
    if isinstance(comp, Strided):
        ok = (kv % comp.stride) == comp.offset
        if comp.span is not None:
            ok = ok & (qi - kv < comp.span) & (kv - qi < comp.span)
        return ok
    if isinstance(comp, Global):
        return kv < comp.first
    raise TypeError(f"no arithmetic mask for {comp!r}")


def document_ids(lengths, n: int, device):
    """int32 ``[n]``: the index of the document holding each position (None without documents)."""
    if not lengths:
        return None
    sizes = torch.tensor(lengths, device=device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device, dtype=torch.int32), sizes)[:n]


def single_mask(pat: Pattern, n: int, hq: int, q=None, k=None, device="cuda", doc=None):
    """A mask_mod equal to the whole pattern (within the documents of ``doc``, document ids);
    block-list components read their tables as tensors."""
    bound = pat.bind(n, hq, q=q if pat.data_dependent else None, k=k if pat.data_dependent else None,
                     device=device)
    tables = dict(zip(pat.block_components, (t.to(torch.int32).to(device) for t in bound.tables)))

    def mask_mod(b, h, qi, kv):
        ok = kv < 0
        for c in pat.components:
            if c in tables:
                tab = tables[c]
                row = tab[0, h if tab.shape[1] > 1 else 0, qi // c.block]
                for w in range(tab.shape[-1]):
                    ok = ok | (row[w] == kv // c.block)
            else:
                ok = ok | allows(c, qi, kv)
        ok = ok & (kv <= qi)
        return ok if doc is None else ok & (doc[qi] == doc[kv])

    return mask_mod


@dataclass(frozen=True)
class Part:
    """One call of the hand split: keys ``offset + stride * c`` for c < ``kv_len``, and its mask."""

    name: str
    offset: int
    stride: int
    kv_len: int
    mask_mod: Callable


def split_parts(pat: Pattern, n: int, doc=None) -> list[Part] | None:
    """The hand split of ``pat`` over compact key sets, or None when it has no such split.

    Only causal unions of windows, strided levels and leading global keys (``Global(first=G,
    queries=False)``) split this way; block lists and global query rows do not.
    """
    comps = pat.components
    if not pat.causal or any(c.block_based for c in comps):
        return None
    if any(isinstance(c, Global) and (c.queries or c.positions) for c in comps):
        return None
    rank = {Window: 0, Strided: 1, Global: 2}
    order = sorted(comps, key=lambda c: rank[type(c)])  # stable: pattern order within a kind
    parts = []
    for index, comp in enumerate(order):
        if isinstance(comp, Strided):
            offset, stride, kv_len = comp.offset, comp.stride, len(range(comp.offset, n, comp.stride))
        elif isinstance(comp, Global):
            offset, stride, kv_len = 0, 1, min(comp.first, n)
        else:
            offset, stride, kv_len = 0, 1, n
        parts.append(Part(f"{comp.kind}{index}", offset, stride, kv_len,
                          _owned_mask(comp, order[:index], offset, stride, doc)))
    return parts


def _owned_mask(comp, earlier, offset: int, stride: int, doc=None):
    """mask_mod in compact key coordinates: pairs ``comp`` allows and no ``earlier`` component does
    (inside one document of ``doc``)."""

    def mask_mod(b, h, qi, c):
        kv = offset + stride * c
        ok = (kv <= qi) & allows(comp, qi, kv)
        for e in earlier:
            ok = ok & ~allows(e, qi, kv)
        return ok if doc is None else ok & (doc[qi] == doc[kv])

    return mask_mod


def verify(pat: Pattern, variant: str, n: int, hq: int, device, lengths=None) -> dict:
    """Small-size check that the variant's masks cover the pattern's pairs exactly once (the first
    ``n`` positions of the documents of ``lengths``)."""
    from torch.nn.attention.flex_attention import create_mask

    doc = document_ids(lengths, n, device)
    counted_pattern = pat
    if doc is not None:
        cut = torch.bincount(doc.long()).tolist()
        counted_pattern = pat.within(Documents.from_lengths([[x for x in cut if x]]))

    heads = hq if pat.per_head else 1
    q = k = None
    if pat.data_dependent:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(1, n, hq, 32, device=device, generator=g)
        k = torch.randn(1, n, hq, 32, device=device, generator=g)
    want = pat.mask(n, heads, q=q, k=k).to(device)
    if doc is not None:
        want = want & (doc[:, None] == doc[None, :])
    if variant == "single":
        got = create_mask(single_mask(pat, n, hq, q, k, device, doc), 1, heads, n, n, device=device)[0].int()
    else:
        got = torch.zeros(heads, n, n, dtype=torch.int32, device=device)
        for p in split_parts(pat, n, doc):
            m = create_mask(p.mask_mod, 1, 1, n, p.kv_len, device=device)[0].int()
            got[:, :, p.offset::p.stride][:, :, :p.kv_len] += m
    described = counted_pattern.describe(n, hq, 128, q=q, k=k)["pairs"] / hq
    counted = got.sum().item() / heads
    return {"verify_n": n, "pairs_counted": counted, "pairs_described": described,
            "exact_cover": bool(torch.equal(got, want.int())) and counted == described}


# -- timing ----------------------------------------------------------------------------------------------
def computed_flops(block_masks, hq: int, d: int) -> float:
    """Forward FLOPs Flex really computes: every listed (full or partial) block, whole."""
    total = 0.0
    for bm in block_masks:
        blocks = bm.kv_num_blocks.sum().item() + (bm.full_kv_num_blocks.sum().item()
                                                  if bm.full_kv_num_blocks is not None else 0)
        per_head = hq // bm.kv_num_blocks.shape[1]
        total += 4.0 * per_head * blocks * bm.BLOCK_SIZE[0] * bm.BLOCK_SIZE[1] * d
    return total


def run_case(spec: dict) -> dict:
    """Build, compile and time the spec's variant; the result dict that ``kernels.py`` records."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # Static shapes: the parts of a split have different key lengths, and dynamo's automatic dynamic
    # shapes would otherwise switch to a slower shape-generic kernel at the second one.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 512
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    fa = torch.compile(flex_attention, dynamic=False)

    pat = Pattern.from_dict(spec["pattern"])
    n, hq, hkv, d, variant = spec["n"], spec["hq"], spec["hkv"], spec["d"], spec["variant"]
    device = spec["device"]
    dtype = getattr(torch, spec["dtype"])
    lengths = spec.get("documents")
    res = {"variant": variant, **verify(pat, variant, min(n, spec["verify_n"]), hq, device, lengths)}
    doc = document_ids(lengths, n, device)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, h, n, d, device=device, dtype=dtype, generator=gen) for h in (hq, hkv, hkv))
    do = torch.randn_like(q)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    # On the CPU, inductor miscompiles some of these masks; eager mask building is fine at smoke sizes.
    compile_mask = device == "cuda"
    t = time.perf_counter()
    if variant == "single":
        mm = single_mask(pat, n, hq, q.transpose(1, 2), k.transpose(1, 2), device, doc)
        masks = [create_block_mask(mm, None, hq if pat.per_head else None, n, n, device=device,
                                   _compile=compile_mask)]
        kv_sets = [(k, v)]
    else:
        parts = split_parts(pat, n, doc)
        masks = [create_block_mask(p.mask_mod, None, None, n, p.kv_len, device=device, _compile=compile_mask)
                 for p in parts]
        kv_sets = [(k[:, :, p.offset::p.stride][:, :, :p.kv_len].contiguous(),
                    v[:, :, p.offset::p.stride][:, :, :p.kv_len].contiguous()) for p in parts]
        res["parts"] = [{"name": p.name, "offset": p.offset, "stride": p.stride, "kv_len": p.kv_len}
                        for p in parts]
    sync()
    res["mask_s"] = time.perf_counter() - t
    flops = computed_flops(masks, hq, d)
    res["computed_flops_fwd"] = flops
    if device == "cuda" and 4.5 * flops / FLEX_PEAK_FLOPS > spec["guard_s"]:
        res["skipped"] = (f"would compute {flops / 1e12:.0f} TFLOP per forward: over "
                          f"{flops / FLEX_PEAK_FLOPS:.1f} s even at {FLEX_PEAK_FLOPS / 1e12:.0f} TFLOP/s")
        return res

    qs = q.clone().requires_grad_()
    kv_leaves = [(a.clone().requires_grad_(), b.clone().requires_grad_()) for a, b in kv_sets]
    gqa = hq != hkv

    def fwd():
        with torch.no_grad():
            for (kk, vv), bm in zip(kv_sets, masks):
                fa(q, kk, vv, block_mask=bm, enable_gqa=gqa)

    leaves = [qs, *(t for pair in kv_leaves for t in pair)]

    def fwd_bwd():
        for x in leaves:  # gradients written, not accumulated between calls (as in a model)
            x.grad = None
        outs = [fa(qs, kk, vv, block_mask=bm, enable_gqa=gqa) for (kk, vv), bm in zip(kv_leaves, masks)]
        torch.autograd.backward(outs, [do] * len(outs))

    if device != "cuda":  # torch's CPU FlexAttention is inference only, without return_lse
        fwd_bwd = None
        res["skipped_cpu"] = "FlexAttention on the CPU: forward only (no backward, no lse)"
    timings = [("", fwd, fwd_bwd)]
    if variant == "split" and fwd_bwd is not None and spec.get("merged", True):
        timings.append(("merged_", *_merged_fns(fa, q, qs, kv_sets, kv_leaves, masks, do, gqa)))
    if spec.get("warm_only"):  # compile into the on-disk caches for a later, timed process; no timing
        for _, f, fb in timings:
            for g in (f, fb):
                if g is not None:
                    g()
        sync()
        res["warmed"] = True
        return res
    for prefix, f, fb in timings:
        res.update(_time_pair(prefix, f, fb, spec["guard_s"], device, flops))
        for x in leaves:
            x.grad = None
    res["dynamo"] = {key: dict(counters[key]) for key in ("stats", "graph_break", "unimplemented")
                     if counters[key]}
    res["graph_breaks"] = sum(counters["graph_break"].values())
    res["degraded"] = res["graph_breaks"] > 0 or any("recompile" in str(key).lower()
                                                     for key in counters["unimplemented"])
    return res


def _merged_fns(fa, q, qs, kv_sets, kv_leaves, masks, do, gqa):
    """fwd and fwd+bwd of the split merged into one output by an eager log-sum-exp merge."""
    from torch.nn.attention.flex_attention import AuxRequest

    def merged(qq, sets):
        outs, lses = [], []
        for (kk, vv), bm in zip(sets, masks):
            o, aux = fa(qq, kk, vv, block_mask=bm, enable_gqa=gqa, return_aux=AuxRequest(lse=True))
            outs.append(o)
            lses.append(aux.lse)
        lse = torch.stack(lses).logsumexp(0)
        # A part with no key for a row has lse -inf there; its weight is then exactly 0.
        return sum(o * torch.exp(part - lse).unsqueeze(-1).to(o.dtype) for o, part in zip(outs, lses))

    def fwd():
        with torch.no_grad():
            merged(q, kv_sets)

    def fwd_bwd():
        for x in [qs, *(t for pair in kv_leaves for t in pair)]:
            x.grad = None
        merged(qs, kv_leaves).backward(do)

    return fwd, fwd_bwd


def _time_pair(prefix: str, fwd, fwd_bwd, guard_s: float, device: str, flops: float) -> dict:
    """Forward and forward+backward timings (ms), first-call (compile) seconds and peak memory."""
    out = {}
    ms, first = bench(fwd, guard_s)
    out[f"{prefix}fwd_ms"], out[f"{prefix}fwd_first_s"] = ms, first
    if ms is None:
        out[f"{prefix}skipped"] = f"a warm forward > guard {guard_s} s (first {first:.1f} s)"
        return out
    if fwd_bwd is None:
        return out
    if device == "cuda":
        out[f"{prefix}computed_tflops_fwd"] = flops / ms / 1e9
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    ms2, first2 = bench(fwd_bwd, guard_s)
    out[f"{prefix}fwdbwd_ms"], out[f"{prefix}fwdbwd_first_s"] = ms2, first2
    if ms2 is None:
        out[f"{prefix}skipped"] = f"a warm fwd+bwd > guard {guard_s} s (first {first2:.1f} s)"
    if device == "cuda":
        out[f"{prefix}peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
    return out


def main():
    spec = json.loads(sys.argv[1])
    try:
        res = run_case(spec)
    except Exception as e:  # noqa: BLE001 - the parent records the failure and goes on
        import traceback

        traceback.print_exc()
        res = {"variant": spec.get("variant"), "error": repr(e)[:400]}
    print("FLEX_RESULT " + json.dumps(res, default=str), flush=True)


if __name__ == "__main__":
    main()
