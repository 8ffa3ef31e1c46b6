"""nfdet.solver.stats (per-stage training statistics) and their logging by the detection trainer.

References are computed here from the definitions: ||G|| / ||W|| over a stage's weight tensors,
AGC's test ||G_i|| > clipping * max(||W_i||, eps) on DeepMind's units, mean |skip gain|, the RMS
of a stage's output from a separate forward pass.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import quick_cfg

from nfdet.modeling import build_nfnet
from nfdet.solver.agc import with_agc
from nfdet.solver.build import build_param_groups
from nfdet.solver.stats import TrainingStats, param_group_name

CLIPPING, EPS = 0.01, 1e-3


def test_param_group_names():
    cases = {
        "backbone.bottom_up.trunk.stem.conv1.weight": "stem",
        "backbone.bottom_up.trunk.stages.0.1.conv2.gain": "res2",
        "module.trunk.stages.3.0.skip_gain": "res5",
        "trunk.final_conv.weight": "final_conv",
        "head.fc.weight": "head",
        "backbone.bottom_up.stem.conv1.weight": "stem",  # detectron2 ResNet
        "backbone.bottom_up.res4.2.conv3.norm.weight": "res4",
        "backbone.fpn_lateral3.weight": "fpn",
        "backbone.fpn_output5.norm.bias": "fpn",
        "proposal_generator.rpn_head.conv.weight": "rpn",
        "roi_heads.box_head.fc1.weight": "box_head",
        "roi_heads.box_predictor.cls_score.weight": "box_head",
        "roi_heads.mask_head.mask_fcn1.weight": "mask_head",
        "something.else": "other",
    }
    assert {name: param_group_name(name) for name in cases} == cases


def _units(t: torch.Tensor) -> torch.Tensor:
    # DeepMind: squeezed rank <= 1 is one unit, otherwise one unit per slice of dim 0.
    squeezed = t.squeeze()
    return t.reshape(1, -1) if squeezed.dim() <= 1 else t.reshape(t.shape[0], -1)


def test_gradient_stats_follow_their_definitions():
    torch.manual_seed(0)
    model = build_nfnet("nano", num_classes=3)
    # Skip gains away from 0 so that the mean |skip gain| is not trivially 0.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("skip_gain"):
                p.fill_(-0.25 if "stages.1" in name else 0.5)
    groups = build_param_groups(model, 0.1, 1e-5, agc_clipping=CLIPPING, agc_eps=EPS)
    optimizer = with_agc(torch.optim.SGD)(groups, lr=0.1, momentum=0.9)
    stats = TrainingStats(model, optimizer)
    seen = {}

    def snapshot(opt, args, kwargs):  # registered after TrainingStats' hook: same gradients
        seen.update({n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()
                     if p.grad is not None})
    optimizer.register_step_pre_hook(snapshot)

    x = torch.randn(2, 3, 64, 64)
    stats.before_step(log=True)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 2]))
    loss.backward()
    optimizer.step()
    result = stats.after_step()

    stage = [(n, w, g) for n, (w, g) in seen.items() if n.startswith("trunk.stages.1.")]
    weights = [(w, g) for n, w, g in stage if w.dim() >= 2 and not n.endswith("gain")]
    expected = math.sqrt(sum(float(g.norm()) ** 2 for _, g in weights)
                         / sum(float(w.norm()) ** 2 for w, _ in weights))
    assert result["grad_ratio/res3"] == pytest.approx(expected, rel=1e-4)
    # After clipping: each unit's norm capped at clipping * max(||W_i||, eps).
    capped = 0.0
    for w, g in weights:
        wn, gn = _units(w).norm(dim=1), _units(g).norm(dim=1)
        capped += float(torch.minimum(gn, CLIPPING * wn.clamp_min(EPS)).pow(2).sum())
    assert result["clipped_ratio/res3"] == pytest.approx(
        math.sqrt(capped / sum(float(w.norm()) ** 2 for w, _ in weights)), rel=1e-4)
    assert result["clipped_ratio/res3"] <= result["grad_ratio/res3"]

    def clipped_fraction(items):
        hits = units = 0
        for w, g in items:
            wn, gn = _units(w).norm(dim=1), _units(g).norm(dim=1)
            hits += int((gn > CLIPPING * wn.clamp_min(EPS)).sum())
            units += wn.numel()
        return hits / units

    stage_params = [(w, g) for n, w, g in stage if not n.endswith("gain")]
    assert result["agc_clipped/res3"] == pytest.approx(clipped_fraction(stage_params))
    gains = [(w, g) for n, (w, g) in seen.items()
             if n.endswith("gain") and not n.endswith("skip_gain")]
    assert result["agc_clipped/gains"] == pytest.approx(clipped_fraction(gains))
    assert result["skip_gain/res3"] == pytest.approx(0.25)
    assert result["skip_gain/res2"] == pytest.approx(0.5)
    # The classifier weight is not clipped (AGC's exclusion): only its bias counts in "head".
    head_bias = [(w, g) for n, (w, g) in seen.items() if n == "head.fc.bias"]
    assert result["agc_clipped/head"] == pytest.approx(clipped_fraction(head_bias))


def test_stage_output_rms_only_when_armed():
    torch.manual_seed(1)
    model = build_nfnet("nano", num_classes=3)
    optimizer = with_agc(torch.optim.SGD)(model.parameters(), lr=0.0, agc_clipping=None)
    stats = TrainingStats(model, optimizer)
    x = torch.randn(2, 3, 64, 64)
    stats.before_step(log=False)
    model(x).sum().backward()
    optimizer.step()
    assert stats.after_step() == {}

    stats.before_step(log=True)
    model(x).sum().backward()
    optimizer.step()
    result = stats.after_step()
    stats.close()
    with torch.no_grad():
        outs = model.trunk.forward_stages(x)
    for name, out in zip(("res2", "res3", "res4", "res5"), outs):
        assert result[f"out_rms/{name}"] == pytest.approx(float(out.pow(2).mean().sqrt()),
                                                          rel=1e-4)
    # No AGC group: ratios are reported, clipped fractions are not.
    assert "grad_ratio/res2" in result and not any(k.startswith("agc_clipped") for k in result)
    # close() removed the hooks: nothing is recorded any more.
    stats.before_step(log=True)
    model(x).sum().backward()
    optimizer.step()
    assert stats.after_step() == {}


def test_detection_trainer_logs_the_statistics(tiny_coco, tmp_path):
    from detectron2.data import DatasetCatalog

    from nfdet.detection import NFNetTrainer
    from nfdet.detection.cli import register_coco_datasets

    json_path, image_dir = tiny_coco
    name = f"stats_tiny_{tmp_path.name}"
    register_coco_datasets([(name, str(json_path), str(image_dir))])
    try:
        cfg = quick_cfg(
            "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()",
            "MODEL.ROI_HEADS.NUM_CLASSES", "2", "SOLVER.MAX_ITER", "4",
            # metrics.json is written before each checkpoint (every 2 iterations) and at the end.
            "SOLVER.STATS_PERIOD", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
            "OUTPUT_DIR", str(tmp_path / "out"), "SEED", "0",
        )
        trainer = NFNetTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
    finally:
        DatasetCatalog.remove(name)
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.json").read_text()
            .splitlines()]
    # Logged at iterations 1 and 3 ((it + 1) % 2 == 0), next to the losses.
    logged = {row["iteration"]: row for row in rows if "grad_ratio/res2" in row}
    assert sorted(logged) == [1, 3]
    for it, row in logged.items():
        assert "total_loss" in row
        # The detection default leaves skip gains out of AGC: no clipped share is logged for them.
        assert "agc_clipped/skip_gains" not in row
        for key in ("grad_ratio/res2", "clipped_ratio/res5", "agc_clipped/res3",
                    "agc_clipped/gains", "skip_gain/res4",
                    "out_rms/res2", "out_rms/p2", "grad_ratio/fpn", "grad_ratio/mask_head"):
            assert key in row and math.isfinite(row[key]), (it, key)
