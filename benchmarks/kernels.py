"""Triton sparse-attention kernels on one GPU: correctness, tile tuning, and speed against FlexAttention.

Run on the device machine (one H200), e.g. the issue's goal cases, then the others, then correctness:

    PYTHONUNBUFFERED=1 python3 benchmarks/kernels.py --out $OUT --only time --cases goal --no-merged --warm-flex 3 --budget 420
    PYTHONUNBUFFERED=1 python3 benchmarks/kernels.py --out $OUT --only time --cases rest --no-sdpa
    PYTHONUNBUFFERED=1 python3 benchmarks/kernels.py --out $OUT --only check,tune

``--cases`` takes all, goal, rest, case names, keys (``window4096@1M``) or indices (``--list`` shows them).

Sections (``--only``, comma list):
- ``check`` / ``quickcheck``: out, lse, dq, dk, dv in bf16 and fp16 against float64, each within 2x the
  error of the eager reference in the same dtype; head dims 64 and 128, GQA; outputs land in NaN-poisoned
  memory, so an unwritten element shows.
- ``tune``: forward candidates (bm, bn, warps, stages), then backward candidates (bm_kv, bn_kv, warps_kv,
  stages_kv), each passed as ``config=``; reported, not installed.
- ``time``: per case (B=1, bf16, causal, d128; heads 16/16 and 16/4) ours forward and forward+backward
  (medians of do_bench), peak memory and cold plan time; FlexAttention with one mask; FlexAttention split
  by hand over compact key sets (see ``flex_case.py``), unmerged and LSE-merged; SDPA dense causal at 64k
  once, as the ceiling.  Useful TFLOP/s = 4*B*Hq*pairs_per_head*D forward, 3.5x that forward+backward.
- ``planops`` (alone, CPU): tensor operations of one cold plan per case -> plan_ops.json.

Every FlexAttention variant of every case is compiled and timed in a fresh process
(``benchmarks/flex_case.py``): a process past torch.compile's recompile limit runs Flex degraded.
``--budget`` skips (and records as skipped) the cases that would start after that many seconds.
Writes kernels.json and kernels.png to ``--out`` and prints a markdown table.

``--smoke`` runs the whole flow tiny on the CPU (N=256, Triton interpreter, float16/float32, Flex forward
only) to exercise the plumbing; its times mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

SMOKE = "--smoke" in sys.argv
if SMOKE:  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from flex_case import FLEX_PEAK_FLOPS, bench, split_parts  # noqa: E402
from sparse_parallel.kernels import core  # noqa: E402
from sparse_parallel.kernels import function as kfunction  # noqa: E402
from sparse_parallel.kernels.function import prepare, triton_attention  # noqa: E402
from sparse_parallel.patterns import (Dilated, Documents, Global, Pattern, RandomBlocks, Strided,  # noqa: E402
                                      TopKBlocks, Window, as_pattern)
from sparse_parallel.reference import reference_attention  # noqa: E402

K = 1024
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


# -- cases -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One timed pattern at one length; ``goal`` cases are the issue's targets and run first."""

    name: str
    pattern: Pattern
    n: int
    goal: bool = False
    #: mean document length of packed documents (0: one sequence); lengths drawn by ``document_lengths``
    docs_mean: int = 0

    @property
    def key(self) -> str:
        return f"{self.name}@{size_label(self.n)}"

    @property
    def lengths(self) -> list[int] | None:
        return document_lengths(self.n, self.docs_mean) if self.docs_mean else None

    @property
    def attended(self) -> Pattern:
        """The pattern our kernels run: with documents, intersected with them."""
        lengths = self.lengths
        return self.pattern.within(Documents.from_lengths([lengths])) if lengths else self.pattern


def document_lengths(n: int, mean: int, seed: int = 0) -> list[int]:
    """Lengths of packed documents filling n tokens: exponentially distributed around ``mean``
    (at least one token), the last one cut to fit; the same for every run (seeded)."""
    g = torch.Generator().manual_seed(seed)
    out, left = [], n
    while left > 0:
        size = max(1, int(torch.empty(1).exponential_(1.0 / mean, generator=g)))
        out.append(min(size, left))
        left -= out[-1]
    return out


def size_label(n: int) -> str:
    return f"{n // (K * K)}M" if n % (K * K) == 0 else (f"{n // K}k" if n % K == 0 else str(n))


