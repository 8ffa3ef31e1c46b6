"""Parameter groups by name, build_optimizer on plain and detectron2 configs, the AGC benchmark."""

from __future__ import annotations

import helpers
import pytest
import torch
from fvcore.common.config import CfgNode as CN
from torch import nn

from nfdet.config import add_agc_config, add_nfnet_config
from nfdet.solver import build_optimizer, build_param_groups, get_agc_stats, with_agc


def _names(model: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _group_of(model: nn.Module, groups: list[dict], name: str) -> dict:
    param = dict(model.named_parameters())[name]
    (group,) = [g for g in groups if any(p is param for p in g["params"])]
    return group


@pytest.fixture(scope="module")
def nano():
    return helpers.nano()


def test_param_groups_by_name(nano):
    groups = build_param_groups(nano, 0.1, 2e-5)
    total = sum(len(g["params"]) for g in groups)
    assert total == len(list(nano.parameters()))
    assert all(g["lr"] == 0.1 and g["agc_eps"] == 1e-3 for g in groups)
    for name, _ in nano.named_parameters():
        g = _group_of(nano, groups, name)
        no_decay = name.endswith("gain") or name.endswith("bias")
        assert g["weight_decay"] == (0.0 if no_decay else 2e-5), name
        assert g["agc_clipping"] == (None if name == "head.fc.weight" else 0.01), name
    for name in ["trunk.stages.0.0.skip_gain", "trunk.stem.conv1.gain", "head.fc.bias"]:
        g = _group_of(nano, groups, name)
        assert g["weight_decay"] == 0.0 and g["agc_clipping"] == 0.01


def test_param_groups_patterns_ddp_prefix_norms_and_sharing():
    class Wrapped(nn.Module):  # what DDP looks like by name: a "module." prefix
        def __init__(self):
            super().__init__()
            self.module = nn.Module()
            self.module.body = nn.Linear(4, 4)
            self.module.norm = nn.LayerNorm(4)
            self.module.head = nn.Module()
            self.module.head.fc = nn.Linear(4, 2)
            self.module.tied = self.module.body  # shared: must appear once
            self.module.frozen = nn.Linear(4, 4)
            self.module.frozen.requires_grad_(False)

    model = Wrapped()
    groups = build_param_groups(model, 0.1, 1e-4, agc_exclude=("head.*", "body.bias"))
    names = [n for g in groups for n in _names(model, g)]
    assert len(names) == len(set(names)) == 6  # tied counted once, frozen left out
    clipped = set().union(*(_names(model, g) for g in groups if g["agc_clipping"]))
    assert clipped == {"module.body.weight", "module.norm.weight", "module.norm.bias"}
    decayed = set().union(*(_names(model, g) for g in groups if g["weight_decay"]))
    assert decayed == {"module.body.weight", "module.head.fc.weight"}  # LayerNorm: no decay
    only_body = build_param_groups(model, 0.1, 1e-4, agc_include=("body.*",), agc_exclude=())
    clipped = set().union(*(_names(model, g) for g in only_body if g["agc_clipping"]))
    assert clipped == {"module.body.weight", "module.body.bias"}
    off = build_param_groups(model, 0.1, 1e-4, agc_clipping=None)
    assert all(g["agc_clipping"] is None for g in off)
    with pytest.raises(ValueError, match="agc_exclude"):
        build_param_groups(model, 0.1, 1e-4, agc_exclude="head.fc.weight")


def _plain_cfg(**solver) -> CN:
    cfg = CN()
    cfg.SOLVER = CN()
    cfg.SOLVER.BASE_LR = 0.2
    cfg.SOLVER.MOMENTUM = 0.9
    cfg.SOLVER.NESTEROV = True
    cfg.SOLVER.WEIGHT_DECAY = 2e-5
    add_agc_config(cfg)
    for k, v in solver.items():
        cfg.SOLVER[k] = v
    return cfg


def test_build_optimizer_plain_cfg(nano):
    cfg = _plain_cfg()
    cfg.SOLVER.AGC.CLIPPING = 0.02
    opt = build_optimizer(cfg, nano)
    assert isinstance(opt, torch.optim.SGD) and type(opt) is with_agc(torch.optim.SGD)
    assert all(g["momentum"] == 0.9 and g["nesterov"] and g["lr"] == 0.2 for g in opt.param_groups)
    assert _group_of(nano, opt.param_groups, "head.fc.weight")["agc_clipping"] is None
    assert _group_of(nano, opt.param_groups, "trunk.stem.conv1.weight")["agc_clipping"] == 0.02
    assert _group_of(nano, opt.param_groups, "trunk.stem.conv1.gain")["weight_decay"] == 0.0
    nano.zero_grad()
    nano(torch.randn(1, 3, 32, 32)).sum().backward()
    opt.step()
    assert 0.0 < get_agc_stats(opt)["agc_clipped_fraction"] <= 1.0

    adamw = build_optimizer(_plain_cfg(OPTIMIZER="AdamW"), nano)
    assert isinstance(adamw, torch.optim.AdamW)
    disabled = _plain_cfg()
    disabled.SOLVER.AGC.ENABLED = False
    plain = build_optimizer(disabled, nano)
    assert type(plain) is torch.optim.SGD
    assert get_agc_stats(plain) == {}
    assert _group_of(nano, plain.param_groups, "trunk.stem.conv1.gain")["weight_decay"] == 0.0


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("OPTIMIZER", "Lion", "SOLVER.OPTIMIZER"),
        ("AGC.CLIPPING", 0.0, "SOLVER.AGC.CLIPPING"),
        ("AGC.EPS", -1.0, "SOLVER.AGC.EPS"),
        ("AGC.EXCLUDE", "head.fc.weight", "SOLVER.AGC.EXCLUDE"),
    ],
)
def test_build_optimizer_bad_values(nano, key, value, match):
    cfg = _plain_cfg()
    node = cfg.SOLVER
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=match):
        build_optimizer(cfg, nano)


def test_build_optimizer_detectron2_cfg(nano):
    get_cfg = pytest.importorskip("detectron2.config").get_cfg
    cfg = get_cfg()
    add_nfnet_config(cfg)
    cfg.SOLVER.BASE_LR = 0.05
    opt = build_optimizer(cfg, nano)
    assert type(opt) is with_agc(torch.optim.SGD)
    assert {g["agc_clipping"] for g in opt.param_groups} == {0.01, None}
    decays = {g["weight_decay"] for g in opt.param_groups}
    assert decays == {cfg.SOLVER.WEIGHT_DECAY, 0.0}

    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    with pytest.raises(ValueError, match="CLIP_GRADIENTS"):
        build_optimizer(cfg, nano)
    # Without AGC, detectron2's own clipping is kept.
    cfg.SOLVER.AGC.ENABLED = False
    opt = build_optimizer(cfg, nano)
    assert isinstance(opt, torch.optim.SGD) and type(opt) is not torch.optim.SGD
    assert get_agc_stats(opt) == {}
