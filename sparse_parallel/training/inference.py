"""A finished run as a model: its config, tokenizer and the weights of a checkpoint, on one process.

What ``export``, ``generate`` and ``eval`` start from.  The weights are read in float32 whatever the
training precision: ZeRO checkpoints through DeepSpeed's own ``zero_to_fp32`` (which gathers the
fp32 master shards), ZeRO-0 checkpoints from the saved module states.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import TrainConfig, load_config


@dataclass
class TrainedRun:
    cfg: TrainConfig
    model: torch.nn.Module          # our Transformer, float32, eval mode, on the CPU
    tokenizer: object
    checkpoint: Path
    context_length: int             #: the context the run trained at


def checkpoint_state_dict(found: ckpt.Found) -> dict:
    """The float32 model state dict of a complete checkpoint."""
    stage = int(found.meta.get("zero_stage", 0))
    if stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # DeepSpeed reports its progress on stdout, where generate writes its text
        with contextlib.redirect_stdout(sys.stderr):
            state = get_fp32_state_dict_from_zero_checkpoint(str(found.root), tag=found.tag)
    else:
        files = sorted(found.path.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise ValueError(f"checkpoint {found.path} holds no model states (mp_rank_*_model_states.pt)")
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in state.items()}


def load_run(run_dir, checkpoint: str = "auto", overrides=()) -> TrainedRun:
    """The model of ``run_dir`` (its ``config.yaml``) at ``checkpoint`` ('auto': the latest)."""
    from ..model import Transformer
    from .tokenizer import Tokenizer

    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml; a run writes it when it starts)")
    cfg = load_config(config, list(overrides))
    found = ckpt.find_checkpoint(run_dir / "checkpoints", checkpoint)
    if found is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint (checkpoints/latest is missing)")
    ckpt.check_compatible(found, _as_dict(cfg.model))
    model = Transformer(cfg.model)
    model.load_state_dict(checkpoint_state_dict(found))
    model.float().eval()
    return TrainedRun(cfg, model, Tokenizer(cfg.data.tokenizer), found.path,
                      int(found.meta.get("context_length", cfg.train.tokens_per_gpu)))


def _as_dict(model_cfg) -> dict:
    from dataclasses import asdict

    return asdict(model_cfg)
