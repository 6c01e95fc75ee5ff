"""Project training step time and reachable context to more GPUs from measured one-GPU runs.

python benchmarks/projection.py [--runs JSON ...] -> table on stdout, JSON in benchmarks/results/projection.json

The model and its assumptions are documented in docs/SCALING.md.  In short, for the busiest rank
of P sequence-parallel ranks holding t tokens each:

    step(P, t) = a * t + b * t * keys(P, t) + comm(P, t)

``a`` (seconds per token: matmuls, recompute, norms, optimizer share, activation offload) and ``b``
(seconds per query-key pair of attention, forward + backward + recompute) are fitted to two measured
one-GPU steps at different lengths; ``keys`` is the mean number of keys per query of the busiest rank
(the last one: an unbounded strided level reaches every earlier token), computed exactly by
``Pattern.describe`` for the rank's query range; ``comm`` is the bytes the busiest rank sends
(``comm_volume``) over the measured link bandwidth, assumed not hidden (an upper bound).
Peak GPU memory: the parameter and optimizer bytes (ZeRO-1 shards the optimizer's 12 bytes per
parameter over the P ranks) plus activations proportional to t, scaled from the measured peak of
the longest offloaded run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sparse_parallel.patterns import Pattern

MAIN = Pattern.from_dict({"causal": True, "components": [
    {"type": "window", "left": 4096}, {"type": "strided", "stride": 64},
    {"type": "global", "first": 128, "queries": False}]})
LINK_GBPS = 222.0  # measured P2P on 2 x H200 over NVLink at 32 MB messages (shared/FACTS.md)
GPU_GIB = 139.8


def keys_per_query(pattern: Pattern, n: int) -> torch.Tensor:
    """Keys of every query of a length-n sequence (exact, O(n))."""
    from sparse_parallel.patterns.counting import per_query_counts

    return per_query_counts(pattern, n)[0][0, 0].double()


def comm_seconds(layers: int, t: int, p: int, kv_heads: int, dim: int) -> float:
    """Busiest-rank bytes of one step (forward, recompute, backward) over the link, not hidden."""
    if p == 1:
        return 0.0
    window_rows = 4096
    strided_rows = (p - 1) * t // 64
    per_row = 2 * kv_heads * dim * 2  # k and v, bf16
    fwd = (window_rows + strided_rows) * per_row
    per_layer = 3 * fwd  # forward, recompute forward, gradients back
    return layers * per_layer / (LINK_GBPS * 1e9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", default=["benchmarks/results/train_scaling_h200_128k.json",
                                                  "benchmarks/results/train_scaling_h200_1m_offload.json"])
    ap.add_argument("--gpus", default="1,2,4,8,32")
    ap.add_argument("--tokens-per-gpu", default="1048576,1572864")
    ap.add_argument("--out", default="benchmarks/results/projection.json")
    args = ap.parse_args()
    points = []
    model = None
    for path in args.runs:
        data = json.loads(Path(path).read_text())
        model = data["meta"]["model"]
        for r in data["rows"]:
            if r["status"] == "ok" and r["attention"] == "ours" and r["pattern"] == "main" and r["gpus"] == 1:
                n = r["tokens_per_gpu"]
                points.append((n, r["step_s"], float(keys_per_query(MAIN, n).mean()), r["peak_mem_gib"]))
    if len(points) < 2:
        raise SystemExit("need two measured one-GPU 'main' steps at different lengths")
    (t1, s1, k1, m1), (t2, s2, k2, m2) = sorted(points)[:1] + sorted(points)[-1:]
    # s = a t + b t k  -> per token: s/t = a + b k
    b = (s2 / t2 - s1 / t1) / (k2 - k1)
    a = s1 / t1 - b * k1
    params = json.loads(Path(args.runs[-1]).read_text())["rows"][0]["params"]
    state = lambda p: params * (4 + 12 / p) / 2**30  # bf16 param + grad, fp32 master/moments sharded
    act_per_token = (m2 - state(1)) / t2
    print(f"fit: a = {a * 1e6:.2f} us/token, b = {b * 1e12:.1f} ps/pair (all layers), activations "
          f"{act_per_token * 2**20:.1f} GiB per 1M tokens  (from {t1} and {t2} tokens)")
    rows = []
    print(f"{'GPUs':>5}{'tok/GPU':>10}{'context':>11}{'keys/q last':>13}{'step s':>9}{'comm s':>8}"
          f"{'weak eff':>10}{'balance':>9}{'mem GiB':>9}  fits")
    for t in map(int, args.tokens_per_gpu.split(",")):
        base = None
        for p in map(int, args.gpus.split(",")):
            n = p * t
            counts = keys_per_query(MAIN, n) if n <= (1 << 25) else None
            keys_last = float(counts[n - t:].mean()) if counts is not None else float("nan")
            keys_mean = float(counts.mean()) if counts is not None else float("nan")
            comm = comm_seconds(model["layers"], t, p, model["kv_heads"], model["dim"] // model["heads"])
            step = a * t + b * t * keys_last + comm
            balanced = a * t + b * t * keys_mean
            base = step if p == 1 else base
            mem = state(p) + act_per_token * t
            row = {"gpus": p, "tokens_per_gpu": t, "context": n, "keys_per_query_last_rank": keys_last,
                   "keys_per_query_mean": keys_mean, "step_s": step, "comm_s": comm,
                   "weak_efficiency_tokens": base / step, "load_balance": balanced / step, "mem_gib": mem,
                   "fits": mem < GPU_GIB}
            rows.append(row)
            print(f"{p:>5}{t:>10}{n:>11}{keys_last:>13.0f}{step:>9.1f}{comm:>8.2f}{base / step:>10.1%}"
                  f"{balanced / step:>9.1%}{mem:>9.1f}  {'yes' if row['fits'] else 'no'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"fit": {"a_s_per_token": a, "b_s_per_pair": b,
                                                  "activation_gib_per_token": act_per_token},
                                          "model": model, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
