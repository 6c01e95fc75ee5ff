"""``make demo``: draw a few patterns, then train a tiny model sequence-parallel, preempt it, resume it.

Training part: a sentencepiece tokenizer is trained on this Python's standard
library source (no download); two processes (gloo on CPU, or two GPUs when
there are) share every sequence (sequence-parallel size 2); halfway through,
the demo sends SIGUSR1 like a scheduler about to preempt the job; the ranks
checkpoint and exit with code 85; a second start resumes from that checkpoint
and finishes.  Each file of the corpus is a document, and the config masks
attention to documents (``data.document_mask``), so no layer attends from one
file into the one packed before it.  It prints the loss table and the held-out
loss by position in the context and within the document, and leaves the plots
in out/demo/run/.
"""
from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from pathlib import Path

from . import Dilated, Global, Pattern, RandomBlocks, Strided, Window

PATTERNS = {
    "window": Pattern(Window(32)),
    "window_strided_global": Window(16) | Strided(16) | Global(first=8, queries=False),
    "dilated": Pattern(Dilated(window=16, levels=3)),
    "bigbird": Window(8) | Global(first=16) | RandomBlocks(block=16, per_query_block=2, seed=0),
}

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
STEPS = 240


def patterns(out: Path) -> None:
    print(f"{'pattern':<24}{'keys/query (min/mean/max) at 1M':>36}{'density':>12}{'TFLOP fwd (H16,D128)':>24}")
    for name, pattern in PATTERNS.items():
        pattern.draw(256, str(out / f"{name}.png"))
        d = pattern.describe(1 << 20, heads=16, dim=128)
        kpq = d["keys_per_query"]
        print(f"{name:<24}{kpq['min']:>12}/{kpq['mean']:>10.1f}/{kpq['max']:>10}{d['density']:>12.2e}"
              f"{d['useful_flops_fwd'] / 1e12:>24.1f}")
        (out / f"{name}.json").write_text(json.dumps({"pattern": pattern.to_dict(), "describe": d}, indent=2))
    print(f"pictures and descriptions in {out}/\n")


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train(out: Path) -> int:
    import torch

    from .training import REQUEUE_EXIT_CODE, local
    from .training.data import iter_documents, stdlib_files
    from .training.tokenizer import train_tokenizer

    tok = out / "tokenizer" / "stdlib512.model"
    if not tok.is_file():
        t0 = time.time()
        train_tokenizer(iter_documents(stdlib_files(2_000_000), "stdlib", "text", None), tok, 512)
        print(f"tokenizer: {tok} (512 pieces, trained on the standard library in {time.time() - t0:.1f}s)")
    run = out / "run"
    shutil.rmtree(run, ignore_errors=True)  # the demo's own previous output
    gpus = torch.cuda.device_count()
    nprocs = 2 if gpus >= 2 or gpus == 0 else 1
    overrides = [f"run.dir={run}", f"data.tokenizer={tok}", f"data.cache_dir={out / 'cache'}",
                 f"parallel.sequence_parallel={nprocs}", f"train.tokens_per_gpu={512 // nprocs}",
                 f"train.steps={STEPS}", "train.micro_batch=4", "checkpoint.every=50", "train.eval_every=80",
                 "eval.buckets=8", "data.eval_sequences=32",
                 f"deepspeed.scheduler.params.total_num_steps={STEPS}",
                 f"deepspeed.scheduler.params.warmup_num_steps={STEPS // 20}"]
    where = f"{nprocs} GPU(s)" if gpus else f"{nprocs} CPU processes (gloo)"
    print(f"training: {where}, sequence-parallel size {nprocs}, context 512 tokens, 4 sequences per step, "
          f"{STEPS} steps")
    ranks = local.start(str(CONFIG), overrides, nprocs, "auto", out / "logs", console=True)
    while all(p.poll() is None for p in ranks.procs) and len(_rows(run)) < STEPS // 2:
        time.sleep(0.2)
    print(f"\n-- sending SIGUSR1 at step {len(_rows(run))} (a scheduler's preemption notice) --", flush=True)
    ranks.signal(signal.SIGUSR1)
    codes = ranks.wait(300)
    if codes != [REQUEUE_EXIT_CODE] * nprocs:
        print(f"expected every rank to exit with {REQUEUE_EXIT_CODE}, got {codes}; logs in {out / 'logs'}")
        return 1
    latest = (run / "checkpoints" / "latest").read_text().strip()
    print(f"-- ranks exited with {REQUEUE_EXIT_CODE}; checkpoint {latest}; resuming --", flush=True)
    codes = local.start(str(CONFIG), overrides, nprocs, "auto", out / "logs", console=True).wait(900)
    if codes != [0] * nprocs:
        print(f"resumed run failed with {codes}; logs in {out / 'logs'}")
        return 1
    report(run)
    return 0


def report(run: Path) -> None:
    rows = _rows(run)
    print(f"\n{'step':>6}{'loss':>10}{'tokens/s':>12}")
    for r in rows:
        if r["step"] == 1 or r["step"] % 25 == 0 or r is rows[-1]:
            print(f"{r['step']:>6}{r['loss']:>10.4f}{r['tokens_per_s']:>12,.0f}")
    for name, what in (("eval_by_position", "position"),
                       ("eval_by_document_position", "position within the document")):
        if not (run / f"{name}.json").is_file():
            continue
        table = json.loads((run / f"{name}.json").read_text())
        print(f"\nheld-out loss by {what} (step {table['step']}):")
        for b in table["buckets"]:
            print(f"  tokens {b['start']:>4}-{b['end'] - 1:<4} {b['loss']:.4f}   ({b['tokens']} tokens)")
    summary = json.loads((run / "summary.json").read_text())
    print(f"\nparameters equal on all ranks: {len(set(summary['param_digests'])) == 1}")
    plots = [run / name for name in ("loss_curve.png", "eval_by_position.png", "eval_by_document_position.png")]
    print(f"plots: {', '.join(str(p) for p in plots if p.is_file())}; TensorBoard: {run / 'tensorboard'}")


def main(out_dir: str = "out/demo") -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    patterns(out)
    return train(out)


if __name__ == "__main__":
    sys.exit(main())
