"""End to end on a real one-node Slurm cluster that slurm/cluster.sh installs and starts.

(1) `sparse-parallel submit` of the tiny CPU config with 2 tasks: the job completes, a checkpoint is there,
    the losses are logged.
(2) The same job signalled mid-run (USR1 to the batch shell, which is what `--signal=B:USR1@N` does before
    the time limit): the ranks checkpoint, the script requeues the job, the requeued job resumes and
    finishes with the losses of (1).
(3) A job one of whose ranks stops (SIGSTOP) mid-run: the other rank ends with the named collective timeout,
    the stopped one is ended with it, and the job fails in bounded time with its last checkpoint intact.
If the cluster cannot be started (no root, no apt, no network), every test here is skipped with the reason.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from test_launcher_e2e import CLI, STEPS, assert_finished, losses, run_env, workspace

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "slurm" / "cluster.sh"
JOB_TIMEOUT = 240.0


@pytest.fixture(scope="module")
def slurm_env():
    """An environment whose Slurm clients reach the cluster; stops the cluster afterwards if it started it."""
    was_running = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True).returncode == 0
    proc = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=600)
    if proc.returncode:
        pytest.skip(f"no Slurm cluster: slurm/cluster.sh start failed: {proc.stderr.strip()[-800:]}")
    conf = re.search(r"export SLURM_CONF=(\S+)", proc.stdout)
    assert conf, proc.stdout
    env = run_env()
    env["SLURM_CONF"] = conf.group(1)
    try:
        yield env
    finally:
        if not was_running:
            subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return workspace(tmp_path_factory.getbasetemp())


def submit(ws: Path, env: dict, run_dir: Path, *overrides: str) -> str:
    sets = [a for o in overrides for a in ("--set", o)]
    proc = subprocess.run([*CLI, "submit", "tiny.yaml", "--tasks-per-node", "2", "--set", f"run.dir={run_dir}",
                           *sets], cwd=ws, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return re.search(r"submitted job (\d+)", proc.stdout).group(1)


def job_fields(env: dict, job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True,
                         check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_until(predicate, what: str, timeout: float = JOB_TIMEOUT, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def job_log(run_dir: Path, job: str) -> str:
    logs = list((run_dir / "jobs").glob(f"*/slurm-{job}.out"))
    return logs[0].read_text() if logs else ""


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def wait_done(env: dict, job: str, run_dir: Path) -> dict[str, str]:
    def ended():
        fields = job_fields(env, job)
        return fields if fields["JobState"] in ENDED else None

    fields = wait_until(ended, f"job {job} to end", every=0.5)
    assert fields["JobState"] == "COMPLETED", (fields, job_log(run_dir, job)[-4000:])
    return fields


def test_srun_tasks_discover_their_ranks(ws, slurm_env):
    proc = subprocess.run(["srun", "--ntasks=2", *CLI, "train", "tiny.yaml", "--dry-run"], cwd=ws, env=slurm_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    ranks = sorted((r["rank"] for r in rows), key=lambda r: r["rank"])
    assert [(r["rank"], r["local_rank"], r["world_size"], r["source"]) for r in ranks] == \
        [(0, 0, 2, "slurm"), (1, 1, 2, "slurm")]
    # The master is the allocation's first host, from `scontrol show hostnames`, on one port for all.
    assert {(r["master_addr"], r["master_port"]) for r in ranks} == {(socket.gethostname().split(".")[0],
                                                                      ranks[0]["master_port"])}
    assert {r["derived"]["context_length"] for r in rows} == {128}


@pytest.fixture(scope="module")
def uninterrupted(ws, slurm_env):
    run_dir = ws / "runs" / "slurm-uninterrupted"
    job = submit(ws, slurm_env, run_dir)
    fields = wait_done(slurm_env, job, run_dir)
    return run_dir, job, fields


def test_submit_two_tasks_completes(uninterrupted):
    run_dir, job, fields = uninterrupted
    assert fields["ExitCode"] == "0:0" and fields["NumTasks"] == "2" and fields["Restarts"] == "0"
    got = assert_finished(run_dir)  # checkpoint present, every step's loss logged
    assert got[-1][1] < got[0][1] - 0.5
    log = job_log(run_dir, job)
    assert "world size 2 = sequence-parallel 1 x data-parallel 2; context length 128 tokens" in log


def test_signal_checkpoints_requeues_and_resumes_with_equal_losses(ws, slurm_env, uninterrupted):
    reference = losses(uninterrupted[0])
    run_dir = ws / "runs" / "slurm-requeued"
    job = submit(ws, slurm_env, run_dir)
    # Signal once training is under way: a few steps logged, most still to come.
    wait_until(lambda: len(losses(run_dir)) >= 3, "the first steps' losses")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm_env, check=True)
    # Nothing else is done by hand: the script requeues the job and Slurm starts it again once the old
    # run's credential has expired (cluster.sh sets 5 s), and the trainer resumes from the checkpoint.
    fields = wait_done(slurm_env, job, run_dir)
    assert fields["Restarts"] == "1"
    log = job_log(run_dir, job)
    stopped = re.search(r"preempted: checkpoint at step (\d+)", log)
    assert stopped and 0 < int(stopped.group(1)) < STEPS, log[-4000:]
    assert f"requeueing job {job}" in log
    assert "(restart 1)" in log
    got = assert_finished(run_dir)
    # The resumed run continues from the exact state of the checkpoint: the same loss at every step.
    assert got == reference


#: Imported by every Python process of the job (it is first on PYTHONPATH): in the rank named by
#: SPARSE_PARALLEL_TEST_STOP ("<rank>:<consumed>"), the training stream stops its own process (SIGSTOP)
#: when asked for the batch at that many consumed sequences.
STOP_RANK_SITECUSTOMIZE = """
import os
_stop = os.environ.get("SPARSE_PARALLEL_TEST_STOP", "")
if _stop and _stop.split(":")[0] == os.environ.get("SLURM_PROCID"):
    import signal
    from sparse_parallel.training import data
    _orig = data.TokenStream.train_batch
    def train_batch(self, consumed, *a, **k):
        if consumed == int(_stop.split(":")[1]):
            os.kill(os.getpid(), signal.SIGSTOP)
        return _orig(self, consumed, *a, **k)
    data.TokenStream.train_batch = train_batch
