"""`sparse-parallel launch` and `submit`: command building, validation before anything starts, rendering.

Slurm's clients are replaced here by small scripts on PATH that answer like sinfo/sbatch and record how
they were called; tests/launcher/test_slurm_e2e.py runs the same commands against a real cluster.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sparse_parallel.launcher import cli
from sparse_parallel.launcher.launch import torchrun_command, torchrun_nnodes
from sparse_parallel.launcher.preflight import check_writable_dir
from sparse_parallel.launcher.submit import (JobSpec, PartitionNodes, check_against_cluster, parse_gres_gpus,
                                             parse_sinfo, render, slurm_time_seconds)


def write_config(tmp_path: Path, sp: int = 2, tokens: int = 96, run_dir: Path | None = None) -> Path:
    cfg = {"data": {"tokenizer": str(tmp_path / "tok.model")},
           "parallel": {"sequence_parallel": sp},
           "train": {"tokens_per_gpu": tokens, "steps": 3},
           "run": {"dir": str(run_dir or tmp_path / "run")}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fake_slurm(tmp_path: Path, monkeypatch, sinfo_lines: list[str], job_id: str = "4242") -> Path:
    """sinfo/sbatch stand-ins on PATH; sbatch's arguments land in <bin>/sbatch.args."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sinfo").write_text("#!/bin/sh\ncat <<'EOF'\n" + "\n".join(sinfo_lines) + "\nEOF\n")
    (bindir / "sbatch").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {bindir}/sbatch.args\necho {job_id}\n")
    for f in ("sinfo", "sbatch"):
        (bindir / f).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return bindir


CLUSTER = ["debug*|1|2|(null)", "gpu|4|64|gpu:h100:8(S:0-1)", "gpu|2|32|gpu:a100:4"]


# ---------------------------------------------------------------------------------------------------- launch

