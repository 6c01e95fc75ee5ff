"""Checks made before anything is started or submitted: a bad job fails here, not after hours in a queue."""
from __future__ import annotations

import os
from pathlib import Path


def resolve_config(config: str, overrides: list[str], world_size: int):
    """Load and validate ``config`` with ``overrides`` for ``world_size`` ranks -> (TrainConfig, Derived)."""
    if not Path(config).is_file():
        raise FileNotFoundError(f"config file {config} does not exist")
    from ..training.config import load_config

    cfg = load_config(config, overrides)
    return cfg, cfg.derived(world_size)


def check_writable_dir(path: str | os.PathLike, what: str = "run.dir") -> Path:
    """Raise ValueError unless ``path`` is, or can be created as, a writable directory.  Creates nothing."""
    p = Path(path).expanduser().absolute()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{what} {p} cannot be created: {probe} exists and is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {p} is not writable (no write permission on {probe})")
    # Root passes os.access everywhere; a read-only file system is only seen by statvfs.
    if os.statvfs(probe).f_flag & os.ST_RDONLY:
        raise ValueError(f"{what} {p} is not writable ({probe} is on a read-only file system)")
    return p


def describe(derived) -> str:
    """One line saying what the world size gives: the context length follows the sequence-parallel size."""
    return (f"world size {derived.world_size} = sequence-parallel {derived.sequence_parallel} x data-parallel "
            f"{derived.data_parallel}; context length {derived.context_length} tokens; global batch "
            f"{derived.global_batch} sequences ({derived.tokens_per_step} tokens) per step")