"""


def test_a_stopped_rank_ends_the_job_in_bounded_time(ws, slurm_env):
    """srun waits for every task: a rank that stops answering must not keep the job alive once its peer has
    ended with the named collective timeout."""
    from sparse_parallel.training import checkpoint as ckpt

    site = ws / "stop-rank-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(STOP_RANK_SITECUSTOMIZE)
    env = dict(slurm_env, SPARSE_PARALLEL_TEST_STOP="1:12",  # rank 1, before step 4 (4 sequences a step)
               PYTHONPATH=os.pathsep.join([str(site), *filter(None, [slurm_env.get("PYTHONPATH")])]))
    run_dir = ws / "runs" / "slurm-stopped-rank"
    job = submit(ws, env, run_dir, "train.collective_timeout_s=5", "checkpoint.every=2")
    try:
        wait_until(lambda: len(losses(run_dir)) >= 3, "the first steps' losses")
        t0 = time.monotonic()
        # Rank 0 gives up 5 s into step 4; the stopped rank must end with it, not hold the job forever.
        fields = wait_until(lambda: (f := job_fields(slurm_env, job))["JobState"] in ENDED and f,
                            f"job {job} to end after its rank 1 stopped", timeout=60)
        waited = time.monotonic() - t0
    finally:
        if job_fields(slurm_env, job)["JobState"] not in ENDED:
            subprocess.run(["scancel", job], env=slurm_env)  # a job left hanging would hold the cluster
    log = job_log(run_dir, job)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] != "0:0", (fields, log[-4000:])
    assert fields["Restarts"] == "0", fields
    assert "a collective did not complete within train.collective_timeout_s=5 s" in log, log[-4000:]
    assert waited < 60, waited
    assert [s for s, _ in losses(run_dir)] == [1, 2, 3]
    # The checkpoint of step 2 is complete and verifies: a later submit resumes from it.
    found = ckpt.find_checkpoint(run_dir / "checkpoints", "auto")
    assert found is not None and found.meta["step"] == 2, found
