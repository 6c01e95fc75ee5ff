"""Sharded checkpoints that are complete or absent, and finding the one to resume from.

Layout under ``<run.dir>/checkpoints``::

    step00000040/            a complete checkpoint (DeepSpeed's shards + ours)
        meta.json            written last, before the rename: step, data position, model config,
                             world/sequence/data-parallel sizes, ZeRO stage
        rng_rank00000.pt     per-rank RNG states
        universal/           made on demand when resuming at another world size
    latest                   name of the newest complete checkpoint (replaced atomically)

A save writes into ``.tmp-stepXXXXXXXX``; after every rank has written (a
barrier) rank 0 writes ``meta.json``, renames the folder and then replaces
``latest``.  A process killed at any point before the rename leaves only a
``.tmp-`` folder, which is never loaded and is removed by the next save.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

META = "meta.json"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Found:
    """A complete checkpoint chosen for resuming."""

    path: Path
    meta: dict

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def tag(self) -> str:
        return self.path.name


def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / META).read_text())
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} is incomplete (no {META}); it cannot be resumed from") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint {path}: {META} is corrupt ({e})") from None


def find_checkpoint(root: Path, resume: str) -> Found | None:
    """``resume``: "none", "auto" (the latest complete one under ``root``, if any) or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        latest = root / LATEST
        if not latest.is_file():
            return None
        path = root / latest.read_text().strip()
        return Found(path, read_meta(path))
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"--resume: {resume} does not exist")
    if (path / LATEST).is_file():  # a checkpoints folder: take its latest
        path = path / (path / LATEST).read_text().strip()
    elif (path / "checkpoints" / LATEST).is_file():  # a run directory
        path = path / "checkpoints" / (path / "checkpoints" / LATEST).read_text().strip()
    return Found(path, read_meta(path))


def check_compatible(found: Found, model_cfg: dict) -> None:
    """A checkpoint of another model shape is an error naming the differing fields."""
    saved = found.meta.get("model", {})
    model_cfg = json.loads(json.dumps(model_cfg))  # as saved: JSON has only string keys
    diff = sorted(k for k in set(saved) | set(model_cfg) if saved.get(k) != model_cfg.get(k)
                  and k not in ("activation_checkpointing", "loss_chunk", "mlp_chunk", "attention_backend"))
    if diff:
        detail = ", ".join(f"model.{k}: checkpoint {saved.get(k)!r} vs config {model_cfg.get(k)!r}" for k in diff)
        raise ValueError(f"checkpoint {found.path} is of another model: {detail}")


def save(engine, root: Path, step: int, meta: dict, keep: int, rank: int) -> Path:
    """Collective: every rank calls it.  Returns the complete checkpoint's path."""
    tag = tag_for(step)
    tmp_tag = f".tmp-{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)  # what a killed save left
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    torch.save(rng_state(), root / tmp_tag / f"rng_rank{rank:05d}.pt")
    dist.barrier()
    final = root / tag
    if rank == 0:
        _atomic_write(root / tmp_tag / META, json.dumps(meta, indent=1))
        if final.exists():  # the same step saved by an earlier attempt: replace it whole
            old = root / f".old-{tag}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(root / tmp_tag, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(root / tmp_tag, final)
        _atomic_write(root / LATEST, tag + "\n")
        complete = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step")
                          and (p / META).is_file())
        for p in complete[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    return final


def to_universal(found: Found, work_root: Path, rank: int) -> Path:
    """Collective: DeepSpeed's universal form of ``found``, made by rank 0 under ``work_root``.

    Written beside this run's checkpoints (never into the source checkpoint); the
    caller removes it once loaded.
    """
    out = work_root / f".universal-{found.tag}"
    if rank == 0:
        import argparse

        from deepspeed.checkpoint import ds_to_universal

        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        args = argparse.Namespace(input_folder=str(found.path), output_folder=str(out), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)
        try:
            ds_to_universal.main(args)
        except Exception as e:
            raise ValueError(f"checkpoint {found.path} could not be converted for another world size "
                             f"({type(e).__name__}: {e})") from None
    dist.barrier()
    return out


def load(engine, found: Found, universal: Path | None, rank: int, same_world: bool) -> None:
    """Load model, optimizer and scheduler state (and this rank's RNG when the world size is unchanged).

    ``universal``: the converted copy from ``to_universal`` to load instead of ``found``.
    """
    load_dir, tag = (universal.parent, universal.name) if universal else (found.root, found.tag)
    try:
        path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, AssertionError) as e:
        raise ValueError(f"checkpoint {found.path} could not be loaded ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if path is None:
        raise ValueError(f"checkpoint {found.path} could not be loaded (model states missing)")
    rng = found.path / f"rng_rank{rank:05d}.pt"
    if same_world and rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