WSG = Window(1024) | Strided(64) | Global(first=128, queries=False)
CASES = (
    Case("window4096", as_pattern(Window(4096)), 1024 * K, goal=True),
    Case("w1024+s64+g128", WSG, 256 * K, goal=True),
    Case("w1024+s64+g128", WSG, 1024 * K, goal=True),
    Case("dilated(1024,4)", as_pattern(Dilated(window=1024, levels=4)), 256 * K, goal=True),
    Case("window4096", as_pattern(Window(4096)), 256 * K),
    Case("random(64,3)+w512", RandomBlocks(block=64, per_query_block=3) | Window(512), 256 * K),
    Case("topk(64,16)", as_pattern(TopKBlocks(block=64, k=16)), 64 * K),
    Case("w4096+s64+g128 docs32k", Window(4096) | Strided(64) | Global(first=128, queries=False), 1024 * K,
         docs_mean=32 * K),
)
#: The same shapes of pattern, shrunk for ``--smoke`` (N=256 under the interpreter).
SMOKE_CASES = (
    Case("window64", as_pattern(Window(64)), 256, goal=True),
    Case("w32+s8+g16", Window(32) | Strided(8) | Global(first=16, queries=False), 256, goal=True),
    Case("dilated(16,2)", as_pattern(Dilated(window=16, levels=2)), 256, goal=True),
    Case("random(16,2)+w16", RandomBlocks(block=16, per_query_block=2) | Window(16), 256),
    Case("topk(16,4)", as_pattern(TopKBlocks(block=16, k=4)), 256),
    Case("w32+s8+g16 docs", Window(32) | Strided(8) | Global(first=16, queries=False), 256, docs_mean=40),
)
HEADS = {"16/16": (16, 16), "16/4": (16, 4)}


def select_jobs(cases, spec: str, heads: list[str]) -> list[tuple[Case, str]]:
    """(case, heads label) jobs in run order: goal cases first, each in both head layouts.

    ``spec``: ``all``, ``goal``, ``rest``, or a comma list of case names, keys (``name@256k``) or indices.
    """
    picked = []
    for token in re.split(r",(?![^()]*\))", spec):  # names such as dilated(1024,4) hold commas
        for index, case in enumerate(cases):
            if (token == "all" or (token == "goal" and case.goal) or (token == "rest" and not case.goal)
                    or token in (case.name, case.key, str(index))) and case not in picked:
                picked.append(case)
    picked.sort(key=lambda c: not c.goal)
    return [(case, h) for case in picked for h in heads]


