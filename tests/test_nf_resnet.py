"""NF-ResNets (nfdet.modeling variants "nf_resnet*"): the block and stem against a plain
re-statement of DeepMind's formulation, the fused CPU path, parameter counts, signal
propagation, the detectron2 backbone and configs (compared leaf by leaf with detectron2's model
zoo), pretraining, and the statement of docs/nf_resnet.md on timm's nf_resnet50 keys."""

from __future__ import annotations

import itertools
import json
import math
import re
import runpy

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    CONFIGS,
    NORM_TYPES,
    REPO,
    TOOLS,
    perturb_block_scalars,
    quick_cfg,
    write_flat_shapes,
)
from torch import nn

from nfdet.modeling import NFBlock, ScaledStdConv2d, build_nfnet, fused, get_variant
from nfdet.modeling.signal_propagation import signal_propagation

# docs/reference.md, "NF-ResNets" (DeepMind's nf_resnet.py and base.py).
RELU_GAMMA = 1.7139588594436646
ALPHA = 0.2
DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3), 200: (3, 24, 36, 3)}
WIDTHS = (256, 512, 1024, 2048)
WS_EPS = 1e-4


# ---------------------------------------------------------------------------------------------
# A plain re-statement of DeepMind's NF-ResNet (not nfdet's code)
# ---------------------------------------------------------------------------------------------


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME': output ceil(size / stride), the padding split with the extra after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _ws_conv(x: torch.Tensor, p: dict, name: str, stride: int = 1) -> torch.Tensor:
    """WSConv2D: (w - mean) * gain / sqrt(max(var * fan_in, 1e-4)) over the fan-in, SAME
    padding, bias always added."""
    w = p[f"{name}.weight"]
    fan_in = w[0].numel()
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = ((w - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    w_hat = (w - mean) * p[f"{name}.gain"].reshape(-1, 1, 1, 1) / torch.sqrt(
        torch.clamp(var * fan_in, min=WS_EPS))
    k = w.shape[-1]
    ph, pw = _same_pad(x.shape[-2], k, stride), _same_pad(x.shape[-1], k, stride)
    x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]))
    return F.conv2d(x, w_hat, p[f"{name}.bias"], stride)


def _act(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x) * RELU_GAMMA


def _reference_block(x, p, beta, stride, projection):
    """NFResBlock.__call__: act(x) * beta; shortcut (strided 1x1 on it) or x; 1x1, act, 3x3
    (stride), act, 1x1; * skip_gain; * alpha + shortcut."""
    out = _act(x) * beta
    shortcut = _ws_conv(out, p, "shortcut", stride) if projection else x
    out = _ws_conv(out, p, "conv1")
    out = _ws_conv(_act(out), p, "conv2", stride)
    out = _ws_conv(_act(out), p, "conv3")
    return out * p["skip_gain"] * ALPHA + shortcut


