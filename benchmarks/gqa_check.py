"""bf16 GQA check of the kernels against float64 (group 4 and 2), then one timing; a quick device probe.

    python3 benchmarks/gqa_check.py
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kernel_variants as KV  # noqa: E402
from sparse_parallel.kernels import core  # noqa: E402
from sparse_parallel.patterns import Dilated, Global, Strided, Window  # noqa: E402

KV.CHECKS = [
    ("w512+g64+s32 gqa4 d128", Window(512) | Global(first=64, queries=False) | Strided(32), 8, 2, 128),
    ("dilated(256,3) gqa2 d64", Dilated(window=256, levels=3), 4, 2, 64),
]
t0 = time.time()
print("checks ok:", KV.check(core.default_config("cuda"), n=2000), f"{time.time() - t0:.1f} s", flush=True)
pat = Window(1024) | Strided(64) | Global(first=128, queries=False)
ms = KV.timed(pat, 256 * 1024, 16, 4, core.default_config("cuda"))
print(f"w1024+s64+g128 256k 16/4 fwd+bwd {ms:.2f} ms", flush=True)
