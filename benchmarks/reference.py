"""Time and peak memory of the eager reference on the CPU (the backend tests and parity checks use).

python benchmarks/reference.py [--n 65536] -> table on stdout, JSON in benchmarks/results/reference.json
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

import sparse_parallel as sp

PATTERNS = {
    "window1024": sp.Pattern(sp.Window(1024)),
    "window1024+strided64+global128": sp.Window(1024) | sp.Strided(64) | sp.Global(first=128, queries=False),
    "dilated(512,4)": sp.Pattern(sp.Dilated(512, 4)),
    "bigbird(w256,g64,r2x64)": sp.Window(256) | sp.Global(first=64) | sp.RandomBlocks(64, 2),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/reference.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, args.n, args.heads, args.dim) for _ in range(3))
    rows = []
    print(f"{'pattern':<34}{'fwd s':>8}{'GFLOP/s':>10}{'peak RSS GiB':>14}")
    for name, p in PATTERNS.items():
        t0 = time.perf_counter()
        with torch.no_grad():
            sp.sparse_attention(q, k, v, p, backend="reference")
        dt = time.perf_counter() - t0
        flops = p.describe(args.n, heads=args.heads, dim=args.dim)["useful_flops_fwd"]
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        rows.append({"pattern": name, "seconds": dt, "useful_gflops": flops / dt / 1e9, "peak_rss_gib": rss})
        print(f"{name:<34}{dt:>8.2f}{flops / dt / 1e9:>10.2f}{rss:>14.2f}")
    meta = {"n": args.n, "heads": args.heads, "dim": args.dim, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
