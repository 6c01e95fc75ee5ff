"""Activation checkpointing: none, whole layers (attention output kept or not) and selective compute the
same loss and gradients; selective, and whole layers keeping the attention output with the Triton kernels,
run each layer's attention forward once per step; whole layers run the MLP twice."""
from __future__ import annotations

import os
import re

import pytest
import torch

from dist_utils import run_ranks
from sparse_parallel.model import Transformer, layers
from sparse_parallel.model.transformer import OFFLOAD_NEEDS_FULL
from sparse_parallel.training.config import ModelConfig

if not torch.cuda.is_available():  # the Triton kernels in the interpreter (read when they are first compiled)
    os.environ.setdefault("TRITON_INTERPRET", "1")

MODES = (False, True, "keep_attention", "selective")
PATTERN = {"components": [{"type": "window", "left": 5}]}
LAYER_PATTERNS = {1: {"components": [{"type": "window", "left": 3}, {"type": "strided", "stride": 4},
                                     {"type": "global", "first": 2}]}}


def cfg_for(mode, **kw) -> ModelConfig:
    base = dict(vocab_size=37, dim=24, n_layers=2, n_heads=6, n_kv_heads=2, loss_chunk=7, mlp_chunk=0,
                attention_backend="reference", pattern=PATTERN, layer_patterns=LAYER_PATTERNS,
                activation_checkpointing=mode)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def loss_and_grads(cfg, tokens, labels):
    torch.manual_seed(3)
    model = Transformer(cfg).double()
    total, _ = model(tokens, labels)
    total.backward()
    return total.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("n_kv_heads", [2, 1, 6])
@pytest.mark.parametrize("mlp_chunk", [0, 5, 8, 23])
def test_checkpointing_modes_give_the_same_loss_and_gradients(n_kv_heads, mlp_chunk):
    """Recomputation replays the same float64 arithmetic on the same rows: agreement to rounding."""
    torch.manual_seed(2)
    tokens, labels = torch.randint(0, 37, (2, 23)), torch.randint(0, 37, (2, 23))
    (want, want_grads), *others = [loss_and_grads(cfg_for(m, n_kv_heads=n_kv_heads, mlp_chunk=mlp_chunk),
                                                  tokens, labels) for m in MODES]
    for mode, (got, grads) in zip(MODES[1:], others):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=0, msg=f"loss, {mode}")
        assert grads.keys() == want_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, want_grads[name], rtol=1e-12, atol=1e-14, msg=f"{name}, {mode}")


def _counting(monkeypatch, owner, name):
    calls = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


# (mode, attention calls per layer per step, MLP calls of the two layers after the forward / the step).
# Two layers, 23 tokens, MLP chunks of 8 under checkpointing (3 per layer): a whole-layer checkpoint's
# forward runs the chunks once (nothing kept), its recompute once more, backward with each; selective
# runs them under checkpoints and recomputes each once.  The reference backend cannot replay a kept
# attention output (its backward is autograd through its forward), so "keep_attention" recomputes it.
COUNTS = [(False, 1, 2, 2), (True, 2, 6, 12), ("keep_attention", 2, 6, 12), ("selective", 1, 6, 12)]


@pytest.mark.parametrize("mode, attention_runs, mlp_forward, mlp_step", COUNTS)
def test_attention_forward_runs_once_per_layer_per_step_unless_whole_layers_recompute(
        monkeypatch, mode, attention_runs, mlp_forward, mlp_step):
    attention = _counting(monkeypatch, layers, "sparse_attention")
    mlp = _counting(monkeypatch, layers.SwiGLU, "forward")
    model = Transformer(cfg_for(mode, mlp_chunk=8)).double()
    tokens = torch.randint(0, 37, (1, 23))
    total, _ = model(tokens, tokens)
    assert len(attention) == 2 and len(mlp) == mlp_forward
    total.backward()
    assert len(attention) == 2 * attention_runs
    assert len(mlp) == mlp_step
    with torch.no_grad():
        model(tokens, tokens)  # evaluation keeps nothing for a backward: nothing to recompute
    assert len(attention) == 2 * attention_runs + 2


