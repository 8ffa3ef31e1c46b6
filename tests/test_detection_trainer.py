"""NFNetTrainer pieces: the optimizer's AGC/weight-decay groups on a detector, AGC logging."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from nfdet.detection import AGCStatsHook, NFNetTrainer, get_nfdet_cfg

QUICK = (
    Path(__file__).resolve().parents[1] / "configs" / "quick" / "nfnet_nano_mask_rcnn_instant.yaml"
)


def _cfg():
    cfg = get_nfdet_cfg()
    cfg.merge_from_file(str(QUICK))
    return cfg


def test_optimizer_clips_the_backbone_only():
    cfg = _cfg()
    model = build_model(cfg)
    optimizer = NFNetTrainer.build_optimizer(cfg, model)
    names = {id(p): n for n, p in model.named_parameters()}
    clipped, unclipped = set(), set()
    for group in optimizer.param_groups:
        target = clipped if group["agc_clipping"] is not None else unclipped
        target.update(names[id(p)] for p in group["params"])
        if group["agc_clipping"] is not None:
            # The clipping of the batch: CLIPPING at REFERENCE_BATCH_SIZE, scaled by sqrt.
            assert group["agc_clipping"] == pytest.approx(
                cfg.SOLVER.AGC.CLIPPING
                * (cfg.SOLVER.AGC.REFERENCE_BATCH_SIZE / cfg.SOLVER.IMS_PER_BATCH) ** 0.5)
    # The NF backbone, except its zero-initialised skip gains (docs/small_batch.md).
    assert clipped == {n for n in names.values()
                       if n.startswith("backbone.bottom_up.") and not n.endswith("skip_gain")}
    assert any(n.endswith("skip_gain") for n in unclipped)
    assert "roi_heads.box_predictor.cls_score.weight" in unclipped
    assert "backbone.fpn_lateral2.weight" in unclipped
    assert clipped | unclipped == set(names.values())


def test_agc_stats_hook_writes_the_clipped_fraction():
    cfg = _cfg()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    # Rename-free check: clip every parameter of this toy model.
    cfg.SOLVER.AGC.INCLUDE = ["*"]
    optimizer = NFNetTrainer.build_optimizer(cfg, model)
    model(torch.randn(3, 4)).pow(2).sum().mul(1e3).backward()
    optimizer.step()
    with EventStorage(0) as storage:
        hook = AGCStatsHook()
        hook.trainer = SimpleNamespace(optimizer=optimizer, storage=storage)
        hook.after_step()
        value = storage.latest()["agc_clipped_fraction"][0]
    # A huge gradient on a fresh layer: every unit (4 rows + the bias) is clipped.
    assert value == 1.0