def _reference_max_pool_same(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-2 'SAME' max pool: padded positions never win (as TF ignores them)."""
    ph, pw = _same_pad(x.shape[-2], 3, 2), _same_pad(x.shape[-1], 3, 2)
    x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]), value=float("-inf"))
    patches = x.unfold(2, 3, 2).unfold(3, 3, 2)  # N, C, H', W', 3, 3
    return patches.amax(dim=(-1, -2))


def _expected_betas(depths) -> list[list[float]]:
    """DeepMind's bookkeeping: beta = 1 / expected_std; after a stage's first block the std is
    reset to 1, then every block adds alpha**2 to the variance."""
    betas, std = [], 1.0
    for depth in depths:
        stage = []
        for b in range(depth):
            stage.append(1.0 / std)
            if b == 0:
                std = 1.0
            std = math.sqrt(std**2 + ALPHA**2)
        betas.append(stage)
    return betas


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.named_parameters())


def _nano(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return build_nfnet("nf_resnet_nano", **kwargs)


# ---------------------------------------------------------------------------------------------
# Variant table and architecture
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", sorted(DEPTHS))
def test_variant_table_holds_deepmind_architecture(depth):
    spec = get_variant(f"NF_ResNet{depth}")  # case-insensitive
    assert spec is get_variant(f"nf_resnet{depth}")
    assert spec.depths == DEPTHS[depth] and spec.widths == WIDTHS
    with torch.device("meta"):
        model = build_nfnet(f"nf_resnet{depth}")
    trunk = model.trunk
    assert [len(s) for s in trunk.stages] == list(DEPTHS[depth])
    assert trunk.stem.conv1.kernel_size == (7, 7) and trunk.stem.conv1.stride == (2, 2)
    assert trunk.stem.conv1.out_channels == 64 and trunk.final_conv is None
    assert model.head.fc.in_features == 2048
    betas = _expected_betas(DEPTHS[depth])
    for s, stage in enumerate(trunk.stages):
        for b, block in enumerate(stage):
            width = WIDTHS[s]
            assert block.conv1.out_channels == width // 4  # bottleneck ratio 0.25
            assert block.conv2.groups == 1 and block.conv2.kernel_size == (3, 3)
            assert block.conv2.stride == ((1 if s == 0 else 2, 1 if s == 0 else 2) if b == 0
                                          else (1, 1))
            assert block.conv2b is None and block.se is None and block.pool is None
            assert (block.shortcut is not None) == (b == 0)
            if b == 0:
                assert block.shortcut.stride == block.conv2.stride
            assert block.activation == "relu" and block.act.gamma == RELU_GAMMA
            assert block.beta == pytest.approx(betas[s][b], rel=1e-12)
            assert block.alpha == ALPHA


def test_every_conv_has_a_gain_and_bias_per_output_channel():
    """base.WSConv2D always adds a bias (even the stem's, built with_bias=False) and has a gain
    per output channel: the count of a BatchNorm's weight and bias."""
    model = _nano()
    convs = [m for m in model.modules() if isinstance(m, ScaledStdConv2d)]
    assert convs
    for m in convs:
        assert m.bias is not None and m.bias.numel() == m.out_channels
        assert m.gain.numel() == m.out_channels


# ---------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _bn_resnet_count(depths, num_classes: int = 1000) -> int:
    """Parameters of a torchvision-style bottleneck ResNet (convs without bias, a BatchNorm
    weight + bias after each, the classifier), by formula."""
    total = 3 * 64 * 7 * 7 + 2 * 64  # stem conv + bn1
    in_ch = 64
    for depth, out in zip(depths, WIDTHS):
        mid = out // 4
        for b in range(depth):
            total += in_ch * mid + 2 * mid  # 1x1
            total += 9 * mid * mid + 2 * mid  # 3x3
            total += mid * out + 2 * out  # 1x1
            if b == 0:
                total += in_ch * out + 2 * out  # downsample conv + bn
            in_ch = out
    return total + 2048 * num_classes + num_classes


# torchvision's resnet50/101/152 parameter counts (checked against torchvision below).
TORCHVISION = {50: 25_557_032, 101: 44_549_160, 152: 60_192_808}
# NF-ResNet = the BatchNorm ResNet's count (each WS conv's gain + bias in place of a BN's weight
# + bias) + one scalar skip gain per block.
NF_RESNET_PARAMS = {50: 25_557_048, 101: 44_549_193, 152: 60_192_858, 200: 64_673_898}


@pytest.mark.parametrize("depth", sorted(TORCHVISION))
def test_formula_matches_torchvision(depth):
    import torchvision

    with torch.device("meta"):
        resnet = getattr(torchvision.models, f"resnet{depth}")()
    assert _count(resnet) == TORCHVISION[depth] == _bn_resnet_count(DEPTHS[depth])


@pytest.mark.parametrize("depth", sorted(DEPTHS))
def test_parameter_count(depth):
    with torch.device("meta"):
        model = build_nfnet(f"nf_resnet{depth}", num_classes=1000)
    expected = _bn_resnet_count(DEPTHS[depth]) + sum(DEPTHS[depth])
    assert _count(model) == expected == NF_RESNET_PARAMS[depth]


# ---------------------------------------------------------------------------------------------
# Block and stem against the re-statement
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", [(0, 0), (1, 0), (2, 1)],
                         ids=["stride1_width_change", "stride2_width_change", "identity"])
@pytest.mark.parametrize("size", [(9, 10), (8, 8)], ids=["odd", "even"])
def test_block_matches_reference_forward_and_gradients(where, size):
    model = _nano().double()
    s, b = where
    block = perturb_block_scalars(model.trunk.stages[s][b]).train()
    stride = 2 if (s > 0 and b == 0) else 1
    beta = _expected_betas(get_variant("nf_resnet_nano").depths)[s][b]
    x = torch.randn(2, block.conv1.in_channels, *size, dtype=torch.float64, requires_grad=True)
    params = _params(block)
    out = block(x)
    ref = _reference_block(x, params, beta, stride, projection=b == 0)
    assert out.shape == (2, block.conv3.out_channels, -(-size[0] // stride), -(-size[1] // stride))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    names = ["input", *params]
    grads = torch.autograd.grad(out, [x, *params.values()], g)
    ref_grads = torch.autograd.grad(ref, [x, *params.values()], g)
    for name, a, r in zip(names, grads, ref_grads):
        assert r.abs().sum() > 0, name
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("size", [(32, 32), (33, 35), (30, 31)])
def test_stem_is_same_padded_conv_and_max_pool(size):
    model = _nano().double()
    stem = model.trunk.stem
    with torch.no_grad():
        stem.conv1.gain.uniform_(0.5, 1.5)
        stem.conv1.bias.normal_(0.0, 0.5)
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    out = stem(x)
    ref = _reference_max_pool_same(_ws_conv(x, _params(stem), "conv1", 2))
    quarter = tuple(math.ceil(math.ceil(n / 2) / 2) for n in size)  # SAME: ceil twice
    assert out.shape[-2:] == quarter
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, [x, *stem.parameters()], g),
                    torch.autograd.grad(ref, [x, *stem.parameters()], g)):
        torch.testing.assert_close(a, r)


def test_max_pool_on_even_maps_is_tf_same_not_pytorch_symmetric():
    """On an even size, SAME pads only after (windows start at 0): PyTorch's ceil_mode pooling
    without padding; the symmetric padding=1 pool (timm's) gives other windows."""
    model = _nano()
    conv_out = {}
    model.trunk.stem.conv1.register_forward_hook(lambda m, a, o: conv_out.setdefault("y", o))
    out = model.trunk.stem(torch.randn(1, 3, 16, 16))
    y = conv_out["y"]
    torch.testing.assert_close(out, F.max_pool2d(y, 3, 2, ceil_mode=True))
    assert not torch.allclose(out, F.max_pool2d(y, 3, 2, padding=1))


def test_classifier_head_pools_the_activated_last_stage():
    model = _nano(num_classes=3).eval()
    x = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        last = model.trunk.forward_stages(x)[-1]
        logits = model(x)
    expected = model.head.fc((torch.relu(last) * RELU_GAMMA).mean(dim=(2, 3)))
    torch.testing.assert_close(logits, expected)


def test_stochastic_depth_rates_are_linear_in_the_block_index():
    model = _nano(drop_path_rate=0.1)
    rates = [b.drop_path.rate for stage in model.trunk.stages for b in stage]
    n = len(rates)
    assert rates == pytest.approx([0.1 * i / n for i in range(n)])
    assert all(not b.drop_path.scale_by_keep for stage in model.trunk.stages for b in stage)


# ---------------------------------------------------------------------------------------------
# The fused CPU path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", [(0, 0), (1, 0), (2, 1)],
                         ids=["stride1_width_change", "stride2", "identity"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fused_path_matches_plain_code(where, mode, layout, monkeypatch):
    model = _nano(drop_path_rate=0.9)
    s, b = where
    block = perturb_block_scalars(model.trunk.stages[s][b]).train(mode == "train")
    x = torch.randn(4, block.conv1.in_channels, 9, 10)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    calls = []
    original = fused.block_forward
    monkeypatch.setattr(fused, "block_forward", lambda *a: calls.append(1) or original(*a))

    def run(use_fused):
        xi = x.detach().clone().requires_grad_(mode == "train")
        with fused.enabled(use_fused), torch.set_grad_enabled(mode == "train"):
            torch.manual_seed(5)  # the same stochastic depth draws on both paths
            out = block(xi)
            if mode == "eval":
                return out, []
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
            return out.detach(), torch.autograd.grad(out, [xi, *block.parameters()], g)

    out, grads = run(True)
    assert calls, "the fused path did not run"
    calls.clear()
    ref, ref_grads = run(False)
    assert not calls
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5 * (r.abs().max().item() or 1.0))


def test_fused_model_matches_plain_model_in_eval():
    model = _nano().eval()
    for block in model.modules():
        if isinstance(block, NFBlock):
            perturb_block_scalars(block)
    model.eval()
    x = torch.randn(2, 3, 45, 38)
    with torch.no_grad():
        out = model(x)
        with fused.enabled(False):
            ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Signal propagation
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nf_resnet50_signals():
    torch.manual_seed(0)
    model = build_nfnet("nf_resnet50")
    # 224 px: on small maps SAME zero padding pulls the variance of res5 down.
    return signal_propagation(model, size=224, batch_size=1)


def test_variance_grows_within_a_stage_and_resets_at_each_stage(nf_resnet50_signals):
    """With active branches the stream's variance follows DeepMind's expected_std: ~1 + alpha**2
    after each stage's first block (the strided 1x1 shortcut re-projects act(x) * beta, no pool
    to substitute), + alpha**2 per block after it; the squared channel mean stays small."""
    signals = nf_resnet50_signals
    assert [len([r for r in signals if r.stage == s]) for s in range(4)] == list(DEPTHS[50])
    for r in signals:
        expected = 1.0 + (r.index + 1) * ALPHA**2  # expected_std**2 after block r.index
        assert r.expected_var == pytest.approx(expected)
        assert abs(r.variance - expected) < 0.1, r
        assert r.squared_mean < 0.05, r
        assert 0.7 < r.residual_variance < 1.2, r
    for prev, cur in zip(signals, signals[1:]):
        if cur.index == 0:  # the reset: below the end of the previous stage
            assert cur.variance < prev.variance - 0.05, (prev, cur)
        else:  # growth by ~alpha**2 times the branch variance
            growth = cur.variance - prev.variance
            assert 0 < growth and abs(growth - ALPHA**2 * cur.residual_variance) < 0.02


def test_signal_propagation_tool_runs_nf_resnet(tmp_path, capsys):
    main = runpy.run_path(str(TOOLS / "signal_propagation.py"), run_name="cli")["main"]
    out = tmp_path / "spp.png"
    main(["--variant", "nf_resnet_nano", "--size", "32", "--batch", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert text.startswith("nf_resnet_nano, input 2x3x32x32")
    assert "res5.0" in text and out.stat().st_size > 1000


# ---------------------------------------------------------------------------------------------
# detectron2 backbone
# ---------------------------------------------------------------------------------------------


def test_backbone_features_for_fpn():
    from nfdet.detection import NFNetBackbone

    with torch.device("meta"):
        backbone = NFNetBackbone(get_variant("nf_resnet50"), res5_final_conv=False)
    shapes = backbone.output_shape()
    assert [(shapes[f].channels, shapes[f].stride) for f in ("res2", "res3", "res4", "res5")] == [
        (256, 4), (512, 8), (1024, 16), (2048, 32)]
    nano = NFNetBackbone(get_variant("nf_resnet_nano"), res5_final_conv=False).eval()
    classifier = _nano()
    nano.trunk.load_state_dict(classifier.trunk.state_dict())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = nano(x)
        stages = classifier.eval().trunk.forward_stages(x)
    for name, stage in zip(("res2", "res3", "res4", "res5"), stages):
        torch.testing.assert_close(feats[name], stage)  # res5: the raw last stage
    with pytest.raises(ValueError, match="res5_final_conv"):
        NFNetBackbone(get_variant("nf_resnet_nano"))


def _nf_resnet_quick_cfg(*opts):
    return quick_cfg("MODEL.NFNET.VARIANT", "nf_resnet_nano", "MODEL.NFNET.RES5_FINAL_CONV",
                     False, "MODEL.FPN.NORM", "", "MODEL.ROI_HEADS.NUM_CLASSES", 2, *opts)


def test_res5_final_conv_with_nf_resnet_is_a_named_error():
    from detectron2.modeling import build_model

    with pytest.raises(ValueError, match="MODEL.NFNET.RES5_FINAL_CONV"):
        build_model(_nf_resnet_quick_cfg("MODEL.NFNET.RES5_FINAL_CONV", True))


@pytest.mark.parametrize("freeze_at", [0, 2])
def test_detector_backbone_is_norm_free_and_fully_trained(freeze_at):
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    model = build_model(_nf_resnet_quick_cfg("MODEL.BACKBONE.FREEZE_AT", freeze_at,
                                             "MODEL.MASK_ON", False))
    from detectron2.layers import FrozenBatchNorm2d

    bottom_up = model.backbone.bottom_up
    norms = (*NORM_TYPES, FrozenBatchNorm2d)
    assert not [n for n, m in model.backbone.named_modules() if isinstance(m, norms)]
    assert bottom_up.trunk.final_conv is None and bottom_up.trunk.final_act is None

    def batch():
        inst = Instances((64, 96))
        inst.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 48.0], [50.0, 20.0, 90.0, 60.0]]))
        inst.gt_classes = torch.tensor([0, 1])
        return [{"image": torch.randint(0, 256, (3, 64, 96)).float(), "instances": inst}] * 2

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02)
    model.train()
    for _ in range(2):  # after one step the zero-initialised skip gains have moved
        optimizer.zero_grad()
        with EventStorage(0):
            sum(model(batch()).values()).backward()
        if not _:
            optimizer.step()
    params = dict(bottom_up.named_parameters())
    frozen = {n for n, p in params.items() if not p.requires_grad}
    expected = {n for n in params if n.startswith(("trunk.stem.", "trunk.stages.0."))}
    assert frozen == (expected if freeze_at == 2 else set())
    assert expected  # the stem and res2 exist and hold parameters
    dead = [n for n, p in params.items()
            if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert dead == []
    assert all(params[n].grad is None for n in frozen)


# ---------------------------------------------------------------------------------------------
# Detection configs against detectron2's model zoo
# ---------------------------------------------------------------------------------------------

# (nfdet config, detectron2 model-zoo config it mirrors)
MIRRORS = {
    "nf_resnet50_mask_rcnn_1x.yaml": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
    "nf_resnet50_mask_rcnn_3x.yaml": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
    # detectron2 has no R-101 FPN 1x Mask R-CNN: the R-50 1x schedule.
    "nf_resnet101_mask_rcnn_1x.yaml": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
    "nf_resnet101_mask_rcnn_3x.yaml": "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml",
}
# The only keys allowed to differ: the backbone, its input convention, and AGC (nfdet's key:
# the gradient clipping of the backbone's parameters only, asserted in the test below; the
# FPN and heads keep detectron2's optimizer).
BACKBONE_KEYS = ("MODEL.BACKBONE.NAME", "MODEL.WEIGHTS", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD",
                 "INPUT.FORMAT")
BACKBONE_PREFIXES = ("MODEL.NFNET.", "MODEL.RESNETS.", "SOLVER.AGC.")
SCHEDULE_KEYS = ("SOLVER.IMS_PER_BATCH", "SOLVER.BASE_LR", "SOLVER.STEPS", "SOLVER.MAX_ITER",
                 "SOLVER.WARMUP_ITERS", "SOLVER.WARMUP_FACTOR", "SOLVER.LR_SCHEDULER_NAME",
                 "SOLVER.GAMMA", "SOLVER.MOMENTUM", "SOLVER.WEIGHT_DECAY",
                 "SOLVER.CHECKPOINT_PERIOD", "TEST.EVAL_PERIOD", "INPUT.MIN_SIZE_TRAIN",
                 "INPUT.MAX_SIZE_TRAIN", "INPUT.MIN_SIZE_TEST", "DATASETS.TRAIN", "DATASETS.TEST")


def _leaves(cfg, prefix: str = "") -> dict:
    from fvcore.common.config import CfgNode

    out = {}
    for key, value in cfg.items():
        if isinstance(value, CfgNode):
            out.update(_leaves(value, prefix + key + "."))
        else:
            out[prefix + key] = value
    return out


@pytest.mark.parametrize("name", sorted(MIRRORS))
def test_detection_config_mirrors_detectron2(name):
    from detectron2 import model_zoo

    from nfdet.detection import get_nfdet_cfg

    theirs = get_nfdet_cfg()
    theirs.merge_from_file(model_zoo.get_config_file(MIRRORS[name]))
    ours = get_nfdet_cfg()
    ours.merge_from_file(str(CONFIGS / name))
    a, b = _leaves(theirs), _leaves(ours)
    assert set(a) == set(b)
    differ = {k for k in a if a[k] != b[k]}
    outside = sorted(k for k in differ
                     if k not in BACKBONE_KEYS and not k.startswith(BACKBONE_PREFIXES))
    assert outside == [], [(k, a[k], b[k]) for k in outside]
    assert {"MODEL.BACKBONE.NAME", "MODEL.NFNET.VARIANT", "INPUT.FORMAT"} <= differ
    for key in SCHEDULE_KEYS:
        assert a[key] == b[key], key
    assert b["MODEL.FPN.NORM"] == "" and b["MODEL.MASK_ON"]
    depth = int(re.match(r"nf_resnet(\d+)_", name).group(1))
    assert b["MODEL.NFNET.VARIANT"] == f"nf_resnet{depth}"
    assert b["SOLVER.MAX_ITER"] == (270000 if name.endswith("_3x.yaml") else 90000)
    # AGC, when on, clips the backbone only (detectron2's FPN and heads are never clipped).
    if b["SOLVER.AGC.ENABLED"]:
        assert all(p.startswith(("backbone.bottom_up.", "backbone.trunk."))
                   for p in b["SOLVER.AGC.INCLUDE"])


def test_nf_resnet_detector_loads_a_classifier_checkpoint(tmp_path):
    from detectron2.modeling import build_model
    from helpers import write_classifier_checkpoint

    from nfdet.detection import NFNetCheckpointer

    classifier = _nano(num_classes=4)
    path = write_classifier_checkpoint(tmp_path / "nano.pth", classifier,
                                       variant="nf_resnet_nano", num_classes=4)
    model = build_model(_nf_resnet_quick_cfg())
    NFNetCheckpointer(model).resume_or_load(str(path), resume=False)
    detector = model.state_dict()
    trunk = {k: v for k, v in classifier.state_dict().items() if k.startswith("trunk.")}
    assert {k for k in detector if k.startswith("backbone.bottom_up.")} == {
        "backbone.bottom_up." + k for k in trunk}
    for key, value in trunk.items():
        assert torch.equal(detector["backbone.bottom_up." + key], value), key


@pytest.mark.parametrize("variant", ["nf_resnet_nano", "nf_resnet50", "nano"])
def test_variant_is_inferred_from_a_state_dict(variant):
    from nfdet.checkpoint.formats import fit_to_variant

    torch.manual_seed(0)
    sd = build_nfnet(variant, num_classes=4).state_dict()
    _, found, num_classes = fit_to_variant(sd, None, "test", {})
    assert found == variant and num_classes == 4


# ---------------------------------------------------------------------------------------------
# Pretraining
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", sorted(DEPTHS))
def test_pretrain_config_recipe(depth):
    from nfdet.classification.config import load_pretrain_cfg, scaled_lr
    from nfdet.solver.clipping import resolve_agc_clipping

    cfg = load_pretrain_cfg(f"nf_resnet{depth}_imagenet")
    assert get_variant(cfg.MODEL.NFNET.VARIANT) is get_variant(f"nf_resnet{depth}")
    s = cfg.SOLVER
    assert s.EPOCHS == 90 and s.BASE_LR == 0.1 and s.REFERENCE_BATCH_SIZE == 256
    assert scaled_lr(cfg) == pytest.approx(0.1 * s.IMS_PER_BATCH / 256)
    assert cfg.MODEL.NFNET.DROP_PATH_RATE == 0.1 and s.AGC.ENABLED
    # The clipping lies in the paper's sweep at every batch of its ablation, smaller at larger.
    clippings = []
    for batch in (256, 1024, 4096):
        run = cfg.clone()
        run.SOLVER.IMS_PER_BATCH = batch
        clippings.append(resolve_agc_clipping(run, batch).SOLVER.AGC.CLIPPING)
    assert all(0.01 <= c <= 0.16 for c in clippings) and clippings == sorted(clippings)[::-1]


def test_pretraining_trainer_trains_an_nf_resnet(tmp_path):
    from nfdet.classification import launch_from_args, pretrain_argument_parser

    data = write_flat_shapes(tmp_path / "shapes", {"train": 8}, size=32)
    out = tmp_path / "run"
    launch_from_args(pretrain_argument_parser().parse_args([
        "--config", "nf_resnet50_imagenet.yaml", "MODEL.NFNET.VARIANT", "nf_resnet_nano",
        "MODEL.NUM_CLASSES", "4", "DATA.ROOT", str(data), "DATA.VAL_SPLIT", "",
        "DATA.NUM_WORKERS", "0", "INPUT.TRAIN_SIZE", "32", "INPUT.TEST_SIZE", "32",
        "SOLVER.IMS_PER_BATCH", "8", "SOLVER.EPOCHS", "1", "SOLVER.WARMUP_EPOCHS", "0.5",
        "SOLVER.CHECKPOINT_PERIOD", "0", "LOG.PERIOD", "1", "LOG.PROGRESS_BAR", "False",
        "LOG.TENSORBOARD", "False", "OUTPUT_DIR", str(out)]))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [d["loss"] for d in lines if "loss" in d]
    assert losses and all(math.isfinite(v) for v in losses)
    exported = torch.load(out / "backbone_final.pth", weights_only=True)
    assert exported["model"]["trunk.stem.conv1.weight"].shape == (16, 3, 7, 7)
    assert get_variant(exported["meta"]["variant"]) is get_variant("nf_resnet_nano")


# ---------------------------------------------------------------------------------------------
# timm's nf_resnet50: the key statement of docs/nf_resnet.md
# ---------------------------------------------------------------------------------------------

DOC = REPO / "docs" / "nf_resnet.md"


def _expand(pattern: str) -> list[str]:
    """``a.{x,y}.b`` -> ``["a.x.b", "a.y.b"]``."""
    parts = re.split(r"\{([^}]*)\}", pattern)
    options = [p.split(",") if i % 2 else [p] for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*options)]


