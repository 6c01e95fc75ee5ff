"""The run directory: nothing a user had is lost, a second run is refused, every bad input is named."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from training_helpers import losses, run_ranks, tiny_config, write_config

from sparse_parallel.launcher import cli
from sparse_parallel.training import checkpoint as ckpt
from sparse_parallel.training import rundir


@pytest.fixture
def local_env(monkeypatch):
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "0"), ("DS_ACCELERATOR", "cpu"),
                       ("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def listed_checkpoints_load(root: Path) -> list[str]:
    """Every checkpoint folder under ``root`` verifies against its checksums; ``latest`` names one."""
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for name in names:
        found = ckpt.find_checkpoint(root, str(root / name))
        assert found.meta["files"], name
    assert (root / (root / "latest").read_text().strip()).is_dir()
    return names


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- starting fresh, rotation -------------------------------------------------------------------
def test_resume_none_in_a_used_run_dir_refuses_then_overwrite_moves_it_aside(tmp_path, straight_run, tokenizer_path,
                                                                           token_cache, local_env):
    from sparse_parallel.training import run

    run_dir = copy_run(straight_run, tmp_path / "run")
    before = snapshot(run_dir)
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(tokenizer_path, run_dir, token_cache))
    with pytest.raises(rundir.RunDirNotEmpty, match=r"holds an earlier run .*--overwrite"):
        run(cfg, ["train.steps=2"], resume="none")
    assert snapshot(run_dir) == before
    codes, out = run_ranks(cfg, ["train.steps=2"], resume="none", log_dir=tmp_path / "logs", overwrite=True)
    assert codes == [0], out[-3000:]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and snapshot(aside[0]) == before  # the earlier run, whole
    assert sorted(losses(run_dir)) == [1, 2]
    assert listed_checkpoints_load(run_dir / "checkpoints") == ["step00000002"]


def test_rotation_keeps_the_checkpoint_just_written(tmp_path, straight_run, tokenizer_path, token_cache):
    """Resumed from step 2 of a run that reached step 8, with keep=1: the new step-4 save outranks
    nothing by step, but it is the one just written and ``latest`` names it."""
    run_dir = copy_run(straight_run, tmp_path / "run")
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(tokenizer_path, run_dir, token_cache))
    codes, out = run_ranks(cfg, ["train.steps=4", "checkpoint.keep=1"],
                           resume=str(run_dir / "checkpoints/step00000002"))
    assert codes == [0], out[-3000:]
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == "step00000004"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step")) == ["step00000004", "step00000008"]
    listed_checkpoints_load(root)
    assert losses(run_dir) == {s: v for s, v in losses(straight_run).items() if s <= 4}


def test_rotate_orders_by_step_number(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (9, 10, 100, 2):
        (root / f"step{step}").mkdir(parents=True)
        (root / f"step{step}" / "meta.json").write_text("{}")
    (root / ".trash-step00000001").mkdir()  # what a kill during a rotation leaves
    ckpt.rotate(root, 2, root / "step9")
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["step10", "step100", "step9"]
    ckpt.remove_leftovers(root)
    assert not (root / ".trash-step00000001").exists()


def test_no_prefix_matching_of_options(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "t.model", tmp_path / "run", tmp_path / "c"))
    with pytest.raises(SystemExit):
        cli.main(["train", str(cfg), "--resum", "none", "--dry-run"])
    assert "--resum" in capsys.readouterr().err
    from sparse_parallel.training.__main__ import main

    with pytest.raises(SystemExit):
        main([str(cfg), "--overwr"])


# -- ownership ----------------------------------------------------------------------------------
def test_second_run_on_a_run_dir_refuses(tmp_path, tokenizer_path, token_cache, local_env):
    from sparse_parallel.training import run

    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(tokenizer_path, run_dir, token_cache))
    held = rundir.RunLock.acquire(run_dir)  # this live process owns it
    with pytest.raises(rundir.RunDirLocked, match=rf"in use by another run \(pid {os.getpid()} on "):
        run(cfg, ["train.steps=1"])
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.lock"]
    held.release()
    assert not (run_dir / "run.lock").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    import socket

    (run_dir / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                  "job": None, "started": 0}))
    with pytest.warns(UserWarning, match="stale lock"):
        held = rundir.RunLock.acquire(run_dir)
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == os.getpid()
    with pytest.raises(rundir.RunDirLocked):
        rundir.RunLock.acquire(run_dir)
    held.release()


# -- checksums, fallback, failed saves ----------------------------------------------------------
def test_corrupt_latest_falls_back_to_the_newest_that_verifies(tmp_path, straight_run, tokenizer_path, token_cache):
    """step 8 deleted (``latest`` names nothing), step 6 with one flipped byte (same size), step 4
    truncated: resume takes step 2, says why for each, and continues the straight run bitwise."""
    run_dir = copy_run(straight_run, tmp_path / "run")
    root = run_dir / "checkpoints"
    shutil.rmtree(root / "step00000008")
    shard = root / "step00000006/mp_rank_00_model_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    opt = next((root / "step00000004").glob("*optim_states.pt"))
    opt.write_bytes(opt.read_bytes()[:100])
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(tokenizer_path, run_dir, token_cache))
    codes, out = run_ranks(cfg)
    assert codes == [0], out[-3000:]
    assert "CheckpointUnusable: checkpoint" in out and "step00000008 is unusable (it does not exist)" in out
    assert "mp_rank_00_model_states.pt fails its SHA-256 checksum" in out
    assert f"{opt.name} has 100 bytes" in out and "resuming from " in out and "step00000002 instead" in out
    assert losses(run_dir) == losses(straight_run)
    listed_checkpoints_load(root)
    # A corrupt checkpoint named explicitly is an error, not a fallback.
    shard = root / "step00000008/mp_rank_00_model_states.pt"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(ValueError, match="step00000008 is corrupt: mp_rank_00_model_states.pt fails"):
        ckpt.find_checkpoint(root, str(root / "step00000008"))


DISK_FULL_SCRIPT = """
import errno, os, sys, torch
from sparse_parallel.training import __main__ as entry
orig = torch.save
def save(obj, f, *a, **k):
    if ".tmp-step00000006" in str(f) and "rng" in str(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
    return orig(obj, f, *a, **k)
torch.save = save
entry.end_process(entry.main(sys.argv[1:]))
"""


def test_a_full_disk_during_a_save_is_named_and_leaves_the_previous_checkpoint(tmp_path, straight_run,
                                                                              tokenizer_path, token_cache):
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(tokenizer_path, tmp_path / "run", token_cache))
    script = tmp_path / "full.py"
    script.write_text(DISK_FULL_SCRIPT)
    codes, out = run_ranks(cfg, script=script)
    assert codes == [2], out[-3000:]
    assert "error: saving checkpoint step00000006 under" in out and "No space left on device" in out
    assert "step00000004 is still the latest checkpoint" in out and "Traceback" not in out
    root = tmp_path / "run/checkpoints"
    assert listed_checkpoints_load(root) == ["step00000002", "step00000004"]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    codes, out = run_ranks(cfg, log_dir=tmp_path / "resumed")
    assert codes == [0], out[-3000:]
    assert losses(tmp_path / "run") == losses(straight_run)


# -- fingerprint --------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, part, match", [
    (["train.tokens_per_gpu=32"], "context", r"context length: checkpoint 64 vs now 32"),
    (["train.micro_batch=4"], "batch", r"global batch \(sequences per step\): checkpoint 2 vs now 4"),
    (["data.max_bytes=200000"], "data", r"data.bytes: checkpoint \d+ vs now \d+"),
    (["data.document_mask=true"], "data", r"data.document_mask: checkpoint False vs now True"),
])
def test_a_changed_run_is_refused_naming_the_change(tmp_path, straight_run, tokenizer_path, token_cache, local_env,
                                                    overrides, part, match):
    from sparse_parallel.training import run

    run_dir = copy_run(straight_run, tmp_path / "run")
    before = snapshot(run_dir)
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(tokenizer_path, run_dir, token_cache))
    with pytest.raises(rundir.FingerprintChanged, match=match + rf".*--allow-change {part}"):
        run(cfg, overrides + ["train.steps=9"])
    assert snapshot(run_dir) == before


def test_a_retrained_tokenizer_is_refused(tmp_path, straight_run, tokenizer_path, token_cache, local_env):
    from sparse_parallel.training import run

    run_dir = copy_run(straight_run, tmp_path / "run")
    from sparse_parallel.training.data import iter_documents, stdlib_files
    from sparse_parallel.training.tokenizer import train_tokenizer

    tok = tmp_path / "tok.model"  # as large, trained on other text: what retraining in place gives
    train_tokenizer(iter_documents(stdlib_files(150_000), "stdlib", "text", None), tok, 512)
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(tok, run_dir, token_cache))
    with pytest.raises(rundir.FingerprintChanged, match=r"tokenizer SHA-256: .*--allow-change tokenizer$"):
        run(cfg, ["train.steps=9"])


def test_an_allowed_change_is_recorded_and_tokens_keep_counting(tmp_path, straight_run, tokenizer_path, token_cache):
    run_dir = copy_run(straight_run, tmp_path / "run")
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(tokenizer_path, run_dir, token_cache))
    codes, out = run_ranks(cfg, ["train.tokens_per_gpu=128", "train.steps=9"], allow_change=["context"])
    assert codes == [0], out[-3000:]
    assert "resuming with allowed changes: context length: checkpoint 64 vs now 128" in out
    meta = json.loads((run_dir / "checkpoints/step00000009/meta.json").read_text())
    assert meta["changes"][0]["step"] == 8 and "context" in meta["changes"][0]["changed"]
    assert meta["fingerprint"]["context"] == 128
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tokens = [r["tokens"] for r in rows]
    assert tokens == [2 * 64 * s for s in range(1, 9)] + [2 * 64 * 8 + 2 * 128], tokens


def test_tokenizer_train_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "t.model"
    out.write_bytes(b"a tokenizer a run depends on")
    rc = cli.main(["tokenizer", "train", "--input", "stdlib", "--vocab-size", "300", "--max-bytes", "20000",
                   "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and f"--out {out} exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"a tokenizer a run depends on"


# -- preflight and a finished run ---------------------------------------------------------------
@pytest.mark.parametrize("case, match", [
    ("run_dir_is_a_file", r"run.dir .* cannot be created: .* exists and is not a directory"),
    ("top_level_list", r"the top level must be a mapping of sections"),
    ("triton_on_cpu", r"model.attention_backend=triton needs a CUDA device"),
    ("deepspeed_typo", r"unknown DeepSpeed key deepspeed.zero_optimisation \(did you mean deepspeed.zero_optimization"),
])
def test_train_preflight_names_the_problem_and_creates_nothing(tmp_path, tokenizer_path, token_cache, local_env,
                                                               case, match):
    from sparse_parallel.training import run

    cfg_dict = tiny_config(tokenizer_path, tmp_path / "run", token_cache)
    overrides = []
    if case == "run_dir_is_a_file":
        (tmp_path / "run").write_text("a file")
    elif case == "top_level_list":
        cfg_dict = [cfg_dict]
    elif case == "triton_on_cpu":
        overrides = ["model.attention_backend=triton"]
    else:
        cfg_dict["deepspeed"]["zero_optimisation"] = cfg_dict["deepspeed"].pop("zero_optimization")
    cfg = write_config(tmp_path / "c.yaml", cfg_dict)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match=match):
        run(cfg, overrides)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_finished_run_resumed_trains_nothing_and_keeps_its_files(tmp_path, straight_run, tokenizer_path,
                                                                   token_cache, capsys, local_env):
    from sparse_parallel.training import run

    run_dir = copy_run(straight_run, tmp_path / "run")
    before = snapshot(run_dir)
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(tokenizer_path, run_dir, token_cache))
    assert run(cfg, ["train.log_every=2", "train.progress=true"]) == 0
    assert "at step 8, train.steps=8: nothing to train" in capsys.readouterr().out
    assert snapshot(run_dir) == before


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path):
    from sparse_parallel.training.outputs import MetricsCorrupt, truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.9}\n{"step": 3, "lo')
    with pytest.warns(MetricsCorrupt, match=rf"{path}: the last line is torn"):
        truncate_metrics(tmp_path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    path.write_text('{"step": 1, "loss": 5.0}\nxx\n{"step": 2, "loss": 4.9}\n')
    with pytest.raises(ValueError, match=rf"{path}: line 2 is not a metrics row"):
        truncate_metrics(tmp_path, 2)


def test_launch_refuses_a_fresh_start_in_a_used_run_dir_before_starting(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "t.model", run_dir, tmp_path / "c"))
    assert cli.main(["launch", str(cfg), "--nproc", "2", "--resume", "none", "--dry-run"]) == 2
    assert "holds an earlier run (checkpoints)" in capsys.readouterr().err
    assert cli.main(["launch", str(cfg), "--nproc", "2", "--resume", "none", "--overwrite", "--dry-run"]) == 0
    assert "--overwrite" in capsys.readouterr().out


def test_tensorboard_keeps_the_checkpointed_step_across_a_resume(tmp_path, tokenizer_path, token_cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg_dict = tiny_config(tokenizer_path, tmp_path / "run", token_cache)
    cfg_dict["run"]["tensorboard"] = True
    cfg = write_config(tmp_path / "tiny.yaml", cfg_dict)
    codes, out = run_ranks(cfg, ["train.steps=2", "data.eval_sequences=0"])
    assert codes == [0], out[-3000:]
    codes, out = run_ranks(cfg, ["train.steps=3", "data.eval_sequences=0"], log_dir=tmp_path / "resumed")
    assert codes == [0], out[-3000:]
    events = EventAccumulator(str(tmp_path / "run/tensorboard"))
    events.Reload()
    assert sorted(e.step for e in events.Scalars("train/loss")) == [1, 2, 3]


def test_lock_of_an_earlier_start_of_the_same_slurm_job_elsewhere_is_stale(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    owner = {"host": "node-that-was-requeued-away", "pid": os.getpid(), "job": "4242", "started": 0}
    (run_dir / "run.lock").write_text(json.dumps(owner))
    monkeypatch.setenv("SLURM_JOB_ID", "4343")
    with pytest.raises(rundir.RunDirLocked, match="Slurm job 4242"):
        rundir.RunLock.acquire(run_dir)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with pytest.warns(UserWarning, match="earlier start of this Slurm job 4242"):
        rundir.RunLock.acquire(run_dir).release()
