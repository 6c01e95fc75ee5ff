"""Variants of the kernels' ``Config`` timed against each other in one process, interleaved.

Run on the device machine:

    PYTHONUNBUFFERED=1 python3 benchmarks/kernel_ab.py --out $OUT \\
        --variants "base;kv2=stages_kv:2;waves8=kv_waves:8" \\
        --cases "window4096:16/16,w1024+s64+g128:16/4,window4096:16/16@1M" --rounds 2 --warm 6 --check kv2

1. ``--warm P``: every (variant, case) is run once in ``P`` worker processes at a time, so that Triton
   compiles in parallel into its on-disk cache; the timing process then loads the compiled kernels.
2. bf16 checks (``kernel_variants.check``: out, lse, dq, dk, dv of five patterns against float64, within
   2x the eager bf16 error, NaN-poisoned memory) of the variants named by ``--check``, each in a process
   of its own that runs beside the compiling workers and is waited for before anything is timed.
3. ``--rounds`` rounds; in each, every case runs every variant in turn (the order rotates by round), so a
   drift of the card's clock or temperature is spread over all variants: forward alone and
   forward+backward, medians of do_bench.
Prints a table (per variant and case the lower median of its rounds' times, with two rounds the faster
one, and its speed relative to the first variant) and writes
kernel_ab.json and kernel_ab.png to ``--out``.  A variant is ``name=field:value,field:value`` over the
CUDA defaults (``core.Config`` fields); ``base`` alone means the defaults.  To time a change of the kernel
code itself, add a ``Config`` field that switches it, time it here, and keep the field only if it wins
(benchmarks/RESULTS.md, "Register operands", is one such run).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from kernel_variants import CASES, case_specs, check  # noqa: E402
from kernels import run_parallel  # noqa: E402
from sparse_parallel.kernels import core  # noqa: E402
from sparse_parallel.kernels.function import triton_attention  # noqa: E402
from sparse_parallel.patterns import as_pattern  # noqa: E402

K = 1024
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def parse_variants(text: str) -> dict[str, dict]:
    """``name=field:value,...;name2=...`` -> {name: overrides}; values are ints (booleans as 0/1)."""
    fields = vars(core.default_config("cuda"))
    out = {}
    for item in filter(None, text.split(";")):
        name, _, body = item.partition("=")
        overrides = {}
        for pair in filter(None, body.split(",")):
            key, _, value = pair.partition(":")
            if key not in fields or not value.lstrip("-").isdigit():
                raise SystemExit(f"--variants {item!r}: expected field:int with field one of {sorted(fields)}")
            overrides[key] = type(fields[key])(int(value))
        out[name] = overrides
    if not out:
        raise SystemExit("--variants: at least one variant")
    return out


def parse_cases(text: str) -> list[tuple[str, int, int, int]]:
    """``name:hq/hkv[@n]`` items (n as 256k, 1M or a number; default 256k) -> (name, hq, hkv, n)."""
    cases = []
    for item in case_specs(text):
        spec, _, size = item.partition("@")
        name, _, heads = spec.rpartition(":")
        if name not in CASES:
            raise SystemExit(f"--cases {item!r}: the pattern is one of {sorted(CASES)}")
        hq, hkv = (int(x) for x in heads.split("/"))
        size = size or "256k"
        n = int(size[:-1]) * (K * K if size.endswith("M") else K) if size[-1] in "kM" else int(size)
        cases.append((name, hq, hkv, n))
    return cases


def config(overrides: dict) -> core.Config:
    return core.default_config("cuda").replace(**overrides)


def measure(name: str, hq: int, hkv: int, n: int, cfg: core.Config, rep_ms: float, d: int = 128):
    """(forward ms, forward+backward ms) of one case under ``cfg``: medians of do_bench."""
    import triton

    pat = as_pattern(CASES[name])
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    do = torch.randn_like(q)

    def fwd():
        with torch.no_grad():
            triton_attention(q, k, v, pat, config=cfg)

    def fwd_bwd():
        qs.grad = ks.grad = vs.grad = None  # gradients written, not accumulated between calls
        o, _ = triton_attention(qs, ks, vs, pat, config=cfg)
        o.backward(do)

    times = []
    for fn in (fwd, fwd_bwd):
        fn()
        torch.cuda.synchronize()
        times.append(triton.testing.do_bench(fn, warmup=2 * rep_ms / 10, rep=rep_ms, return_mode="median"))
    return times


def warm(variants: dict, cases: list, procs: int) -> None:
    """Compile every (variant, case) in ``procs`` processes at a time (one fwd+bwd each, at most 256k
    tokens: the kernels a case compiles do not depend on its length beyond that)."""
    cmds = [[sys.executable, __file__, "--worker",
             json.dumps({"overrides": overrides, "case": [name, hq, hkv, min(n, 256 * K)]})]
            for name, hq, hkv, n in cases for overrides in variants.values()]
    failed = sum(code != 0 for code, _ in run_parallel(cmds, procs))
    log(f"warm: compiled {len(cmds)} jobs ({failed} failed: those the timing run compiles for itself)")


def start_check(name: str, overrides: dict) -> subprocess.Popen:
    spec = json.dumps({"check": name, "overrides": overrides})
    return subprocess.Popen([sys.executable, __file__, "--worker", spec], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def check_result(proc: subprocess.Popen) -> bool:
    out = proc.communicate()[0]
    print(out, end="")
    return proc.returncode == 0 and "CHECK PASSED" in out


def worker(spec: str) -> None:
    s = json.loads(spec)
    if "check" in s:
        ok = check(config(s["overrides"]))
        print("CHECK PASSED" if ok else "CHECK FAILED", s["check"], flush=True)
        return
    name, hq, hkv, n = s["case"]
    pat = as_pattern(CASES[name])
    cfg = config(s["overrides"])
    q, k, v = (torch.randn(1, n, h, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (hq, hkv, hkv))
    o, _ = triton_attention(q, k, v, pat, config=cfg)
    o.backward(torch.randn_like(o))
    torch.cuda.synchronize()


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["summary"]
    keys = list(dict.fromkeys(r["case"] for r in rows))
    names = list(res["variants"])
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(keys) * len(names) / 2), 4))
    width = 0.8 / len(names)
    for j, vname in enumerate(names):
        ys = [next((r["fwdbwd_speed"] for r in rows if r["case"] == key and r["variant"] == vname), 0)
              for key in keys]
        ax.bar([i + j * width for i in range(len(keys))], ys, width, label=vname)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], keys, rotation=15, fontsize=8)
    ax.set_ylabel(f"fwd+bwd speed vs {names[0]}")
    ax.set_title(f"{res['device']}, {res['date']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--variants", required=True)
    ap.add_argument("--cases", default="window4096:16/16,w1024+s64+g128:16/16,w1024+s64+g128:16/4")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rep-ms", type=float, default=300.0, help="do_bench's rep (ms) per measurement")
    ap.add_argument("--warm", type=int, default=0, help="compile in this many processes first (0: no)")
    ap.add_argument("--check", default="", help="comma list of variants to bf16-check first")
    ap.add_argument("--budget", type=float, default=500.0, help="seconds after which no new round starts")
    args = ap.parse_args()
    variants = parse_variants(args.variants)
    cases = parse_cases(args.cases)
    os.makedirs(args.out, exist_ok=True)
    import triton

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
           "variants": variants, "checks": {}, "rows": []}
    checks = {vname: start_check(vname, variants[vname]) for vname in filter(None, args.check.split(","))}
    if args.warm:
        warm(variants, cases, args.warm)
    for vname, proc in checks.items():
        res["checks"][vname] = check_result(proc)
        log("check", vname, "passed" if res["checks"][vname] else "FAILED")
    names = list(variants)
    for r in range(args.rounds):
        if time.time() - T0 > args.budget:
            log("budget reached before round", r)
            break
        order = names[r % len(names):] + names[:r % len(names)]
        for name, hq, hkv, n in cases:
            for vname in order:
                fwd, fb = measure(name, hq, hkv, n, config(variants[vname]), args.rep_ms)
                res["rows"].append({"round": r, "case": f"{name} {hq}/{hkv} n={n}", "variant": vname,
                                    "fwd_ms": fwd, "fwdbwd_ms": fb})
                log(f"round {r} {name} {hq}/{hkv} n={n} {vname}: fwd {fwd:.2f} ms, fwd+bwd {fb:.2f} ms")
        torch.cuda.empty_cache()
    summary = []
    for key in dict.fromkeys(row["case"] for row in res["rows"]):
        med = {}
        for vname in names:
            got = [row for row in res["rows"] if row["case"] == key and row["variant"] == vname]
            if got:
                med[vname] = [sorted(x[f] for x in got)[(len(got) - 1) // 2] for f in ("fwd_ms", "fwdbwd_ms")]
        first = med.get(names[0])
        for vname, (fwd, fb) in med.items():
            summary.append({"case": key, "variant": vname, "fwd_ms": fwd, "fwdbwd_ms": fb,
                            "fwd_speed": first[0] / fwd if first else None,
                            "fwdbwd_speed": first[1] / fb if first else None,
                            "spread_fwdbwd_ms": [row["fwdbwd_ms"] for row in res["rows"]
                                                 if row["case"] == key and row["variant"] == vname]})
    res["summary"] = summary
    with open(os.path.join(args.out, "kernel_ab.json"), "w") as f:
        json.dump(res, f, indent=1)
    if summary:
        plot(res, os.path.join(args.out, "kernel_ab.png"))
    print(f"| case | variant | fwd ms | fwd+bwd ms (each round) | fwd speed | fwd+bwd speed (vs {names[0]}) |")
    print("|---|---|---|---|---|---|")
    for s in summary:
        rounds = ", ".join(f"{x:.1f}" for x in s["spread_fwdbwd_ms"])
        print(f"| {s['case']} | {s['variant']} | {s['fwd_ms']:.2f} | {s['fwdbwd_ms']:.2f} ({rounds}) | "
              f"{s['fwd_speed']:.3f} | {s['fwdbwd_speed']:.3f} |")
    print("checks:", res["checks"])


if __name__ == "__main__":
    main()
