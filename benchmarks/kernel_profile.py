"""Where one fwd+bwd of our kernels spends its GPU time: every kernel launch in order, per pass.

Run on the device machine:
    PYTHONUNBUFFERED=1 python3 benchmarks/kernel_profile.py --out $OUT --cases "w1024+s64+g128:16/16"

For each case it prints the launch plan (each pass: its kind, key space, the terms it serves, its
dk/dv launch: key tiles, query-chunk split, and the tile iterations per head that the forward, dq and
dk/dv walk, with how many of them are masked boundary tiles; with packed documents these are the
plan's counts, before the kernels clip each range to the documents) and then, from torch.profiler over
one warm fwd+bwd, every GPU kernel in launch order with its time, and the totals per kernel name.
Cases: kernel_variants.py's, or benchmarks/kernels.py's by name (its packed documents drawn for
``--n``).  ``--set`` changes Config fields (``bm_kv=64,bn_kv=128``) to profile another tile
configuration.  Writes
kernel_profile.json to --out.  Timings here are of one profiled call (profiler overhead included);
the speed of record is benchmarks/kernels.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sparse_parallel.kernels import core  # noqa: E402
from sparse_parallel.kernels.function import prepare, triton_attention  # noqa: E402

from kernel_variants import CASES, case_specs  # noqa: E402
import kernels as table  # noqa: E402  (benchmarks/kernels.py: its cases, documents included)

K = 1024


def _walked_masked(ranges, full) -> tuple[int, int]:
    """(tiles in the [first, last] ranges, those of them outside the full ranges)."""
    def count(r):
        r = r.long()
        return int((r[:, 1] - r[:, 0] + 1).clamp(min=0).sum())

    walked = count(ranges)
    return walked, walked - count(full)


def plan_rows(q, k, v, pat, cfg) -> list:
    """One line per pass of every part of the launch plan, with its dk/dv launch."""
    plan, _, cfg = prepare(q, k, v, pat, config=cfg, plans=True)
    rows = []
    for pi, part in enumerate(plan.parts):
        prob = part.prob
        launches = core.kv_launches(prob, cfg, q.device, q.shape[2])
        for i, ps in enumerate(prob.passes):
            sp = prob.spaces[ps.space]
            kl = launches.get(i)
            tiles = {}
            if not ps.mode.is_block:  # tile iterations walked and, of those, masked (boundary) ones
                for label, (bm, bn) in (("fwd", (cfg.bm, core._forward_bn(prob, cfg))), ("dq", (cfg.bm_dq, cfg.bn_dq))):
                    r = core._range_plan(prob, i, bm, bn)
                    tiles[label] = _walked_masked(r[:, :2], r[:, 2:])
                if kl:
                    tiles["kv"] = _walked_masked(*core._kv_plans(prob, i, kl.rows, core._kv_tiles(prob, cfg)[1]))
            rows.append({
                "part": pi, "pass": i, "kind": ps.mode.name, "served": list(ps.served),
                "keys": sp.nk, "pos0": sp.pos0, "kstr": sp.kstr, "gathered": sp.positions is not None,
                "kv_tiles": kl.grid0 if kl else 0, "kv_split": kl.split if kl else 0,
                "kv_qchunk": kl.qchunk if kl else 0,
                "tiles_walked_masked": tiles})
    return rows


def pattern(name: str, n: int):
    """A case of kernel_variants by name, or of benchmarks/kernels.py (packed documents drawn for
    ``n`` tokens as there: ``"w4096+s64+g128 docs32k"``)."""
    if name in CASES:
        return CASES[name]
    for case in table.CASES:
        if case.name == name:
            return dataclasses.replace(case, n=n).attended
    raise SystemExit(f"unknown case {name!r}; known: {sorted(CASES) + sorted({c.name for c in table.CASES})}")


def launches(pat, n, hq, hkv, cfg, d=128) -> list:
    """(kernel name, GPU ms) of every kernel of one warm fwd+bwd on the GPU, in launch order."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (hq, hkv, hkv))
    do = torch.randn_like(q)
    for _ in range(2):
        o, _ = triton_attention(q, k, v, pat, config=cfg)
        o.backward(do)
    torch.cuda.synchronize()
    q.grad = k.grad = v.grad = None  # the profiled call writes its gradients, as in a model, adding to none
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        o, _ = triton_attention(q, k, v, pat, config=cfg)
        o.backward(do)
        torch.cuda.synchronize()
    kernels = [e for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=lambda e: e.time_range.start)
    return [(e.name[:70], round(e.time_range.elapsed_us() / 1000, 3)) for e in kernels]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--n", type=int, default=256 * K)
    ap.add_argument("--cases", default="window4096:16/16,w1024+s64+g128:16/16,w1024+s64+g128:16/4")
    ap.add_argument("--set", default="", help="Config fields, e.g. bm_kv=64,bn_kv=128")
    ap.add_argument("--device", default="cuda", help="cuda; cpu: the plan only (no kernel runs; give "
                    "--set sms=132 for an H200's dk/dv splits)")
    ap.add_argument("--d", type=int, default=128, help="head dim")
    args = ap.parse_args()
    dev = args.device
    cfg = core.default_config("cuda")  # the GPU's plans, also when only planned on the CPU
    if args.set:
        cfg = cfg.replace(**{f: int(x) for f, x in (kv.split("=") for kv in args.set.split(","))})
    out = {"config": vars(cfg), "n": args.n, "device": torch.cuda.get_device_name() if dev == "cuda" else dev,
           "torch": torch.__version__, "cases": []}
    for spec in case_specs(args.cases):
        name, heads = spec.split(":")
        hq, hkv = map(int, heads.split("/"))
        pat = pattern(name, args.n)
        q, k, v = (torch.randn(1, args.n, h, args.d, device=dev) for h in (hq, hkv, hkv))
        rows = plan_rows(q, k, v, pat, cfg)
        del q, k, v
        seq = launches(pat, args.n, hq, hkv, cfg, args.d) if dev == "cuda" else []
        print(f"\n== {name} {heads} N={args.n}")
        for r in rows:
            print("  pass", r)
        totals = {}
        for kname, ms in seq:
            print(f"  {ms:9.3f} ms  {kname}")
            totals[kname] = round(totals.get(kname, 0.0) + ms, 3)
        print("  total", round(sum(ms for _, ms in seq), 2), "ms;", totals)
        out["cases"].append({"case": name, "heads": heads, "passes": rows, "launches": seq, "totals": totals})
        if dev == "cuda":
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernel_profile.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
