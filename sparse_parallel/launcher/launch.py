"""``sparse-parallel launch``: N local ranks through torchrun.

Builds one ``torch.distributed.run`` command whose workers are ``sparse-parallel train``; arguments this
command does not know go to torchrun unchanged (``--max-restarts 3``, ``--rdzv-backend c10d``, ``--nnodes``
...), so nothing torchrun does is redone here.  ``--dry-run`` prints the command.

Signals and the exit code.  SIGTERM and SIGUSR1 sent to ``launch`` go to the ranks themselves (torchrun
would die of USR1, and answers TERM by killing its workers after 30 s), so they checkpoint at the next
step and exit with ``REQUEUE_EXIT_CODE``.  torchrun reports any failed worker as 1; each rank therefore
records its exit code in a folder named by ``EXIT_DIR_ENV``, and ``launch`` returns the ranks' code when
they all agree (85 after a preemption checkpoint), torchrun's otherwise.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

#: Where ``sparse-parallel train`` records its exit code (one file per rank) when this is set.
EXIT_DIR_ENV = "SPARSE_PARALLEL_EXIT_DIR"
#: Signals passed on to the ranks.
FORWARDED = (signal.SIGTERM, signal.SIGUSR1)

from ..training.__main__ import add_run_arguments
from ..training.rundir import check_fresh
from .preflight import check_writable_dir, describe, resolve_config


def torchrun_command(config: str, nproc: int, overrides: list[str] = (), resume: str = "auto",
                     torchrun_args: list[str] = (), python: str = sys.executable, overwrite: bool = False,
                     allow_change: list[str] = ()) -> list[str]:
    """The torchrun command line that starts ``nproc`` training ranks on this node."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be an integer >= 1, got {nproc!r}")
    torchrun_args = list(torchrun_args)
    cmd = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    # One node with no rendezvous of its own: --standalone picks a free port on localhost.
    if not any(a.split("=")[0] in ("--nnodes", "--rdzv-endpoint", "--rdzv_endpoint", "--master-addr",
                                   "--master_addr", "--standalone") for a in torchrun_args):
        cmd.append("--standalone")
    cmd += torchrun_args
    cmd += ["-m", "sparse_parallel.launcher.cli", "train", config, "--launcher", "torchrun", "--resume", resume]
    if overwrite:
        cmd.append("--overwrite")
    for part in allow_change:
        cmd += ["--allow-change", part]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def torchrun_nnodes(torchrun_args: list[str]) -> tuple[int, int]:
    """(min, max) nodes from torchrun's ``--nnodes N`` or ``--nnodes MIN:MAX`` (default one node)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--nnodes", default="1")
    value = parser.parse_known_args(list(torchrun_args))[0].nnodes
    try:
        low, _, high = value.partition(":")
        low, high = int(low), int(high or low)
    except ValueError:
        raise ValueError(f"--nnodes must be N or MIN:MAX, got {value!r}") from None
    if not 1 <= low <= high:
        raise ValueError(f"--nnodes must be N or MIN:MAX with 1 <= MIN <= MAX, got {value!r}")
    return low, high


def run(args) -> int:
    low, high = torchrun_nnodes(args.extra)
    # Every world size an elastic job may reach must fit the config (sequence-parallel size divides it).
    for nodes in sorted({low, high}):
        cfg, derived = resolve_config(args.config, args.overrides, args.nproc * nodes)
    run_dir = check_writable_dir(cfg.run.dir)
    if args.resume == "none":  # refused here already, not by every rank after torchrun started them
        check_fresh(run_dir, args.overwrite)
    cmd = torchrun_command(args.config, args.nproc, args.overrides, args.resume, args.extra,
                           overwrite=args.overwrite, allow_change=args.allow_change)
    print(f"sparse-parallel launch: {describe(derived)}", file=sys.stderr)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    return run_forwarding(cmd)


def record_exit_code(code: int, env=os.environ) -> None:
    """Called by ``sparse-parallel train`` as it ends: leave ``code`` where ``launch`` looks for it."""
    folder = env.get(EXIT_DIR_ENV)
    if folder and os.path.isdir(folder):
        Path(folder, f"rank{env.get('RANK', '0')}").write_text(f"{code}\n")


def _ranks_of(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def run_forwarding(cmd: list[str]) -> int:
    """Run torchrun ``cmd``; forward TERM/USR1 to its ranks; the ranks' common exit code, else torchrun's."""
    with tempfile.TemporaryDirectory(prefix="sparse-parallel-exit-") as folder:
        env = dict(os.environ, **{EXIT_DIR_ENV: folder})
        # torchrun would die of USR1 (the default action); ignored there, the ranks install their own handler.
        proc = subprocess.Popen(cmd, env=env, preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN))

        def forward(signum, frame):
            for child in _ranks_of(proc.pid):
                try:
                    child.send_signal(signum)
                except Exception:  # noqa: BLE001 - a rank that has just ended needs no signal
                    pass

        previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
        # Ctrl-C reaches torchrun and the ranks from the terminal; this process waits for their end.
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda signum, frame: None)
        try:
            rc = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        codes = {int(p.read_text()) for p in Path(folder).glob("rank*")}
    if rc != 0 and len(codes) == 1:
        return codes.pop()
    return rc


def add_parser(sub) -> None:
    p = sub.add_parser("launch", help="start N local ranks through torchrun",
                       description="Start N training ranks on this machine (GPUs, or CPU ranks on gloo) "
                                   "through torchrun.  Unknown arguments are passed to torchrun.")
    p.add_argument("config", help="YAML training config")
    p.add_argument("--nproc", "--nproc-per-node", "--nproc_per_node", dest="nproc", type=int, required=True,
                   help="ranks on this node (one per GPU)")
    add_run_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command; start nothing")
    p.set_defaults(func=run, accepts_extra=True)
