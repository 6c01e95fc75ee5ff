"""The compiled element-wise functions (model/fused.py) against their eager definitions and float64.

On CUDA they compile; here the tests add "cpu" to ``fused.COMPILE_ON`` so that inductor's CPU
backend compiles the same functions.  Tolerance: the compiled error against float64 may be at most
twice the eager same-dtype error (tests/tolerance.py), plus a unit in the last place for values
the eager form happens to get exact.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from tolerance import assert_within_reference_error
from sparse_parallel.model import Transformer, fused, layers
from sparse_parallel.training.config import ModelConfig

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not any(map(shutil.which, ("g++", "c++", "clang++"))),
                                 reason="torch.compile on CPU needs a C++ compiler")]
ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7}


@pytest.fixture
def compiled_on_cpu(monkeypatch):
    monkeypatch.setattr(fused, "COMPILE_ON", fused.COMPILE_ON | {"cpu"})


def test_eager_without_compiling_on_devices_outside_compile_on(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.compile called for a CPU tensor")

    monkeypatch.setattr(torch, "compile", refuse)
    x, w = torch.randn(3, 8), torch.randn(8)
    assert not fused.rms_norm.compiles(x)
    assert torch.equal(fused.rms_norm(x, w, 1e-5), fused.rms_norm.eager(x, w, 1e-5))
    assert torch.equal(fused.silu_mul(x, w), fused.silu_mul.eager(x, w))


def test_compiled_rotary_at_a_million_positions_matches_float64_angles(compiled_on_cpu):
    torch.manual_seed(0)
    d, theta = 16, 10000.0
    pos = torch.tensor([0, 1, 999_999, 1_048_575, 1_048_576 + 12_345])
    x = torch.randn(2, len(pos), 3, d, dtype=torch.float32)
    cos, sin = layers.rotary_tables(pos, d, theta)
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv
    xd = x.double().unflatten(-1, (-1, 2))
    c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
    want = torch.stack((xd[..., 0] * c - xd[..., 1] * s, xd[..., 0] * s + xd[..., 1] * c), -1).flatten(-2)
    got = layers.apply_rotary(x, cos, sin, fused=True)
    eager = layers.apply_rotary(x, cos, sin)
    assert (got.double() - want).abs().max() < 1e-5  # the eager rotary's own bar
    assert_within_reference_error("rotary", got, want, eager, floor=4 * ULP[torch.float32])


def _rms_norm64(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w  # the eager form computes in float32


CASES = {  # name: (compiled, eager, float64 reference)
    "rms_norm": (lambda x, w: fused.rms_norm(x, w, 1e-5), lambda x, w: fused.rms_norm.eager(x, w, 1e-5),
                 _rms_norm64),
    "silu_mul": (fused.silu_mul, fused.silu_mul.eager, fused.silu_mul.eager),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 97])
def test_compiled_norm_and_gating_match_float64_forward_and_backward(compiled_on_cpu, name, dtype, n):
    torch.manual_seed(n)
    compiled, eager, ref = CASES[name]
    inputs = [torch.randn(2, n, 48, dtype=torch.float64),
              torch.randn(48 if name == "rms_norm" else (2, n, 48), dtype=torch.float64)]
    dy = torch.randn(2, n, 48, dtype=torch.float64)

    def run(fn, dtype):
        leaves = [t.to(dtype).clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        out.backward(dy.to(dtype))
        return [out.detach()] + [t.grad for t in leaves]

    ref64, ref_lo, got = run(ref, torch.float64), run(eager, dtype), run(compiled, dtype)
    for what, g, r64, rlo in zip(("out", "grad 0", "grad 1"), got, ref64, ref_lo):
        assert_within_reference_error(f"{name} {what}", g, r64, rlo, floor=2 * ULP[dtype] * r64.abs().max().item())


def test_fused_model_matches_eager_model_in_selective_mode(compiled_on_cpu):
    """The whole model in float32, fused against eager, both against the float64 eager model."""
    cfg = ModelConfig(vocab_size=37, dim=24, n_layers=2, n_heads=6, n_kv_heads=2, loss_chunk=16, mlp_chunk=8,
                      attention_backend="reference", activation_checkpointing="selective",
                      pattern={"components": [{"type": "window", "left": 5}, {"type": "strided", "stride": 4}]})
    cfg.validate()
    tokens, labels = torch.randint(0, 37, (2, 21)), torch.randint(0, 37, (2, 21))
    torch._dynamo.reset()
    counters.clear()
    results = {}
    for name, dtype, fused_elementwise in (("ref64", torch.float64, False), ("eager32", torch.float32, False),
                                           ("fused32", torch.float32, True)):
        cfg.fused_elementwise = fused_elementwise
        torch.manual_seed(4)
        model = Transformer(cfg).to(dtype)
        total, _ = model(tokens, labels)
        total.backward()
        results[name] = [total.detach()] + [p.grad for p in model.parameters()]
    assert counters["stats"]["unique_graphs"] >= 3  # norm, rotary and gating each ran compiled
    for i, (got, r64, r32) in enumerate(zip(results["fused32"], results["ref64"], results["eager32"])):
        assert_within_reference_error(f"loss and gradient {i}", got, r64, r32,
                                      floor=4 * ULP[torch.float32] * r64.abs().max().item())
