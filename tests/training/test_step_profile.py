"""The step profile of benchmarks/train_scaling.py: where the GPU sat idle and what the CPU did then."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "train_scaling.py"
_SPEC = importlib.util.spec_from_file_location("train_scaling", _PATH)
train_scaling = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(train_scaling)


def test_idle_stretches_are_the_gaps_of_the_union_of_device_spans():
    # Two streams overlap in [10, 40) and [30, 50); then a 150 us gap; a 50 us gap below min_us.
    spans = [(10, 40), (30, 50), (200, 260), (310, 400), (395, 420)]
    cpu = [("cudaStreamSynchronize", 60, 180),   # inside the 150 us gap: 120 us of it
           ("aten::nonzero", 170, 230),          # 30 us in the gap (170-200)
           ("aten::mm", 0, 20),                  # while the GPU ran: not counted
           ("cudaLaunchKernel", 270, 300)]       # in the 50 us gap, which is shorter than min_us
    got = train_scaling.idle_stretches(spans, cpu, min_us=100.0)
    assert got["idle_ms"] == pytest.approx((150 + 50) / 1e3)
    assert got["stretches"] == 1 and got["longest_ms"] == pytest.approx(0.15)
    assert [(c["name"], c["ms"]) for c in got["cpu_ms"]] == [("cudaStreamSynchronize", pytest.approx(0.12)),
                                                          ("aten::nonzero", pytest.approx(0.03))]


def test_idle_stretches_of_a_busy_or_empty_step():
    assert train_scaling.idle_stretches([(0, 5), (5, 9)], [("x", 1, 2)])["idle_ms"] == 0.0
    assert train_scaling.idle_stretches([], [])["stretches"] == 0


def test_loss_agreement_counts_the_steps_inside_the_noise_runs_spread():
    first = [10.0, 8.0, 4.0, 1.0]
    noise = [[10.0, 8.1, 3.9, 1.2], [10.0, 7.95, 4.05, 0.9]]  # spread: 0, 0.1, 0.1, 0.2
    got = train_scaling.loss_agreement([10.0, 8.05, 4.2, 1.1], first, noise)
    assert got["steps"] == 4 and got["inside"] == 3  # step 2 (0.2 > 0.1) is outside
    assert got["max_rel"] == pytest.approx(0.1) and got["last_rel"] == pytest.approx(0.1)
    assert "inside" not in train_scaling.loss_agreement([10.0, 8.0], first, [])
    assert train_scaling.loss_agreement([10.0, 8.0, 4.0], first, noise)["steps"] == 3  # the shortest run


def test_stdlib_batches_are_consecutive_windows_of_the_library_bytes():
    from sparse_parallel.training.data import stdlib_files

    args = SimpleNamespace(data="stdlib", vocab=300, warmup=1, steps=2, profile=True)
    batches = train_scaling.batch_source(args, 50)
    text = b"".join(f.read_bytes() for f in stdlib_files(4 * 50 + 1))
    for step in range(4):  # warm-up, two timed steps, the profiled one: each a fresh window
        got = batches(step)
        assert got.shape == (1, 51) and got.dtype == torch.long
        assert bytes(got[0].tolist()) == text[step * 50:step * 50 + 51]
    assert not torch.equal(batches(0), batches(1))
    random = train_scaling.batch_source(SimpleNamespace(data="random", vocab=300), 50)
    assert torch.equal(random(0), random(3)) and int(random(0).max()) < 300


def test_stdlib_data_needs_a_vocabulary_of_every_byte():
    proc = subprocess.run([sys.executable, str(_PATH), "--device", "cpu", "--data", "stdlib", "--vocab", "255"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--vocab must be at least 256, got 255" in proc.stderr, proc.stderr[-2000:]


def test_a_finished_run_frees_its_model_and_the_next_run_repeats_its_losses():
    # train_scaling measures many variants in one process: a model kept alive by the engine of a finished
    # run (DeepSpeed's gradient hooks sit on its parameters) adds its memory to every later run's peak.
    from sparse_parallel.launcher.discovery import free_port

    code = f"""
import gc, importlib.util, os, types, weakref
import torch.distributed as dist
spec = importlib.util.spec_from_file_location("train_scaling", {str(_PATH)!r})
ts = importlib.util.module_from_spec(spec); spec.loader.exec_module(ts)
dist.init_process_group("gloo")
args = types.SimpleNamespace(device="cpu", layers=2, dim=64, heads=4, kv_heads=2, vocab=300, mlp_chunk=256,
                             zero=1, offload=False, data="stdlib", warmup=1, steps=2, profile=False)
models = []
init = ts.Transformer.__init__
def tracked(self, *a, **k):
    init(self, *a, **k)
    models.append(weakref.ref(self))
ts.Transformer.__init__ = tracked
runs = [ts.attempt(args, "main", 256, "ours", 1, 0, "full", "off", 0) for _ in range(2)]
gc.collect()
print("status", *[r["status"] for r in runs])
print("alive", sum(m() is not None for m in models), "of", len(models))
print("same losses", runs[0]["losses"] == runs[1]["losses"], len(runs[0]["losses"]))
"""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    assert "status ok ok" in out and "alive 0 of 2" in out and "same losses True 3" in out, out
