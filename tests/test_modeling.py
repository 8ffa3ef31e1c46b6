"""NFNet model family: variant table, parameter counts, gradients, the eval weight cache,
channels_last and torch.compile."""

from __future__ import annotations

import pytest
import torch
from helpers import gained_nano, perturb_block_scalars, set_skip_gains
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


@pytest.mark.parametrize("variant", [v for v in NFNET_VARIANTS if v not in PAPER_PARAMS_M])
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
    for name in NFNET_VARIANTS:
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
    set_skip_gains(model)
    nn.functional.cross_entropy(model(x), y).backward()
    dead = [
        n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert not dead


# ---------------------------------------------------------------------------------------------
# Eval cache of standardized weights
# ---------------------------------------------------------------------------------------------


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
    model, x = gained_nano(), torch.randn(2, 3, 32, 32)
    before = _cached_output(model, x)
    _train_step(model, make_opt(model.parameters()), x)
    _assert_refreshed(model, x, before)


def test_cache_not_stale_after_step_without_mode_switch():
    """Updating an eval-mode model (e.g. an EMA copy) in place under no_grad."""
    model, x = gained_nano(), torch.randn(2, 3, 32, 32)
    before = _cached_output(model, x)
    other = gained_nano(seed=1)
    with torch.no_grad():
        for p, q in zip(model.parameters(), other.parameters()):
            p.mul_(0.5).add_(q, alpha=0.5)
    _assert_refreshed(model, x, before)


def test_cache_not_stale_after_copy_and_gain_update():
    model, x = gained_nano(), torch.randn(2, 3, 32, 32)
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
    model, x = gained_nano(), torch.randn(2, 3, 32, 32)
    before = _cached_output(model, x)
    model.load_state_dict(gained_nano(seed=2).state_dict())
    _assert_refreshed(model, x, before)


def test_cache_not_stale_after_dtype_move():
    model, x = gained_nano(), torch.randn(2, 3, 32, 32)
    _cached_output(model, x)
    model = model.to(torch.float64)
    x64 = x.double()
    with torch.no_grad():
        out = model(x64)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _fresh_output(model, x64), rtol=1e-9, atol=1e-9)


def test_cache_not_stale_after_parameter_replacement():
    model, x = gained_nano(), torch.randn(2, 3, 32, 32)
    before = _cached_output(model, x)
    conv = model.trunk.stages[0][0].conv1
    conv.weight = nn.Parameter(torch.randn_like(conv.weight))
    _assert_refreshed(model, x, before)


def test_data_writes_are_picked_up_after_eval():
    """``param.data`` writes bypass version counters; ``eval()`` drops the cache (documented)."""
    model, x = gained_nano(), torch.randn(2, 3, 32, 32)
    before = _cached_output(model, x)
    model.trunk.stem.conv1.weight.data.normal_()
    model.eval()
    _assert_refreshed(model, x, before)


def test_cache_avoids_recomputation(monkeypatch):
    calls = []
    original = ScaledStdConv2d.standardized_weight

    def counting(self, *args):
        calls.append(self)
        return original(self, *args)

    monkeypatch.setattr(ScaledStdConv2d, "standardized_weight", counting)
    model, x = gained_nano(), torch.randn(1, 3, 32, 32)
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
    model, x = gained_nano(), torch.randn(1, 3, 32, 32)
    model.requires_grad_(False)
    with torch.inference_mode():
        ref = model(x)
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch.testing.assert_close(out.detach(), ref)


def test_channels_last_matches_contiguous():
    model, x = gained_nano(), torch.randn(2, 3, 37, 32)
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


@pytest.mark.slow  # dynamo tracing: 735 s in one `make test` run on the loaded 2-core machine
def test_torch_compile():
    # backend="aot_eager" traces the model through dynamo + AOTAutograd (graph breaks, the cache
    # bypass under compilation, backward) without generating C++: inductor on this 2-core CPU
    # took ~52 s to compile nano, too slow for the suite.
    model, x = gained_nano(), torch.randn(2, 3, 32, 32)
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
    model = gained_nano().cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model)(x)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Fast paths: folded gains, the standardization's backward, packed eval convolutions, layout
