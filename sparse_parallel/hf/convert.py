"""Our model's weights and config <-> a Hugging Face Llama-style folder (config.json + safetensors).

The model here is a Llama-style decoder already (RMSNorm, SwiGLU, GQA, rotary); two things differ:

* names: ``layers.0.attn.wq.weight`` here is ``model.layers.0.self_attn.q_proj.weight`` there;
* rotary: here each head rotates the interleaved pairs ``(x[2i], x[2i+1])``, Llama's ``rotate_half``
  rotates ``(x[i], x[i + D/2])``.  Both rotate pair i by the same angle, so permuting the output rows
  of ``wq`` and ``wk`` within each head (even rows first, then odd rows) turns one into the other;
  attention scores are unchanged because q and k are permuted alike, and v/o are untouched.

The attention pattern of every layer travels in ``config.json`` (``sparse_pattern``,
``sparse_layer_patterns``), where the attention plug-in (:mod:`.attention`) reads it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import torch

#: our parameter name (inside a layer) -> the Llama name
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
WEIGHTS = "model.safetensors"


def interleaved_to_half(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection ``[heads * D, dim]``: interleaved-pair order -> rotate_half order."""
    d = w.shape[0] // heads
    return w.reshape(heads, d // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def half_to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`interleaved_to_half`."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, -1).transpose(1, 2).reshape(w.shape)


def to_hf_state_dict(state: dict, model_cfg) -> dict:
    """Our ``Transformer.state_dict()`` -> Llama names and rotary order (contiguous tensors)."""
    out = {}
    for name, t in state.items():
        if name in _TOP_NAMES:
            out[_TOP_NAMES[name]] = t
            continue
        _, index, rest = name.split(".", 2)
        if rest not in _LAYER_NAMES:
            raise ValueError(f"no Llama name for parameter {name}")
        if rest == "attn.wq.weight":
            t = interleaved_to_half(t, model_cfg.n_heads)
        elif rest == "attn.wk.weight":
            t = interleaved_to_half(t, model_cfg.n_kv_heads)
        out[f"model.layers.{index}.{_LAYER_NAMES[rest]}"] = t
    if model_cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf_state_dict(state: dict, model_cfg) -> dict:
    """Llama names and rotary order -> our ``Transformer`` state dict (the inverse of the above)."""
    top = {v: k for k, v in _TOP_NAMES.items()}
    layer = {v: k for k, v in _LAYER_NAMES.items()}
    out = {}
    for name, t in state.items():
        if name in top:
            if name == "lm_head.weight" and model_cfg.tie_embeddings:
                continue
            out[top[name]] = t
            continue
        parts = name.split(".", 3)
        if len(parts) != 4 or parts[:2] != ["model", "layers"] or parts[3] not in layer:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raise ValueError(f"weight {name} has no counterpart in this model (a Llama-style model is expected)")
        ours = layer[parts[3]]
        if ours == "attn.wq.weight":
            t = half_to_interleaved(t, model_cfg.n_heads)
        elif ours == "attn.wk.weight":
            t = half_to_interleaved(t, model_cfg.n_kv_heads)
        out[f"layers.{parts[2]}.{ours}"] = t
    return out


def hf_config(model_cfg, context_length: int, bos_id: int | None = None, eos_id: int | None = None):
    """A ``transformers.LlamaConfig`` of the same shape, with the layer patterns in it."""
    from transformers import LlamaConfig

    from ..model import mlp_hidden

    c = model_cfg
    return LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=mlp_hidden(c.dim, c.mlp_hidden),
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
        head_dim=c.dim // c.n_heads, hidden_act="silu", rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(c.rope_theta)},
        max_position_embeddings=context_length, tie_word_embeddings=c.tie_embeddings,
        attention_bias=False, mlp_bias=False, bos_token_id=bos_id, eos_token_id=eos_id,
        dtype="float32", architectures=["LlamaForCausalLM"],
        sparse_pattern=c.pattern, sparse_layer_patterns={str(k): v for k, v in c.layer_patterns.items()},
        sparse_backend=c.attention_backend)


