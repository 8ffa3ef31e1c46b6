"""The fused CPU path (``nfdet.modeling.fused``) against the plain model: same outputs and
gradients for every activation, layout and stride; when it steps aside; hooks; the activation
registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import gained_nano, perturb_block_scalars

from nfdet.modeling import ACTIVATIONS, NFBlock, NFStem, build_nfnet, fused
from nfdet.modeling.activations import get_activation


def _block(activation: str, stride: int, drop_path_rate: float = 0.0) -> NFBlock:
    """A small transition block (shortcut conv, and the average pool when strided) with every
    scalar away from its init: gains, biases, skip gain, beta."""
    torch.manual_seed(0)
    block = NFBlock(16, 32, 16, group_size=8, se_hidden=4, stride=stride, beta=0.8,
                    drop_path_rate=drop_path_rate, activation=activation)
    return perturb_block_scalars(block)


def _input(layout: str, shape=(2, 16, 9, 11)) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _run(block, x, use_fused: bool, seed: int = 2):
    """Output and gradients (input, then every parameter) of a training-mode call."""
    x = x.detach().clone().requires_grad_(True)
    with fused.enabled(use_fused):
        torch.manual_seed(seed)  # the same stochastic depth draws on both paths
        out = block(x)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(out, [x, *block.parameters()], grad_out)
    return out.detach(), grads


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_fused_block_matches_plain_forward_and_gradients(activation, layout, stride,
                                                         monkeypatch):
    block = _block(activation, stride, drop_path_rate=0.5).train()
    x = _input(layout, (4, 16, 9, 11))
    calls = []
    original = fused.block_forward
    monkeypatch.setattr(fused, "block_forward",
                        lambda *args: calls.append(1) or original(*args))
    out, grads = _run(block, x, use_fused=True)
    assert calls, "the fused path did not run"
    calls.clear()
    ref, ref_grads = _run(block, x, use_fused=False)
    assert not calls, "the plain path ran the fused code"
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    names = ["input"] + [n for n, _ in block.named_parameters()]
    for name, a, b in zip(names, grads, ref_grads):
        scale = b.abs().max().item() or 1.0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_fused_block_matches_plain_in_eval(activation, layout, stride):
    """Without autograd: packed weights with the activation as a oneDNN post-op (channels_last),
    reused buffers, the residual written into conv3's output; twice, and at a second size."""
    block = _block(activation, stride).eval()
    for shape in [(2, 16, 9, 11), (2, 16, 9, 11), (1, 16, 12, 8)]:
        x = _input(layout, shape)
        before = x.clone()
        with torch.no_grad():
            out = block(x)
            with fused.enabled(False):
                ref = block(x)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(x, before, rtol=0, atol=0)  # the input is left alone
    if layout == "channels_last" and fused._PACKED_CONV:
        assert block.conv2._derived["packed"].input_shape[0] == 1


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_fused_stem_matches_plain(activation):
    torch.manual_seed(0)
    stem = NFStem(3, (8, 16, 16, 32), activation)
    x = torch.randn(2, 3, 33, 30)
    for mode in ("train", "eval"):
        stem.train(mode == "train")
        with torch.set_grad_enabled(mode == "train"):
            out = stem(x)
            with fused.enabled(False):
                ref = stem(x)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        if mode == "train":
            g = torch.randn_like(out)
            for a, b in zip(torch.autograd.grad(out, list(stem.parameters()), g),
                            torch.autograd.grad(ref, list(stem.parameters()), g)):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("floored", [False, True], ids=["batch_norm", "eps_floor"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_standardization_matches_the_formula(floored, channels_last):
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)
    if floored:
        w[2] *= 1e-4  # var * fan_in below eps
    w.requires_grad_(True)
    gain = torch.rand(6, 1, 1, 1, dtype=torch.float64, requires_grad=True)

    def fast(w, g):
        return fused.standardize_weight_fast(w, g, 36, 1e-4, 1.3, channels_last)

    assert torch.autograd.gradcheck(fast, (w, gain))
    var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
    reference = (w - mean) * torch.rsqrt(torch.clamp(var * 36, min=1e-4)) * gain * 1.3
    torch.testing.assert_close(fast(w, gain), reference)


# ---------------------------------------------------------------------------------------------
# Hooks and buffers
# ---------------------------------------------------------------------------------------------


def test_forward_hook_inputs_are_not_overwritten_by_the_next_call():
    """A hook keeping a conv's input (conv1 reads act(x); a strided conv2 reads a padded
    input) sees the same values after later calls: nothing it holds is a reused buffer."""
    model = gained_nano()
    kept = []

    def keep(_module, inputs, output):
        kept.append((inputs[0], inputs[0].clone(), output, output.clone()))

    block = model.trunk.stages[1][0]
    handles = [block.conv1.register_forward_hook(keep), block.conv2.register_forward_hook(keep),
               model.trunk.stem.conv1.register_forward_hook(keep)]
    with torch.no_grad():
        for size in (64, 64, 48):
            model(torch.randn(2, 3, size, size))
    for h in handles:
        h.remove()
    assert len(kept) == 9
    for inp, inp_then, out, out_then in kept:
        torch.testing.assert_close(inp, inp_then, rtol=0, atol=0)
        torch.testing.assert_close(out, out_then, rtol=0, atol=0)


def test_hooked_modules_take_the_plain_path_with_the_same_outputs():
    model = gained_nano()
    x = torch.randn(2, 3, 45, 37)
    with torch.no_grad():
        want = model(x)
    seen = {}
    block = model.trunk.stages[2][1]
    handle = block.conv2b.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    assert not fused.applies(torch.randn(1, 32, 8, 8), block)
    assert fused.applies(torch.randn(1, 3, 8, 8), model.trunk.stem)  # no hook there
    with torch.no_grad():
        got = model(x)
    handle.remove()
    assert "out" in seen and fused.applies(torch.randn(1, 32, 8, 8), block)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_global_hooks_turn_the_fused_path_off():
    block = _block("gelu", 1)
    x = torch.randn(1, 16, 8, 8)
    assert fused.applies(x, block)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert not fused.applies(x, block)
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------
# When the fused path applies
# ---------------------------------------------------------------------------------------------


def test_applies_only_to_eager_cpu_float32():
    block = _block("gelu", 1)
    x = torch.randn(1, 16, 8, 8)
    assert fused.applies(x, block)
    with fused.enabled(False):
        assert not fused.applies(x, block)
    assert fused.is_enabled()
    assert not fused.applies(x.double(), block)
    assert not fused.applies(x.half(), block)
    assert not fused.applies(x.to(torch.bfloat16), block)
    assert not fused.applies(torch.empty(1, 16, 8, 8, device="meta"), block)
    assert not fused.applies(x[0], block)  # 3-d
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused.applies(x, block)
    assert not fused.applies(x, block.to(torch.float64))


def test_set_enabled_returns_the_previous_setting():
    assert fused.set_enabled(False) is True
    try:
        assert not fused.is_enabled()
    finally:
        assert fused.set_enabled(True) is False


@pytest.fixture
def fused_forbidden(monkeypatch):
    """Make any use of the fused block or stem an error."""
    def forbidden(*args):
        raise AssertionError("the fused path ran under a graph capture")

    monkeypatch.setattr(fused, "block_forward", forbidden)
    monkeypatch.setattr(fused, "stem_forward", forbidden)


def _reference(model, x):
    with torch.no_grad(), fused.enabled(False):
        return model(x)


@pytest.mark.parametrize("capture", ["jit_trace", "fx", "torch_export", "compile"])
def test_graph_captures_run_the_plain_code(capture, fused_forbidden):
    model = gained_nano()
    x = torch.randn(1, 3, 37, 42)
    want = _reference(model, x)
    with torch.no_grad():
        if capture == "jit_trace":
            got = torch.jit.trace(model, (x,), check_trace=False)(x)
        elif capture == "fx":
            got = torch.fx.symbolic_trace(model)(x)
        elif capture == "torch_export":
            got = torch.export.export(model, (x,)).module()(x)
        else:
            got = torch.compile(model, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_scripting_is_refused_with_a_clear_error():
    with pytest.raises(RuntimeError, match="torch.jit.script.*trace the model instead"):
        torch.jit.script(gained_nano())


def test_onnx_export_runs_the_plain_code(tmp_path, fused_forbidden):
    import warnings

    model = gained_nano()
    x = torch.randn(1, 3, 37, 42)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=False)
    assert (tmp_path / "m.onnx").stat().st_size > 0


# ---------------------------------------------------------------------------------------------
# The activation registry
# ---------------------------------------------------------------------------------------------


def test_unknown_activation_raises_naming_it():
    with pytest.raises(ValueError, match="'mish'.*gelu"):
        get_activation("mish")
    with pytest.raises(ValueError, match="'mish'"):
        build_nfnet("nano", activation="mish")
    with pytest.raises(ValueError, match="'swish'"):
        NFBlock(8, 8, 8, group_size=8, se_hidden=2, activation="swish")


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_registry_entries_agree(name):
    """gamma makes the activation variance-preserving on N(0, 1) (sampled here, independently
    of the constant), and the buffer form computes the function."""
    act = ACTIVATIONS[name]
    x = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    variance = (act.fn(x) * act.gamma).var().item()
    assert math.isclose(variance, 1.0, rel_tol=1e-2), variance
    x = x[:1000].float().view(10, 100)
    out = torch.empty_like(x)
    assert act.fn_out(x, out) is out
    torch.testing.assert_close(out, act.fn(x), rtol=0, atol=0)
    expected = {"gelu": F.gelu(x), "gelu_tanh": F.gelu(x, approximate="tanh"),
                "relu": F.relu(x), "silu": F.silu(x)}[name]
    torch.testing.assert_close(act.fn(x), expected, rtol=0, atol=0)
