"""Where a run starts: its run directory owned, then a checkpoint found, checked, converted and loaded.

The steps marked collective are called by every rank, and every rank takes the same decision: rank 0's
lock outcome is broadcast, checkpoint verification is shared out and gathered (see :mod:`.checkpoint`).
"""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist

from . import checkpoint as ckpt
from . import rundir
from .layout import Layout
from .outputs import warnings_printed


@dataclass(frozen=True)
class Progress:
    """How far a run is: optimizer steps, global sequences consumed, tokens trained on (all processes)."""

    step: int = 0
    consumed: int = 0
    tokens: int = 0

    def advance(self, layout: Layout) -> "Progress":
        """The progress one optimizer step later."""
        return Progress(self.step + 1, self.consumed + layout.global_batch, self.tokens + layout.tokens_per_step)


def _on_rank0(fn, rank: int, world: int):
    """Collective: rank 0 runs ``fn``; its result, or its error, is every rank's."""
    box = [None, None]
    if rank == 0:
        try:
            box[0] = fn()
        except (ValueError, OSError) as e:
            box[1] = e
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return box[0]


def own_run_dir(run_dir: Path, resume: str, overwrite: bool, layout: Layout, held: list | None) -> None:
    """Collective: rank 0 takes the run directory's lock (and for ``resume="none"`` starts it fresh);
    every rank raises rank 0's error, if any.  The lock is appended to ``held``; the caller releases it."""
    def take() -> None:
        lock = rundir.RunLock.acquire(run_dir)
        try:
            if resume == "none":
                aside = rundir.start_fresh(run_dir, overwrite)
                if aside is not None:
                    print(f"--overwrite: the earlier run in {run_dir} was moved to {aside}", flush=True)
        except BaseException:
            lock.release()
            raise
        if held is not None:
            held.append(lock)

    _on_rank0(take, layout.rank, layout.world_size)


def run_fingerprint(cfg, layout: Layout, tokenizer) -> dict:
    """This run's :func:`rundir.fingerprint`; reading the corpus's files checks ``data.path`` too."""
    from .data import cache_key, resolve_files

    files, fmt = resolve_files(cfg.data.path, cfg.data.format, cfg.data.max_bytes)
    key = cache_key(files, fmt, cfg.data.text_field, tokenizer)
    data = rundir.data_identity(cfg.data.path, fmt, cfg.data.text_field, files, key, cfg.data.document_mask)
    return rundir.fingerprint(layout.context_length, layout.global_batch, data, tokenizer.sha256)


class Resume:
    """The checkpoint a run continues from (``found``; None for a new run) and what it carries over.

    Made by :meth:`find`, which checks the checkpoint against this run; :meth:`convert` prepares it for
    another world size before the engine exists, :meth:`load` loads it into the engine.
    """

    def __init__(self, found: ckpt.Found | None, changes: list, layout: Layout):
        self.found = found
        #: the allowed fingerprint changes of the run so far, recorded in each of its checkpoints
        self.changes = changes
        self.layout = layout
        self.universal: Path | None = None

    @classmethod
    def find(cls, root: Path, resume: str, cfg, fingerprint: dict, allow_change: list[str],
             layout: Layout) -> "Resume":
        """Collective: the checkpoint ``resume`` names under ``root`` (see :func:`ckpt.find_checkpoint`), if
        any, refused if it is of another model or of another run in a part ``allow_change`` does not name."""
        with warnings_printed():
            found = ckpt.find_checkpoint(root, resume, layout.rank, layout.world_size)
        if found is None:
            return cls(None, [], layout)
        ckpt.check_compatible(found, asdict(cfg.model))
        changed = rundir.changes(found.meta.get("fingerprint", {}), fingerprint)
        rundir.check_allowed(found.path, changed, allow_change)
        changes = list(found.meta.get("changes", []))
        if changed:
            changes.append({"step": found.meta["step"], "time": time.time(), "changed": changed})
            if layout.rank == 0:
                print("resuming with allowed changes: " + "; ".join(changed.values()), flush=True)
        return cls(found, changes, layout)

    @property
    def step(self) -> int:
        return 0 if self.found is None else self.found.meta["step"]

    @property
    def same_world(self) -> bool:
        return self.found is not None and self.found.meta["world_size"] == self.layout.world_size

    def saved_under(self, root: Path) -> bool:
        """Whether the checkpoint is one of this run's own (under ``root``): then it needs no second save."""
        return self.found is not None and self.found.root.resolve() == root.resolve()

    def convert(self, root: Path, zero_stage: int) -> bool:
        """Collective: whether the engine is to load DeepSpeed's universal form, made here if so.

        ZeRO partitions optimizer state by world size: another world size loads the universal form,
        converted on the fly beside this run's checkpoints (stage 0 keeps it whole and loads as is).
        """
        if self.found is not None and not self.same_world and zero_stage > 0:
            self.universal = ckpt.to_universal(self.found, root, self.layout.rank)
        return self.universal is not None

    def load(self, engine) -> Progress:
        """Collective: load the checkpoint into ``engine`` (nothing for a new run); the run's progress."""
        if self.found is None:
            return Progress()
        rank = self.layout.rank
        ckpt.load(engine, self.found, self.universal, rank, self.same_world)
        dist.barrier()
        if self.universal is not None and rank == 0:
            shutil.rmtree(self.universal, ignore_errors=True)
        meta = self.found.meta
        # Checkpoints written before the count was recorded trained at this run's layout, if any.
        tokens = meta.get("tokens", meta["step"] * self.layout.tokens_per_step)
        return Progress(meta["step"], meta["consumed"], tokens)
