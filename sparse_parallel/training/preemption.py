"""Preemption signals and the checkpoint cadence: when a run saves, and what it records with a save.

The ranks decide together, at each step boundary, in one all-reduce: whether any rank was signalled
(then every rank saves and the run stops) and whether any rank's checkpoint clock ran out.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .layout import Layout
from .resume import Progress


class Preemption:
    """SIGUSR1/SIGTERM/SIGINT set a flag; ranks agree on it at each step boundary.

    A second SIGINT (Ctrl-C twice) ends the process at once, without a checkpoint.
    """

    def __init__(self):
        self.flag = False
        self._interrupted = False
        self._old = {}
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self._interrupted:
                os.write(2, b"interrupted again: exiting now, without a checkpoint\n")
                os._exit(128 + signal.SIGINT)
            self._interrupted = True
            os.write(2, b"interrupted: checkpointing at the next step boundary (Ctrl-C again to exit now)\n")
        self.flag = True

    def agreed(self, device, save_due: bool = False) -> tuple[bool, bool]:
        """(stop, save): whether any rank was signalled, and whether any rank's checkpoint clock ran out."""
        t = torch.tensor([1.0 if self.flag else 0.0, 1.0 if save_due else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t[0].item()), bool(t[1].item())

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Saver:
    """This run's checkpoint saves: every ``checkpoint.every`` steps, at the end, every
    ``checkpoint.every_minutes`` and on preemption, each with its ``meta.json`` record.

    ``last_step``: the step of this run's latest checkpoint (-1 for none), which a preemption before the
    next step need not save again.
    """

    def __init__(self, cfg, layout: Layout, root: Path, zero_stage: int, fingerprint: dict, changes: list,
                 last_step: int):
        self.cfg, self.layout, self.root = cfg, layout, root
        self.zero_stage, self.fingerprint, self.changes = zero_stage, fingerprint, changes
        self.last_step, self.last_time = last_step, time.time()
        self.every_s = cfg.checkpoint.every_minutes * 60

    def meta(self, progress: Progress) -> dict:
        layout = self.layout
        return {"step": progress.step, "consumed": progress.consumed, "world_size": layout.world_size,
                "sequence_parallel": layout.sequence_parallel, "data_parallel": layout.data_parallel,
                "zero_stage": self.zero_stage, "model": asdict(self.cfg.model),
                "context_length": layout.context_length, "tokens": progress.tokens, "fingerprint": self.fingerprint,
                "changes": self.changes, "time": time.time()}

    def save(self, engine, progress: Progress) -> None:
        """Collective: a complete checkpoint at ``progress`` (see :func:`ckpt.save`)."""
        ckpt.save(engine, self.root, progress.step, self.meta(progress), self.cfg.checkpoint.keep,
                  self.layout.rank, self.layout.world_size)
        self.last_step, self.last_time = progress.step, time.time()

    def due(self, step: int) -> bool:
        """Whether the step just trained is saved by the step cadence (or is the last)."""
        every = self.cfg.checkpoint.every
        return step == self.cfg.train.steps or bool(every and step % every == 0)

    def at_boundary(self, engine, progress: Progress, preempt: Preemption, device) -> bool:
        """Collective, before each step: save if any rank was signalled or any rank's clock ran out (not
        twice, nor at step 0 by the clock); whether the run stops here (it was signalled)."""
        clock = self.every_s > 0 and time.time() - self.last_time >= self.every_s
        stop, save_due = preempt.agreed(device, clock)
        if (stop or (save_due and progress.step > 0)) and self.last_step != progress.step:
            self.save(engine, progress)
        return stop
