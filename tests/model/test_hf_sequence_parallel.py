"""A transformers Llama model trained through the attention plug-in: SP=2 (gloo) losses equal SP=1."""
from __future__ import annotations

import pytest
import torch

from dist_utils import run_ranks

pytest.importorskip("transformers", reason="transformers is not installed (pip install 'sparse-parallel[hf]')")

PATTERN = {"components": [{"type": "window", "left": 5}, {"type": "strided", "stride": 4},
                          {"type": "global", "first": 2, "queries": False}]}
N, B, VOCAB = 24, 2, 53


def _worker(rank, world, folder):
    import torch.distributed as dist
    import transformers

    from sparse_parallel import hf
    from sparse_parallel.parallel import SequenceParallel

    hf.register()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation=hf.NAME)
    model.train()
    ctx = SequenceParallel(seq_len=N) if world > 1 else None
    if ctx is not None:
        hf.apply_sequence_parallel(model, ctx)
    start, end = ctx.shard_range(N) if ctx is not None else (0, N)
    data = torch.randint(0, VOCAB, (B, N + 1), generator=torch.Generator().manual_seed(0))
    tokens, labels = data[:, start:end], data[:, start + 1:end + 1]
    positions = torch.arange(start, end)[None].expand(B, -1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(2):
        logits = model(input_ids=tokens, position_ids=positions, use_cache=False).logits
        local = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")
        # the trainer's rule: each rank back-propagates SP x its loss sum / the whole sequences' tokens,
        # and gradients are averaged over the world
        (local * world / (B * N)).backward()
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        opt.zero_grad()
        total = local.detach().reshape(1)
        dist.all_reduce(total)
        losses.append(float(total) / (B * N))
    return losses


def test_hf_model_trains_with_sequence_parallelism_like_one_process(tmp_path):
    from sparse_parallel import hf
    from sparse_parallel.model import Transformer
    from sparse_parallel.training.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, attention_backend="reference",
                      pattern=PATTERN, tie_embeddings=False)
    folder = hf.write_hf_folder(Transformer(cfg), cfg, tmp_path / "m", N)
    one = run_ranks(_worker, 1, tmp_path, args=(str(folder),), timeout=240)[0]
    two = run_ranks(_worker, 2, tmp_path, args=(str(folder),), timeout=240)
    assert two[0] == two[1]
    assert one[1] < one[0]  # it trained
    assert max(abs(a - b) for a, b in zip(one, two[0])) < 1e-5, (one, two[0])