# ---------------------------------------------------------------------------------------------


def _reference_block_forward(block: NFBlock, x: torch.Tensor) -> torch.Tensor:
    """The NF block written out with every scalar applied explicitly (nothing folded)."""
    import torch.nn.functional as F

    from nfdet.modeling.layers import ACTIVATION_GAMMA

    gamma = ACTIVATION_GAMMA[block.activation]

    def conv(m: ScaledStdConv2d, h: torch.Tensor) -> torch.Tensor:
        w = m.weight
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
        w_hat = (w - mean) * torch.rsqrt(torch.clamp(var * m.fan_in, min=m.eps)) * m.gain
        k, s = m.kernel_size[0], m.stride[0]
        if s == 1:
            return F.conv2d(h, w_hat, m.bias, 1, (k - 1) // 2, 1, m.groups)
        from nfdet.modeling.layers import same_padding

        ph, pw = same_padding(h.shape[-2], k, s), same_padding(h.shape[-1], k, s)
        h = F.pad(h, (pw[0], pw[1], ph[0], ph[1]))
        return F.conv2d(h, w_hat, m.bias, s, 0, 1, m.groups)

    def act(h):
        return F.gelu(h) * gamma

    out = act(x) * block.beta
    shortcut = x
    if block.shortcut is not None:
        shortcut = conv(block.shortcut, block.pool(out) if block.pool is not None else out)
    out = conv(block.conv1, out)
    out = conv(block.conv2, act(out))
    out = conv(block.conv2b, act(out))
    out = conv(block.conv3, act(out))
    out = out * (2.0 * block.se(out))
    return out * (block.skip_gain * block.alpha) + shortcut


@pytest.mark.parametrize("stride", [1, 2])
def test_folded_block_matches_explicit_reference_forward_and_backward(stride):
    torch.manual_seed(0)
    block = NFBlock(16, 32, 16, group_size=8, se_hidden=4, stride=stride, beta=0.8).double()
    perturb_block_scalars(block)
    x = torch.randn(2, 16, 9, 11, dtype=torch.float64, requires_grad=True)
    out = block(x)
    ref = _reference_block_forward(block, x)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *block.parameters()], g)
    ref_grads = torch.autograd.grad(ref, [x, *block.parameters()], g)
    names = ["input"] + [n for n, _ in block.named_parameters()]
    for name, a, b in zip(names, grads, ref_grads):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("weight_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("floored", [False, True], ids=["batch_norm_path", "eps_floor_path"])
def test_standardization_backward_is_exact(floored, channels_last, weight_layout):
    from nfdet.modeling.layers import standardize_weight

    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    if floored:
        w[2] *= 1e-4  # var * fan_in below eps: the floor holds this channel's scale constant
    w = w.contiguous(memory_format=torch.channels_last if weight_layout == "channels_last"
                     else torch.contiguous_format)
    w.requires_grad_(True)
    gain = torch.rand(6, 1, 1, 1, dtype=torch.float64, requires_grad=True)

    def standardize(w, g):
        out = standardize_weight(w, g, 36, 1e-4, 1.7, channels_last)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        assert out.is_contiguous(memory_format=layout)  # both paths honour the layout request
        return out

    assert torch.autograd.gradcheck(standardize, (w, gain))
    var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
    reference = (w - mean) * torch.rsqrt(torch.clamp(var * 36, min=1e-4)) * gain * 1.7
    torch.testing.assert_close(standardize(w, gain), reference)
    # The gradient of a weight comes back in the weight's own layout when the standardization
    # runs in it (no re-layout copy for AccumulateGrad).
    if not floored and channels_last == (weight_layout == "channels_last"):
        standardize(w, gain).sum().backward()
        assert w.grad.stride() == w.stride()


def test_spatial_mean_keeps_channels_last_gradients():
    from nfdet.modeling.layers import spatial_mean

    x = torch.randn(2, 8, 5, 7, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last).requires_grad_(True)
    torch.testing.assert_close(spatial_mean(x), x.mean(dim=(2, 3)))
    assert torch.autograd.gradcheck(spatial_mean, (x,))


def test_packed_eval_convolutions_match_plain_ones(monkeypatch):
    """The CPU eval path (oneDNN blocked weights, fused GELU) computes what F.conv2d does, also
    for input sizes other than the one the weights were packed for."""
    from nfdet.modeling import fused

    if not fused._PACKED_CONV:
        pytest.skip("this torch build has no oneDNN fused convolution")
    model = gained_nano()
    inputs = [torch.randn(2, 3, 37, 45), torch.randn(1, 3, 64, 64), torch.randn(3, 3, 33, 31)]
    with torch.no_grad():
        packed = [model(x) for x in inputs]
    # Packed, for the last input's shape (each conv sees its own shape of it): every conv of
    # the stem and the blocks (the final conv is a plain module call).
    fused_convs = [m for m in model.modules() if isinstance(m, ScaledStdConv2d)
                   and m is not model.trunk.final_conv]
    assert all(m._derived["packed"].input_shape[0] == 3 for m in fused_convs)
    monkeypatch.setattr(fused, "_PACKED_CONV", False)
    model.eval()  # drop the caches
    with torch.no_grad():
        plain = [model(x) for x in inputs]
    for a, b in zip(packed, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("memory_format", ["auto", "channels_last", "contiguous"])
def test_memory_format_changes_layout_not_values(memory_format):
    model = gained_nano()
    x = torch.randn(2, 3, 99, 70)  # a 4x3 final map: both layouts are unambiguous
    with torch.no_grad():
        ref = model(x)
        model.trunk.memory_format = memory_format
        features = model.forward_features(x)
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    channels_last = memory_format != "contiguous"  # auto: channels_last on CPU
    assert features.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert features.is_contiguous() == (not channels_last)


def test_memory_format_must_be_known():
    with pytest.raises(ValueError, match="memory_format.*'nhwc'"):
        build_nfnet("nano", memory_format="nhwc")


def test_eval_block_writes_in_place_only_into_its_own_buffer():
    """Without autograd the block adds the residual into conv3's output buffer: same values as
    the autograd path, and neither its input nor the returned features of earlier stages change."""
    model = gained_nano()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        features = model.trunk.forward_stages(x)
        snapshot = [f.clone() for f in features]
    torch.testing.assert_close(features, snapshot, rtol=0, atol=0)
    grad_features = model.trunk.forward_stages(x.clone().requires_grad_(True))
    for a, b in zip(features, grad_features):
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-5)  # packed vs plain convs
    block = model.trunk.stages[1][0]
    inp = torch.randn(2, block.conv1.in_channels, 9, 7)
    before = inp.clone()
    with torch.no_grad():
        block(inp)
    torch.testing.assert_close(inp, before, rtol=0, atol=0)


def test_eval_block_with_only_the_gains_trainable_backpropagates():
    """The in-place residual is for no-autograd only: with frozen convs but trainable skip gains
    (the gate needs a gradient) the block takes the autograd path."""
    model = gained_nano()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("skip_gain"))
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    gains = [p.grad for n, p in model.named_parameters() if n.endswith("skip_gain")]
    assert gains and all(g is not None and torch.isfinite(g).all() for g in gains)


