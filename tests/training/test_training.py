"""End-to-end training: exact resume after preemption, loss parity across SP/DP layouts, outputs."""
from __future__ import annotations

import json
from pathlib import Path

from training_helpers import assert_same_losses, losses, run_ranks, run_together, tiny_config, write_config

from sparse_parallel.training import REQUEUE_EXIT_CODE

# The preemption signal arrives from inside step 3's data read, i.e. in the middle of a step,
# like a scheduler's SIGUSR1 would; the trainer must finish the step and checkpoint after it.
PREEMPT_SCRIPT = """
import os, signal, sys
from sparse_parallel.training import data, __main__ as entry
orig = data.TokenStream.train_batch
def train_batch(self, consumed, *a, **k):
    if consumed == 2 * {gb}:
        os.kill(os.getpid(), signal.SIGUSR1)
    return orig(self, consumed, *a, **k)
data.TokenStream.train_batch = train_batch
entry.end_process(entry.main(sys.argv[1:]))
"""


def test_outputs_of_a_run(straight_run):
    run = straight_run
    for name in ("metrics.jsonl", "config.yaml", "summary.json", "loss_curve.png", "eval_by_position.json",
                 "eval_by_position.csv", "eval_by_position.png"):
        assert (run / name).is_file(), name
    assert sorted(losses(run)) == list(range(1, 9))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["derived"]["context_length"] == 64
    table = json.loads((run / "eval_by_position.json").read_text())["buckets"]
    assert [r["start"] for r in table] == [0, 16, 32, 48]
    # 2 held-out sequences x 16 positions per bucket
    assert all(r["tokens"] == 32 for r in table)
    ck = run / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step00000008"
    # keep=4 of the saves at 2, 4, 6, 8
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("step")) == \
        ["step00000002", "step00000004", "step00000006", "step00000008"]
    l = losses(run)
    assert l[8] < l[1] - 0.05, f"training did not lower the loss: {l}"


def test_preemption_checkpoint_and_exact_resume(tmp_path, straight_run, tokenizer_path, token_cache):
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(tokenizer_path, tmp_path / "run", token_cache))
    script = tmp_path / "preempt.py"
    script.write_text(PREEMPT_SCRIPT.format(gb=2))
    codes, out = run_ranks(cfg, script=script)
    assert codes == [REQUEUE_EXIT_CODE], out[-3000:]
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step00000003"
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3]
    codes, out = run_ranks(cfg, log_dir=tmp_path / "resumed")
    assert codes == [0], out[-3000:]
    # Bitwise: the same float32 operations in the same order, state restored exactly.
    assert losses(tmp_path / "run") == losses(straight_run)


def _param_digests(run: Path) -> list:
    return json.loads((run / "summary.json").read_text())["param_digests"]


def test_sequence_and_data_parallel_loss_parity(tmp_path, straight_run, tokenizer_path, token_cache):
    """SP=2, SP=2 x DP=2 (and gradient accumulation) reproduce the SP=1 losses; parameters stay
    equal on every rank.

    The context (64 tokens) and the global batch (2 sequences) are the same in all the
    layouts.  float32 sums in another order differ by a few ulps (~1e-7 relative per step);
    1e-5 relative over 4 steps leaves room for that and nothing else.
    """
    ref = losses(straight_run)
    # The 1- and 2-rank layouts run side by side (3 ranks), the 4-rank one alone.
    for group in ((("accum", 1, ["train.micro_batch=1", "train.grad_accum=2"]),
                   ("sp2", 2, ["parallel.sequence_parallel=2", "train.tokens_per_gpu=32"])),
                  (("sp2dp2", 4, ["parallel.sequence_parallel=2", "train.tokens_per_gpu=32",
                                  "train.micro_batch=1"]),)):
        runs = [dict(config=write_config(tmp_path / f"{name}.yaml",
                                         tiny_config(tokenizer_path, tmp_path / name, token_cache)),
                     overrides=overrides + ["train.steps=4", "checkpoint.every=0"], nprocs=nprocs)
                for name, nprocs, overrides in group]
        for (name, nprocs, _), (codes, out) in zip(group, run_together(*runs)):
            assert codes == [0] * nprocs, (name, out[-3000:])
            assert_same_losses(tmp_path / name, ref, range(1, 5), name)
            digests = _param_digests(tmp_path / name)
            assert len(digests) == nprocs and len(set(digests)) == 1, (name, digests)
    # The SP=2 x DP=2 checkpoint resumed by one process (SP and DP both change; ZeRO-1 state
    # goes through the universal form) continues the straight run.
    cfg = write_config(tmp_path / "sp1.yaml", tiny_config(tokenizer_path, tmp_path / "sp1", token_cache))
    codes, out = run_ranks(cfg, resume=str(tmp_path / "sp2dp2/checkpoints/step00000004"))
    assert codes == [0], out[-3000:]
    assert_same_losses(tmp_path / "sp1", ref, range(5, 9), "resumed at SP=1")


