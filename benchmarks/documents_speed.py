"""What documents save: our kernels on one pattern with and without packed documents, same run.

    python3 benchmarks/documents_speed.py --out $OUT [--n 1048576] [--mean 32768] [--heads 16/16]

Times forward and forward+backward of ``pattern`` and of ``pattern.within(documents)`` (document lengths
from ``kernels.document_lengths``: exponential around ``--mean``, seeded), and the pairs each computes
(``Pattern.describe``).  The FlexAttention anchors of the same case are in ``kernels.py``
(case ``w4096+s64+g128 docs32k``).  Prints a table, writes documents_speed.json and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparse_parallel.kernels import triton_attention  # noqa: E402
from sparse_parallel.patterns import Documents, Global, Strided, Window, as_pattern  # noqa: E402

from kernels import document_lengths  # noqa: E402


def bench(fn) -> float:
    import triton

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=2, rep=20, return_mode="median")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--n", type=int, default=1 << 20)
    ap.add_argument("--mean", type=int, default=32 * 1024)
    ap.add_argument("--heads", default="16/16")
    args = ap.parse_args()
    hq, hkv = (int(x) for x in args.heads.split("/"))
    base = as_pattern(Window(4096) | Strided(64) | Global(first=128, queries=False))
    lengths = document_lengths(args.n, args.mean)
    docs = Documents.from_lengths([lengths])
    q, k, v = (torch.randn(1, args.n, h, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (hq, hkv, hkv))
    do = torch.randn_like(q)
    rows = []
    for label, pat in (("without documents", base), (f"{len(lengths)} documents, mean {args.mean}", base.within(docs))):
        def fwd():
            with torch.no_grad():
                triton_attention(q, k, v, pat)

        def fwd_bwd():
            o, _ = triton_attention(q, k, v, pat)
            o.backward(do)
            q.grad = k.grad = v.grad = None

        pairs = pat.describe(args.n, hq, 128)["pairs"] / hq
        rows.append({"pattern": label, "pairs_per_head": pairs, "fwd_ms": bench(fwd), "fwdbwd_ms": bench(fwd_bwd)})
        print(rows[-1], flush=True)
    import triton

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
           "n": args.n, "heads": args.heads, "documents": len(lengths), "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "documents_speed.json"), "w") as f:
        json.dump(res, f, indent=1)
    print("| pattern | pairs per head | fwd ms | fwd+bwd ms |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['pattern']} | {r['pairs_per_head']:.3g} | {r['fwd_ms']:.1f} | {r['fwdbwd_ms']:.1f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["fwd_ms"] for r in rows], 0.4, label="forward")
    ax.bar([i + 0.2 for i in x], [r["fwdbwd_ms"] for r in rows], 0.4, label="forward+backward")
    ax.set_xticks(list(x), [r["pattern"] for r in rows])
    ax.set_ylabel("ms")
    ax.set_title(f"W4096+S64+G128, {args.n} tokens, {args.heads} heads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "documents_speed.png"), dpi=120)


if __name__ == "__main__":
    main()
