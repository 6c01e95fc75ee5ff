"""Triton sparse-attention kernels on one GPU: correctness, then speed against FlexAttention and SDPA.

Run on the device machine:  PYTHONUNBUFFERED=1 python3 benchmarks/kernels.py --out $OUT

1. Correctness (bf16 and fp16, N=4096, GQA 4q/2kv, D=128): out, lse, dq, dk, dv of the
   kernels against float64, error <= 2x the eager reference's in the same dtype; outputs
   land in NaN-poisoned memory, so an unwritten element shows.
2. Tile-size tuning on window 4096 at 64k (forward and backward configs separately).
3. Timing (B=1, H=16 or GQA 16q/4kv, D=128, bf16, causal), medians of do_bench:
   useful TFLOP/s = 4*B*H*pairs*D fwd, 3.5x that fwd+bwd, pairs from Pattern.describe;
   peak memory of fwd+bwd; planning time.  FlexAttention is torch.compile'd with
   create_block_mask(..., _compile=True); SDPA dense causal is the ceiling at 64k.
   A per-variant time guard skips what would take too long (reported as skipped).
Writes kernels.json and kernels.png to --out, prints a table.

``--only planops`` runs anywhere (CPU): the tensor operations of a cold plan per case -> plan_ops.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparse_parallel.kernels import core  # noqa: E402
from sparse_parallel.kernels import function as kfunction  # noqa: E402
from sparse_parallel.kernels.function import prepare, triton_attention  # noqa: E402
from sparse_parallel.patterns import (Dilated, Global, Pattern, RandomBlocks, Strided, TopKBlocks,  # noqa: E402
                                      Window, as_pattern)
from sparse_parallel.reference import reference_attention  # noqa: E402

K = 1024
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def poison():
    """Fill the allocator's free memory with NaN so that unwritten outputs show."""
    free = torch.cuda.mem_get_info()[0]
    x = torch.empty(int(min(free * 0.5, 24e9)) // 4, dtype=torch.float32, device="cuda")
    x.fill_(float("nan"))
    del x


def run(fn, q, k, v, dout, dlse):
    ts = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = fn(*ts)
    lf = torch.where(torch.isinf(lse), 0.0, lse)
    ((out.double() * dout).sum() + (lf.double() * dlse).sum()).backward()
    return [out.double(), lf.double()] + [t.grad.double() for t in ts]


def correctness(results, quick=False, names=None, dtypes=(torch.bfloat16, torch.float16)):
    cases = [
        ("window512+global64+strided32 gqa", Window(512) | Global(first=64, queries=False) | Strided(32), 4, 2),
        ("dilated(256,3)", Dilated(window=256, levels=3), 4, 2),
        ("random(64,3)+window256", RandomBlocks(block=64, per_query_block=3) | Window(256), 4, 2),
        ("topk(64,4)", TopKBlocks(block=64, k=4), 4, 2),
        ("global queries+keys", Window(128) | Global(first=16, positions=(1000, 3001)), 4, 2),
        ("strided(64,63) masked rows", Strided(64, 63) | Window(0), 4, 2),
        ("noncausal window+strided", Pattern(Window(300, 200) | Strided(48, 5, span=2000), causal=False), 4, 4),
    ]
    if quick:
        cases = [cases[0], cases[4]]
    if names is not None:
        cases = [c for c in cases if c[0] in names]
    n, d = 4096, 128
    ok_all = True
    for name, pat, hq, hkv in cases:
        pat = as_pattern(pat)
        g = torch.Generator(device="cuda").manual_seed(int(time.time()) % 10000)
        q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.float64, generator=g) for h in (hq, hkv, hkv))
        dout = torch.randn(1, n, hq, d, device="cuda", dtype=torch.float64, generator=g)
        dlse = torch.randn(1, hq, n, device="cuda", dtype=torch.float64, generator=g)
        bound = pat.bind(n, hq, q=q if pat.data_dependent else None, k=k if pat.data_dependent else None)
        ref = run(lambda *t: reference_attention(*t, bound), q, k, v, dout, dlse)
        for dt in dtypes:
            low = run(lambda *t: reference_attention(*t, bound), q.to(dt), k.to(dt), v.to(dt), dout, dlse)
            if pat.data_dependent:  # TopK picks blocks from the data: the kernel and the eager run see the same
                bound_dt = pat.bind(n, hq, q=q.to(dt), k=k.to(dt))
                ref_dt = run(lambda *t: reference_attention(*t, bound_dt), q.to(dt).double(), k.to(dt).double(),
                             v.to(dt).double(), dout, dlse)
                low = run(lambda *t: reference_attention(*t, bound_dt), q.to(dt), k.to(dt), v.to(dt), dout, dlse)
            else:
                ref_dt = ref
            poison()
            got = run(lambda *t: triton_attention(*t, pat), q.to(dt), k.to(dt), v.to(dt), dout, dlse)
            row = {"case": name, "dtype": str(dt).split(".")[-1]}
            good = True
            for label, a, r, lo in zip(("out", "lse", "dq", "dk", "dv"), got, ref_dt, low):
                err = (a - r).abs().max().item()
                rerr = (lo - r).abs().max().item()
                finite = bool(torch.isfinite(a).all())
                row[label] = [err, rerr]
                good &= finite and err <= 2 * rerr + 1e-6
            row["ok"] = good
            ok_all &= good
            results["correctness"].append(row)
            log(f"check {name:36s} {row['dtype']:9s} " + " ".join(
                f"{lb}={row[lb][0]:.1e}/{row[lb][1]:.1e}" for lb in ("out", "lse", "dq", "dk", "dv"))
                + ("  OK" if good else "  FAIL"))
    return ok_all


