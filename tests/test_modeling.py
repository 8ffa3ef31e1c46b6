"""NFNet model family: variant table, parameter counts, gradients, the eval weight cache,
channels_last and torch.compile."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nfdet.modeling import NFNET_VARIANTS, NFBlock, ScaledStdConv2d, build_nfnet

# Paper (Brock et al. 2021, Table 7 / DeepMind nfnet_params), 1000 classes, in millions.
PAPER_PARAMS_M = {
    "F0": 71.5, "F1": 132.6, "F2": 193.8, "F3": 254.9, "F4": 316.1, "F5": 377.2, "F6": 438.4,
}


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("variant", sorted(PAPER_PARAMS_M))
def test_parameter_count_matches_paper(variant):
    with torch.device("meta"):
        model = build_nfnet(variant, num_classes=1000)
    assert abs(_count(model) / 1e6 - PAPER_PARAMS_M[variant]) < 0.1


@pytest.mark.parametrize("variant", ["F7", "F0+", "F3+", "F7+", "nano"])
def test_other_variants_build(variant):
    with torch.device("meta"):
        model = build_nfnet(variant, num_classes=1000)
    spec = NFNET_VARIANTS[variant]
    assert [len(s) for s in model.trunk.stages] == list(spec.depths)
    assert model.trunk.stage_channels == list(spec.widths)
    assert model.head.fc.in_features == spec.num_features


def test_plus_variants_are_wider():
    with torch.device("meta"):
        plain, plus = build_nfnet("F0"), build_nfnet("F0+")
    assert plus.trunk.stage_channels == [384, 768, 2048, 2048]
    assert plus.head.fc.in_features == 4096
    assert _count(plus) > _count(plain)


def test_unknown_variant_lists_valid_names():
    with pytest.raises(ValueError) as info:
        build_nfnet("F9")
    message = str(info.value)
    assert "F9" in message
    for name in ("F0", "F7", "F0+", "nano"):
        assert name in message


def test_nano_forward_shapes_odd_input():
    model = build_nfnet("nano", num_classes=7).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 67, 61))
        feats = model.forward_features(torch.randn(1, 3, 67, 61))
    assert logits.shape == (2, 7)
    assert feats.shape == (1, NFNET_VARIANTS["nano"].num_features, 3, 2)  # ceil(67/32), ceil(61/32)


def test_betas_follow_deepmind_bookkeeping():
    """beta = 1/expected_std of the block input; the reset to 1 happens *after* a stage's first
    block, so the first block of a later stage divides by the previous stage's accumulated std."""
    model = build_nfnet("F0")
    alpha = 0.2
    var = 1.0
    for stage in model.trunk.stages:
        for b, block in enumerate(stage):
            assert block.beta == pytest.approx(var**-0.5, rel=1e-6)
            var = (1.0 if b == 0 else var) + alpha**2


def _set_skip_gains(model: nn.Module, low: float = 0.2, high: float = 1.0) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NFBlock):
                m.skip_gain.uniform_(low, high)


@pytest.mark.parametrize("variant,size", [("nano", 64), ("F0", 64)])
def test_every_parameter_gets_a_gradient(variant, size):
    torch.manual_seed(0)
    model = build_nfnet(variant, num_classes=10).train()
    x, y = torch.randn(2, 3, size, size), torch.tensor([1, 3])
    if variant == "nano":  # (one backward of F0 is enough for the suite's time budget)
        # At init (skip gains 0) every parameter is still part of the graph.
        nn.functional.cross_entropy(model(x), y).backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing
        skip_grads = [m.skip_gain.grad for m in model.modules() if isinstance(m, NFBlock)]
        assert all(g.abs() > 0 for g in skip_grads)
        model.zero_grad(set_to_none=True)
    # With active branches every gradient carries signal.
    _set_skip_gains(model)
    nn.functional.cross_entropy(model(x), y).backward()
    dead = [
        n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert not dead


# ---------------------------------------------------------------------------------------------
# Eval cache of standardized weights
# ---------------------------------------------------------------------------------------------


def _nano(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_nfnet("nano", num_classes=5)
    _set_skip_gains(model)
    return model.eval()


def _fresh_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Output of a newly built model holding copies of ``model``'s current weights."""
    ref = build_nfnet("nano", num_classes=5)
    ref.load_state_dict({k: v.detach().clone().float() for k, v in model.state_dict().items()})
    ref = ref.to(next(model.parameters()).dtype).eval()
    with torch.no_grad():
        return ref(x)


def _assert_refreshed(model, x, before):
    with torch.no_grad():
        after = model(x)
    expected = _fresh_output(model, x)
    # The change must matter, and the cached path must follow it.
    assert not torch.allclose(before, expected, atol=1e-4)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


def _cached_output(model, x):
    with torch.no_grad():
        model(x)  # fills the cache
        return model(x)  # served from it


def _train_step(model, optimizer, x):
    model.train()
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()
    model.eval()


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, foreach=False),
        lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, foreach=True),
        lambda p: torch.optim.Adam(p, lr=0.05, fused=True),
    ],
    ids=["sgd", "sgd_foreach", "adam_fused"],
)
def test_cache_not_stale_after_optimizer_step(make_opt):
    model, x = _nano(), torch.randn(2, 3, 32, 32)
    before = _cached_output(model, x)
    _train_step(model, make_opt(model.parameters()), x)
    _assert_refreshed(model, x, before)


