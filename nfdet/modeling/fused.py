"""The fused CPU path: the NF block and stem of ``nfnet.py`` computed faster on CPU in float32.

It is an optimization of the plain code, not a second model: same parameters, same outputs
(to float32 rounding). What it does differently:

- **Folded scalars.** A convolution is linear, so ``conv(x * gamma * beta)`` is the conv with
  its standardized weight scaled by ``gamma * beta``: the activations' gammas and the block's
  beta cost no pass over the activations.
- **Fused activations.** conv1, conv2, conv2b (where the block has one) and the first three
  stem convs return ``act(conv(.))`` (without gamma, which the next conv's weight carries); in
  eval the activation is a oneDNN post-op of the convolution. (The NF-ResNet stem, one conv and a
  max pool, has no fused form: it runs its plain code.)
- **Packed eval weights.** In eval without a gradient to the weights, the standardized
  (scaled) weight is cached (``ScaledStdConv2d.eval_weight``) and reordered once into oneDNN's
  blocked layout for the last input shape (``PackedWeight``).
- **The residual on the gate.** ``branch * 2 * gate * skip_gain * alpha + shortcut`` is one
  ``addcmul`` of conv3's output with the (N, C, 1, 1) gate ``2 * gate * skip_gain * alpha``
  (an (N, 1, 1, 1) ``skip_gain * alpha`` for blocks without squeeze-excite, the NF-ResNets');
  stochastic depth zeroes a sample's gate (the same draw as on the branch).
- **Reused buffers without autograd.** The zero-padded input of a SAME-padded conv and a
  block's ``act(x)`` go into buffers kept between calls (``EvalWorkspace``), and the residual
  is added into conv3's output (fresh every call). None of them is ever visible outside: the
  path steps aside for a module with hooks.
- **Standardization in training** runs as one ATen batch-norm kernel, forward and backward
  (``standardize_weight_fast``).

One switch: ``set_enabled(False)`` (or ``with enabled(False): ...``) turns the path off for
the process; otherwise ``applies(x, module)`` decides per call, and the plain code runs
whenever the path does not apply: under graph captures (TorchScript tracing, ONNX export,
``torch.export``, FX, ``torch.compile``; ``torch.jit.script`` refuses NF layers with an error
saying to trace), on other devices, for other dtypes or under autocast, and for a module any of
whose submodules has hooks.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from .activations import Activation, get_activation
from .layers import (
    ScaledStdConv2d,
    capturing_graph,
    is_channels_last,
    same_padding,
    standardize_weight,
)

__all__ = [
    "EvalWorkspace",
    "PackedWeight",
    "applies",
    "block_forward",
    "conv",
    "enabled",
    "is_enabled",
    "set_enabled",
    "standardize_weight_fast",
    "stem_forward",
]

_ENABLED = True

# oneDNN's fused convolution (what torch.compile's freezing uses on CPU).
_PACKED_CONV = torch.backends.mkldnn.is_available() and all(
    hasattr(torch.ops.mkldnn, op)
    for op in ("_reorder_convolution_weight", "_convolution_pointwise")
)


def is_enabled() -> bool:
    """Whether the fused path may run (the process-wide switch)."""
    return _ENABLED


def set_enabled(flag: bool) -> bool:
    """Turn the fused path on or off for the whole process; returns the previous setting."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(flag)
    return previous


@contextlib.contextmanager
def enabled(flag: bool) -> Iterator[None]:
    """``with enabled(False): ...`` runs the plain code only (process-wide while inside)."""
    previous = set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(previous)


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _hooked(module: nn.Module) -> bool:
    """Whether a hook would see a submodule of ``module`` (the fused path calls none of the
    convs and activations, and writes into tensors a hook on the others could keep)."""
    if (_module._global_forward_hooks or _module._global_forward_pre_hooks
            or _module._global_backward_hooks or _module._global_backward_pre_hooks):
        return True
    return any(_has_hooks(m) for m in module.modules() if m is not module)


def applies(x: torch.Tensor, module: nn.Module) -> bool:
    """Whether ``module`` (an ``NFBlock`` or ``NFStem``) may run the fused path on ``x``: the
    switch is on, no graph capture, a 4-d float32 CPU tensor and float32 CPU parameters, no
    autocast, and no hooks on the module's submodules."""
    if not _ENABLED or capturing_graph(x):
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4:
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    p = next(module.parameters(), None)
    if p is not None and (p.device.type != "cpu" or p.dtype != torch.float32):
        return False
    return not _hooked(module)


class _Buffer(NamedTuple):
    tensor: torch.Tensor
    tag: object  # what else the contents depend on (e.g. where a zero border lies)