def _key_regex(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(r"S\.B", r"\d+\.\d+") + "$")


def _doc_key_table() -> list[tuple[str, str, str]]:
    """(timm pattern, nfdet pattern, shapes) rows of the key table in docs/nf_resnet.md."""
    text = DOC.read_text()
    table = text.split("<!-- timm-keys -->")[1].split("<!-- /timm-keys -->")[0]
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and (cells[0].startswith("`") or cells[0] == "none"):
            rows.append((cells[0].strip("`"), cells[1].strip("`"), cells[2]))
    return rows


def test_timm_key_statement_matches_timm():
    timm = pytest.importorskip("timm", reason="the statement is about timm (test extra)")
    theirs = {k: tuple(v.shape) for k, v in
              timm.create_model("nf_resnet50", pretrained=False).state_dict().items()}
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in build_nfnet("nf_resnet50").state_dict().items()}
    rows = _doc_key_table()
    assert len(rows) >= 5
    covered_theirs, covered_ours = set(), set()
    for timm_pat, nfdet_pat, shapes in rows:
        timm_keys = [] if timm_pat == "none" else _expand(timm_pat)
        nfdet_keys = [] if nfdet_pat == "none" else _expand(nfdet_pat)
        for t in timm_keys:
            matched = {k for k in theirs if _key_regex(t).match(k)}
            assert matched, f"docs: no timm key matches {t}"
            covered_theirs |= matched
        for n in nfdet_keys:
            matched = {k for k in ours if _key_regex(n).match(k)}
            assert matched, f"docs: no nfdet key matches {n}"
            covered_ours |= matched
        if timm_keys and nfdet_keys:
            assert len(timm_keys) == len(nfdet_keys)
            for t, n in zip(timm_keys, nfdet_keys):
                # Same blocks on both sides, and the stated shapes.
                t_re, n_re = _key_regex(t), _key_regex(n)
                t_blocks = {re.search(r"stages\.(\d+\.\d+)\.", k).group(1) if "S.B" in t else ""
                            for k in theirs if t_re.match(k)}
                n_blocks = {re.search(r"stages\.(\d+\.\d+)\.", k).group(1) if "S.B" in n else ""
                            for k in ours if n_re.match(k)}
                assert t_blocks == n_blocks, (t, n)
                if shapes == "equal":
                    for k in theirs:
                        if t_re.match(k):
                            block = re.search(r"stages\.(\d+\.\d+)\.", k)
                            mine = n.replace("S.B", block.group(1)) if block else n
                            assert theirs[k] == ours[mine], (k, mine)
    # Every key of both models is in the statement.
    assert covered_theirs == set(theirs)
    assert covered_ours == set(ours)


