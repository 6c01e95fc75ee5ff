"""``sparse-parallel launch``: N local ranks through torchrun.

Builds one ``torch.distributed.run`` command whose workers are ``sparse-parallel train``; arguments this
command does not know go to torchrun unchanged (``--max-restarts 3``, ``--rdzv-backend c10d``, ``--nnodes``
...), so nothing torchrun does is redone here.  ``--dry-run`` prints the command.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

from ..training.__main__ import add_run_arguments
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
    check_writable_dir(cfg.run.dir)
    cmd = torchrun_command(args.config, args.nproc, args.overrides, args.resume, args.extra,
                           overwrite=args.overwrite, allow_change=args.allow_change)
    print(f"sparse-parallel launch: {describe(derived)}", file=sys.stderr)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    return subprocess.run(cmd).returncode


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