class EvalWorkspace:
    """Scratch tensors a module reuses across forwards run without autograd.

    On CPU every fresh activation-sized tensor costs page faults when the allocator hands back
    memory it had returned to the system; a reused buffer does not. Only without autograd
    (nothing can save a buffer for a backward pass) and for one caller at a time
    (``try_acquire``; a concurrent caller of the same module allocates as usual). A buffer is
    overwritten by the next call, so none may leave the fused path. Workspaces live in a
    module's ``_derived`` entries: copies and pickles start without, and ``train()``/``eval()``
    and device moves drop them.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._buffers: dict[str, _Buffer] = {}

    def try_acquire(self) -> bool:
        return self._lock.acquire(blocking=False)

    def release(self) -> None:
        self._lock.release()

    def buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor,
               zero: bool = False, tag: object = None) -> torch.Tensor:
        """The buffer ``name`` of ``shape`` in ``like``'s dtype, device and layout (a new one,
        zero-filled if ``zero``, when the last one differs in any of these or in ``tag``).
        Call only while acquired."""
        layout = torch.channels_last if is_channels_last(like) else torch.contiguous_format
        last = self._buffers.get(name)
        if (last is None or last.tag != tag or last.tensor.shape != shape
                or last.tensor.dtype != like.dtype or last.tensor.device != like.device
                or not last.tensor.is_contiguous(memory_format=layout)):
            # A normal tensor even under inference_mode, so that it can be written outside it.
            with torch.inference_mode(False):
                tensor = torch.empty(shape, dtype=like.dtype, device=like.device,
                                     memory_format=layout)
                if zero:
                    tensor.zero_()
            last = self._buffers[name] = _Buffer(tensor, tag)
        return last.tensor

    def __reduce__(self):
        return (EvalWorkspace, ())

    def __deepcopy__(self, memo):
        return EvalWorkspace()


def _workspace(module: nn.Module) -> EvalWorkspace:
    derived = module._derived
    workspace = derived.get("workspace")
    if workspace is None:
        workspace = derived.setdefault("workspace", EvalWorkspace())
    return workspace


class PackedWeight(NamedTuple):
    """A standardized eval weight reordered into oneDNN's blocked layout for one input shape
    (oneDNN picks the blocking for the shape: a weight packed for another ran far slower)."""

    source: torch.Tensor  # the standardized weight it was packed from
    input_shape: torch.Size
    padding: int
    value: torch.Tensor


def standardize_weight_fast(
    weight: torch.Tensor,
    gain: torch.Tensor,
    fan_in: int,
    eps: float,
    scale: float = 1.0,
    channels_last: bool = False,
) -> torch.Tensor:
    """``layers.standardize_weight`` through ATen's batch-norm kernels (float32 CPU).

    When no channel is at the eps floor (the rule for weights of any real scale),
    standardization is exactly a batch norm of the ``(1, out, fan_in)`` view with zero eps and
    the per-channel weight ``gain * scale / sqrt(fan_in)``: one fused kernel forward and one
    backward, where autograd through the plain formula makes about ten passes over every
    weight. A kxk weight asked for in channels_last is standardized in (out, kh, kw, in) order,
    its memory order, so neither the standardization nor the gradient copies it. With a
    channel at the floor, the plain formula runs.
    """
    out_channels = weight.shape[0]
    permuted = channels_last and weight.dim() == 4
    src = weight.permute(0, 2, 3, 1) if permuted else weight
    bn_weight = gain.reshape(out_channels) * (scale / math.sqrt(fan_in))
    out, _, invstd = torch.native_batch_norm(
        src.reshape(1, out_channels, -1), bn_weight, None, None, None, True, 0.0, 0.0
    )
    # invstd = 1 / sqrt(var): the floor is not reached while invstd <= sqrt(fan_in / eps).
    if not bool((invstd.detach() <= math.sqrt(fan_in / eps)).all()):
        return standardize_weight(weight, gain, fan_in, eps, scale, channels_last)
    out = out.view(src.shape)
    return out.permute(0, 3, 1, 2) if permuted else out


def _packed_conv(m: ScaledStdConv2d, x: torch.Tensor, padding: int, weight: torch.Tensor,
                 act: Activation | None) -> torch.Tensor:
    """oneDNN's convolution with the weight packed once for ``x``'s shape and the activation
    as a post-op."""
    packed = m._derived.get("packed")  # read once: another thread may replace it meanwhile
    if (packed is None or packed.source is not weight or packed.input_shape != x.shape
            or packed.padding != padding):
        with torch.inference_mode(False), torch.no_grad():
            value = torch.ops.mkldnn._reorder_convolution_weight(
                weight, [padding] * 2, list(m.stride), list(m.dilation), m.groups,
                list(x.shape))
        packed = m._derived["packed"] = PackedWeight(weight, x.shape, padding, value)
    attr, algorithm = act.onednn if act is not None else ("none", "")
    return torch.ops.mkldnn._convolution_pointwise(
        x, packed.value, m.bias, [padding] * 2, list(m.stride), list(m.dilation), m.groups,
        attr, [], algorithm)


def _conv_padded(m: ScaledStdConv2d, x: torch.Tensor, padding: int, scale: float,
                 act: Activation | None) -> torch.Tensor:
    weight = m.eval_weight(x, scale, standardize_weight_fast)
    if weight is None:
        weight = m.standardized_weight(scale, is_channels_last(x), standardize_weight_fast)
    elif (_PACKED_CONV and x.is_contiguous(memory_format=torch.channels_last)
          and not (x.requires_grad and torch.is_grad_enabled())):  # the op has no autograd
        # (it returns channels_last: an NCHW input keeps its layout through F.conv2d)
        return _packed_conv(m, x, padding, weight, act)
    out = F.conv2d(x, weight, m.bias, m.stride, padding, m.dilation, m.groups)
    return out if act is None else act.fn(out)


def conv(m: ScaledStdConv2d, x: torch.Tensor, scale: float = 1.0,
         act: Activation | None = None) -> torch.Tensor:
    """``act.fn(m(x * scale))``: the conv ``m`` of ``x`` scaled by ``scale`` (folded into the
    weight), followed by the activation without its gamma (or nothing when ``act`` is None).

    Args:
        m (ScaledStdConv2d): the convolution (its parameters; its forward is not called).
        x (Tensor): a 4-d float32 CPU input.
        scale (float): the input's factor (gamma, or gamma * beta).
        act (Activation | None): the activation to fuse.
    """
    if m._static_pad is not None:
        return _conv_padded(m, x, m._static_pad, scale, act)
    ph = same_padding(x.shape[-2], m.kernel_size[0], m.stride[0], m.dilation[0])
    pw = same_padding(x.shape[-1], m.kernel_size[1], m.stride[1], m.dilation[1])
    if not (any(ph) or any(pw)):
        return _conv_padded(m, x, 0, scale, act)
    if not torch.is_grad_enabled():
        workspace = _workspace(m)
        if workspace.try_acquire():
            try:
                # The zero border of a reused padded buffer stays: only the interior is ever
                # written (its place is the tag: an odd and an even size can pad to the same
                # shape).
                n, c, h, w = x.shape
                padded = workspace.buffer("padded", (n, c, h + sum(ph), w + sum(pw)), x,
                                          zero=True, tag=(ph, pw))
                padded[:, :, ph[0]:ph[0] + h, pw[0]:pw[0] + w].copy_(x)
                return _conv_padded(m, padded, 0, scale, act)
            finally:
                workspace.release()
    return _conv_padded(m, F.pad(x, (pw[0], pw[1], ph[0], ph[1])), 0, scale, act)


def block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``NFBlock.forward`` on the fused path (see the module docstring)."""
    act = get_activation(block.activation)
    gamma, entry_scale = act.gamma, act.gamma * block.beta  # act(x) * gamma * beta
    workspace = _workspace(block) if not torch.is_grad_enabled() else None
    if workspace is not None and workspace.try_acquire():
        try:
            a = act.fn_out(x, workspace.buffer("act", x.shape, x))
            shortcut, out = _block_entry(block, x, a, entry_scale, act)
        finally:
            workspace.release()
    else:
        shortcut, out = _block_entry(block, x, act.fn(x), entry_scale, act)
    out = conv(block.conv2, out, gamma, act)
    if block.conv2b is not None:
        out = conv(block.conv2b, out, gamma, act)
    out = conv(block.conv3, out, gamma)
    if block.se is not None:
        gate = block.se(out) * (block.skip_gain * (2.0 * block.alpha))
    else:
        # No squeeze-excite (NF-ResNets): the gate is the scalar, one per sample so that
        # stochastic depth draws the same (N, 1, 1, 1) mask as on the branch.
        gate = (block.skip_gain * block.alpha).expand(out.shape[0], 1, 1, 1)
    gate = block.drop_path(gate)
    if not (torch.is_grad_enabled()
            and (out.requires_grad or shortcut.requires_grad or gate.requires_grad)):
        return torch.addcmul(shortcut, out, gate, out=out)  # conv3's output: fresh, unseen
    return torch.addcmul(shortcut, out, gate)


def _block_entry(block: nn.Module, x: torch.Tensor, a: torch.Tensor, scale: float,
                 act: Activation) -> tuple[torch.Tensor, torch.Tensor]:
    """The shortcut and ``act(conv1(.))``, both from ``a = act.fn(x)`` scaled by ``scale``."""
    shortcut = x
    if block.shortcut is not None:
        pooled = block.pool(a) if block.pool is not None else a
        shortcut = conv(block.shortcut, pooled, scale)
    return shortcut, conv(block.conv1, a, scale, act)


def stem_forward(stem: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``NFStem.forward`` on the fused path."""
    act = get_activation(stem.activation)
    x = conv(stem.conv1, x, 1.0, act)
    x = conv(stem.conv2, x, act.gamma, act)
    x = conv(stem.conv3, x, act.gamma, act)
    return conv(stem.conv4, x, act.gamma)
