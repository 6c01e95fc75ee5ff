"""What a run writes into its run directory besides checkpoints, and what it says on the console.

Rank 0 writes everything: ``config.yaml``, ``metrics.jsonl`` (cut back to the resume point, so it holds
one row per step), TensorBoard events (purged after the resume point), the progress bar, the
evaluation files, the loss plot and ``summary.json``.  On the other ranks :class:`RunOutputs` does
nothing.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from pathlib import Path

from . import evaluate
from .layout import Layout


class MetricsCorrupt(UserWarning):
    """metrics.jsonl ended in a torn line (a kill while it was written); the line is dropped."""


@contextlib.contextmanager
def warnings_printed():
    """Warnings raised inside are printed as one line each, naming their kind (no source line, no
    traceback); not when the block raises."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        print(f"warning: {w.category.__name__}: {w.message}", file=sys.stderr, flush=True)


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep the metric rows up to ``step``: a resumed run rewrites what came after its checkpoint.

    A torn last line (the process was killed while appending it) is dropped with a
    :class:`MetricsCorrupt` warning; a bad line before the end is an error naming the file and line.
    """
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            if i == len(lines) - 1:
                warnings.warn(MetricsCorrupt(f"{path}: the last line is torn ({line[:60]!r}); dropped"),
                              stacklevel=2)
                break
            raise ValueError(f"{path}: line {i + 1} is not a metrics row ({line[:60]!r}); fix or remove it") \
                from None
        if row_step <= step:
            rows.append(line)
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    os.replace(tmp, path)


class RunOutputs:
    """The run directory's outputs from ``start_step`` on; a context manager that closes the bar and the
    TensorBoard writer.

    ``flops_per_token`` and ``peak_flops`` (per device; 0 when unknown) give the MFU estimate.
    """

    def __init__(self, cfg, layout: Layout, start_step: int, flops_per_token: float, peak_flops: float):
        self.cfg, self.layout = cfg, layout
        self.run_dir = Path(cfg.run.dir)
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.active = layout.rank == 0
        self.writer = self.bar = None
        if not self.active:
            return
        for warning in cfg.schedule_warnings():
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        import yaml

        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        with warnings_printed():
            truncate_metrics(self.run_dir, start_step)
        if cfg.run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Events after the checkpoint's step are redone by this run; the checkpoint's own step stays.
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1)
        if cfg.train.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train.steps, initial=start_step, desc="train", dynamic_ncols=True)

    def __enter__(self) -> "RunOutputs":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()

    def log_step(self, step: int, tokens: int, loss: float, lr: float | None, step_time_s: float,
                 flops_per_token: float | None = None) -> None:
        """One optimizer step: a metrics.jsonl row (every ``train.log_every`` steps and the last), scalars,
        the bar.  ``tokens``: trained on so far, by every process of the run; ``flops_per_token``: this
        step's, where it differs from the run's (sequences within documents)."""
        if not self.active:
            return
        tps = self.layout.tokens_per_step / step_time_s
        flops = self.flops_per_token if flops_per_token is None else flops_per_token
        mfu = flops * tps / (self.layout.world_size * self.peak_flops) if self.peak_flops else None
        row = {"step": step, "loss": loss, "lr": lr, "tokens": tokens, "tokens_per_s": tps, "mfu": mfu,
               "step_time_s": step_time_s}
        if step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps:
            with (self.run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/tokens_per_s", tps, step)
            if lr is not None:
                self.writer.add_scalar("train/lr", lr, step)
            if mfu is not None:
                self.writer.add_scalar("train/mfu", mfu, step)
        if self.bar is not None:
            post = {"loss": f"{loss:.4f}", "tok/s": f"{tps:,.0f}"}
            if mfu is not None:
                post["mfu"] = f"{100 * mfu:.1f}%"
            self.bar.set_postfix(post)
            self.bar.update(1)

    def log_eval(self, tables: dict[str, list[dict]], step: int) -> None:
        """The held-out loss by position, and within the document (:func:`evaluate.loss_by_position`'s
        tables by name), at ``step``."""
        if not self.active:
            return
        for name, table in tables.items():
            axis, tag = evaluate.AXES[name]
            evaluate.write_eval(self.run_dir, table, step, name=name, xlabel=axis,
                                title=f"loss by {axis.removeprefix('token ')}, step {step}")
            if self.writer is not None:
                for r in table:
                    self.writer.add_scalar(f"eval/loss_{tag}_{r['start']}", r["loss"], step)

    def finish(self, step: int, summary: dict) -> None:
        """The loss plot and summary.json: ``step``, the final loss from metrics.jsonl, then ``summary``."""
        if not self.active:
            return
        evaluate.plot_loss(self.run_dir)
        rows = evaluate.read_metrics(self.run_dir)
        out = {"steps": step, "final_loss": rows[-1]["loss"] if rows else None, **summary}
        (self.run_dir / "summary.json").write_text(json.dumps(out, indent=1))
