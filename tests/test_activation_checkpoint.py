"""Activation checkpointing of the NFNet trunk (MODEL.NFNET.ACTIVATION_CHECKPOINT): the same
losses and gradients as without, stochastic depth included (its masks are drawn again in the
recomputation), on the fused CPU path, the plain path and under autocast; it really saves
activations; both trainers' builders pass the key."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from nfdet.modeling import build_nfnet, fused


class _SavedBytes:
    """Bytes of the tensors autograd saves for backward in the outer graph (a checkpointed
    segment saves only its input there)."""

    def __init__(self):
        self.total = 0

    def __enter__(self):
        def pack(t):
            self.total += t.numel() * t.element_size()
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def _step(model, images, labels, seed, context=contextlib.nullcontext):
    """Loss, gradients and saved bytes of one training step from RNG seed ``seed``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with context(), _SavedBytes() as saved:
        loss = F.cross_entropy(model(images), labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, saved.total


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 48, 48, generator=g), torch.randint(0, 5, (8,), generator=g)


def _model(drop_path_rate=0.5):
    torch.manual_seed(0)
    model = build_nfnet("nano", num_classes=5, drop_rate=0.2, drop_path_rate=drop_path_rate)
    with torch.no_grad():  # skip gains away from 0 so that every branch reaches the loss
        for name, p in model.named_parameters():
            if name.endswith("skip_gain"):
                p.fill_(0.5)
    return model.train()


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("mode", ["stage", "block"])
@pytest.mark.parametrize("path", ["fused", "plain", "autocast"])
def test_same_losses_and_gradients(mode, path, data):
    images, labels = data
    model = _model()
    context = _autocast if path == "autocast" else contextlib.nullcontext
    switch = fused.enabled(path == "fused")
    with switch:
        ref_loss, ref_grads, ref_saved = _step(model, images, labels, 7, context)
        model.trunk.activation_checkpoint = mode
        loss, grads, saved = _step(model, images, labels, 7, context)
    # The stochastic-depth draws matter (another seed, another loss) ...
    model.trunk.activation_checkpoint = ""
    with fused.enabled(path == "fused"):
        other_loss, _, _ = _step(model, images, labels, 8, context)
    assert not torch.equal(other_loss, ref_loss)
    # ... and the recomputation replays them: same loss and gradients.
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    # Checkpointing took place: the outer graph keeps far fewer activations.
    assert saved < 0.5 * ref_saved, (saved, ref_saved)


def test_block_mode_saves_less_than_stage_mode(data):
    images, labels = data
    model = _model()
    saved = {}
    for mode in ("", "stage", "block"):
        model.trunk.activation_checkpoint = mode
        saved[mode] = _step(model, images, labels, 1)[2]
    assert saved["block"] > saved["stage"]  # more segment inputs kept ...
    assert saved["stage"] < saved[""]


def test_off_in_eval_and_without_grad(data):
    images, _ = data
    model = _model().eval()
    model.trunk.activation_checkpoint = "block"
    assert not model.trunk._checkpointing(images)
    model.train()
    assert model.trunk._checkpointing(images)
    with torch.no_grad():
        assert not model.trunk._checkpointing(images)


def test_invalid_mode_is_refused():
    with pytest.raises(ValueError, match="activation_checkpoint must be one of"):
        build_nfnet("nano", activation_checkpoint="layer")


def test_detection_backbone_same_gradients_and_config_key():
    from detectron2.layers import ShapeSpec

    from nfdet.config import ConfigError, check_nfnet_config
    from nfdet.detection import get_nfdet_cfg
    from nfdet.detection.backbone import build_nfnet_fpn_backbone

    cfg = get_nfdet_cfg()
    cfg.MODEL.NFNET.VARIANT = "nano"
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.NFNET.DROP_PATH_RATE = 0.5
    cfg.MODEL.BACKBONE.FREEZE_AT = 2  # frozen stem and res2: segments without gradients
    cfg.MODEL.NFNET.ACTIVATION_CHECKPOINT = "block"
    torch.manual_seed(0)
    fpn = build_nfnet_fpn_backbone(cfg, ShapeSpec(channels=3)).train()
    trunk = fpn.bottom_up.trunk
    assert trunk.activation_checkpoint == "block"
    with torch.no_grad():
        for name, p in trunk.named_parameters():
            if name.endswith("skip_gain"):
                p.fill_(0.5)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    results = []
    for mode in ("", "block", "stage"):
        trunk.activation_checkpoint = mode
        fpn.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        loss = sum((f.float() ** 2).mean() for f in fpn(x).values())
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in fpn.named_parameters()
                                        if p.grad is not None}))
    (ref_loss, ref_grads), *others = results
    assert "bottom_up.trunk.stem.conv1.weight" not in ref_grads  # frozen
    for loss, grads in others:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)

    cfg.MODEL.NFNET.ACTIVATION_CHECKPOINT = "stages"
    with pytest.raises(ConfigError, match="MODEL.NFNET.ACTIVATION_CHECKPOINT"):
        check_nfnet_config(cfg)


def test_pretraining_builder_passes_the_key():
    from nfdet.classification.config import load_pretrain_cfg
    from nfdet.classification.engine import build_pretrain_model

    cfg = load_pretrain_cfg("nfnet_nano_shapes.yaml",
                            ["MODEL.NFNET.ACTIVATION_CHECKPOINT", "stage"])
    assert build_pretrain_model(cfg).trunk.activation_checkpoint == "stage"


def test_detection_benchmark_option(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, "tools/benchmark.py", "detection", "--configs",
         "quick/nfnet_nano_mask_rcnn_instant.yaml", "--activation-checkpoint", "off,block",
         "--smoke", "--threads", "1", "--json", str(out)],
        cwd=repo, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["config"] for r in rows] == [
        "quick/nfnet_nano_mask_rcnn_instant.yaml [checkpoint off]",
        "quick/nfnet_nano_mask_rcnn_instant.yaml [checkpoint block]",
    ]
    assert all(r["train_peak_memory_mb"] > 0 and r["train_iter_s"] > 0 for r in rows)
