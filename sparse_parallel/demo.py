"""``make demo``: draw and describe a few patterns."""
from __future__ import annotations

import json
from pathlib import Path

from . import Dilated, Global, Pattern, RandomBlocks, Strided, Window
from .launcher.pattern_cmd import draw

PATTERNS = {
    "window": Pattern(Window(32)),
    "window_strided_global": Window(16) | Strided(16) | Global(first=8, queries=False),
    "dilated": Pattern(Dilated(window=16, levels=3)),
    "bigbird": Window(8) | Global(first=16) | RandomBlocks(block=16, per_query_block=2, seed=0),
}


def main(out_dir: str = "out/demo") -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{'pattern':<24}{'keys/query (min/mean/max) at 1M':>36}{'density':>12}{'TFLOP fwd (H16,D128)':>24}")
    for name, pattern in PATTERNS.items():
        draw(pattern, 256, str(out / f"{name}.png"))
        d = pattern.describe(1 << 20, heads=16, dim=128)
        kpq = d["keys_per_query"]
        print(f"{name:<24}{kpq['min']:>12}/{kpq['mean']:>10.1f}/{kpq['max']:>10}{d['density']:>12.2e}"
              f"{d['useful_flops_fwd'] / 1e12:>24.1f}")
        (out / f"{name}.json").write_text(json.dumps({"pattern": pattern.to_dict(), "describe": d}, indent=2))
    print(f"pictures and descriptions in {out}/")


if __name__ == "__main__":
    main()
