"""Chunked MLP and rotary, and host-offloaded checkpoints (what lets a million-token shard fit), compute
exactly the model without them."""
import pytest
import torch

from sparse_parallel.model import Transformer
from sparse_parallel.model import layers, offload, transformer
from sparse_parallel.training.config import ModelConfig


def test_chunked_mlp_matches_whole_shard_loss_and_grads():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, activation_checkpointing=True,
                      mlp_chunk=16, loss_chunk=32, attention_backend="reference")
    cfg.validate()
    model = Transformer(cfg).double()
    assert all(block.mlp_chunk == 16 for block in model.layers)
    tokens, labels = torch.randint(0, 64, (2, 50)), torch.randint(0, 64, (2, 50))

    def loss_and_grads():
        model.zero_grad()
        total, _ = model(tokens, labels)
        total.backward()
        return total.detach(), [p.grad.clone() for p in model.parameters()]

    chunked, g_chunked = loss_and_grads()
    for block in model.layers:
        block.mlp_chunk = 0
    whole, g_whole = loss_and_grads()
    # Same float64 arithmetic on the same rows, only split: equal to rounding.
    torch.testing.assert_close(chunked, whole, rtol=1e-13, atol=1e-13)
    for a, b in zip(g_chunked, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_chunked_rotary_matches_whole():
    x = torch.randn(2, 300, 3, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = layers.rotary_tables(torch.arange(1000, 1300), 8, 10000.0)
    whole = layers.apply_rotary(x, cos, sin)
    chunked = layers.apply_rotary(x, cos, sin, chunk=64)
    assert torch.equal(whole, chunked)
    g = torch.randn_like(whole)
    (gx,) = torch.autograd.grad(chunked, x, g)
    (gx_whole,) = torch.autograd.grad(whole, x, g)
    torch.testing.assert_close(gx, gx_whole, rtol=1e-14, atol=1e-14)
    # A rotation keeps the norm of every pair.
    torch.testing.assert_close(chunked.norm(dim=-1), x.detach().norm(dim=-1))


def _offload_against_checkpoint(model, tokens, labels, monkeypatch):
    """(loss, grads) with plain checkpointing, then with host offload, and the offload's chains."""
    chains = []

    class RecordedChain(offload.LayerChain):
        def __init__(self, **kw):
            super().__init__(**kw)
            if self.offload:
                chains.append(self)

    monkeypatch.setattr(transformer, "LayerChain", RecordedChain)
    results = []
    for offload_activations in (False, True):
        model.cfg.offload_activations = offload_activations
        model.zero_grad()
        total, _ = model(tokens, labels)
        total.backward()
        results.append((total.detach(), [p.grad.clone() for p in model.parameters()]))
    return results, chains


def test_offloaded_checkpoint_matches_checkpoint(monkeypatch):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, activation_checkpointing=True,
                      mlp_chunk=16, loss_chunk=32, attention_backend="reference")
    model = Transformer(cfg).double()
    tokens, labels = torch.randint(0, 64, (2, 40)), torch.randint(0, 64, (2, 40))
    ((a, ga), (b, gb)), chains = _offload_against_checkpoint(model, tokens, labels, monkeypatch)
    # The same layers recomputed from the same (host-stored) inputs: identical up to float64 rounding.
    # A layer handed another layer's input (a prefetch of the wrong one) changes gradients at order 1.
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    # One chain for the one offloaded forward; every input but the last layer's (the first the
    # backward takes) was prefetched by the backward of the layer after it.
    assert len(chains) == 1
    assert chains[0].prefetched == cfg.n_layers - 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (side-stream copies to pinned host memory)")
def test_offloaded_checkpoint_matches_checkpoint_on_gpu(monkeypatch):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, activation_checkpointing=True,
                      mlp_chunk=128, loss_chunk=256, attention_backend="reference", fused_elementwise=False)
    model = Transformer(cfg).to("cuda")
    tokens = torch.randint(0, 64, (1, 513), device="cuda")
    labels = torch.randint(0, 64, (1, 513), device="cuda")
    ((a, ga), (b, gb)), chains = _offload_against_checkpoint(model, tokens, labels, monkeypatch)
    assert len(chains) == 1 and chains[0].prefetched == cfg.n_layers - 1
    assert torch.isfinite(b) and all(torch.isfinite(g).all() for g in gb)
    # float32, the same kernels on bit-identical layer inputs: the two runs may differ only where a
    # kernel's summation order is not fixed (atomics in a backward), a few float32 ulps (1.2e-7) per
    # sum; 1e-5 of the largest value bounds that. A copy read before it finished, or the wrong layer's
    # input, changes the loss and gradients at order 1 (or gives NaN from uninitialised memory).
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0.0)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5 * y.abs().max().item())