def test_timm_differences_stated_in_docs_hold():
    """The functional differences docs/nf_resnet.md lists, read off timm's model."""
    timm = pytest.importorskip("timm", reason="the statement is about timm (test extra)")
    model = timm.create_model("nf_resnet50", pretrained=False)
    assert isinstance(model.stem.pool, nn.MaxPool2d) and model.stem.pool.padding == 1
    assert model.stem.conv.padding == (3, 3)  # symmetric, not SAME
    transition = model.stages[1][0]
    assert isinstance(transition.downsample.pool, nn.AvgPool2d)  # avg pool + 1x1, not strided
    assert transition.downsample.conv.stride == (1, 1)
    assert transition.conv2.padding == (1, 1)  # symmetric on a stride-2 3x3
    assert transition.conv1.eps == 1e-5
    # gamma inside every conv (the stem's too): gamma / sqrt(fan_in).
    assert model.stem.conv.scale == pytest.approx(RELU_GAMMA / math.sqrt(3 * 49))
    assert transition.skipinit_gain is None
    assert torch.count_nonzero(transition.conv3.gain) == 0  # gain 0 stands in for skip_gain
    assert isinstance(model.final_act, nn.ReLU)  # the head pools relu(x), without gamma
    # So nfdet's timm import (dm_nfnet_f* only) refuses it, saying why.
    from nfdet.checkpoint import CheckpointFormatError, convert_timm_state_dict

    with pytest.raises(CheckpointFormatError, match="skipinit_gain"):
        convert_timm_state_dict(model.state_dict())


# ---------------------------------------------------------------------------------------------
# Export (the -inf padded max pool in traced graphs)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "torch_export"])
def test_classifier_exports_match_eager(fmt, tmp_path):
    import warnings

    from helpers import set_skip_gains

    from nfdet.export import export_classifier

    model = _nano(num_classes=4)
    set_skip_gains(model)
    model.eval()
    x = torch.randn(2, 3, 67, 61, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    report = export_classifier(model, x, fmt, str(tmp_path))
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(report.path, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    else:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            exported = (torch.jit.load(report.path) if fmt == "torchscript"
                        else torch.export.load(report.path).module())
            got = exported(x)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
