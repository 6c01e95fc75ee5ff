"""``python -m sparse_parallel.training CONFIG [--set k=v ...] [--resume auto|none|PATH]``: one rank."""
from __future__ import annotations

import argparse
import sys

from .trainer import end_process, run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparse_parallel.training",
                                description="Train one rank (torchrun/srun/mpirun start one per GPU).")
    p.add_argument("config", help="YAML training config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--resume", default="auto", help="auto (latest complete checkpoint), none, or a checkpoint path")
    args = p.parse_args(argv)
    try:
        return run(args.config, args.overrides, resume=args.resume)
    except (ValueError, FileNotFoundError) as e:
        print(f"sparse_parallel.training: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    end_process(main())
