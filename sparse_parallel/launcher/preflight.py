"""Checks made before anything is started or submitted: a bad job fails here, not after hours in a queue."""
from __future__ import annotations

from pathlib import Path

from ..training.rundir import check_writable_dir  # noqa: F401  (the one rule, shared with the ranks)


def resolve_config(config: str, overrides: list[str], world_size: int):
    """Load and validate ``config`` with ``overrides`` for ``world_size`` ranks -> (TrainConfig, Layout)."""
    if not Path(config).is_file():
        raise FileNotFoundError(f"config file {config} does not exist")
    from ..training.config import load_config
    from ..training.layout import build_layout

    cfg = load_config(config, overrides)
    return cfg, build_layout(cfg, world_size)


def describe(derived) -> str:
    """One line saying what the world size gives: the context length follows the sequence-parallel size."""
    return (f"world size {derived.world_size} = sequence-parallel {derived.sequence_parallel} x data-parallel "
            f"{derived.data_parallel}; context length {derived.context_length} tokens; global batch "
            f"{derived.global_batch} sequences ({derived.tokens_per_step} tokens) per step")