def test_cache_not_stale_after_step_without_mode_switch():
    """Updating an eval-mode model (e.g. an EMA copy) in place under no_grad."""
    model, x = _nano(), torch.randn(2, 3, 32, 32)
    before = _cached_output(model, x)
    other = _nano(seed=1)
    with torch.no_grad():
        for p, q in zip(model.parameters(), other.parameters()):
            p.mul_(0.5).add_(q, alpha=0.5)
    _assert_refreshed(model, x, before)


def test_cache_not_stale_after_copy_and_gain_update():
    model, x = _nano(), torch.randn(2, 3, 32, 32)
    before = _cached_output(model, x)
    conv = model.trunk.stem.conv2
    with torch.no_grad():
        conv.weight.copy_(torch.randn_like(conv.weight))
    _assert_refreshed(model, x, before)
    before = _cached_output(model, x)
    with torch.no_grad():
        model.trunk.final_conv.gain.mul_(3.0)
    _assert_refreshed(model, x, before)


def test_cache_not_stale_after_load_state_dict():
    model, x = _nano(), torch.randn(2, 3, 32, 32)
    before = _cached_output(model, x)
    model.load_state_dict(_nano(seed=2).state_dict())
    _assert_refreshed(model, x, before)


def test_cache_not_stale_after_dtype_move():
    model, x = _nano(), torch.randn(2, 3, 32, 32)
    _cached_output(model, x)
    model = model.to(torch.float64)
    x64 = x.double()
    with torch.no_grad():
        out = model(x64)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _fresh_output(model, x64), rtol=1e-9, atol=1e-9)


def test_cache_not_stale_after_parameter_replacement():
    model, x = _nano(), torch.randn(2, 3, 32, 32)
    before = _cached_output(model, x)
    conv = model.trunk.stages[0][0].conv1
    conv.weight = nn.Parameter(torch.randn_like(conv.weight))
    _assert_refreshed(model, x, before)


def test_data_writes_are_picked_up_after_eval():
    """``param.data`` writes bypass version counters; ``eval()`` drops the cache (documented)."""
    model, x = _nano(), torch.randn(2, 3, 32, 32)
    before = _cached_output(model, x)
    model.trunk.stem.conv1.weight.data.normal_()
    model.eval()
    _assert_refreshed(model, x, before)


def test_cache_avoids_recomputation(monkeypatch):
    calls = []
    original = ScaledStdConv2d.standardized_weight

    def counting(self):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(ScaledStdConv2d, "standardized_weight", counting)
    model, x = _nano(), torch.randn(1, 3, 32, 32)
    num_convs = sum(isinstance(m, ScaledStdConv2d) for m in model.modules())
    with torch.no_grad():
        model(x)
        assert len(calls) == num_convs
        model(x)
        model(torch.randn(2, 3, 40, 48))
    assert len(calls) == num_convs  # served from the cache
    with torch.inference_mode():
        model(x)
    assert len(calls) == num_convs
    model.train()
    with torch.no_grad():
        model(x)
    assert len(calls) == 2 * num_convs  # training mode always recomputes
    model.eval()
    model(x)  # grad enabled, weights require grad: recompute so gradients flow
    assert len(calls) == 3 * num_convs


def test_cache_from_inference_mode_usable_with_autograd():
    """A cache filled under inference_mode must not leak inference tensors into autograd."""
    model, x = _nano(), torch.randn(1, 3, 32, 32)
    model.requires_grad_(False)
    with torch.inference_mode():
        ref = model(x)
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch.testing.assert_close(out.detach(), ref)


def test_channels_last_matches_contiguous():
    model, x = _nano(), torch.randn(2, 3, 37, 32)
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.to(memory_format=torch.channels_last))
        features = model_cl.forward_features(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert features.is_contiguous(memory_format=torch.channels_last)
    model_cl.train()
    model_cl(x.to(memory_format=torch.channels_last)).sum().backward()
    assert all(p.grad is not None for p in model_cl.parameters())


def test_torch_compile():
    # backend="aot_eager" traces the model through dynamo + AOTAutograd (graph breaks, the cache
    # bypass under compilation, backward) without generating C++: inductor on this 2-core CPU
    # took ~52 s to compile nano, too slow for the suite.
    model, x = _nano(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        out = compiled(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    model.train()
    compiled_train = torch.compile(model, backend="aot_eager")
    compiled_train(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (inductor/Triton)")
def test_torch_compile_inductor_channels_last_cuda():
    model = _nano().cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model)(x)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