def model_config_from_hf(config: dict, base):
    """Our ``ModelConfig`` for a Llama-style ``config.json`` dict; fields it does not state come from ``base``.

    Without ``sparse_pattern`` the layers keep ``base``'s pattern (continued pretraining of a dense
    model under a sparse pattern is the point of importing one).
    """
    if config.get("model_type") != "llama" and "LlamaForCausalLM" not in (config.get("architectures") or []):
        raise ValueError(f"model.init_from: a Llama-style model is expected, config.json says model_type="
                         f"{config.get('model_type')!r}")
    for key, allowed in (("hidden_act", ("silu",)), ("attention_bias", (False, None)), ("mlp_bias", (False, None))):
        if config.get(key) not in allowed:
            raise ValueError(f"model.init_from: config.json {key}={config.get(key)!r} is not supported "
                             f"(allowed: {list(allowed)})")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"model.init_from: rope_type={rope.get('rope_type')!r} is not supported (allowed: ['default'])")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    dim, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, dim // heads):
        raise ValueError(f"model.init_from: head_dim={config['head_dim']} must be hidden_size / num_attention_heads "
                         f"= {dim // heads}")
    values = asdict(base)
    values.update(vocab_size=config["vocab_size"], dim=dim, n_layers=config["num_hidden_layers"], n_heads=heads,
                  n_kv_heads=config.get("num_key_value_heads") or heads, mlp_hidden=config["intermediate_size"],
                  rope_theta=float(theta), norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                  tie_embeddings=bool(config.get("tie_word_embeddings", False)))
    if "sparse_pattern" in config:
        values["pattern"] = config["sparse_pattern"]
        values["layer_patterns"] = {int(k): v for k, v in (config.get("sparse_layer_patterns") or {}).items()}
    cfg = type(base)(**{f.name: values[f.name] for f in fields(base)})
    cfg.validate()
    return cfg


def read_hf_folder(folder, base) -> tuple[object, dict]:
    """(our ModelConfig, our state dict) of a Hugging Face folder holding config.json and safetensors."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"model.init_from: {folder} has no config.json (a Hugging Face model folder "
                                "is expected)")
    model_cfg = model_config_from_hf(json.loads(cfg_path.read_text()), base)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model.init_from: {folder} has no *.safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return model_cfg, from_hf_state_dict(state, model_cfg)


def write_hf_folder(model, model_cfg, out, context_length: int, tokenizer=None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ the tokenizer file) of ``model`` into ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bos = eos = None
    if tokenizer is not None:
        eos = tokenizer.eos_id
        bos = getattr(tokenizer, "bos_id", None)
    config = hf_config(model_cfg, context_length, bos, eos)
    config.save_pretrained(str(out))
    state = {k: v.float().cpu() for k, v in model.state_dict().items()}
    save_file(to_hf_state_dict(state, model_cfg), str(out / WEIGHTS), metadata={"format": "pt"})
    if tokenizer is not None:
        import shutil

        # the names transformers' tokenizer classes look for
        name = "tokenizer.json" if tokenizer.path.suffix == ".json" else "tokenizer.model"
        shutil.copyfile(tokenizer.path, out / name)
    return out


#: fields of our ModelConfig that a Hugging Face folder fixes (the rest are training choices)
SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden", "rope_theta", "norm_eps",
                "tie_embeddings")


def load_init_weights(model, model_cfg) -> None:
    """Copy the weights of ``model_cfg.init_from`` into ``model`` (our Transformer of ``model_cfg``).

    The folder's shape must equal the config's: a mismatch names each field and the folder's value.
    """
    from ..model import mlp_hidden

    theirs, state = read_hf_folder(model_cfg.init_from, model_cfg)
    ours = {k: getattr(model_cfg, k) for k in SHAPE_FIELDS}
    ours["mlp_hidden"] = mlp_hidden(model_cfg.dim, model_cfg.mlp_hidden)
    diff = [k for k in SHAPE_FIELDS if getattr(theirs, k) != ours[k]]
    if diff:
        raise ValueError(f"model.init_from={model_cfg.init_from}: the folder's model differs from the config: "
                         + ", ".join(f"set model.{k}={getattr(theirs, k)!r} (config has {ours[k]!r})" for k in diff))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"model.init_from={model_cfg.init_from}: weights missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