def test_torchrun_command_single_node_passes_unknown_args_through():
    cmd = torchrun_command("c.yaml", 2, ["train.steps=3"], "auto", ["--max-restarts", "2"], python="py")
    assert cmd[:5] == ["py", "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    assert "--standalone" in cmd
    worker = cmd.index("-m", 3)
    assert cmd[worker - 2:worker] == ["--max-restarts", "2"]  # torchrun's own, before the worker module
    assert cmd[worker:] == ["-m", "sparse_parallel.launcher.cli", "train", "c.yaml", "--launcher", "torchrun",
                            "--resume", "auto", "--set", "train.steps=3"]


def test_torchrun_command_multi_node_leaves_rendezvous_to_torchrun():
    cmd = torchrun_command("c.yaml", 4, torchrun_args=["--nnodes=2", "--rdzv-endpoint", "h:29400"])
    assert "--standalone" not in cmd
    with pytest.raises(ValueError, match="--nproc"):
        torchrun_command("c.yaml", 0)


@pytest.mark.parametrize("args, expected", [([], (1, 1)), (["--nnodes", "3"], (3, 3)),
                                            (["--nnodes=1:4"], (1, 4))])
def test_torchrun_nnodes(args, expected):
    assert torchrun_nnodes(args) == expected


def test_torchrun_nnodes_bad():
    with pytest.raises(ValueError, match="--nnodes"):
        torchrun_nnodes(["--nnodes", "two"])


def test_launch_dry_run_prints_the_command_and_context(tmp_path, capsys):
    cfg = write_config(tmp_path, sp=2, tokens=96)
    rc = cli.main(["launch", str(cfg), "--nproc", "4", "--set", "train.steps=5", "--dry-run",
                   "--max-restarts", "1"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    cmd = shlex.split(out)
    assert cmd[cmd.index("--nproc-per-node") + 1] == "4"
    assert cmd[cmd.index("--max-restarts") + 1] == "1"
    assert cmd[-2:] == ["--set", "train.steps=5"]
    # 4 ranks at sequence-parallel 2: two sequences of 2 x 96 tokens.
    assert "sequence-parallel 2 x data-parallel 2; context length 192 tokens" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("odd_world", "not a multiple of parallel.sequence_parallel"),
    ("run_dir_under_file", "cannot be created"),
    ("bad_key", "unknown config key"),
])
def test_launch_refuses_bad_input_before_starting(tmp_path, capsys, case, match):
    cfg = write_config(tmp_path, run_dir=tmp_path / "afile" / "run")
    (tmp_path / "afile").write_text("a file where the run directory's parent should be")
    args = ["launch", str(cfg), "--nproc", "2"]
    if case == "missing":
        args[1] = str(tmp_path / "nope.yaml")
    elif case == "odd_world":
        args = ["launch", str(write_config(tmp_path, sp=2)), "--nproc", "3"]
    elif case == "bad_key":
        args += ["--set", "train.stepz=3"]
    rc = cli.main(args)
    assert rc == 2
    assert match in capsys.readouterr().err


def test_check_writable_dir(tmp_path):
    assert check_writable_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # checking creates nothing
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        check_writable_dir(tmp_path / "f" / "run")


# ---------------------------------------------------------------------------------------------------- submit

@pytest.mark.parametrize("gres, gpus", [("(null)", 0), ("gpu:8", 8), ("gpu:h100:8(S:0-1)", 8),
                                        ("gpu:a100:2,gpu:v100:2", 4), ("gpu:a100:4(S:0-1),nvme:1", 4),
                                        ("shard:16", 0)])
def test_parse_gres_gpus(gres, gpus):
    assert parse_gres_gpus(gres) == gpus


def test_parse_sinfo():
    parts = parse_sinfo("\n".join(CLUSTER) + "\n")
    assert parts[0] == PartitionNodes("debug", True, 1, 2, 0)
    assert parts[1] == PartitionNodes("gpu", False, 4, 64, 8)


@pytest.mark.parametrize("spec, match", [
    (JobSpec(partition="gpux"), "does not exist on this cluster; partitions: debug, gpu"),
    (JobSpec(partition="gpu", gpus_per_node=9), "more than a node of partition 'gpu' has \\(8 GPUs\\)"),
    (JobSpec(gpus_per_node=1), "partition 'debug' has \\(0 GPUs\\)"),
    (JobSpec(tasks_per_node=3), "3 tasks per node x 1 CPUs each is more than"),
    (JobSpec(partition="gpu", gpus_per_node=8, nodes=5), "--nodes 5 is more than partition 'gpu' has"),
])
def test_check_against_cluster_refuses(spec, match):
    with pytest.raises(ValueError, match=match):
        check_against_cluster(spec, parse_sinfo("\n".join(CLUSTER)))


def test_check_against_cluster_accepts():
    parts = parse_sinfo("\n".join(CLUSTER))
    assert check_against_cluster(JobSpec(tasks_per_node=2), parts) == "debug"
    # 4 nodes with 8 GPUs plus 2 with 4: six nodes fit 4 GPUs each, only four fit 8.
    assert check_against_cluster(JobSpec(partition="gpu", gpus_per_node=4, nodes=6), parts) == "gpu"


@pytest.mark.parametrize("kwargs, match", [({"nodes": 0}, "--nodes"), ({"gpus_per_node": -1}, "--gpus-per-node"),
                                           ({"gpus_per_node": 4, "tasks_per_node": 2}, "one rank per GPU"),
                                           ({"signal_seconds": 0}, "--signal-seconds")])
def test_job_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        JobSpec(**kwargs)


def test_render_refuses_missing_and_unused_values():
    assert render("a {{x}} b {{y}}", {"x": 1, "y": "z"}) == "a 1 b z"
    with pytest.raises(ValueError, match="without a value: \\['y'\\]"):
        render("{{x}} {{y}}", {"x": 1})
    with pytest.raises(ValueError, match="does not use: \\['z'\\]"):
        render("{{x}}", {"x": 1, "z": 2})


def test_submit_dry_run_prints_a_valid_script_and_writes_nothing(tmp_path, monkeypatch, capsys):
    bindir = fake_slurm(tmp_path, monkeypatch, CLUSTER)
    cfg = write_config(tmp_path, sp=4, tokens=96)
    rc = cli.main(["submit", str(cfg), "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu",
                   "--account", "proj", "--time", "04:00:00", "--qos", "high", "--constraint", "h100",
                   "--signal-seconds", "300", "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = out.splitlines()
    for d in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--account=proj",
              "--time=04:00:00", "--qos=high", "--constraint=h100", "--requeue", "--signal=B:USR1@300"):
        assert f"#SBATCH {d}" in lines, d
    # 16 ranks at sequence-parallel 4: context 4 x 96 tokens, said in the script.
    assert "world size 16 = sequence-parallel 4 x data-parallel 4; context length 384 tokens" in out
    assert "REQUEUE_EXIT_CODE=85" in lines
    assert 'scontrol requeue "$SLURM_JOB_ID"' in out
    assert "--launcher slurm --resume auto" in out
    subprocess.run(["bash", "-n"], input=out, text=True, check=True)  # it parses as bash
    assert not (tmp_path / "run").exists()
    assert not (bindir / "sbatch.args").exists()


def test_submit_writes_the_job_dir_and_passes_unknown_args_to_sbatch(tmp_path, monkeypatch, capsys):
    bindir = fake_slurm(tmp_path, monkeypatch, CLUSTER, job_id="777")
    cfg = write_config(tmp_path, sp=2, tokens=96)
    rc = cli.main(["submit", str(cfg), "--tasks-per-node", "2", "--set", "train.steps=7",
                   "--mail-type=END"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    (job_dir,) = (tmp_path / "run" / "jobs").iterdir()
    script = job_dir / "train.sbatch"
    args = (bindir / "sbatch.args").read_text().split()
    assert args == ["--parsable", "--mail-type=END", str(script)]
    assert "submitted job 777" in out
    resolved = yaml.safe_load((job_dir / "config.yaml").read_text())
    assert resolved["train"]["steps"] == 7  # the override is baked into the job's own copy
    text = script.read_text()
    assert f"{sys.executable} -m sparse_parallel.launcher.cli train {job_dir / 'config.yaml'}" in text
    assert f"#SBATCH --chdir={Path.cwd()}" in text
    assert "--gpus-per-node" not in text and "--partition" not in text


@pytest.mark.parametrize("extra, match", [
    (["--partition", "nosuch"], "--partition 'nosuch' does not exist"),
    (["--gpus-per-node", "1"], "more than a node of partition 'debug' has \\(0 GPUs\\)"),
    (["--tasks-per-node", "3"], "more than a node of partition 'debug' has \\(2 CPUs\\)"),
])
def test_submit_refuses_what_the_cluster_cannot_run(tmp_path, monkeypatch, capsys, extra, match):
    bindir = fake_slurm(tmp_path, monkeypatch, CLUSTER)
    cfg = write_config(tmp_path, sp=1)
    rc = cli.main(["submit", str(cfg), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(match, err), err
    assert not (tmp_path / "run").exists() and not (bindir / "sbatch.args").exists()


def test_submit_refuses_missing_config_and_unwritable_run_dir(tmp_path, monkeypatch, capsys):
    bindir = fake_slurm(tmp_path, monkeypatch, CLUSTER)
    assert cli.main(["submit", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    cfg = write_config(tmp_path, sp=1, run_dir=tmp_path / "afile" / "run")
    assert cli.main(["submit", str(cfg)]) == 2
    assert "cannot be created" in capsys.readouterr().err
    assert not (bindir / "sbatch.args").exists()


def test_submit_without_slurm(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # no sinfo, no sbatch
    cfg = write_config(tmp_path, sp=1)
    assert cli.main(["submit", str(cfg)]) == 2
    assert "not a Slurm submit host" in capsys.readouterr().err
    assert cli.main(["submit", str(cfg), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "#SBATCH --requeue" in captured.out and "not checked" in captured.err


def test_submit_with_an_unreachable_cluster(tmp_path, monkeypatch, capsys):
    bindir = fake_slurm(tmp_path, monkeypatch, [])
    (bindir / "sinfo").write_text("#!/bin/sh\necho 'sinfo: fatal: Could not establish a configuration source' >&2\n"
                                  "exit 1\n")
    cfg = write_config(tmp_path, sp=1)
    assert cli.main(["submit", str(cfg)]) == 2
    assert "sinfo failed (is the cluster up?)" in capsys.readouterr().err
    assert not (bindir / "sbatch.args").exists()
    assert cli.main(["submit", str(cfg), "--dry-run"]) == 0
    assert "not checked" in capsys.readouterr().err


def test_launch_takes_torchruns_spelling_of_nproc(tmp_path, capsys):
    cfg = write_config(tmp_path, sp=2)
    assert cli.main(["launch", "--nproc-per-node", "2", str(cfg), "--dry-run"]) == 0
    cmd = shlex.split(capsys.readouterr().out)
    assert cmd.count("--nproc-per-node") == 1 and cmd[cmd.index("--nproc-per-node") + 1] == "2"


# ----------------------------------------------------------------------------------------------------- train

def test_train_dry_run_reports_rank_and_derived_sizes(tmp_path, monkeypatch, capsys):
    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_", "PMI")) or name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "h0")
    monkeypatch.setenv("MASTER_PORT", "29555")
    cfg = write_config(tmp_path, sp=2, tokens=96)
    assert cli.main(["train", str(cfg), "--dry-run"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["rank"] == {"rank": 3, "world_size": 4, "local_rank": 1, "local_world_size": 4,
                           "master_addr": "h0", "master_port": 29555, "source": "torchrun"}
    assert (got["derived"]["sequence_parallel"], got["derived"]["data_parallel"],
            got["derived"]["context_length"]) == (2, 2, 192)
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_world_the_config_cannot_split(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = write_config(tmp_path, sp=2)
    assert cli.main(["train", str(cfg), "--launcher", "torchrun", "--dry-run"]) == 2
    assert "not a multiple of parallel.sequence_parallel=2" in capsys.readouterr().err


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_train_stops_with_the_requeue_code_on_a_signal_during_start_up(tmp_path, monkeypatch, capsys, sig):
    from sparse_parallel import training

    def slow_start(config, overrides, **kwargs):  # the signal lands while the trainer is still starting
        os.kill(os.getpid(), sig)
        time.sleep(5)
        raise AssertionError("the signal should have stopped start-up")

    monkeypatch.setattr(training, "run", slow_start)
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    before = signal.getsignal(sig)
    cfg = write_config(tmp_path, sp=1)
    assert cli.main(["train", str(cfg), "--launcher", "single"]) == training.REQUEUE_EXIT_CODE
    assert f"{sig.name} before training began" in capsys.readouterr().err
    assert signal.getsignal(sig) is before


@pytest.mark.parametrize("text, seconds", [("90", 5400), ("5:30", 330), ("1:00:00", 3600), ("2-0", 172800),
                                           ("1-2:03", 93780), ("1-0:0:7", 86407), ("UNLIMITED", None)])
def test_slurm_time_seconds(text, seconds):
    assert slurm_time_seconds(text) == seconds


def test_signal_must_come_before_the_time_limit():
    assert JobSpec(time="00:05:00", signal_seconds=120).time == "00:05:00"
    with pytest.raises(ValueError, match="--signal-seconds 120 \\+ 60 s .* shorter than --time 3 \\(180 s\\)"):
        JobSpec(time="3", signal_seconds=120)
    with pytest.raises(ValueError, match="--time must be"):
        JobSpec(time="1h")


END_PROCESS_SCRIPT = """
import sys
import torch.distributed as dist
from sparse_parallel.training.trainer import end_process, init_distributed
if sys.argv[1] == "distributed":
    init_distributed()  # one gloo rank
    got = [None]
    dist.all_gather_object(got, "digest")  # the kind of collective a finished run performs last
    dist.destroy_process_group()
    print("finished", got[0], end="")  # unflushed: end_process must flush it
else:
    print("nothing started", end="")
end_process(85)
"""


@pytest.mark.parametrize("mode", ["distributed", "plain"])
def test_end_process_keeps_the_exit_code_and_the_output(mode):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTHONUNBUFFERED")}
    env["DS_ACCELERATOR"] = "cpu"  # stdout to a pipe is block-buffered: only a flush brings the text out
    proc = subprocess.run([sys.executable, "-c", END_PROCESS_SCRIPT, mode], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 85, proc.stderr[-2000:]
    assert proc.stdout == ("finished digest" if mode == "distributed" else "nothing started")