def _triton_run(mode, offload, calls):
    cfg = cfg_for(mode, dim=32, n_heads=2, n_kv_heads=1, mlp_chunk=16, loss_chunk=16, attention_backend="triton",
                  offload_activations=offload, fused_elementwise=False,
                  pattern={"components": [{"type": "window", "left": 7}, {"type": "strided", "stride": 4}]})
    torch.manual_seed(3)
    model = Transformer(cfg).to("cuda" if torch.cuda.is_available() else "cpu")
    tokens = torch.randint(0, 37, (1, 40), generator=torch.Generator().manual_seed(2)).to(model.output_weight.device)
    calls.clear()
    total, _ = model(tokens, tokens)
    forwards = len(calls)
    total.backward()
    return total.detach(), [p.grad for p in model.parameters()], (forwards, len(calls))


@pytest.mark.parametrize("offload", [False, True])
def test_kept_attention_output_is_replayed_by_the_triton_kernels(monkeypatch, offload):
    """The recompute hands the kept (out, lse) to the kernels' backward: no forward kernel runs again, and
    loss and every gradient equal those of recomputing the attention, bit for bit (the same kernels on
    the same inputs: the recomputed forward gives exactly the kept output)."""
    from sparse_parallel.kernels import core

    calls = _counting(monkeypatch, core, "forward")
    want, want_grads, (forwards, runs) = _triton_run(True, False, calls)
    assert (forwards, runs) == (2, 4)  # two layers: forward, then again in each recompute
    got, grads, (forwards, runs) = _triton_run("keep_attention", offload, calls)
    assert (forwards, runs) == (2, 2)
    assert torch.equal(got, want)
    for g, w in zip(grads, want_grads):
        assert torch.equal(g, w)


@pytest.mark.parametrize("mode", MODES[1:])
def test_checkpoint_layers_limits_the_recompute_to_the_first_layers(monkeypatch, mode):
    """With checkpoint_layers=1 of 2 the second layer keeps everything: its attention runs once (the
    reference backend recomputes the first layer's under whole-layer checkpoints), and the loss and every
    gradient are those of no checkpointing, to float64 rounding."""
    torch.manual_seed(2)
    tokens, labels = torch.randint(0, 37, (2, 23)), torch.randint(0, 37, (2, 23))
    want, want_grads = loss_and_grads(cfg_for(False, mlp_chunk=8), tokens, labels)
    attention = _counting(monkeypatch, layers, "sparse_attention")
    got, grads = loss_and_grads(cfg_for(mode, mlp_chunk=8, checkpoint_layers=1), tokens, labels)
    assert len(attention) == (2 if mode == "selective" else 3)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("mode", MODES[1:])
def test_layers_get_gradients_behind_frozen_embeddings(mode):
    """The first layer's input needs no gradient when the embeddings are frozen: its parameters still do."""
    torch.manual_seed(2)
    tokens, labels = torch.randint(0, 37, (2, 23)), torch.randint(0, 37, (2, 23))
    grads = []
    for m in (False, mode):
        torch.manual_seed(3)
        model = Transformer(cfg_for(m, mlp_chunk=8, tie_embeddings=False)).double()
        model.tok_embeddings.weight.requires_grad_(False)
        model(tokens, labels)[0].backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        assert grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("mode", [True, "keep_attention"])