def _workspace_modules(model):
    from nfdet.modeling.fused import EvalWorkspace

    return [m._derived["workspace"] for m in model.modules()
            if isinstance(getattr(m, "_derived", {}).get("workspace"), EvalWorkspace)]


def test_eval_workspaces_reuse_buffers_without_changing_outputs():
    """Without autograd, padded inputs and a block's act(x) go into reused buffers: outputs equal
    the autograd path's across changing input sizes (odd and even: SAME padding differs), in
    both layouts and under inference_mode, and the buffers are reused for a repeated size."""
    model = gained_nano()
    # 42 and 44 (and 21 and 22 after the stem) pad to the same shape with the zero border on
    # different sides.
    sizes = [(2, 3, 64, 48), (1, 3, 37, 45), (2, 3, 44, 44), (2, 3, 42, 42), (2, 3, 64, 48),
             (3, 3, 33, 31), (2, 3, 44, 44)]
    for memory_format in ("auto", "contiguous"):
        model.trunk.memory_format = memory_format
        model.eval()  # drop the caches and buffers of the other layout
        for i, shape in enumerate(sizes):
            x = torch.randn(*shape)
            reference = model(x)  # autograd enabled: no workspace
            assert not any(ws._buffers for ws in _workspace_modules(model)) or i > 0
            context = torch.inference_mode() if i % 2 else torch.no_grad()
            with context:
                first = model(x)
                buffers = {id(ws): {k: b.tensor.data_ptr() for k, b in ws._buffers.items()}
                           for ws in _workspace_modules(model)}
                second = model(x)
            torch.testing.assert_close(first, reference.detach(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(second, first, rtol=0, atol=0)
            assert any(buffers.values()), "no module used its workspace"
            # The same shape again: the same buffers, nothing reallocated.
            assert buffers == {id(ws): {k: b.tensor.data_ptr() for k, b in ws._buffers.items()}
                               for ws in _workspace_modules(model)}
    model.train()
    assert not _workspace_modules(model)


def test_eval_workspaces_are_safe_across_threads():
    """Two threads running one model at once get the outputs of serial runs (a workspace serves
    one caller at a time; the other allocates)."""
    import threading

    model = gained_nano()
    inputs = [torch.randn(2, 3, 40 + 2 * i, 36) for i in range(4)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    results, errors = {}, []

    def worker(offset):
        try:
            with torch.no_grad():
                for r in range(6):
                    i = (r + offset) % len(inputs)
                    results[(offset, r)] = (i, model(inputs[i]))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 12
    for i, out in results.values():
        torch.testing.assert_close(out, expected[i], rtol=1e-4, atol=1e-5)


def test_eval_workspaces_start_empty_in_copies_and_pickles():
    import copy
    import pickle

    model = gained_nano()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    assert any(ws._buffers for ws in _workspace_modules(model))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        # No derived tensor travels: no cache, no packed weight, no workspace.
        assert not any(getattr(m, "_derived", None) for m in clone.modules())
        with torch.no_grad():
            torch.testing.assert_close(clone(x), want, rtol=1e-4, atol=1e-5)
        workspaces = _workspace_modules(clone)
        assert workspaces
        assert not {id(ws) for ws in workspaces} & {id(ws) for ws in _workspace_modules(model)}


def test_modules_pickled_without_workspaces_still_run():
    """Whole models pickled by nfdet versions before eval workspaces (and before the blocks
    held their activation as a module) load and run."""
    import pickle

    from nfdet.modeling import NFStem

    model = gained_nano()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    for m in model.modules():
        m.__dict__.pop("_derived", None)  # what an older pickle holds
        if isinstance(m, (NFBlock, NFStem)):
            del m._modules["act"]
    loaded = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, rtol=1e-4, atol=1e-5)
    loaded.train()
    loaded(x).sum().backward()


def test_eval_cache_follows_an_nchw_input_once():
    """A contiguous (NCHW) trunk in eval: the cached kxk weights switch to NCHW on the first
    call instead of being copied on every call."""
    model = gained_nano()
    model.trunk.memory_format = "contiguous"
    x = torch.randn(2, 3, 64, 64)  # no 1x1 map (which would count as channels_last too)
    with torch.no_grad():
        model(x)
        convs = [m for m in model.modules()
                 if isinstance(m, ScaledStdConv2d) and m.kernel_size != (1, 1)]
        cached = [m._derived["standardized"].value for m in convs]
        assert all(w.is_contiguous() for w in cached)
        model(x)
    assert all(m._derived["standardized"].value is w for m, w in zip(convs, cached))


# ---------------------------------------------------------------------------------------------
# Every dtype: float16 and bfloat16 models
# ---------------------------------------------------------------------------------------------


def test_spatial_mean_of_a_large_float16_map_is_finite():
    """A float16 sum over a detection-size map overflows (max 65504); the mean does not."""
    from nfdet.modeling.layers import spatial_mean

    x = torch.full((1, 2, 200, 336), 1.5, dtype=torch.float16)  # sum 100800
    out = spatial_mean(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, torch.full((1, 2), 1.5, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_standardization_statistics_accumulate_in_float32(dtype):
    """Weights whose squares overflow float16 (|w| ~ 300) standardize to the float64 result."""
    from nfdet.modeling.layers import standardize_weight

    torch.manual_seed(0)
    w = torch.randn(4, 8, 3, 3, dtype=torch.float64) * 300.0 + 50.0
    gain = torch.rand(4, 1, 1, 1, dtype=torch.float64) + 0.5
    var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
    reference = (w - mean) * torch.rsqrt(torch.clamp(var * 72, min=1e-4)) * gain
    out = standardize_weight(w.to(dtype), gain.to(dtype), 72, 1e-4, 1.0)
    assert out.dtype == dtype and torch.isfinite(out).all()
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), reference, rtol=8 * eps, atol=8 * eps)


def _trunk_in_dtypes(variant: str, size: tuple[int, int]):
    """Stage outputs of one trunk (non-zero skip gains and biases: channel means away from 0,
    as in a trained network) in float32, float16 and bfloat16, on one input."""
    from nfdet.modeling import NFNetTrunk, get_variant

    torch.manual_seed(0)
    trunk = NFNetTrunk(get_variant(variant), final_conv=False).eval()
    with torch.no_grad():
        for m in trunk.modules():
            if isinstance(m, NFBlock):
                m.skip_gain.uniform_(0.2, 1.0)
            if isinstance(m, ScaledStdConv2d):
                m.bias.uniform_(-1.0, 1.0)
    x = torch.randn(1, 3, *size)
    outputs = {}
    with torch.no_grad():
        outputs[torch.float32] = trunk.forward_stages(x)
        for dtype in (torch.float16, torch.bfloat16):
            copy = NFNetTrunk(get_variant(variant), final_conv=False).eval()
            copy.load_state_dict(trunk.state_dict())
            copy = copy.half() if dtype == torch.float16 else copy.to(dtype)
            outputs[dtype] = copy.forward_stages(x.to(dtype))
    return outputs


def _assert_close_to_float32(outputs):
    for dtype in (torch.float16, torch.bfloat16):
        # Rounding errors of ~eps per layer, summed over the depth, stay within a few eps of
        # the float32 features (measured: ~3 eps).
        tolerance = 8 * torch.finfo(dtype).eps
        for stage, (got, want) in enumerate(zip(outputs[dtype], outputs[torch.float32])):
            assert got.dtype == dtype
            assert torch.isfinite(got).all(), f"{dtype} res{stage + 2} is not finite"
            error = ((got.float() - want).norm() / want.norm()).item()
            assert error < tolerance, f"{dtype} res{stage + 2}: {error:.2e} >= {tolerance:.2e}"


def test_half_precision_nano_trunk_at_detection_size():
    _assert_close_to_float32(_trunk_in_dtypes("nano", (800, 1344)))


@pytest.mark.slow  # float16 convolutions on CPU: about a minute for F0 at this size
def test_half_precision_f0_trunk_at_detection_size():
    _assert_close_to_float32(_trunk_in_dtypes("F0", (800, 1344)))