def test_resume_at_another_world_size(tmp_path, straight_run, tokenizer_path, token_cache):
    """A 1-rank ZeRO-1 checkpoint resumed by 2 data-parallel ranks continues the same run.

    The global batch is unchanged (1 rank x 2 sequences -> 2 ranks x 1), so steps 5..8 match
    the straight run up to float32 summation order (see the parity test for the tolerance).
    """
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(tokenizer_path, tmp_path / "run", token_cache))
    codes, out = run_ranks(cfg, ["train.micro_batch=1"], nprocs=2,
                           resume=str(straight_run / "checkpoints" / "step00000004"))
    assert codes == [0, 0], out[-3000:]
    assert_same_losses(tmp_path / "run", losses(straight_run), range(5, 9))
    meta = json.loads((tmp_path / "run/checkpoints/step00000008/meta.json").read_text())
    assert meta["world_size"] == 2 and meta["consumed"] == 16


SIGINT_SCRIPT = PREEMPT_SCRIPT.replace("signal.SIGUSR1", "signal.SIGINT")


def test_ctrl_c_checkpoints_and_time_cadence_saves(tmp_path, straight_run, tokenizer_path, token_cache):
    """Ctrl-C in step 3 checkpoints after it (exit 85); with no step cadence, a tiny time cadence
    saves after every step; the resumed run continues the straight run bitwise."""
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(tokenizer_path, tmp_path / "run", token_cache))
    script = tmp_path / "interrupt.py"
    script.write_text(SIGINT_SCRIPT.format(gb=2))
    codes, out = run_ranks(cfg, ["checkpoint.every=0", "checkpoint.every_minutes=0.0001"], script=script)
    assert codes == [REQUEUE_EXIT_CODE], out[-3000:]
    assert "interrupted: checkpointing at the next step boundary" in out and "Traceback" not in out
    root = tmp_path / "run/checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step")) == \
        ["step00000001", "step00000002", "step00000003"]
    codes, out = run_ranks(cfg, log_dir=tmp_path / "resumed")
    assert codes == [0], out[-3000:]
    assert losses(tmp_path / "run") == losses(straight_run)


HANG_SCRIPT = """
import os, signal, sys
from sparse_parallel.training import data, __main__ as entry
orig = data.TokenStream.train_batch
def train_batch(self, consumed, *a, **k):
    if consumed == 2 * {gb} and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGSTOP)
    return orig(self, consumed, *a, **k)
data.TokenStream.train_batch = train_batch
entry.end_process(entry.main(sys.argv[1:]))
"""


def test_a_stopped_rank_ends_the_run_in_bounded_time(tmp_path, tokenizer_path, token_cache):
    import time

    from sparse_parallel.training import local

    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(tokenizer_path, tmp_path / "run", token_cache))
    script = tmp_path / "hang.py"
    script.write_text(HANG_SCRIPT.format(gb=2))
    ranks = local.start(str(cfg), ["train.micro_batch=1", "train.collective_timeout_s=5"], 2,
                        log_dir=tmp_path / "logs", script=str(script))
    try:
        t0 = time.time()
        code = ranks.procs[0].wait(timeout=120)
        waited = time.time() - t0
    finally:
        for p in ranks.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out = ranks.output(0)
    assert code == 2, out[-3000:]
    assert "error: a collective did not complete within train.collective_timeout_s=5 s" in out, out[-3000:]
    assert waited < 100


def test_a_second_ctrl_c_exits_at_once():
    import subprocess
    import sys

    code = ("import os, signal, time\n"
            "from sparse_parallel.training.preemption import Preemption\n"
            "p = Preemption()\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "print('flag', p.flag, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "time.sleep(30)\n"
            "print('still running', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert proc.stdout.split() == ["flag", "True"]
    assert "Ctrl-C again to exit now" in proc.stderr and "exiting now, without a checkpoint" in proc.stderr
