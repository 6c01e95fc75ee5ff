"""``python -m sparse_parallel.training CONFIG [--set k=v ...] [--resume auto|none|PATH]``: one rank."""
from __future__ import annotations

import argparse
import sys

from . import USER_ERRORS
from .rundir import CHANGES
from .trainer import end_process, run


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of one rank's training process (shared with ``sparse-parallel train``/``launch``)."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--resume", default="auto",
                   help="'auto' (the newest complete checkpoint in the run directory that verifies, if any), "
                        "'none' (a new run; refused where run.dir holds one, see --overwrite), or a checkpoint path")
    p.add_argument("--overwrite", action="store_true",
                   help="with --resume none: move an earlier run in run.dir aside to <run.dir>.old-<time>")
    p.add_argument("--allow-change", dest="allow_change", action="append", default=[], choices=CHANGES,
                   help="resume although this part of the run changed (repeatable): context, batch, data, "
                        "tokenizer; recorded in the checkpoints")


def run_kwargs(args) -> dict:
    return {"resume": args.resume, "overwrite": args.overwrite, "allow_change": args.allow_change}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparse_parallel.training", allow_abbrev=False,
                                description="Train one rank (torchrun/srun/mpirun start one per GPU).")
    p.add_argument("config", help="YAML training config")
    add_run_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args.config, args.overrides, **run_kwargs(args))
    except USER_ERRORS as e:
        print(f"sparse_parallel.training: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    end_process(main())
