"""The command line's small surfaces: --version, config show, pattern show --help, the LR schedule's length."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

import sparse_parallel
from sparse_parallel.launcher.cli import main
from sparse_parallel.patterns.components import COMPONENT_TYPES
from sparse_parallel.training.config import load_config
from sparse_parallel.training.trainer import deepspeed_config

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"sparse-parallel {sparse_parallel.__version__}"


def test_pattern_show_help_lists_every_component_and_key(capsys):
    with pytest.raises(SystemExit):
        main(["pattern", "show", "--help"])
    text = capsys.readouterr().out
    for kind, cls in COMPONENT_TYPES.items():
        assert f"  {kind}: " in text, kind
        for f in dataclasses.fields(cls):
            if f.init:
                assert f.name in text.split(f"  {kind}: ")[1].splitlines()[0], (kind, f.name)


def test_config_show_prints_resolved_config_with_defaults(capsys):
    assert main(["config", "show", str(TINY), "--set", "train.steps=60", "--world-size", "2"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    cfg = load_config(TINY, ["train.steps=60"])
    expected = yaml.safe_load(yaml.safe_dump(cfg.to_dict()))
    expected["deepspeed"]["scheduler"]["params"]["total_num_steps"] = 60   # resolved from train.steps
    assert shown["config"] == expected
    assert shown["config"]["model"]["rope_theta"] == 10000.0          # a default the YAML does not state
    assert shown["derived"]["context_length"] == 128 and shown["derived"]["world_size"] == 2
    assert main(["config", "show", str(TINY), "--set", "train.nope=1"]) == 2


def test_lr_schedule_length_follows_train_steps():
    for steps in (40, 60):
        ds = deepspeed_config(load_config(TINY, [f"train.steps={steps}"]), 1, False)
        assert ds["scheduler"]["params"]["total_num_steps"] == steps
    # an explicit length is kept; one that ends before the run, or a warm-up longer than the schedule,
    # is said (stopping a longer schedule early with train.steps stays possible)
    explicit = ["train.steps=60", "deepspeed.scheduler.params.total_num_steps=80"]
    assert deepspeed_config(load_config(TINY, explicit), 1, False)["scheduler"]["params"]["total_num_steps"] == 80
    assert load_config(TINY, explicit).schedule_warnings() == []
    short = load_config(TINY, ["train.steps=60", "deepspeed.scheduler.params.total_num_steps=40"])
    assert deepspeed_config(short, 1, False)["scheduler"]["params"]["total_num_steps"] == 40
    assert [w.split(":")[0] for w in short.schedule_warnings()] == [
        "deepspeed.scheduler.params.total_num_steps=40 is less than train.steps=60"]
    assert "never reaches its peak" in load_config(TINY, ["deepspeed.scheduler.params={}"]).schedule_warnings()[0]
    with pytest.raises(ValueError, match=r"total_num_steps must be an integer >= 1"):
        load_config(TINY, ["deepspeed.scheduler.params.total_num_steps=0"])


def test_lr_stays_above_its_floor_until_the_last_step():
    """The schedule DeepSpeed builds from the resolved config: no step at the floor before the end."""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    cfg = load_config(TINY, ["train.steps=60"])
    params = deepspeed_config(cfg, 1, False)["scheduler"]["params"]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt, **params)
    lrs = []
    for _ in range(60):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert min(lrs[:55]) > 0.01, lrs
