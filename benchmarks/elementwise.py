"""The element-wise work of a training step, each candidate implementation side by side on one GPU.

    PYTHONUNBUFFERED=1 python3 benchmarks/elementwise.py --out $OUT

At the shapes of benchmarks/train_scaling.py's model at 128k tokens (bf16; q ``[1, N, 16, 128]``,
k ``[1, N, 4, 128]``, activations ``[1, N, 2048]``, MLP hidden ``[1, 65536, 5632]``), forward and
forward+backward medians of ``triton.testing.do_bench`` for:
- rotary: the eager definition (``fused.rotate.eager``), its torch.compile'd form (what
  ``fused.Elementwise`` builds: ``dynamic=True``) and the Triton kernel (``rotary_kernel.rotate``);
- RMSNorm and SwiGLU gating: eager and torch.compile'd.
Each row gives the effective bandwidth over the bytes the operation must move (inputs read once,
outputs written once; the backward: gradient in, gradient out, the inputs again).  Prints a table,
writes elementwise.json and elementwise.png to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparse_parallel.model import fused, layers  # noqa: E402


def bench(fn) -> float:
    import triton

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


def measure(fn, inputs, grad_of: int) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of ``fn(*inputs)``; the backward reaches ``inputs[grad_of]``."""
    leaf = inputs[grad_of].detach().requires_grad_()
    args = list(inputs)
    args[grad_of] = leaf
    dy = torch.randn_like(fn(*inputs))

    def fwd():
        with torch.no_grad():
            fn(*inputs)

    def fwd_bwd():
        fn(*args).backward(dy)
        leaf.grad = None

    return bench(fwd), bench(fwd_bwd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    import triton

    from sparse_parallel.model import rotary_kernel

    os.makedirs(args.out, exist_ok=True)
    dev, bf = "cuda", torch.bfloat16
    n = args.n
    cos, sin = layers.rotary_tables(torch.arange(n, device=dev), 128, 500000.0)
    compiled = {f: torch.compile(f.eager, dynamic=True) for f in (fused.rotate, fused.rms_norm, fused.silu_mul)}
    q = torch.randn(1, n, 16, 128, device=dev, dtype=bf)
    k = torch.randn(1, n, 4, 128, device=dev, dtype=bf)
    x = torch.randn(1, n, 2048, device=dev, dtype=bf)
    w = torch.ones(2048, device=dev, dtype=bf)
    gate = torch.randn(1, 65536, 5632, device=dev, dtype=bf)
    up = torch.randn_like(gate)
    table = 2 * cos.numel() * 4
    cases = []  # (operation, implementation, fn, inputs, which input gets the gradient, fwd bytes, bwd bytes)
    for name, t in (("rotary q", q), ("rotary k", k)):
        moved = 2 * t.numel() * 2 + table
        for impl, fn in (("eager", fused.rotate.eager), ("torch.compile", compiled[fused.rotate]),
                         ("triton kernel", rotary_kernel.rotate)):
            cases.append((name, impl, fn, (t, cos, sin), 0, moved, moved))
    for impl, fn in (("eager", fused.rms_norm.eager), ("torch.compile", compiled[fused.rms_norm])):
        cases.append(("rms_norm", impl, lambda a, b, fn=fn: fn(a, b, 1e-5), (x, w), 0,
                      2 * x.numel() * 2, 3 * x.numel() * 2))
    for impl, fn in (("eager", fused.silu_mul.eager), ("torch.compile", compiled[fused.silu_mul])):
        cases.append(("silu_mul", impl, fn, (gate, up), 0, 3 * gate.numel() * 2, 5 * gate.numel() * 2))
    rows = []
    for op, impl, fn, inputs, grad_of, fwd_bytes, bwd_bytes in cases:
        f_ms, fb_ms = measure(fn, inputs, grad_of)
        b_ms = max(fb_ms - f_ms, 1e-6)
        rows.append({"op": op, "impl": impl, "fwd_ms": f_ms, "fwd_bwd_ms": fb_ms,
                     "fwd_tb_s": fwd_bytes / f_ms / 1e9, "bwd_tb_s": bwd_bytes / b_ms / 1e9})
        print(json.dumps(rows[-1]), flush=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
           "n": n, "rows": rows}
    with open(os.path.join(args.out, "elementwise.json"), "w") as f:
        json.dump(res, f, indent=1)
    print("| op | implementation | fwd ms | fwd+bwd ms | fwd TB/s | bwd TB/s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {r['fwd_tb_s']:.2f}"
              f" | {r['bwd_tb_s']:.2f} |")
    plot(rows, os.path.join(args.out, "elementwise.png"))


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['op']}\n{r['impl']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 4))
    ax.bar(range(len(rows)), [r["fwd_bwd_ms"] for r in rows], color="tab:blue")
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("forward + backward ms")
    ax.set_title("element-wise work of one layer (bf16)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
