"""Shared pieces of the training tests: a tiny config and run helpers (the session fixtures built
from them, one tokenizer, one token cache and one straight run, are in tests/conftest.py)."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from sparse_parallel.training import local

VOCAB = 512
#: stdlib bytes for the test corpus: ~100k tokens, thousands of 64-token sequences.
CORPUS_BYTES = 300_000


def tiny_config(tokenizer: Path, run_dir: Path, cache: Path) -> dict:
    return {
        "model": {"vocab_size": VOCAB, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "loss_chunk": 24,
                  "attention_backend": "reference",
                  "pattern": {"components": [{"type": "window", "left": 8}]},
                  "layer_patterns": {1: {"components": [{"type": "window", "left": 8},
                                                        {"type": "strided", "stride": 8},
                                                        {"type": "global", "first": 3, "queries": False}]}}},
        "data": {"path": "stdlib", "tokenizer": str(tokenizer), "cache_dir": str(cache), "max_bytes": CORPUS_BYTES,
                 "eval_sequences": 2},
        "parallel": {"sequence_parallel": 1},
        "train": {"tokens_per_gpu": 64, "micro_batch": 2, "steps": 8, "progress": False},
        "checkpoint": {"every": 2, "keep": 4},
        "eval": {"buckets": 4},
        "run": {"dir": str(run_dir), "tensorboard": False},
        "deepspeed": {"zero_optimization": {"stage": 1}, "gradient_clipping": 1.0,
                      "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}},
                      "scheduler": {"type": "WarmupCosineLR",
                                    "params": {"total_num_steps": 8, "warmup_num_steps": 2}}},
    }


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"duplicate steps in metrics.jsonl: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def assert_same_losses(run_dir: Path, ref: dict[int, float], steps, label="") -> None:
    """The run logged exactly ``steps``, each within 1e-5 relative of ``ref``'s loss at that step: float32
    sums in another order (other layouts, resumes) differ by a few ulps per step, nothing more."""
    got = losses(run_dir)
    assert sorted(got) == list(steps), (label, sorted(got))
    for step, loss in got.items():
        assert abs(loss - ref[step]) <= 1e-5 * abs(ref[step]), (label, step, loss, ref[step])


def run_ranks(config: Path, overrides=(), nprocs=1, resume="auto", log_dir=None, timeout=240, script=None,
              overwrite=False, allow_change=()):
    """Run ranks; returns exit codes and rank 0's output."""
    return run_together(dict(config=config, overrides=overrides, nprocs=nprocs, resume=resume, log_dir=log_dir,
                             script=script, overwrite=overwrite, allow_change=allow_change), timeout=timeout)[0]


def run_together(*runs: dict, timeout=240) -> list[tuple[list[int], str]]:
    """Start independent runs at once (each a dict of :func:`run_ranks`' arguments, own run.dir) and wait
    for all of them; returns each run's exit codes and rank 0's output.

    A rank spends most of a tiny run importing and setting up, one core at a time: runs side by side
    use the machine's cores where one after the other would leave them idle.
    """
    started = []
    for r in runs:
        config = Path(r["config"])
        log_dir = r.get("log_dir") or config.parent / f"logs-{config.stem}"
        args = ((["--overwrite"] if r.get("overwrite") else [])
                + [a for part in r.get("allow_change", ()) for a in ("--allow-change", part)])
        started.append(local.start(str(config), list(r.get("overrides", ())), r.get("nprocs", 1),
                                   r.get("resume", "auto"), log_dir, script=r.get("script"), args=args))
    return [(ranks.wait(timeout), ranks.output(0)) for ranks in started]
