"""Checkpoints under failure: SIGKILL while saving, corrupt files, another model shape."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from training_helpers import losses, run_ranks, tiny_config, write_config

from sparse_parallel.training import checkpoint as ckpt

# SIGKILL after half of the first shard of the step-6 checkpoint is on disk: a process killed
# by the OOM killer or a scheduler in the middle of torch.save.
KILL_SCRIPT = """
import io, os, signal, sys, torch
from sparse_parallel.training import __main__ as entry
orig = torch.save
def save(obj, f, *a, **k):
    if ".tmp-step00000006" in str(f):
        buf = io.BytesIO()
        orig(obj, buf, *a, **k)
        with open(f, "wb") as out:
            out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            out.flush()
            os.fsync(out.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(obj, f, *a, **k)
torch.save = save
entry.end_process(entry.main(sys.argv[1:]))
"""


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path, straight_run, tokenizer_path, token_cache):
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(tokenizer_path, tmp_path / "run", token_cache))
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    codes, out = run_ranks(cfg, script=script)
    assert codes == [-9], out[-3000:]
    root = tmp_path / "run/checkpoints"
    assert (root / "latest").read_text().strip() == "step00000004"
    assert (root / ".tmp-step00000006").is_dir() and not (root / "step00000006").exists()
    found = ckpt.find_checkpoint(root, "auto")
    assert found.meta["step"] == 4
    codes, out = run_ranks(cfg, log_dir=tmp_path / "resumed")
    assert codes == [0], out[-3000:]
    assert losses(tmp_path / "run") == losses(straight_run)
    assert not (root / ".tmp-step00000006").exists()


def test_checkpoint_of_another_shape_is_refused(tmp_path, straight_run, tokenizer_path, token_cache, monkeypatch):
    from sparse_parallel.training import run

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "0"), ("DS_ACCELERATOR", "cpu"),
                       ("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(key, value)
    before = snapshot(straight_run)
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(tokenizer_path, straight_run, token_cache))
    with pytest.raises(ValueError, match=r"another model: model.dim: checkpoint 32 vs config 48"):
        run(cfg, ["model.dim=48"], resume="auto")
    with pytest.raises(ValueError, match=r"model.n_layers: checkpoint 2 vs config 3"):
        run(cfg, ["model.n_layers=3"], resume=str(straight_run / "checkpoints" / "step00000004"))
    assert snapshot(straight_run) == before  # nothing written, nothing lost


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, straight_run, tokenizer_path, token_cache):
    run_dir = tmp_path / "run"
    shutil.copytree(straight_run, run_dir)
    shard = run_dir / "checkpoints/step00000008/mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:1000])
    before = snapshot(run_dir)
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(tokenizer_path, run_dir, token_cache))
    # Named explicitly, a corrupt checkpoint is an error (with "auto" the run falls back; test_run_dir.py).
    codes, out = run_ranks(cfg, ["train.steps=10"], resume=str(run_dir / "checkpoints/step00000008"))
    assert codes == [2], out[-3000:]
    assert "step00000008 is corrupt: mp_rank_00_model_states.pt has 1000 bytes" in out, out[-3000:]
    assert snapshot(run_dir) == before
    # an incomplete checkpoint named explicitly is refused too
    incomplete = run_dir / "checkpoints/step00000006"
    (incomplete / "meta.json").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        ckpt.find_checkpoint(run_dir / "checkpoints", str(incomplete))


def test_resume_across_runtime_only_model_fields(tmp_path, straight_run, tokenizer_path, token_cache):
    """Fields marked runtime-only (here activation checkpointing with host offload, and the loss
    chunk) change how a step runs, not the model: a checkpoint resumes across them, with the
    losses of the straight run."""
    from sparse_parallel.training.config import ModelConfig

    assert {"offload_activations", "activation_checkpointing", "loss_chunk"} <= ModelConfig.runtime_fields()
    assert "dim" not in ModelConfig.runtime_fields()
    run_dir = tmp_path / "run"
    shutil.copytree(straight_run, run_dir)
    root = run_dir / "checkpoints"
    for p in root.iterdir():  # keep the step-4 checkpoint: the run resumes half-way
        if p.name.startswith("step") and p.name != "step00000004":
            shutil.rmtree(p)
    (root / "latest").write_text("step00000004\n")
    (run_dir / "summary.json").unlink()
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(tokenizer_path, run_dir, token_cache))
    codes, out = run_ranks(cfg, ["model.activation_checkpointing=true", "model.offload_activations=true",
                                 "model.loss_chunk=7"], resume=str(root / "step00000004"))
    assert codes == [0], out[-3000:]
    got, want = losses(run_dir), losses(straight_run)
    assert got.keys() == want.keys()
    # Another loss chunk sums the cross-entropy in another order: equal up to float32 rounding.
    assert all(abs(got[s] - want[s]) <= 1e-5 * abs(want[s]) for s in want), (got, want)
