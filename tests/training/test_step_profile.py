"""The step profile of benchmarks/train_scaling.py: where the GPU sat idle and what the CPU did then."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

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
