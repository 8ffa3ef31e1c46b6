"""AGC clipping from the batch size (nfdet.solver.clipping) against its stated formula
clipping(B) = clipping_ref * sqrt(B_ref / B), and its use by the detection trainer."""

from __future__ import annotations

import pytest
import torch

from nfdet.detection import NFNetTrainer, get_nfdet_cfg
from nfdet.solver.clipping import clipping_for_batch, resolve_agc_clipping


@pytest.mark.parametrize("batch,ref_clip,ref_batch", [
    (4096, 0.01, 4096), (1024, 0.01, 4096), (32, 0.01, 4096), (2, 0.01, 4096), (16, 0.02, 256),
    (3, 0.05, 7),
])
def test_formula(batch, ref_clip, ref_batch):
    assert clipping_for_batch(batch, ref_clip, ref_batch) == pytest.approx(
        ref_clip * (ref_batch / batch) ** 0.5, rel=1e-12)


def test_documented_values():
    # The values the docs quote, from 0.01 at batch 4096; the paper's sweep 0.01-0.16 is the
    # rule's range from batch 4096 to 16.
    quoted = {4096: 0.01, 1024: 0.02, 256: 0.04, 32: 0.1131, 16: 0.16, 2: 0.4525}
    for batch, value in quoted.items():
        assert clipping_for_batch(batch) == pytest.approx(value, abs=5e-5)


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_arguments(bad):
    with pytest.raises(ValueError, match="batch_size"):
        clipping_for_batch(bad)
    with pytest.raises(ValueError, match="reference_batch"):
        clipping_for_batch(8, 0.01, bad)


def test_resolve_config():
    cfg = get_nfdet_cfg()
    assert cfg.SOLVER.AGC.REFERENCE_BATCH_SIZE == 0
    assert resolve_agc_clipping(cfg, 2) is cfg  # DeepMind's behaviour: CLIPPING as given
    cfg.SOLVER.AGC.CLIPPING, cfg.SOLVER.AGC.REFERENCE_BATCH_SIZE = 0.02, 1024
    cfg.freeze()
    resolved = resolve_agc_clipping(cfg, 8)
    assert resolved.SOLVER.AGC.CLIPPING == pytest.approx(0.02 * (1024 / 8) ** 0.5)
    assert resolved.is_frozen() and cfg.SOLVER.AGC.CLIPPING == 0.02  # the input is untouched
    assert resolve_agc_clipping(resolved, 8) is resolved  # resolving twice changes nothing
    cfg.defrost()
    cfg.SOLVER.AGC.REFERENCE_BATCH_SIZE = -4
    with pytest.raises(ValueError, match="REFERENCE_BATCH_SIZE"):
        resolve_agc_clipping(cfg, 8)


def test_detection_optimizer_clips_with_the_batch_rule():
    cfg = get_nfdet_cfg()
    cfg.merge_from_list(["SOLVER.IMS_PER_BATCH", "4", "SOLVER.AGC.CLIPPING", "0.01",
                         "SOLVER.AGC.REFERENCE_BATCH_SIZE", "4096"])
    model = torch.nn.Module()
    model.backbone = torch.nn.Module()
    model.backbone.bottom_up = torch.nn.Linear(3, 3)
    optimizer = NFNetTrainer.build_optimizer(cfg, model)
    clipped = [g["agc_clipping"] for g in optimizer.param_groups if g["agc_clipping"]]
    assert clipped and all(c == pytest.approx(0.01 * (4096 / 4) ** 0.5) for c in clipped)