def bench(fn, guard_s):
    """Median ms of fn; slow functions get a few plain timed runs instead of do_bench."""
    import triton

    torch.cuda.synchronize()
    t = time.time()
    fn()
    torch.cuda.synchronize()
    first = time.time() - t
    if first > guard_s:
        return None, first
    t = time.time()
    fn()
    torch.cuda.synchronize()
    once = time.time() - t
    if once > 0.25:
        times = [once * 1000, _event_ms(fn), _event_ms(fn)]
        return sorted(times)[1], first
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"), first


def flex_mask(pat: Pattern, n, hq, q, k):
    """A mask_mod for FlexAttention equal to the pattern (tables as tensors)."""
    comps = pat.components
    bound = pat.bind(n, hq, q=q if pat.data_dependent else None, k=k if pat.data_dependent else None,
                     device="cuda")
    tables = [t.to(torch.int32).cuda() for t in bound.tables]

    def mask_mod(b, h, qi, kv):
        ok = kv < 0
        ti = 0
        for c in comps:
            if isinstance(c, Window):
                ok = ok | ((qi - kv <= c.left) & (kv - qi <= c.right))
            elif isinstance(c, Strided):
                a = (kv % c.stride) == c.offset
                if c.span is not None:
                    a = a & (qi - kv < c.span) & (kv - qi < c.span)
                ok = ok | a
            elif isinstance(c, Global):
                ok = ok | (kv < c.first)
            else:
                tab = tables[ti]
                ti += 1
                hh = h if tab.shape[1] > 1 else 0
                row = tab[0, hh, qi // c.block]
                kb = kv // c.block
                for w in range(tab.shape[-1]):
                    ok = ok | (row[w] == kb)
        return ok & (kv <= qi)

    return mask_mod


def time_case(name, pat, n, hq, hkv, results, guard_s, flex=True, sdpa=False):
    pat = as_pattern(pat)
    d = 128
    desc = pat.describe(n, hq, d)  # TopKBlocks alone: exact without the data (k blocks per query block)
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    pairs = desc["pairs"]
    fl = desc["useful_flops_fwd"]
    row = {"case": name, "n": n, "hq": hq, "hkv": hkv, "pairs": pairs, "density": desc["density_of_causal"]}
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    do = torch.randn_like(q)

    torch.cuda.synchronize()
    prepare(q, k, v, pat, plans=True)
    kfunction._PLANS.clear()  # time a cold plan (tables, terms, every tile plan)
    torch.cuda.synchronize()
    t = time.time()
    prepare(q, k, v, pat, plans=True)
    torch.cuda.synchronize()
    row["plan_ms"] = (time.time() - t) * 1000

    def ours_f():
        with torch.no_grad():
            triton_attention(q, k, v, pat)

    def ours_fb():
        o, _ = triton_attention(qs, ks, vs, pat)
        o.backward(do)

    variants = [("ours", ours_f, ours_fb)]
    if flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            fa = torch.compile(flex_attention)
            mm = flex_mask(pat, n, hq, q, k)
            torch.cuda.synchronize()
            t = time.time()
            bm = create_block_mask(mm, None, hq if pat.per_head else None, n, n, device="cuda", _compile=True)
            torch.cuda.synchronize()
            row["flex_mask_s"] = time.time() - t
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            qts, kts, vts = (x.clone().requires_grad_() for x in (qt, kt, vt))
            dot = do.transpose(1, 2)
            gqa = hq != hkv

            def flex_f():
                with torch.no_grad():
                    fa(qt, kt, vt, block_mask=bm, enable_gqa=gqa)

            def flex_fb():
                o = fa(qts, kts, vts, block_mask=bm, enable_gqa=gqa)
                o.backward(dot)

            variants.append(("flex", flex_f, flex_fb))
        except Exception as e:  # noqa: BLE001
            row["flex_error"] = repr(e)[:300]
    if sdpa:
        import torch.nn.functional as F

        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        qts, kts, vts = (x.clone().requires_grad_() for x in (qt, kt, vt))
        dot = do.transpose(1, 2)
        dense_fl = 4 * hq * (n * (n + 1) // 2) * d

        def sd_f():
            with torch.no_grad():
                F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=hq != hkv)

        def sd_fb():
            F.scaled_dot_product_attention(qts, kts, vts, is_causal=True, enable_gqa=hq != hkv).backward(dot)

        variants.append(("sdpa_dense", sd_f, sd_fb))
    for label, f, fb in variants:
        scale_fl = dense_fl if label == "sdpa_dense" else fl
        try:
            ms, first = bench(f, guard_s)
            row[f"{label}_fwd_ms"] = ms
            row[f"{label}_fwd_tflops"] = scale_fl / ms / 1e9 if ms else None
            row[f"{label}_fwd_first_s"] = first
            if ms is None:
                row[f"{label}_skipped"] = f"first call {first:.1f}s > guard {guard_s}s"
                continue
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ms2, _ = bench(fb, guard_s)
            row[f"{label}_fwdbwd_ms"] = ms2
            row[f"{label}_fwdbwd_tflops"] = 3.5 * scale_fl / ms2 / 1e9 if ms2 else None
            row[f"{label}_peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
        except Exception as e:  # noqa: BLE001
            row[f"{label}_error"] = repr(e)[:300]
            traceback.print_exc()
        for x in (qs, ks, vs):
            x.grad = None
    results["timing"].append(row)
    log("time", json.dumps({kk: (round(vv, 3) if isinstance(vv, float) else vv) for kk, vv in row.items()}))
    del q, k, v, qs, ks, vs, do
    torch.cuda.empty_cache()


def _event_ms(fn) -> float:
    """One call of fn timed by CUDA events (ms)."""
    s = torch.cuda.Event(enable_timing=True)
    e = torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e)


def _median_ms(fn, reps):
    """Median of ``reps`` CUDA-event timings of fn (after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    times = sorted(_event_ms(fn) for _ in range(reps))
    return times[len(times) // 2]


#: dk/dv variants compared by ``--only bwdcmp``: name -> Config changes from the CUDA default.
KV_VARIANTS = [
    ("old", {"kv_balance": False}),
    ("balanced", {"kv_balance": True}),
    ("balanced 64x64", {"kv_balance": True, "bm_kv": 64, "bn_kv": 64, "warps_kv": 4, "stages_kv": 2}),
    ("balanced 64x128", {"kv_balance": True, "bm_kv": 64, "bn_kv": 128, "warps_kv": 8, "stages_kv": 2}),
]


def bwd_compare(results, budget_s, reps=5, cases=None, d=128):
    """Old vs new dk/dv scheduling on the same inputs: fwd+bwd and backward-only medians.

    Cases: (a) window 4096 and (b) w1024+g128+s64 at 256k, MHA 16/16 and GQA 16q/4kv.
    Variants after the first two are skipped once the script has run ``budget_s`` seconds.
    """
    base = core.Config(**{**vars(core.CONFIGS["cuda"]), "kv_balance": False})
    default = core.CONFIGS["cuda"]
    wgs = Window(1024) | Global(first=128, queries=False) | Strided(64)
    cases = cases or [("(b) w1024+g128+s64", wgs, 256 * K, 16, 4), ("(b) w1024+g128+s64", wgs, 256 * K, 16, 16),
                      ("(a) window4096", Window(4096), 256 * K, 16, 16)]
    for name, pat, n, hq, hkv in cases:
        pat = as_pattern(pat)
        fl = pat.describe(n, hq, d)["useful_flops_fwd"]
        q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        do = torch.randn_like(q)
        grads = {}
        for label, change in KV_VARIANTS:
            if label not in ("old", "balanced") and time.time() - T0 > budget_s:
                log(f"bwdcmp {name} {hq}/{hkv} {label}: skipped (time budget)")
                continue
            core.CONFIGS["cuda"] = core.Config(**{**vars(base), **change})
            try:
                def fb():
                    o, _ = triton_attention(qs, ks, vs, pat)
                    o.backward(do)

                o, _ = triton_attention(qs, ks, vs, pat)

                def bwd():
                    torch.autograd.grad(o, (qs, ks, vs), do, retain_graph=True)

                g = torch.autograd.grad(o, (qs, ks, vs), do, retain_graph=True)
                ms_b = _median_ms(bwd, reps)
                ms_fb = _median_ms(fb, reps)
                for x in (qs, ks, vs):
                    x.grad = None
                if "old" in grads:  # same inputs: the variants must agree up to summation order
                    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(g, grads["old"]))
                else:
                    diff = 0.0
                if label == "old":
                    grads["old"] = g
                row = {"case": name, "n": n, "hq": hq, "hkv": hkv, "variant": label, "config": vars(core.CONFIGS["cuda"]),
                       "bwd_ms": ms_b, "fwdbwd_ms": ms_fb, "fwdbwd_tflops": 3.5 * fl / ms_fb / 1e9,
                       "max_grad_diff_vs_old": diff}
                del o, g
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                row = {"case": name, "n": n, "hq": hq, "hkv": hkv, "variant": label, "error": repr(e)[:300]}
            results["bwdcmp"].append(row)
            log("bwdcmp", json.dumps({kk: (round(vv, 3) if isinstance(vv, float) and kk != "max_grad_diff_vs_old"
                                           else vv) for kk, vv in row.items() if kk != "config"}))
        del q, k, v, qs, ks, vs, do, grads
        torch.cuda.empty_cache()
    core.CONFIGS["cuda"] = default


def _sweep(results, kind, names, candidates, make_config, fn, guard_s):
    """Time ``fn`` under each candidate tile config; record each; return the fastest candidate."""
    best = None
    for cand in candidates:
        core.CONFIGS["cuda"] = make_config(*cand)
        try:
            ms, _ = bench(fn, guard_s)
        except Exception as e:  # noqa: BLE001
            log("tune", kind, *cand, "failed", repr(e)[:200])
            continue
        log(f"tune {kind} {cand}: {ms:.2f} ms")
        results["tuning"].append({"kind": kind, **dict(zip(names, cand)), "ms": ms})
        if best is None or ms < best[0]:
            best = (ms, cand)
    return best[1]


def tune(results, guard_s):
    """Pick tile sizes on window 4096 at 64k: forward/dq (bm, bn, warps, stages) and dk/dv
    (bm_kv, bn_kv, warps_kv, stages_kv) separately."""
    n, hq, d = 64 * K, 16, 128
    pat = as_pattern(Window(4096))
    q, k, v = (torch.randn(1, n, hq, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    do = torch.randn_like(q)
    fwd = _sweep(results, "fwd", ("bm", "bn", "warps", "stages"), [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3)],
                 lambda bm, bn, w, s: core.Config(bm=bm, bn=bn, warps=w, stages=s),
                 lambda: triton_attention(q, k, v, pat), guard_s)

    def with_kv(bmk, bnk, wk, sk):
        bm, bn, w, s = fwd
        return core.Config(bm=bm, bn=bn, warps=w, stages=s, bm_kv=bmk, bn_kv=bnk, warps_kv=wk, stages_kv=sk)

    def fwd_bwd():
        o, _ = triton_attention(qs, ks, vs, pat)
        o.backward(do)

    kv = _sweep(results, "fwdbwd", ("bm_kv", "bn_kv", "warps", "stages"),
                [(64, 128, 8, 2), (32, 128, 4, 2), (64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 3)],
                with_kv, fwd_bwd, guard_s)
    core.CONFIGS["cuda"] = with_kv(*kv)
    results["config"] = vars(core.CONFIGS["cuda"])
    log("chosen config", results["config"])


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["timing"]
    labels = [f"{r['case']}\n{r['n'] // K}k h{r['hq']}/{r['hkv']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 1.1), 5))
    xs = range(len(rows))
    for off, key, lab in ((-0.2, "ours_fwdbwd_tflops", "ours"), (0.2, "flex_fwdbwd_tflops", "FlexAttention")):
        ax.bar([x + off for x in xs], [r.get(key) or 0 for r in rows], width=0.4, label=lab)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("useful TFLOP/s, fwd+bwd (bf16, D=128)")
    ax.set_title(f"sparse attention on {results['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


#: Planning cases of ``--only planops``: the (a), (b) and (c)-dilated patterns at 1M tokens, 16q/4kv heads.
PLAN_CASES = (("(a) window4096", Window(4096)), ("(b) w1024+g128+s64", Window(1024) | Global(first=128, queries=False)
              | Strided(64)), ("(c) dilated(1024,4)", Dilated(window=1024, levels=4)))


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
        print(f"| {r['case']} | {r['n'] // K}k | {r['ops']} | {r['view_ops']} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--guard", type=float, default=20.0, help="skip a variant whose first call takes longer (s)")
    ap.add_argument("--only", default="check,tune,a,b,c",
                    help="comma list of: check (or quickcheck), tune, a, b, c, gqa, bwdcmp; or planops alone "
                         "(operations of a cold plan, on the CPU)")
    ap.add_argument("--max-n", type=int, default=1024 * K)
    ap.add_argument("--budget", type=float, default=110.0,
                    help="bwdcmp: seconds after which only the old and balanced variants are timed")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.only == "planops":
        return plan_ops_report(args.max_n, args.out)
    import torch._dynamo
    import triton

    # Every case has its own mask and shape: without room for recompiles, FlexAttention silently falls
    # back to its unfused path (which materialises N x N and runs out of memory).
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "command": " ".join(sys.argv), "correctness": [], "tuning": [], "timing": [], "bwdcmp": []}
    only = set(args.only.split(","))
    path = os.path.join(args.out, "kernels.json")

    def save():
        with open(path, "w") as f:
            json.dump(results, f, indent=1)

    if "check" in only or "quickcheck" in only:
        results["correct"] = correctness(results, quick="check" not in only)
        save()
    if "bwdcmp" in only:
        # The balanced dk/dv scheduling (the default) checked in bf16 against float64, then timed
        # against the old one (kv_balance=False) on the same inputs.
        core.CONFIGS["cuda"] = core.Config(**{**vars(core.CONFIGS["cuda"]), "kv_balance": True})
        results["correct"] = correctness(results, names=("window512+global64+strided32 gqa", "dilated(256,3)",
                                                         "global queries+keys"), dtypes=(torch.bfloat16,))
        save()
        bwd_compare(results, args.budget)
        save()
    if "tune" in only:
        tune(results, args.guard)
        save()
    sizes = [n for n in (64 * K, 256 * K, 1024 * K) if n <= args.max_n]
    wgs = Window(1024) | Global(first=128, queries=False) | Strided(64)
    jobs = []
    if "a" in only:
        jobs += [("(a) window4096", Window(4096), n, 16, 16, {"sdpa": n == 64 * K}) for n in sizes]
    if "b" in only:
        jobs += [("(b) w1024+g128+s64", wgs, n, 16, 16, {"flex": n <= 256 * K}) for n in sizes]
    if "gqa" in only:
        jobs += [("(a) window4096", Window(4096), 256 * K, 16, 4, {}),
                 ("(b) w1024+g128+s64", wgs, 256 * K, 16, 4, {})]
    if "c" in only:
        jobs += [("(c) dilated(1024,4)", Dilated(window=1024, levels=4), 256 * K, 16, 16, {}),
                 ("(c) random(64,3)+w512", RandomBlocks(block=64, per_query_block=3) | Window(512), 256 * K, 16, 16,
                  {}),
                 ("(c) topk(64,16)", TopKBlocks(block=64, k=16), 64 * K, 16, 16, {})]
    for name, pat, n, hq, hkv, kw in jobs:
        try:
            time_case(name, pat, n, hq, hkv, results, args.guard, **kw)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            results["timing"].append({"case": name, "n": n, "hq": hq, "hkv": hkv, "error": repr(e)[:300]})
        save()
        try:
            plot(results, os.path.join(args.out, "kernels.png"))
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    print_table(results)


def fmt(x, p=1):
    return "-" if x is None else (f"{x:.{p}f}" if isinstance(x, float) else str(x))


def print_table(results):
    hdr = ("case", "N", "Hq/Hkv", "ours fwd ms", "ours f+b ms", "ours fwd TF", "ours f+b TF", "flex f+b TF",
           "ratio", "ours GB", "flex GB", "plan ms")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in results["timing"]:
        o, f = r.get("ours_fwdbwd_tflops"), r.get("flex_fwdbwd_tflops")
        print("| " + " | ".join([r["case"], f"{r['n'] // K}k", f"{r['hq']}/{r['hkv']}", fmt(r.get("ours_fwd_ms")),
                                 fmt(r.get("ours_fwdbwd_ms")), fmt(r.get("ours_fwd_tflops"), 0),
                                 fmt(o, 0), fmt(f, 1), fmt(o / f if o and f else None, 2),
                                 fmt(r.get("ours_peak_gb")), fmt(r.get("flex_peak_gb")), fmt(r.get("plan_ms"), 2)])
              + " |")
        if r.get("sdpa_dense_fwdbwd_tflops"):
            print(f"|   SDPA dense causal | {r['n'] // K}k | | {fmt(r.get('sdpa_dense_fwd_ms'))} | "
                  f"{fmt(r.get('sdpa_dense_fwdbwd_ms'))} | {fmt(r.get('sdpa_dense_fwd_tflops'), 0)} | "
                  f"{fmt(r.get('sdpa_dense_fwdbwd_tflops'), 0)} | | | | | |")


if __name__ == "__main__":
    main()