def test_whole_layer_recompute_runs_under_the_forwards_autocast(mode):
    """A forward under autocast (bf16 products) is recomputed under it too: the same float32 model gives
    the gradients of no checkpointing to float32 rounding (the MLP in one chunk, so the products are
    the same ones); a recompute in float32 would differ at bf16's precision (~1e-3)."""
    torch.manual_seed(2)
    tokens, labels = torch.randint(0, 37, (2, 23)), torch.randint(0, 37, (2, 23))
    grads = []
    for m in (False, mode):
        torch.manual_seed(3)
        model = Transformer(cfg_for(m, mlp_chunk=0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            total, _ = model(tokens, labels)
        total.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_checkpointing_mode_is_validated():
    for bad in ("full", "Selective", 1, None):
        with pytest.raises(ValueError, match=r"model.activation_checkpointing must be one of \[false, true, "
                                             r"'keep_attention', 'selective'\]"):
            cfg_for(bad)
    with pytest.raises(ValueError, match="model.offload_activations needs model.activation_checkpointing: true"):
        cfg_for("selective", offload_activations=True)
    cfg_for(True, offload_activations=True)
    cfg_for("keep_attention", offload_activations=True)
    for bad in (-1, 3, True, "all", 1.0):
        with pytest.raises(ValueError, match=r"model.checkpoint_layers must be unset or an integer in \[0, 2\]"):
            cfg_for(True, checkpoint_layers=bad)
    cfg_for(True, checkpoint_layers=0)
    # A config changed after validation is refused where it would be used.
    cfg = cfg_for("selective")
    cfg.offload_activations = True
    tokens = torch.randint(0, 37, (1, 9))
    with pytest.raises(ValueError, match=re.escape(OFFLOAD_NEEDS_FULL)):
        Transformer(cfg)(tokens, tokens)


N, B = 22, 2


def _sequence_parallel_worker(rank, world):
    import torch.distributed as dist

    from sparse_parallel.model import apply_sequence_parallel
    from sparse_parallel.parallel import SequenceParallel

    ctx = SequenceParallel(seq_len=N)
    start, end = ctx.shard_range(N)
    data = torch.randint(0, 37, (B, N + 1), generator=torch.Generator().manual_seed(0))
    out = {}
    for mode in MODES:
        torch.manual_seed(3)
        model = apply_sequence_parallel(Transformer(cfg_for(mode, mlp_chunk=4)).double(), ctx)
        total, _ = model(data[:, start:end], data[:, start + 1:end + 1], torch.arange(start, end))
        total.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        dist.all_reduce(total)
        dist.all_reduce(grads)
        out[mode] = (total.item(), grads.tolist())  # plain values: tensors do not outlive a rank
    return out


def test_checkpointing_modes_agree_under_sequence_parallelism(tmp_path):
    """Two ranks (gloo): every mode gives the summed loss and gradients of one process holding everything."""
    one = run_ranks(_sequence_parallel_worker, 1, tmp_path, timeout=240)[0]
    two = run_ranks(_sequence_parallel_worker, 2, tmp_path, timeout=240)
    for mode in MODES:
        for rank in two:
            # float64 throughout; the shards only split sums: agreement to rounding.
            assert rank[mode][0] == pytest.approx(one[False][0], rel=1e-12), mode
            torch.testing.assert_close(torch.tensor(rank[mode][1]), torch.tensor(one[False][1]), rtol=1e-10,
                                       atol=1e-13, msg=str(mode))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton kernels, compiled element-wise)")
def test_selective_and_fused_on_gpu_within_bf16_error_of_todays_path():
    """bf16 with the Triton kernels: selective checkpointing with fused element-wise kernels is as close
    to the float64 eager model as whole-layer checkpointing with eager element-wise work (2x its error)."""
    from tolerance import assert_within_reference_error

    pattern = {"causal": True, "components": [{"type": "window", "left": 64}, {"type": "strided", "stride": 16},
                                              {"type": "global", "first": 4, "queries": False}]}
    tokens = torch.randint(0, 37, (1, 1025), device="cuda")
    labels = torch.randint(0, 37, (1, 1025), device="cuda")
    runs = {}
    for name, dtype, backend, mode, fused_elementwise in (
            ("ref64", torch.float64, "reference", False, False), ("today", torch.bfloat16, "triton", True, False),
            ("fast", torch.bfloat16, "triton", "selective", True)):
        cfg = cfg_for(mode, dim=128, n_heads=2, n_kv_heads=1, mlp_chunk=256, loss_chunk=512, pattern=pattern,
                      layer_patterns={}, attention_backend=backend, fused_elementwise=fused_elementwise)
        torch.manual_seed(3)
        model = Transformer(cfg).to(device="cuda", dtype=dtype)
        total, _ = model(tokens, labels)
        total.backward()
        runs[name] = [total.detach()] + [p.grad for p in model.parameters()]
    for i, (got, r64, today) in enumerate(zip(runs["fast"], runs["ref64"], runs["today"])):
        assert_within_reference_error(f"loss and gradient {i}", got, r64, today,
                                      floor=2.0 ** -8 * r64.abs().max().item())
