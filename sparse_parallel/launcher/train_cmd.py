"""``sparse-parallel train``: one rank's training process.

This is what torchrun, srun or mpirun start on every rank: discover the rank (see :mod:`.discovery`),
export the standard variables, hand over to ``sparse_parallel.training.run``.  The exit code is the
trainer's: 0 when done, ``REQUEUE_EXIT_CODE`` after a checkpoint on preemption.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import sys

from ..training.__main__ import add_run_arguments
from .discovery import SOURCES, discover, export_env
from .launch import record_exit_code


class StoppedBeforeTraining(Exception):
    """A preemption signal came before the trainer had installed its own handler."""


def _stop(signum, frame):
    raise StoppedBeforeTraining(signal.Signals(signum).name)


def run(args) -> int:
    # Until the trainer's loop installs its handlers, USR1/TERM would kill the rank outright (USR1's default
    # action).  Start-up trains nothing, so the resume point is still the last checkpoint: stop cleanly
    # with the requeue code instead.  The trainer replaces these handlers when its loop begins.
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        info = discover(args.launcher)
        if args.dry_run:
            from ..training.config import load_config
            from ..training.layout import build_layout

            cfg = load_config(args.config, args.overrides)
            derived = build_layout(cfg, info.world_size, info.rank).sizes()
            print(json.dumps({"rank": dataclasses.asdict(info), "derived": derived}), flush=True)
            return 0
        export_env(info)
        from .. import training

        from ..training.__main__ import run_kwargs

        return int(training.run(args.config, list(args.overrides), **run_kwargs(args)))
    except StoppedBeforeTraining as e:
        from ..training import REQUEUE_EXIT_CODE

        print(f"sparse-parallel train: {e} before training began; nothing to save, exiting with "
              f"{REQUEUE_EXIT_CODE}", file=sys.stderr, flush=True)
        return REQUEUE_EXIT_CODE
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="one rank's training process (what torchrun, srun or mpirun start)",
                       description="Train on this rank.  The rank, world size and rank 0's address come "
                                   "from torchrun's variables, a Slurm task's or MPI (mpi4py).")
    p.add_argument("config", help="YAML training config")
    add_run_arguments(p)
    p.add_argument("--launcher", default="auto", choices=SOURCES,
                   help="where the rank comes from; auto: torchrun variables, then MPI, then a Slurm task, "
                        "else a single process")
    p.add_argument("--dry-run", action="store_true",
                   help="print this rank's discovered place and the config's derived sizes as JSON; "
                        "train nothing")
    p.set_defaults(func=run, on_exit=record_exit_code)