# -- correctness -----------------------------------------------------------------------------------------
def poison():
    """Fill the allocator's free memory with NaN so that unwritten outputs show (CUDA only)."""
    if not torch.cuda.is_available():
        return
    free = torch.cuda.mem_get_info()[0]
    x = torch.empty(int(min(free * 0.5, 24e9)) // 4, dtype=torch.float32, device="cuda")
    x.fill_(float("nan"))
    del x


def run(fn, q, k, v, dout, dlse):
    """[out, lse, dq, dk, dv] in float64 of ``fn``, with gradients from both out and lse."""
    ts = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = fn(*ts)
    lf = torch.where(torch.isinf(lse), 0.0, lse)
    ((out.double() * dout).sum() + (lf.double() * dlse).sum()).backward()
    return [out.double(), lf.double()] + [t.grad.double() for t in ts]


#: (name, pattern, Hq, Hkv, D) of the correctness section.
CHECK_CASES = (
    ("window(700) gqa d128 (one pass)", Window(700), 4, 2, 128),
    ("window512+global64+strided32 gqa d128", Window(512) | Global(first=64, queries=False) | Strided(32), 4, 2, 128),
    ("window512+global64+strided32 gqa4 d64", Window(512) | Global(first=64, queries=False) | Strided(32), 8, 2, 64),
    ("dilated(256,3) d128", Dilated(window=256, levels=3), 4, 4, 128),
    ("dilated(256,3) gqa d64", Dilated(window=256, levels=3), 4, 2, 64),
    ("random(64,3)+window256 gqa d128", RandomBlocks(block=64, per_query_block=3) | Window(256), 4, 2, 128),
    ("topk(64,4) gqa d64", TopKBlocks(block=64, k=4), 4, 2, 64),
    ("topk(64,4) d128", TopKBlocks(block=64, k=4), 4, 4, 128),
    ("global queries+keys gqa d128", Window(128) | Global(first=16, positions=(1000, 3001)), 4, 2, 128),
    ("strided(64,63) masked rows d64", Strided(64, 63) | Window(0), 4, 4, 64),
    ("noncausal window+strided d128", Pattern(Window(300, 200) | Strided(48, 5, span=2000), causal=False), 4, 4, 128),
    # packed documents (1-token ones among them) with every kind of pass, and top-k within them (n = 4096)
    ("w512+g64+s32 in documents gqa d128", (Window(512) | Global(first=64, queries=False) | Strided(32)).within(
        Documents.from_lengths([1, 700, 1, 1500, 33, 1861])), 4, 2, 128),
    ("topk(64,4)+w64 in documents gqa d64", (TopKBlocks(block=64, k=4) | Window(64)).within(
        Documents.from_lengths([900, 1, 2000, 1195])), 4, 2, 64),
)


def correctness(results, quick=False, n=4096, dtypes=(torch.bfloat16, torch.float16), device="cuda", which=None):
    """Kernels against float64; error <= 2x the same-dtype eager reference's (both against float64).

    ``which``: indices into CHECK_CASES (default: all, or four of them when ``quick``)."""
    if which is None:
        which = (0, 1, 4, 8) if quick else range(len(CHECK_CASES))
    cases = [CHECK_CASES[i] for i in which]
    ok_all = True
    for name, pat, hq, hkv, d in cases:
        pat = as_pattern(pat)
        g = torch.Generator(device=device).manual_seed(1234)
        q, k, v = (torch.randn(1, n, h, d, device=device, dtype=torch.float64, generator=g) for h in (hq, hkv, hkv))
        dout = torch.randn(1, n, hq, d, device=device, dtype=torch.float64, generator=g)
        dlse = torch.randn(1, hq, n, device=device, dtype=torch.float64, generator=g)
        ref = None
        for dt in dtypes:
            # TopK picks blocks from the data: the float64 reference must see the same (rounded) inputs.
            ql, kl, vl = (t.to(dt) for t in (q, k, v))
            src = (ql.double(), kl.double(), vl.double()) if pat.data_dependent else (q, k, v)
            bound = pat.bind(n, hq, q=ql if pat.data_dependent else None, k=kl if pat.data_dependent else None)
            if ref is None or pat.data_dependent:
                ref = run(lambda *t: reference_attention(*t, bound), *src, dout, dlse)
            low = run(lambda *t: reference_attention(*t, bound), ql, kl, vl, dout, dlse)
            poison()
            got = run(lambda *t: triton_attention(*t, pat), ql, kl, vl, dout, dlse)
            row = {"case": name, "dtype": str(dt).split(".")[-1], "n": n}
            good = True
            for label, a, r, lo in zip(("out", "lse", "dq", "dk", "dv"), got, ref, low):
                err, rerr = (a - r).abs().max().item(), (lo - r).abs().max().item()
                row[label] = [err, rerr]
                good &= bool(torch.isfinite(a).all()) and err <= 2 * rerr + 1e-6
            row["ok"] = good
            ok_all &= good
            results["correctness"].append(row)
            log(f"check {name:40s} {row['dtype']:9s} " + " ".join(
                f"{lb}={row[lb][0]:.1e}/{row[lb][1]:.1e}" for lb in ("out", "lse", "dq", "dk", "dv"))
                + ("  OK" if good else "  FAIL"))
    return ok_all


# -- tuning ----------------------------------------------------------------------------------------------
FWD_CANDIDATES = ((128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3))
BWD_CANDIDATES = ((64, 128, 8, 2), (32, 128, 4, 2), (64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 3), (32, 128, 8, 3))
SMOKE_FWD_CANDIDATES = ((16, 16, 1, 1), (32, 32, 1, 1))
SMOKE_BWD_CANDIDATES = ((16, 16, 1, 1), (16, 32, 1, 1))


def _sweep(results, kind, names, candidates, make_config, run_with, guard_s):
    """Time ``run_with(config)`` for each candidate; record each; return the fastest candidate's Config."""
    best = None
    for cand in candidates:
        cfg = make_config(*cand)
        try:
            ms, _ = bench(lambda: run_with(cfg), guard_s)
        except Exception as e:  # noqa: BLE001 - a candidate Triton cannot compile is just not a candidate
            log("tune", kind, cand, "failed", repr(e)[:200])
            continue
        log(f"tune {kind} {dict(zip(names, cand))}: {fmt(ms, 2)} ms")
        results["tuning"].append({"kind": kind, **dict(zip(names, cand)), "ms": ms})
        if ms is not None and (best is None or ms < best[0]):
            best = (ms, cfg)
    return best[1] if best else None


def tune(results, guard_s, device, n=64 * K, heads=16, d=128):
    """Tile sizes on window 4096: forward (bm, bn, warps, stages), then dk/dv on the best forward."""
    pat = as_pattern(Window(4096))
    q, k, v = (torch.randn(1, n, heads, d, device=device, dtype=torch.bfloat16) for _ in range(3))
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    do = torch.randn_like(q)
    base = core.default_config(device)
    fwd_c, bwd_c = (SMOKE_FWD_CANDIDATES, SMOKE_BWD_CANDIDATES) if SMOKE else (FWD_CANDIDATES, BWD_CANDIDATES)

    def forward(cfg):
        with torch.no_grad():
            triton_attention(q, k, v, pat, config=cfg)

    def forward_backward(cfg):
        o, _ = triton_attention(qs, ks, vs, pat, config=cfg)
        o.backward(do)

    best = _sweep(results, "fwd", ("bm", "bn", "warps", "stages"), fwd_c,
                  lambda bm, bn, w, s: base.replace(bm=bm, bn=bn, warps=w, stages=s), forward, guard_s) or base
    best = _sweep(results, "fwdbwd", ("bm_kv", "bn_kv", "warps_kv", "stages_kv"), bwd_c,
                  lambda bm, bn, w, s: best.replace(bm_kv=bm, bn_kv=bn, warps_kv=w, stages_kv=s),
                  forward_backward, guard_s) or best
    results["tuned_config"] = vars(best)
    results["default_config"] = vars(base)
    log("fastest config", vars(best), "(device default:", vars(base), ")")


# -- timing ----------------------------------------------------------------------------------------------
def ours_row(case: Case, hq: int, hkv: int, d: int, guard_s: float, device: str) -> dict:
    """Our kernels on one case: plan time, forward and forward+backward ms, peak memory."""
    pat = case.attended
    n = case.n
    dtype = torch.float16 if SMOKE else torch.bfloat16  # bf16 tl.dot is wrong in the interpreter
    q, k, v = (torch.randn(1, n, h, d, device=device, dtype=dtype) for h in (hq, hkv, hkv))
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    do = torch.randn_like(q)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    row = {}
    prepare(q, k, v, pat, plans=True)
    kfunction._PLANS.clear()  # time a cold plan (tables, terms, every tile plan)
    sync()
    t = time.perf_counter()
    prepare(q, k, v, pat, plans=True)
    sync()
    row["plan_ms"] = (time.perf_counter() - t) * 1000

    def fwd():
        with torch.no_grad():
            triton_attention(q, k, v, pat, config=None)

    def fwd_bwd():
        qs.grad = ks.grad = vs.grad = None  # written, not accumulated between calls (as in a model)
        o, _ = triton_attention(qs, ks, vs, pat, config=None)
        o.backward(do)

    row["fwd_ms"], row["fwd_first_s"] = bench(fwd, guard_s, compiles=False)
    if row["fwd_ms"] is None:
        row["skipped"] = f"a warm forward > guard {guard_s} s (first {row['fwd_first_s']:.1f} s)"
        return row
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    row["fwdbwd_ms"], row["fwdbwd_first_s"] = bench(fwd_bwd, guard_s, compiles=False)
    if device == "cuda":
        row["peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
    return row


def flex_spec(case: Case, hq: int, hkv: int, d: int, variant: str, args, device: str) -> dict:
    """The JSON spec that ``flex_case.py`` runs (in a process of its own)."""
    return {"pattern": case.pattern.to_dict(), "n": case.n, "hq": hq, "hkv": hkv, "d": d, "variant": variant,
            "device": device, "dtype": "float32" if SMOKE else "bfloat16", "guard_s": args.guard,
            "verify_n": 256 if SMOKE else 4096, "merged": not args.no_merged, "documents": case.lengths}


def flex_worker(spec: dict, timeout_s: float) -> dict:
    """Run one Flex variant in a fresh Python process; its result dict (or the error)."""
    cmd = [sys.executable, os.path.join(HERE, "flex_case.py"), json.dumps(spec)]
    env = dict(os.environ)
    if SMOKE:  # the CPU is shared: keep inductor's compile workers and OpenMP to one thread
        env.update(OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"variant": spec["variant"], "error": f"worker timed out after {timeout_s:.0f} s"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("FLEX_RESULT "):
            res = json.loads(line[len("FLEX_RESULT "):])
            if "error" in res:
                res["stderr_tail"] = proc.stderr[-1500:]
            return res
    return {"variant": spec["variant"], "error": f"worker rc={proc.returncode}, no result",
            "stderr_tail": proc.stderr[-1500:]}


def job_shape(heads: str) -> tuple[int, int, int]:
    """(Hq, Hkv, D) of a job with the head layout ``heads`` (a quarter of the heads and D=32 in --smoke)."""
    hq, hkv = HEADS[heads]
    return (hq // 4, hkv // 4, 32) if SMOKE else (hq, hkv, 128)


def flex_specs(case: Case, heads: str, args, device: str) -> dict[str, dict]:
    """{"single"/"split": the spec of the Flex process ``time_job`` starts, or {"skipped": why}}."""
    hq, hkv, d = job_shape(heads)
    why = single_mask_hopeless(case, hq, d, args.guard if args.single_guard is None else args.single_guard)
    specs = {"single": {"skipped": why} if why else flex_spec(case, hq, hkv, d, "single", args, device)}
    parts = split_parts(case.pattern, case.n)
    if parts is None:
        specs["split"] = {"skipped": "no compact key sets (block lists)"}
    elif len(parts) == 1:
        specs["split"] = {"skipped": "one key set: the same as one mask"}
    else:
        specs["split"] = flex_spec(case, hq, hkv, d, "split", args, device)
    return specs


def run_parallel(cmds: list[list[str]], procs: int) -> list[tuple[int, str]]:
    """Run the commands ``procs`` at a time; (exit code, output) of each, in order.  Output goes to a
    file, not a pipe, so that a chatty compile cannot block on a full one."""
    results: list = [None] * len(cmds)
    running = []
    for i, cmd in enumerate(cmds):
        out = tempfile.TemporaryFile("w+")
        running.append((i, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT), out))
        while len(running) >= procs or (i == len(cmds) - 1 and running):
            time.sleep(0.5)
            for item in [item for item in running if item[1].poll() is not None]:
                running.remove(item)
                j, p, f = item
                f.seek(0)
                results[j] = (p.returncode, f.read())
                f.close()
    return results


def warm_flex(jobs, args, device: str) -> None:
    """Run every Flex process of ``jobs`` once, untimed and ``args.warm_flex`` at a time, to fill
    torch.compile's on-disk caches (inductor's FX graph and Triton kernel caches).  Each timed process
    is still a fresh one (its own dynamo state and recompile counts); only its compiled kernels come
    from the cache.  A warm-up that fails (e.g. out of memory beside the others) costs only its time:
    the timed process then compiles for itself."""
    specs = [{**spec, "warm_only": True} for case, heads in jobs
             for spec in flex_specs(case, heads, args, device).values() if "skipped" not in spec]
    t = time.time()
    cmd = [sys.executable, os.path.join(HERE, "flex_case.py")]
    failed = [out for code, out in run_parallel([cmd + [json.dumps(s)] for s in specs], args.warm_flex)
              if code != 0 or '"warmed": true' not in out]
    for out in failed:
        log("warm-flex: a warm-up failed:", out[-600:])
    log(f"warm-flex: {len(specs)} Flex processes compiled in {time.time() - t:.0f} s ({len(failed)} failed)")


def single_mask_hopeless(case: Case, hq: int, d: int, guard_s: float) -> str | None:
    """Why one-mask Flex is not worth starting, or None.

    An unbounded strided level with stride <= 128 puts a key in every 128-key block, so Flex computes
    the whole causal triangle; past the guard it is skipped without spending a process on it.
    """
    if case.docs_mean or not any(isinstance(c, Strided) and c.span is None and c.stride <= 128
                                 for c in case.pattern.components):
        return None  # within documents a strided level reaches back to its document's start only
    flops = 4.0 * hq * case.n * case.n / 2 * d
    if 4.5 * flops / FLEX_PEAK_FLOPS <= guard_s:
        return None
    return f"computes the whole causal triangle: >= {flops / FLEX_PEAK_FLOPS:.0f} s per forward"


def time_job(case: Case, heads: str, args, device: str) -> dict:
    """Ours, one-mask Flex and hand-split Flex on one case; the row kernels.json records."""
    hq, hkv, d = job_shape(heads)
    desc = case.attended.describe(case.n, hq, d)  # TopKBlocks alone: exact without the data
    row = {"case": case.name, "key": case.key, "n": case.n, "heads": heads, "hq": hq, "hkv": hkv, "d": d,
           "goal": case.goal, "pairs_per_head": desc["pairs"] / hq, "useful_flops_fwd": desc["useful_flops_fwd"],
           "density": desc["density_of_causal"], "documents": len(case.lengths) if case.docs_mean else 0}
    try:
        row["ours"] = ours_row(case, hq, hkv, d, args.guard, device)
        log("  ours", json.dumps(row["ours"], default=str)[:300])
    except Exception as e:  # noqa: BLE001 - record and go on to the baselines
        row["ours"] = {"error": repr(e)[:400]}
        log("ours failed:", repr(e)[:400])
    if device == "cuda":
        torch.cuda.empty_cache()  # leave the memory to the Flex process
    for variant, spec in flex_specs(case, heads, args, device).items():
        row[f"flex_{variant}"] = spec if "skipped" in spec else flex_worker(spec, args.worker_timeout)
        log(f"  flex {variant}", json.dumps(row[f"flex_{variant}"], default=str)[:300])
    add_derived(row)
    return row


def add_derived(row: dict) -> None:
    """Useful TFLOP/s per variant and ours-vs-best-Flex ratios (flex_ms / ours_ms: > 1, ours faster)."""
    fl = row["useful_flops_fwd"]
    variants = {"ours": row["ours"], "single": row["flex_single"], "split": row["flex_split"]}
    split = row["flex_split"]
    if split.get("merged_fwdbwd_ms"):
        variants["merged"] = {"fwd_ms": split.get("merged_fwd_ms"), "fwdbwd_ms": split["merged_fwdbwd_ms"]}
    for name, r in variants.items():
        if r.get("fwd_ms"):
            row[f"{name}_fwd_tflops"] = fl / r["fwd_ms"] / 1e9
        if r.get("fwdbwd_ms"):
            row[f"{name}_fwdbwd_tflops"] = 3.5 * fl / r["fwdbwd_ms"] / 1e9
    for phase in ("fwd", "fwdbwd"):
        flex = [r[f"{phase}_ms"] for r in (row["flex_single"], row["flex_split"]) if r.get(f"{phase}_ms")]
        ours = row["ours"].get(f"{phase}_ms")
        row[f"ratio_{phase}"] = min(flex) / ours if flex and ours else None


def sdpa_row(device: str, guard_s: float, n=64 * K, heads=16, d=128) -> dict:
    """SDPA dense causal (the ceiling): forward and forward+backward at 64k, 16/16 heads, d128."""
    import torch.nn.functional as F

    if SMOKE:
        n, heads, d = 256, 4, 32
    dtype = torch.float32 if SMOKE else torch.bfloat16
    q, k, v = (torch.randn(1, heads, n, d, device=device, dtype=dtype) for _ in range(3))
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    do = torch.randn_like(q)
    fl = 4.0 * heads * (n * (n + 1) // 2) * d

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwd_bwd():
        F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).backward(do)

    row = {"n": n, "hq": heads, "hkv": heads, "d": d}
    row["fwd_ms"], _ = bench(fwd, guard_s)
    row["fwdbwd_ms"], _ = bench(fwd_bwd, guard_s)
    row["fwd_tflops"] = fl / row["fwd_ms"] / 1e9
    row["fwdbwd_tflops"] = 3.5 * fl / row["fwdbwd_ms"] / 1e9
    return row


# -- output ----------------------------------------------------------------------------------------------
def fmt(x, p=1):
    return "-" if x is None else (f"{x:.{p}f}" if isinstance(x, float) else str(x))


def _ms(r: dict, key: str) -> str:
    """A variant's time, or why there is none (skipped / error / CPU forward only)."""
    if r.get(key) is not None:
        return fmt(r[key])
    for why in ("error", "skipped", "skipped_cpu"):
        if r.get(why):
            return "err" if why == "error" else "skip"
    return "-"


def print_table(results) -> None:
    hdr = ("case", "N", "heads", "ours fwd", "ours f+b", "Flex fwd", "Flex f+b", "split fwd", "split f+b",
           "merged f+b", "fwd ratio", "f+b ratio", "ours f+b TF", "best Flex f+b TF", "ours GB", "Flex GB",
           "plan ms", "split covers") + (("run",) if any("run" in r for r in results["timing"]) else ())
    print("times in ms; ratio = best Flex ms / ours ms (> 1: ours faster); TF = useful TFLOP/s")
    print("| " + " | ".join(hdr) + " |\n|" + "---|" * len(hdr))
    for r in results["timing"]:
        if "ours" not in r:
            print(f"| {r['case']} | {size_label(r['n'])} | {r['heads']} | {r.get('skipped', r.get('error'))} |")
            continue
        o, s, h = r["ours"], r["flex_single"], r["flex_split"]
        best_tf = max([x for x in (r.get("single_fwdbwd_tflops"), r.get("split_fwdbwd_tflops")) if x] or [None],
                      key=lambda x: x or 0)
        flex_gb = max([x for x in (s.get("peak_gb"), h.get("peak_gb")) if x] or [None], key=lambda x: x or 0)
        cover = h.get("exact_cover", "-" if "skipped" in h else "?")
        cells = [r["case"], size_label(r["n"]), f"{r['hq']}/{r['hkv']}", _ms(o, "fwd_ms"), _ms(o, "fwdbwd_ms"),
                 _ms(s, "fwd_ms"), _ms(s, "fwdbwd_ms"), _ms(h, "fwd_ms"), _ms(h, "fwdbwd_ms"),
                 _ms(h, "merged_fwdbwd_ms"), fmt(r.get("ratio_fwd"), 2), fmt(r.get("ratio_fwdbwd"), 2),
                 fmt(r.get("ours_fwdbwd_tflops"), 0), fmt(best_tf, 0), fmt(o.get("peak_gb")), fmt(flex_gb),
                 fmt(o.get("plan_ms"), 2), str(cover)] + ([r["run"]] if "run" in r else [])
        print("| " + " | ".join(cells) + " |")
    sd = results.get("sdpa")
    if sd and "fwd_ms" in sd:
        print(f"| SDPA dense causal (ceiling) | {size_label(sd['n'])} | {sd['hq']}/{sd['hkv']} | "
              f"{fmt(sd['fwd_ms'])} | {fmt(sd['fwdbwd_ms'])} | | | | | | | | {fmt(sd['fwdbwd_tflops'], 0)} | | | "
              "| | |")


def plot(results, path) -> None:
    """Bar chart: useful fwd+bwd TFLOP/s per case, ours vs one-mask Flex vs hand-split Flex."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["timing"] if "ours" in r]
    labels = [f"{r['case']}\n{size_label(r['n'])} {r['hq']}/{r['hkv']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 1.2), 5))
    series = (("ours_fwdbwd_tflops", "ours"), ("single_fwdbwd_tflops", "Flex, one mask"),
              ("split_fwdbwd_tflops", "Flex, hand-split (unmerged)"))
    width = 0.8 / len(series)
    for i, (key, label) in enumerate(series):
        ax.bar([x + (i - 1) * width for x in range(len(rows))], [r.get(key) or 0 for r in rows], width=width,
               label=label)
    sd = results.get("sdpa") or {}
    if sd.get("fwdbwd_tflops"):
        ax.axhline(sd["fwdbwd_tflops"], color="gray", ls="--", lw=1, label="SDPA dense causal 64k")
    ax.set_xticks(list(range(len(rows))))
    ax.set_xticklabels(labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("useful TFLOP/s, fwd+bwd")
    ax.set_title(f"sparse attention, B=1 causal, on {results['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(paths: list, out: str) -> dict:
    """One table and chart from the timed rows of several runs (each row: ours and Flex of one run)."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    rows = {}
    for run in runs:
        for r in run["timing"]:
            if "ours" in r or "ours" not in rows.get((r["key"], r["heads"]), {}):
                rows[(r["key"], r["heads"])] = dict(r, run=run["date"])
    results = dict(runs[-1], timing=list(rows.values()), sdpa=next((r["sdpa"] for r in runs if r.get("sdpa")), None),
                   runs=[{"date": r["date"], "command": r["command"]} for r in runs])
    print_table(results)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "kernels.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(out, "kernels.png"))
    return results


# -- planning operations (CPU) ---------------------------------------------------------------------------
#: Planning cases of ``--only planops``: at 1M tokens, 16q/4kv heads.
PLAN_CASES = (("window4096", Window(4096)), ("w1024+s64+g128", WSG),
              ("dilated(1024,4)", Dilated(window=1024, levels=4)))


def plan_ops(n: int) -> list[dict]:
    """Tensor operations of one cold plan (``prepare(..., plans=True)``), counted on the CPU.

    On a GPU a non-view operation is about one kernel launch, so the count is what cold planning costs there
    beyond its O(N/block) work; q/k/v are broadcast views (no memory), planning never reads their data.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    views = {"slice", "select", "view", "expand", "alias", "unsqueeze", "squeeze", "t", "transpose", "permute",
             "as_strided", "detach", "_unsafe_view"}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = self.views = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in views:
                self.views += 1
            else:
                self.ops += 1
            return func(*args, **(kwargs or {}))

    rows = []
    for name, pat in PLAN_CASES:
        q = torch.empty(1, 1, 16, 128).expand(1, n, 16, 128)
        k = torch.empty(1, 1, 4, 128).expand(1, n, 4, 128)
        kfunction._PLANS.clear()
        with Count() as c:
            prepare(q, k, k, pat, plans=True)
        rows.append({"case": name, "n": n, "ops": c.ops, "view_ops": c.views})
        log("planops", json.dumps(rows[-1]))
    kfunction._PLANS.clear()
    return rows


def plan_ops_report(n: int, out: str) -> None:
    rows = plan_ops(n)
    with open(os.path.join(out, "plan_ops.json"), "w") as f:
        json.dump({"torch": torch.__version__, "python": platform.python_version(), "command": " ".join(sys.argv),
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "plans": rows}, f, indent=1)
    print("| case | N | tensor operations | view operations |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {size_label(r['n'])} | {r['ops']} | {r['view_ops']} |")


# -- main ------------------------------------------------------------------------------------------------
def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--only", default="check,tune,time",
                    help="comma list of: check (or quickcheck), tune, time; or planops alone (CPU)")
    ap.add_argument("--report", default="", help="comma list of kernels.json files of earlier runs: print "
                    "one table and draw one chart of their timed rows (no GPU); a row's last measured run wins")
    ap.add_argument("--check-cases", default="", help="comma list of indices into CHECK_CASES (default: all)")
    ap.add_argument("--cases", default="all", help="all, goal, rest, or a comma list of case names, "
                    "keys (name@256k) or indices into the case list")
    ap.add_argument("--heads", default="16/16,16/4", help="comma list of head layouts: 16/16, 16/4")
    ap.add_argument("--no-sdpa", action="store_true", help="do not time the SDPA dense causal ceiling")
    ap.add_argument("--no-merged", action="store_true",
                    help="hand-split Flex: skip the LSE-merged variant (saves its compile, ~15 s a case)")
    ap.add_argument("--guard", type=float, default=20.0,
                    help="skip a variant whose warm call takes longer (s); a slower first call gets a second")
    ap.add_argument("--single-guard", type=float, default=None,
                    help="the guard for one-mask Flex on unbounded strided levels (default: --guard)")
    ap.add_argument("--budget", type=float, default=1e9,
                    help="seconds after which cases not yet started are skipped (and recorded as skipped)")
    ap.add_argument("--worker-timeout", type=float, default=300.0, help="seconds one Flex process may take")
    ap.add_argument("--warm-flex", type=int, default=0, metavar="P",
                    help="first compile every Flex process of the selected cases, P at a time, untimed, so "
                    "that the timed (still fresh) processes load torch.compile's kernels from its caches")
    ap.add_argument("--max-n", type=int, default=1024 * K, help="planops: sequence length")
    ap.add_argument("--smoke", action="store_true", help="the whole flow tiny on the CPU (interpreter)")
    ap.add_argument("--list", action="store_true", help="print the cases with their indices and exit")
    return ap.parse_args()


def main():
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    only = set(args.only.split(","))
    if args.list:
        for index, case in enumerate(SMOKE_CASES if SMOKE else CASES):
            print(index, case.key, "(goal)" if case.goal else "")
        return None
    if only == {"planops"}:
        return plan_ops_report(args.max_n, args.out)
    if args.report:
        return report(args.report.split(","), args.out)
    import triton

    if SMOKE:
        torch.set_num_threads(1)  # a shared 2-core machine
    device = "cpu" if SMOKE else "cuda"
    results = {"device": "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": triton.__version__, "python": platform.python_version(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
               "args": vars(args), "correctness": [], "tuning": [], "timing": []}
    path = os.path.join(args.out, "kernels.json")

    def save():
        with open(path, "w") as f:
            json.dump(results, f, indent=1)

    if "check" in only or "quickcheck" in only:
        if SMOKE:  # bf16 tl.dot is wrong in the interpreter; small sizes keep it quick
            results["correct"] = correctness(results, quick=True, n=256, dtypes=(torch.float16,), device=device)
        else:
            which = [int(i) for i in args.check_cases.split(",")] if args.check_cases else None
            results["correct"] = correctness(results, quick="check" not in only, which=which)
        save()
    if "tune" in only:
        tune(results, args.guard, device, **({"n": 256, "heads": 2, "d": 32} if SMOKE else {}))
        save()
    if "time" in only:
        if not args.no_sdpa:
            results["sdpa"] = sdpa_row(device, args.guard)
            log("sdpa", json.dumps(results["sdpa"]))
        jobs = select_jobs(SMOKE_CASES if SMOKE else CASES, args.cases, args.heads.split(","))
        if args.warm_flex:
            warm_flex(jobs, args, device)
        for case, heads in jobs:
            if time.time() - T0 > args.budget:
                results["timing"].append({"case": case.name, "key": case.key, "n": case.n, "heads": heads,
                                          "skipped": f"time budget {args.budget:.0f} s spent"})
                log("skip", case.key, heads, "(budget)")
                continue
            log("case", case.key, heads)
            row = time_job(case, heads, args, device)
            results["timing"].append(row)
            log("time", json.dumps(row, default=str)[:1500])
            save()
            try:
                plot(results, os.path.join(args.out, "kernels.png"))
            except Exception as e:  # noqa: BLE001 - the chart is a convenience, the JSON is the record
                log("plot failed:", repr(e)[:200])
        print_table(results)
    save()


if __name__ == "__main__":
    main()
