"""Bytes per rank of the pattern exchange vs the all-to-all, per attention layer (computed, no devices).

python benchmarks/comm_volume.py -> table on stdout, JSON in benchmarks/results/comm_volume.json

Busiest rank, forward + backward, bf16, H = Hkv = 16, D = 128, 512k tokens per rank, causal; then the
exchange of Window(4096) + Strided(64) + Global(first=128 keys) at 1M tokens without and within packed
documents (mean length 32k, ``kernels.document_lengths``).  The
numbers are what ``sparse_parallel.comm_volume`` returns; tests/parallel/test_sequence_parallel.py checks that
they equal the bytes the exchange really sends.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import sparse_parallel as sp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PATTERNS = {
    "Window(4096) + Strided(64) + Global(128)": sp.Window(4096) | sp.Strided(64) | sp.Global(first=128),
    "Window(4096)": sp.Pattern(sp.Window(4096)),
    "Dilated(1024, 4)": sp.Pattern(sp.Dilated(1024, 4)),
    "Window(256) + Global(64) + RandomBlocks(64, 3)": sp.Window(256) | sp.Global(first=64) | sp.RandomBlocks(64, 3),
}
TOKENS_PER_RANK, HEADS, DIM = 512 * 1024, 16, 128


def busiest(pattern, n, p, exchange, documents=None):
    vol = sp.comm_volume(pattern, n, p, HEADS, DIM, torch.bfloat16,
                         exchange=exchange, documents=documents)
    per = vol["per_rank"]
    return max(f + b for f, b in zip(per["forward"], per["backward"])), vol["exchange"]


def main() -> None:
    rows = []
    print(f"{'pattern':<48}{'P':>3}{'N':>9}{'ours MiB':>11}{'all-to-all MiB':>16}{'ratio':>8}  auto")
    for name, pattern in PATTERNS.items():
        for p in (2, 4, 8):
            n = p * TOKENS_PER_RANK
            ours, _ = busiest(pattern, n, p, "pattern")
            a2a, _ = busiest(pattern, n, p, "ulysses")
            _, auto = busiest(pattern, n, p, "auto")
            rows.append({"pattern": name, "P": p, "N": n, "ours_bytes": ours, "all_to_all_bytes": a2a, "auto": auto})
            print(f"{name:<48}{p:>3}{n // 1024:>8}k{ours / 2**20:>11.1f}{a2a / 2**20:>16.0f}{a2a / ours:>7.1f}x  {auto}")
    from kernels import document_lengths

    n = 1 << 20
    docs = sp.Documents.from_lengths([document_lengths(n, 32 * 1024)])
    pattern = sp.Window(4096) | sp.Strided(64) | sp.Global(first=128, queries=False)
    print(f"\nWindow(4096) + Strided(64) + Global(128 keys), {n // 1024}k tokens, {len(docs.offsets[0]) - 1} documents "
          f"(mean 32k): busiest rank, pattern exchange")
    print(f"{'P':>3}{'without MiB':>13}{'within MiB':>12}{'ratio':>8}")
    for p in (2, 4, 8):
        plain, _ = busiest(pattern, n, p, "pattern")
        within, _ = busiest(pattern, n, p, "pattern", docs)
        rows.append({"pattern": "Window(4096) + Strided(64) + Global(128 keys), mean-32k documents", "P": p, "N": n,
                     "ours_bytes": within, "without_documents_bytes": plain, "documents": len(docs.offsets[0]) - 1})
        print(f"{p:>3}{plain / 2**20:>13.1f}{within / 2**20:>12.1f}{plain / within:>7.1f}x")
    out = Path("benchmarks/results/comm_volume.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
