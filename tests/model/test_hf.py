"""Hugging Face interop: export to a Llama-style folder, the attention plug-in, import with model.init_from."""
from __future__ import annotations

import json

import pytest
import torch

from training_helpers import VOCAB, run_ranks, tiny_config, write_config

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install "
                                   "'sparse-parallel[hf]'); the Hugging Face interop tests need it")
pytest.importorskip("safetensors", reason="safetensors is not installed (pip install 'sparse-parallel[hf]')")

from sparse_parallel import hf  # noqa: E402
from sparse_parallel.launcher.cli import main  # noqa: E402
from sparse_parallel.model import Transformer  # noqa: E402
from sparse_parallel.training.config import ModelConfig  # noqa: E402
from sparse_parallel.training.inference import load_run  # noqa: E402

SPARSE = {"components": [{"type": "window", "left": 5}, {"type": "strided", "stride": 4},
                         {"type": "global", "first": 2, "queries": True}]}
DENSE = {"components": [{"type": "window", "left": 1 << 20}]}


def _ours(model, tokens):
    with torch.no_grad():
        return model.hidden(tokens) @ model.output_weight.t()


def _hf(folder, tokens, impl):
    hf.register()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation=impl).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        return model(tokens).logits


def _tiny(pattern, tie=False, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, attention_backend="reference",
                      pattern=pattern, tie_embeddings=tie)
    return Transformer(cfg).eval(), cfg


def test_export_of_a_run_loads_in_transformers_with_equal_logits(straight_run, tmp_path):
    out = tmp_path / "hf"
    assert main(["export", str(straight_run), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    trained = load_run(straight_run)
    # the run's per-layer patterns travel in config.json
    assert config["sparse_layer_patterns"]["1"] == trained.cfg.model.layer_patterns[1]
    assert (out / "tokenizer.model").is_file()
    tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    ours = _ours(trained.model, tokens)
    theirs = _hf(out, tokens, hf.NAME)
    assert (ours - theirs).abs().max().item() < 1e-5
    # the pattern matters here: plain causal attention gives other logits
    assert (ours - _hf(out, tokens, "sdpa")).abs().max().item() > 1e-3


@pytest.mark.parametrize("tie", [False, True])
def test_dense_causal_pattern_equals_sdpa_and_sparse_needs_the_plugin(tmp_path, tie):
    tokens = torch.randint(0, 97, (2, 37), generator=torch.Generator().manual_seed(2))
    model, cfg = _tiny(DENSE, tie)
    hf.write_hf_folder(model, cfg, tmp_path / "dense", 64)
    assert (_ours(model, tokens) - _hf(tmp_path / "dense", tokens, "sdpa")).abs().max().item() < 1e-5
    model, cfg = _tiny(SPARSE, tie)
    hf.write_hf_folder(model, cfg, tmp_path / "sparse", 64)
    assert (_ours(model, tokens) - _hf(tmp_path / "sparse", tokens, hf.NAME)).abs().max().item() < 1e-5


def test_rotary_permutation_is_needed_and_inverts():
    w = torch.randn(4 * 8, 16)
    assert torch.equal(hf.half_to_interleaved(hf.interleaved_to_half(w, 4), 4), w)
    assert not torch.equal(hf.interleaved_to_half(w, 4), w)
    # the permuted rows under rotate_half give the same rotation as the interleaved rows here
    from sparse_parallel.model import apply_rotary, rotary_tables
    from transformers.models.llama.modeling_llama import rotate_half

    x = torch.randn(1, 5, 4, 8)
    cos, sin = rotary_tables(torch.arange(5), 8, 10000.0)
    ours = apply_rotary(x, cos, sin)
    xh = x.reshape(1, 5, 4, 4, 2).transpose(-1, -2).reshape(1, 5, 4, 8)
    c, s = torch.cat([cos, cos], -1)[None, :, None], torch.cat([sin, sin], -1)[None, :, None]
    theirs = xh * c + rotate_half(xh) * s
    assert torch.allclose(theirs, ours.reshape(1, 5, 4, 4, 2).transpose(-1, -2).reshape(1, 5, 4, 8), atol=1e-6)


def test_import_round_trip_and_shape_errors(tmp_path):
    model, cfg = _tiny(SPARSE)
    hf.write_hf_folder(model, cfg, tmp_path / "m", 64)
    back, state = hf.read_hf_folder(tmp_path / "m", ModelConfig())
    assert back.pattern == SPARSE and back.dim == 32
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k
    other = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, init_from=str(tmp_path / "m"))
    with pytest.raises(ValueError, match=r"set model.dim=32 \(config has 64\)"):
        hf.convert.load_init_weights(Transformer(other), other)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.read_hf_folder(tmp_path, ModelConfig())


def test_init_from_first_step_loss_equals_transformers(tmp_path, tokenizer_path, token_cache):
    """Continued pretraining of a dense Hugging Face model: step 1's loss is transformers' loss on that batch."""
    from sparse_parallel.training.data import TokenStream, build_token_cache
    from sparse_parallel.training.config import load_config
    from sparse_parallel.training.tokenizer import Tokenizer

    torch.manual_seed(3)
    lc = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  tie_word_embeddings=False, rms_norm_eps=1e-5)
    src = transformers.LlamaForCausalLM(lc).eval()
    src.save_pretrained(str(tmp_path / "src"))
    cfg_dict = tiny_config(tokenizer_path, tmp_path / "run", token_cache)
    cfg_dict["model"].update(init_from=str(tmp_path / "src"), mlp_hidden=64, tie_embeddings=False,
                             pattern=DENSE, layer_patterns={})
    cfg_dict["train"]["steps"] = 1
    cfg_dict["data"]["eval_sequences"] = 0
    path = write_config(tmp_path / "init.yaml", cfg_dict)
    codes, out = run_ranks(path)
    assert codes == [0], out[-3000:]
    loss = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[0])["loss"]
    cfg = load_config(path)
    stream = TokenStream(build_token_cache(cfg.data, Tokenizer(cfg.data.tokenizer)), 64, 0, cfg.data.seed)
    batch = stream.train_batch(0, 0, 0, 1, 2, 0, 64)
    with torch.no_grad():
        logits = src(batch.tokens).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten()).item()
    assert abs(loss - expected) < 1e-5, (loss, expected)
