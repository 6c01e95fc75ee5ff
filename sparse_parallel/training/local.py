"""Start N training ranks on this machine as child processes (the demo and the tests use it).

Each rank is ``python -m sparse_parallel.training CONFIG ...`` with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and a free MASTER_PORT in its environment:
the same contract torchrun and the launcher follow.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..launcher.discovery import free_port


@dataclass
class Ranks:
    procs: list[subprocess.Popen]
    logs: list[Path]

    def signal(self, sig: int = signal.SIGUSR1) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(sig)

    def wait(self, timeout: float) -> list[int]:
        """Exit codes; on timeout every rank still running is killed and reports -9."""
        deadline = time.time() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(0.1, deadline - time.time())))
            except subprocess.TimeoutExpired:
                for q in self.procs:
                    if q.poll() is None:
                        q.kill()
                codes.append(p.wait())
        return codes

    def output(self, rank: int = 0) -> str:
        return self.logs[rank].read_text(errors="replace")


def start(config: str, overrides=(), nprocs: int = 1, resume: str = "auto", log_dir: str | os.PathLike = ".",
          env: dict | None = None, script: str | None = None, console: bool = False, args=()) -> Ranks:
    """Start ``nprocs`` ranks; their stdout+stderr go to ``log_dir/rank{r}.log``.

    ``script``: a Python file taking the same arguments as ``python -m sparse_parallel.training``
    (to wrap the entry point) instead of the module itself.  ``console``: rank 0 writes to this
    process's terminal (its progress bar) instead of its log file.  ``args``: more arguments of the
    entry point (``--overwrite``, ``--allow-change context`` ...).
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs, logs = [], []
    for rank in range(nprocs):
        e = dict(os.environ)
        e.update(env or {})
        e.update(RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nprocs),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if nprocs > 1:
            # Ranks share this machine's cores; more threads each only oversubscribe them.
            e.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nprocs)))
        entry = [str(script)] if script else ["-m", "sparse_parallel.training"]
        cmd = [sys.executable, *entry, str(config), "--resume", str(resume), *args]
        for o in overrides:
            cmd += ["--set", o]
        log = log_dir / f"rank{rank}.log"
        logs.append(log)
        if console and rank == 0:
            log.write_text("(rank 0 wrote to the console)\n")
            procs.append(subprocess.Popen(cmd, env=e))
            continue
        with log.open("w") as f:
            procs.append(subprocess.Popen(cmd, env=e, stdout=f, stderr=subprocess.STDOUT))
    return Ranks(procs, logs)


def train(config: str, overrides=(), nprocs: int = 1, resume: str = "auto", log_dir=".", timeout: float = 600,
          env: dict | None = None, script: str | None = None, args=()) -> tuple[list[int], Ranks]:
    """Run ranks to completion; returns their exit codes and the ranks (for their logs)."""
    ranks = start(config, overrides, nprocs, resume, log_dir, env, script, args=args)
    return ranks.wait(timeout), ranks
