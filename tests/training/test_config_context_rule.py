"""The context grows with the GPUs when every rank shares one sequence (parallel.sequence_parallel: all)."""
import pytest

from sparse_parallel.training.config import load_config
from sparse_parallel.training.layout import build_layout


@pytest.mark.parametrize("world", [1, 2, 8])
def test_all_ranks_share_the_sequence(world):
    cfg = load_config("configs/h200x8_8m.yaml")
    d = build_layout(cfg, world)
    assert d.sequence_parallel == world and d.data_parallel == 1
    assert d.context_length == cfg.train.tokens_per_gpu * world


def test_fixed_size_keeps_context_and_adds_data_parallel():
    cfg = load_config("configs/tiny.yaml", ["parallel.sequence_parallel=2"])
    d = build_layout(cfg, 4)
    assert (d.sequence_parallel, d.data_parallel, d.context_length) == (2, 2, 2 * cfg.train.tokens_per_gpu)


@pytest.mark.parametrize("value", ["most", 0, True])
def test_bad_rule_names_the_field(value):
    with pytest.raises(ValueError, match="parallel.sequence_parallel"):
        load_config("configs/tiny.yaml", [f"parallel.sequence_parallel={value}"])
