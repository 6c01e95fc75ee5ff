"""The fused element-wise functions (model/fused.py) against their eager definitions and float64.

On CUDA they compile (the rotary rotation runs its Triton kernel); without CUDA the tests add "cpu"
to ``fused.COMPILE_ON`` so that inductor's CPU backend compiles the same functions and the rotary
kernel runs in Triton's interpreter.  Tolerance: the fused error against float64 may be at most
twice the eager same-dtype error (tests/tolerance.py), plus a unit in the last place for values
the eager form happens to get exact.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the rotary kernel is first imported

from tolerance import assert_within_reference_error
from sparse_parallel.model import Transformer, fused, layers
from sparse_parallel.training.config import ModelConfig

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not any(map(shutil.which, ("g++", "c++", "clang++"))),
                                 reason="torch.compile on CPU needs a C++ compiler")]
ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7}
DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="the rotary kernel needs CUDA or TRITON_INTERPRET=1")


@pytest.fixture
def compiled_on_cpu(monkeypatch):
    monkeypatch.setattr(fused, "COMPILE_ON", fused.COMPILE_ON | {"cpu"})


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the rotary kernel's launches (forward and backward)."""
    from sparse_parallel.model import rotary_kernel

    calls = []
    launch = rotary_kernel._launch
    monkeypatch.setattr(rotary_kernel, "_launch", lambda *a: calls.append(a[3]) or launch(*a))
    return calls


def test_eager_without_compiling_on_devices_outside_compile_on(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.compile called for a CPU tensor")

    monkeypatch.setattr(torch, "compile", refuse)
    x, w = torch.randn(3, 8), torch.randn(8)
    assert not fused.rms_norm.compiles(x)
    assert torch.equal(fused.rms_norm(x, w, 1e-5), fused.rms_norm.eager(x, w, 1e-5))
    assert torch.equal(fused.silu_mul(x, w), fused.silu_mul.eager(x, w))


@needs_kernel
@pytest.mark.parametrize("dtype,d", [(torch.float32, 16), (torch.bfloat16, 16), (torch.float32, 12)])
def test_rotary_kernel_at_a_million_positions_matches_float64_angles(compiled_on_cpu, kernel_calls, dtype, d):
    """Forward and backward (the rotation by the opposite angle) against float64 angles, on 2 x 5 x 3
    rows: not a multiple of the kernel's row block, so its masked rows are exercised too; a head
    dimension of 12 pads its 6 pairs to 8 in registers."""
    torch.manual_seed(0)
    theta = 10000.0
    pos = torch.tensor([0, 1, 999_999, 1_048_575, 1_048_576 + 12_345], device=DEV)
    x = torch.randn(2, len(pos), 3, d, dtype=torch.float64, device=DEV)
    dy = torch.randn_like(x)
    cos, sin = layers.rotary_tables(pos, d, theta)
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=DEV) / d)
    ang = pos.double()[:, None] * inv

    def rot64(t, sign):
        t = t.unflatten(-1, (-1, 2))
        c, s = ang.cos()[None, :, None], sign * ang.sin()[None, :, None]
        return torch.stack((t[..., 0] * c - t[..., 1] * s, t[..., 0] * s + t[..., 1] * c), -1).flatten(-2)

    def run(fused_path):
        leaf = x.to(dtype).requires_grad_()
        out = layers.apply_rotary(leaf, cos, sin, fused=fused_path)
        out.backward(dy.to(dtype))
        return out.detach(), leaf.grad

    (got, dgot), (eager, deager) = run(True), run(False)
    assert kernel_calls == [1.0, -1.0]  # the kernel ran, forward then backward
    for what, g, want, e in (("out", got, rot64(x, 1), eager), ("grad", dgot, rot64(dy, -1), deager)):
        if dtype == torch.float32:
            assert (g.double() - want).abs().max() < 1e-5  # the eager rotary's own bar
        assert_within_reference_error(f"rotary {what}", g, want, e, floor=4 * ULP[dtype] * want.abs().max().item())


def test_rotary_kernel_refuses_shapes_it_cannot_rotate():
    from sparse_parallel.model import rotary_kernel

    cos, sin = layers.rotary_tables(torch.arange(4), 12, 1e4)
    with pytest.raises(ValueError, match="even head dimension, got 13"):
        rotary_kernel.rotate(torch.randn(1, 4, 2, 13), cos, sin)
    cos, sin = layers.rotary_tables(torch.arange(3), 16, 1e4)
    with pytest.raises(ValueError, match=r"cos/sin must be \[4, 8\]"):
        rotary_kernel.rotate(torch.randn(1, 4, 2, 16), cos, sin)


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


@needs_kernel
def test_fused_model_matches_eager_model_in_selective_mode(compiled_on_cpu, kernel_calls):
    """The whole model in float32, fused against eager, both against the float64 eager model."""
    cfg = ModelConfig(vocab_size=37, dim=24, n_layers=2, n_heads=6, n_kv_heads=2, loss_chunk=16, mlp_chunk=8,
                      attention_backend="reference", activation_checkpointing="selective",
                      pattern={"components": [{"type": "window", "left": 5}, {"type": "strided", "stride": 4}]})
    cfg.validate()
    tokens, labels = torch.randint(0, 37, (2, 21), device=DEV), torch.randint(0, 37, (2, 21), device=DEV)
    torch._dynamo.reset()
    counters.clear()
    results = {}
    for name, dtype, fused_elementwise in (("ref64", torch.float64, False), ("eager32", torch.float32, False),
                                           ("fused32", torch.float32, True)):
        cfg.fused_elementwise = fused_elementwise
        torch.manual_seed(4)
        model = Transformer(cfg).to(dtype).to(DEV)
        total, _ = model(tokens, labels)
        total.backward()
        results[name] = [total.detach()] + [p.grad for p in model.parameters()]
    assert counters["stats"]["unique_graphs"] >= 2  # norm and gating ran compiled
    assert kernel_calls.count(-1.0) == 2 * cfg.n_layers  # the rotary kernel's backward: q and k of each layer
    for i, (got, r64, r32) in enumerate(zip(results["fused32"], results["ref64"], results["eager32"])):
        assert_within_reference_error(f"loss and gradient {i}", got, r64, r32,
                                      floor=4 * ULP[torch.float32] * r64.abs().max().item())
