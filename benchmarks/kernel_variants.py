"""Kernel variants side by side on one GPU: tile configurations.

Run on the device machine:  PYTHONUNBUFFERED=1 python3 benchmarks/kernel_variants.py --out $OUT

1. A bf16 check of the default config's out/lse/dq/dk/dv against float64 on small inputs (error within
   2x the eager bf16 reference's, NaN-poisoned memory): tile sizes alone do not change what is computed.
2. Forward candidates (bm, bn, warps, stages; ``bn`` is also the single-pass key tile), then backward
   candidates: dk/dv tiles (bm_kv, bn_kv, warps_kv, stages_kv) x query-major dq tiles (``--bwd`` x
   ``--dq``), on the cases given by ``--cases``; medians of do_bench.
   Each row lists the registers and spills of the kernels it compiled.
3. A torch.profiler breakdown of one fwd+bwd of the first case under the fastest variant
   (GPU time per kernel name).
Writes kernel_variants.json to --out and prints a table.  FlexAttention is not run here: the anchors
live in benchmarks/kernels.py, which compiles each Flex case in a fresh process.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparse_parallel.kernels import core  # noqa: E402
from sparse_parallel.kernels.function import triton_attention  # noqa: E402
from sparse_parallel.patterns import Dilated, Global, RandomBlocks, Strided, TopKBlocks, Window, as_pattern  # noqa: E402
from sparse_parallel.reference import reference_attention  # noqa: E402

from kernels import poison, run as _grads  # noqa: E402  (benchmarks/kernels.py: the same check helpers)

K = 1024
T0 = time.time()
CASES = {
    "window4096": Window(4096),
    "w1024+s64+g128": Window(1024) | Strided(64) | Global(first=128, queries=False),
    "dilated(1024,4)": Dilated(window=1024, levels=4),
}
CHECKS = [
    ("w512+g64+s32 gqa d128", Window(512) | Global(first=64, queries=False) | Strided(32), 4, 2, 128),
    ("dilated(256,3) d64", Dilated(window=256, levels=3), 4, 2, 64),
    ("random(64,3)+w256", RandomBlocks(block=64, per_query_block=3) | Window(256), 4, 2, 128),
    ("topk(64,4)", TopKBlocks(block=64, k=4), 4, 2, 128),
    ("global queries+keys", Window(128) | Global(first=16, positions=(1000, 3001)), 4, 2, 128),
]


def case_specs(text: str) -> list:
    """``name:hq/hkv`` items of a comma list whose names may hold commas in parentheses."""
    return [item for item in re.split(r",(?![^()]*\))", text) if item]


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def check(cfg: core.Config, n=3000) -> bool:
    """bf16 kernels within 2x the bf16 eager error against float64, on every CHECKS pattern."""
    ok = True
    for name, pat, hq, hkv, d in CHECKS:
        pat = as_pattern(pat)
        g = torch.Generator(device="cuda").manual_seed(int(time.time() * 1000) % 100000)
        q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.float64, generator=g) for h in (hq, hkv, hkv))
        dout = torch.randn(1, n, hq, d, device="cuda", dtype=torch.float64, generator=g)
        dlse = torch.randn(1, hq, n, device="cuda", dtype=torch.float64, generator=g)
        lo = [t.to(torch.bfloat16) for t in (q, k, v)]
        bound = pat.bind(n, hq, q=lo[0] if pat.data_dependent else None, k=lo[1] if pat.data_dependent else None)
        ref = _grads(lambda *t: reference_attention(*t, bound), *(t.double() for t in lo), dout, dlse)
        eager = _grads(lambda *t: reference_attention(*t, bound), *lo, dout, dlse)
        poison()
        got = _grads(lambda *t: triton_attention(*t, pat, config=cfg), *lo, dout, dlse)
        errs = []
        for label, a, r, e in zip(("out", "lse", "dq", "dk", "dv"), got, ref, eager):
            err, rerr = (a - r).abs().max().item(), (e - r).abs().max().item()
            good = bool(torch.isfinite(a).all()) and err <= 2 * rerr + 1e-6
            ok &= good
            errs.append(f"{label}={err:.1e}/{rerr:.1e}{'' if good else '!'}")
        log(f"check {name:24s}", " ".join(errs))
    return ok


def bench(fn) -> float:
    import triton

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")


def timed(pat, n, hq, hkv, cfg, backward=True, d=128):
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    if not backward:
        def fwd():
            with torch.no_grad():
                triton_attention(q, k, v, pat, config=cfg)
        return bench(fwd)
    qs, ks, vs = (t.requires_grad_() for t in (q, k, v))
    do = torch.randn_like(q)

    def fb():
        o, _ = triton_attention(qs, ks, vs, pat, config=cfg)
        o.backward(do)
        qs.grad = ks.grad = vs.grad = None
    return bench(fb)


def profile(pat, n, hq, hkv, cfg, d=128) -> dict:
    """GPU ms per kernel name of one warm fwd+bwd (``kernel_profile.launches`` summed), the 12 largest."""
    from kernel_profile import launches  # it imports this module's cases

    times = {}
    for name, ms in launches(pat, n, hq, hkv, cfg, d):
        times[name[:60]] = round(times.get(name[:60], 0.0) + ms, 2)
    return dict(sorted(times.items(), key=lambda kv: -kv[1])[:12])


def compiled_info(seen: set) -> list:
    """Registers, spills and shared memory of the kernels compiled since ``seen`` (updated)."""
    from sparse_parallel.kernels import triton_kernels as T

    rows = []
    for fn in (T.query_kernel, T.dkdv_kernel):
        for caches in getattr(fn, "device_caches", {}).values():
            for kernel in caches[0].values():
                if id(kernel) not in seen:
                    seen.add(id(kernel))
                    md = kernel.metadata
                    try:
                        regs, spills = kernel.n_regs, kernel.n_spills
                    except Exception:  # noqa: BLE001  (a compile that ran out of shared memory has none)
                        continue
                    rows.append({"kernel": fn.__name__, "regs": regs, "spills": spills,
                                 "warps": md.num_warps, "stages": md.num_stages, "shared": md.shared})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--n", type=int, default=256 * K)
    ap.add_argument("--cases", default="window4096:16/16,w1024+s64+g128:16/16,w1024+s64+g128:16/4")
    ap.add_argument("--fwd", default="64,64,4,3;128,64,8,3;128,128,8,3;128,64,4,3;128,128,8,2")
    ap.add_argument("--bwd", default="32,64,4,3;64,128,8,2;64,128,8,3;32,128,4,3;64,64,4,3;128,128,8,2",
                    help="dk/dv candidates bm_kv,bn_kv,warps_kv,stages_kv")
    ap.add_argument("--dq", default="64,64,4,3", help="query-major dq candidates (bm_dq, bn_dq, warps_dq, stages_dq)")
    ap.add_argument("--check", default="default", help="bf16 checks of the default config first; '' = none")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds after which remaining variants are skipped")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import triton

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
           "n": args.n, "rows": [], "checks": {}}
    base = core.default_config("cuda")
    if args.check:
        res["checks"]["default"] = check(base)
    cases = []
    for item in case_specs(args.cases):
        name, heads = item.split(":")
        hq, hkv = (int(x) for x in heads.split("/"))
        cases.append((name, as_pattern(CASES[name]), hq, hkv))
    fwd_cands = [tuple(int(x) for x in c.split(",")) for c in args.fwd.split(";")]
    bwd_cands = [tuple(int(x) for x in c.split(",")) for c in args.bwd.split(";")]
    dq_cands = [tuple(int(x) for x in c.split(",")) for c in args.dq.split(";")]
    backward_variants = [(kv, dq) for kv in bwd_cands for dq in dq_cands]

    def save():
        with open(os.path.join(args.out, "kernel_variants.json"), "w") as f:
            json.dump(res, f, indent=1)

    seen = set()
    compiled_info(seen)  # the checks' kernels
    best_fwd = {}
    for name, pat, hq, hkv in cases:
        best = None
        for bm, bn, w, s in fwd_cands:
            if time.time() - T0 > args.budget:
                break
            cfg = base.replace(bm=bm, bn=bn, bn_single=bn, warps=w, stages=s)
            try:
                ms = timed(pat, args.n, hq, hkv, cfg, backward=False)
            except Exception as e:  # noqa: BLE001
                log("fwd", name, (bm, bn, w, s), "failed", repr(e)[:200])
                continue
            res["rows"].append({"case": name, "heads": f"{hq}/{hkv}", "pass": "fwd", "cfg": [bm, bn, w, s], "ms": ms,
                                "compiled": compiled_info(seen)})
            log(f"fwd {name} {hq}/{hkv} {(bm, bn, w, s)}: {ms:.2f} ms")
            if best is None or ms < best[0]:
                best = (ms, (bm, bn, w, s))
        best_fwd[name, hq, hkv] = best[1] if best else (base.bm, base.bn, base.warps, base.stages)
        save()
    fastest = None
    for name, pat, hq, hkv in cases:
        bm, bn, w, s = best_fwd[name, hq, hkv]
        for (bmk, bnk, wk, sk), dq in backward_variants:
            if time.time() - T0 > args.budget:
                break
            cfg = base.replace(bm=bm, bn=bn, bn_single=bn, warps=w, stages=s, bm_kv=bmk, bn_kv=bnk, warps_kv=wk,
                               stages_kv=sk, bm_dq=dq[0], bn_dq=dq[1], warps_dq=dq[2], stages_dq=dq[3])
            label = [bm, bn, w, s, bmk, bnk, wk, sk] + list(dq)
            try:
                ms = timed(pat, args.n, hq, hkv, cfg)
            except Exception as e:  # noqa: BLE001
                log("fwd+bwd", name, label, "failed", repr(e)[:200])
                continue
            res["rows"].append({"case": name, "heads": f"{hq}/{hkv}", "pass": "fwd+bwd", "cfg": label, "ms": ms,
                                "compiled": compiled_info(seen)})
            log(f"fwd+bwd {name} {hq}/{hkv} {label}: {ms:.2f} ms")
            if name == cases[0][0] and (fastest is None or ms < fastest[0]):
                fastest = (ms, cfg)
            save()
    if fastest is not None:
        name, pat, hq, hkv = cases[0]
        res["profile"] = {"case": name, "config": vars(fastest[1]), "ms": profile(pat, args.n, hq, hkv, fastest[1])}
        log("profile", json.dumps(res["profile"]))
    save()
    print("| case | heads | pass | config | ms | new kernels: registers/spills |\n|---|---|---|---|---|---|")
    for r in res["rows"]:
        regs = " ".join(f"{c['kernel'][1:4]}:{c['regs']}/{c['spills']}" for c in r["compiled"])
        print(f"| {r['case']} | {r['heads']} | {r['pass']} | {r['cfg']} | {r['ms']:.2f}"
              f" | {regs} |")
    print("checks:", res["checks"])


if __name__ == "__main__":
    main()
