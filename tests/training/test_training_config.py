"""Config parsing, overrides, the layout they give, and bad inputs refused before any work."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from training_helpers import tiny_config, write_config

from sparse_parallel.patterns import Pattern
from sparse_parallel.training import load_config
from sparse_parallel.training.config import config_from_dict
from sparse_parallel.training.layout import build_layout

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_parse(name):
    """Every value written in a shipped config reaches the parsed config (nothing dropped or renamed),
    the parsed config serialises back to itself, and its layout derives at its own sequence-parallel size."""
    raw = yaml.safe_load((CONFIGS / name).read_text())
    cfg = load_config(CONFIGS / name)
    parsed = cfg.to_dict()

    def same(written, got, where):
        for key, value in written.items():
            assert key in got, f"{name}: {where}{key} is not in the parsed config"
            if key in ("pattern",) or where.endswith("layer_patterns."):
                assert Pattern.from_dict(value) == Pattern.from_dict(got[key]), f"{name}: {where}{key}"
            elif isinstance(value, dict):
                same(value, got[key], f"{where}{key}.")
            else:
                assert got[key] == value, f"{name}: {where}{key} = {got[key]!r}, written {value!r}"

    same(raw, parsed, "")
    assert config_from_dict(parsed) == cfg
    sp = cfg.parallel.sequence_parallel
    world = 1 if sp == "all" else sp
    assert build_layout(cfg, world).sequence_parallel == world


def test_long_context_configs_reach_their_targets():
    one = build_layout(load_config(CONFIGS / "h200_1m.yaml"), 1)
    assert one.context_length >= 1 << 20 and one.sequence_parallel == 1
    eight = build_layout(load_config(CONFIGS / "h200x8_8m.yaml"), 8)
    assert eight.context_length >= 8 << 20 and eight.sequence_parallel == 8


def test_overrides_and_layout(tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(Path("t.model"), tmp_path / "run", tmp_path))
    cfg = load_config(path, ["parallel.sequence_parallel=2", "train.micro_batch=3", "train.grad_accum=2",
                             "model.layer_patterns.0={components: [{type: window, left: 4}]}",
                             "deepspeed.bf16.enabled=true", "model.rope_theta=500000"])
    assert cfg.model.rope_theta == 500000.0 and isinstance(cfg.model.rope_theta, float)
    assert cfg.deepspeed["bf16"] == {"enabled": True}
    assert cfg.model.patterns()[0].components[0].left == 4
    d = build_layout(cfg, 8)
    assert (d.sequence_parallel, d.data_parallel, d.context_length) == (2, 4, 128)
    assert d.global_batch == 3 * 2 * 4 and d.tokens_per_step == d.global_batch * 128
    with pytest.raises(ValueError, match="world size 3 is not a multiple of parallel.sequence_parallel=2"):
        build_layout(cfg, 3)


@pytest.mark.parametrize("data, overrides, match", [
    ({"model": {"dimm": 4}}, [], r"unknown config key model\.dimm"),
    ({"trainer": {}}, [], r"unknown config key trainer"),
    ({}, ["train.stepz=3"], r"unknown config key train\.stepz"),
    ({}, ["train.steps=0"], r"train\.steps must be an integer >= 1"),
    ({}, ["model.n_kv_heads=3"], r"model\.n_heads \(4\) must be a multiple of model\.n_kv_heads"),
    ({}, ["model.attention_backend=flash"], r"model\.attention_backend must be one of"),
    ({}, ["data.format=csv"], r"data\.format must be one of"),
    ({}, ["model.pattern={components: [{type: windoww}]}"], r"model\.pattern: unknown component type"),
    ({}, ["model.layer_patterns.7={components: []}"], r"model\.layer_patterns key must be a layer index"),
    ({}, ["deepspeed.train_batch_size=8"], r"deepspeed\.train_batch_size is set by the trainer"),
    ({}, ["train.steps"], r"override must look like section\.key=value"),
])
def test_bad_config_is_refused_naming_the_field(data, overrides, match):
    base = {"data": {"tokenizer": "t.model"}}
    for k, v in data.items():
        base.setdefault(k, {}).update(v) if isinstance(v, dict) and v else base.__setitem__(k, v)
    with pytest.raises(ValueError, match=match):
        config_from_dict(base, overrides)


def test_config_parsing_has_no_side_effects(tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "missing.model", tmp_path / "run", tmp_path / "c"))
    cfg = load_config(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg


@pytest.fixture
def local_env(monkeypatch):
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "0"), ("DS_ACCELERATOR", "cpu"),
                       ("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("overrides, error, match", [
    (["data.path=/nonexistent/corpus"], FileNotFoundError, r"data\.path: /nonexistent/corpus does not exist"),
    (["model.vocab_size=1000"], ValueError, r"model\.vocab_size=1000 but the tokenizer .* has 512 pieces"),
    (["data.tokenizer=/nonexistent/t.model"], FileNotFoundError, r"data\.tokenizer: /nonexistent/t.model does not exist"),
])
def test_bad_inputs_fail_before_training(tmp_path, tokenizer_path, token_cache, local_env, overrides, error, match):
    from sparse_parallel.training import run

    cfg = write_config(tmp_path / "c.yaml", tiny_config(tokenizer_path, tmp_path / "run", token_cache))
    with pytest.raises(error, match=match):
        run(cfg, overrides)
    assert not (tmp_path / "run").exists()


def test_module_entry_reports_errors_with_exit_code_2(tmp_path, capsys):
    from sparse_parallel.training.__main__ import main

    path = write_config(tmp_path / "c.yaml", {"model": {"widht": 3}})
    assert main([str(path)]) == 2
    assert "unknown config key model.widht" in capsys.readouterr().err
