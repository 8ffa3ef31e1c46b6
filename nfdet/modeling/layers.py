"""Small layers of Normalizer-Free networks: scaled weight-standardized conv, gamma-scaled
activations, squeeze-excite and stochastic depth.

This is the plain form of the model, the one that runs everywhere (any device, any dtype,
under tracing, export and compilation). ``fused.py`` holds the CPU float32 optimization of it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .activations import ACTIVATION_GAMMA, get_activation

__all__ = [
    "ACTIVATION_GAMMA",
    "DerivedTensors",
    "GammaAct",
    "ScaledStdConv2d",
    "SqueezeExcite",
    "StandardizedWeight",
    "StochasticDepth",
    "capturing_graph",
    "is_channels_last",
    "pad_same",
    "same_padding",
    "spatial_mean",
    "standardize_weight",
]


def capturing_graph(x: torch.Tensor) -> bool:
    """Whether ``x`` flows through a graph capture rather than plain eager execution: TorchScript
    tracing or scripting, ONNX export, ``torch.export``, FX tracing or ``torch.compile`` (or
    ``x`` is a tensor subclass, as the fake and functional tensors of those tools are). Code that
    keeps state between calls (caches, reused buffers) steps aside then: a graph must compute
    from the parameters, and a captured buffer would be a constant."""
    if torch.jit.is_scripting():
        return True
    return (
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or torch.fx._symbolic_trace.is_fx_symbolic_tracing()
        or type(x) is not torch.Tensor
    )


def is_channels_last(t: torch.Tensor) -> bool:
    """A 4-d tensor laid out channels_last (and not also plain contiguous, as 1x1 maps are)."""
    return (t.dim() == 4 and not t.is_contiguous()
            and t.is_contiguous(memory_format=torch.channels_last))


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) for one spatial dimension."""
    effective = (kernel - 1) * dilation + 1
    # ceil(size / stride) with non-negative operands only: a traced ONNX graph divides sizes
    # with truncation, which differs from Python's floor for negative numbers.
    out = (size + stride - 1) // stride
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


@torch.fx.wrap
def pad_same(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
             dilation: tuple[int, int] = (1, 1), value: float = 0.0) -> torch.Tensor:
    """``x`` padded as TensorFlow's 'SAME' convolutions and poolings pad it (DeepMind pads this
    way everywhere; e.g. a stride-2 3x3 conv on an even size pads 0 before and 1 after).
    ``value`` is the fill: 0 for convolutions, ``-inf`` for max pooling (TF's SAME max pool
    ignores the padded positions).

    The padding depends on the input size: a traced graph (TorchScript, ONNX) serves inputs
    whose sizes have the traced ones' parity. An FX graph calls this function (it is wrapped).
    """
    ph = same_padding(x.shape[-2], kernel[0], stride[0], dilation[0])
    pw = same_padding(x.shape[-1], kernel[1], stride[1], dilation[1])
    if any(ph) or any(pw):
        x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]), value=value)
    return x


@torch.fx.wrap
def standardize_weight(
    weight: torch.Tensor,
    gain: torch.Tensor,
    fan_in: int,
    eps: float,
    scale: float = 1.0,
    channels_last: bool = False,
) -> torch.Tensor:
    """Scaled weight standardization, per output channel (docs/reference.md, "Architecture"):
    ``w_hat = gain * scale * (w - mean(w)) / sqrt(max(var(w) * fan_in, eps))`` with mean and
    (biased) variance over the fan-in. Differentiable in ``weight`` and ``gain``.

    The statistics accumulate in float32 at least: float16 and bfloat16 weights are
    standardized in float32 and the result is cast back.

    Args:
        weight (Tensor): (out, in/groups, kh, kw) or (out, fan_in) weight.
        gain (Tensor): per-output-channel gain, broadcastable to ``weight``.
        fan_in (int): inputs per output channel.
        eps (float): floor of ``var * fan_in``.
        scale (float): a constant factor (1; the fused path folds gammas and betas here).
        channels_last (bool): return a 4-d result in that layout (the convolution's input's).
    """
    # float16/bfloat16 weights are standardized in float32. (No cast or product that changes
    # nothing: an exported graph would keep it, as a constant-folded copy of the parameter.)
    low_precision = weight.dtype in (torch.float16, torch.bfloat16)
    w = weight.float() if low_precision else weight
    g = gain.to(w.dtype) if gain.dtype != w.dtype else gain
    if scale != 1.0:
        g = g * scale
    var, mean = torch.var_mean(w, dim=tuple(range(1, w.dim())), keepdim=True, correction=0)
    # With var * fan_in = 1 every output unit of a unit-variance input has unit variance: the
    # convolution preserves the signal's scale whatever the weights' (the eps floor keeps
    # near-constant filters finite).
    inv_std = torch.rsqrt(torch.clamp(var * fan_in, min=eps))
    out = (w - mean) * (inv_std * g)
    if low_precision:
        out = out.to(weight.dtype)
    if out.dim() == 4:
        out = out.contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return out


def _not_scriptable(module: nn.Module):
    raise RuntimeError(
        f"{type(module).__name__} cannot be compiled by torch.jit.script (nfdet's layers take "
        "the activation from a registry and keep eval caches); trace the model instead "
        "(torch.jit.trace, or tools/export_model.py --format torchscript)")


class StandardizedWeight(NamedTuple):
    """A standardized weight kept for eval calls, and what it was computed from.

    The entry holds the parameter tensors themselves, so their memory cannot be reused by other
    tensors while it lives: an equal ``data_ptr`` then means the same storage, and an equal
    version counter means no in-place write through the parameter since.
    """

    weight: torch.Tensor  # the parameter it was computed from
    gain: torch.Tensor
    versions: tuple[int, int]  # weight._version, gain._version at that time
    scale: float
    value: torch.Tensor  # the standardized weight

    def serves(self, weight: torch.Tensor, gain: torch.Tensor, scale: float) -> bool:
        return (self.weight is weight and self.gain is gain
                and self.versions == (weight._version, gain._version) and self.scale == scale)


class DerivedTensors(nn.Module):
    """Base of modules that keep tensors derived from their parameters in ``self._derived`` (a
    dict of named entries: the eval weight cache, the fused path's packed weights and reused
    buffers).

    The entries are dropped by ``train()``/``eval()``, ``load_state_dict``, device and dtype
    moves, and start empty in copies and pickles. Writes through ``param.data`` bypass
    PyTorch's version counters: after such writes call ``model.eval()`` (or ``clear_cache()``)
    before the next forward.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._derived: dict[str, object] = {}

    def clear_cache(self) -> None:
        """Drop every derived tensor (a new dict: a call in flight keeps the old entries)."""
        self._derived = {}

    def train(self, mode: bool = True):
        self.clear_cache()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.clear_cache()
        return super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_derived"] = {}
        return state

    def __prepare_scriptable__(self):
        _not_scriptable(self)

    def __setstate__(self, state):
        super().__setstate__(state)
        # Modules pickled by nfdet versions that kept other caches.
        self.__dict__["_derived"] = {}
        for stale in ("_cache", "_workspace"):
            self.__dict__.pop(stale, None)


class GammaAct(nn.Module):
    """A nonlinearity multiplied by its variance-preserving gain: ``fn(x) * gamma``.

    Args:
        name (str): a key of the activation registry (``nfdet.modeling.activations``): "gelu"
            (exact, as timm's port), "gelu_tanh" (jax.nn.gelu's default, which DeepMind trained
            with), "relu" or "silu".
    """

    def __init__(self, name: str = "gelu"):
        super().__init__()
        self.name = name
        self.gamma = get_activation(name).gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return get_activation(self.name).fn(x) * self.gamma

    def __prepare_scriptable__(self):
        _not_scriptable(self)

    def extra_repr(self) -> str:
        return f"{self.name}, gamma={self.gamma:.6f}"


class ScaledStdConv2d(DerivedTensors, nn.Conv2d):
    """Conv2d with scaled weight standardization (Brock et al. 2021) and TF 'SAME' padding.

    The convolution uses ``standardize_weight(weight, gain, fan_in, eps)`` (DeepMind's
    formulation, ``eps = 1e-4``); ``gain`` has shape (out, 1, 1, 1), init 1.

    Eval cache: in eval mode, when no gradient flows to the weights (``torch.no_grad()``,
    ``inference_mode`` or frozen parameters), the standardized weight is computed once and
    reused until the weight or gain changes (any in-place write through the parameters bumps
    their version counter; see ``DerivedTensors`` for what else drops it). It costs one copy of
    the weights. Under graph captures (``capturing_graph``) nothing is cached.

    kxk weights are stored channels_last (the layout the trunk computes in on CPU): a
    ``state_dict`` holds them so, and loading copies values whatever the source's layout.

    Args:
        in_channels, out_channels, kernel_size, stride, groups, bias: as ``nn.Conv2d``.
        eps (float): floor of ``var * fan_in``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
        eps: float = 1e-4,
    ):
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=0, groups=groups,
            bias=bias,
        )
        self.gain = nn.Parameter(torch.ones(out_channels, 1, 1, 1))
        self.eps = eps
        self.fan_in = self.weight[0].numel()
        k = self.kernel_size[0]
        # Stride 1 with an odd kernel pads SAME symmetrically: a static padding. Otherwise the
        # padding depends on the input size (pad_same).
        self._static_pad = (k - 1) // 2 if (self.stride[0] == 1 and k % 2 == 1) else None
        if k > 1:
            # kxk weights live in channels_last, the layout the convolutions compute in on CPU:
            # standardizing them in that order needs no copy, and their gradients come back in
            # it (a 1x1 weight is channels_last already).
            self.weight = nn.Parameter(self.weight.detach().contiguous(
                memory_format=torch.channels_last))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Variance scaling over fan-in (normal); standardization makes the scale irrelevant.
        if not hasattr(self, "gain") or self.weight.is_meta:
            return  # nn.Conv2d's call before gain exists; meta tensors hold no values
        # Drawn in (out, in, kh, kw) order whatever the memory layout: a seed gives the same
        # weights in every layout.
        with torch.no_grad():
            self.weight.copy_(torch.empty(self.weight.shape, dtype=self.weight.dtype,
                                          device=self.weight.device).normal_(
                0.0, 1.0 / math.sqrt(self.weight[0].numel())))
        nn.init.ones_(self.gain)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def standardized_weight(self, scale: float = 1.0, channels_last: bool = False,
                            standardize=None) -> torch.Tensor:
        """The weight the convolution uses, times ``scale``.

        Args:
            scale (float): a constant factor (the fused path folds gammas and betas here).
            channels_last (bool): in that layout (where the convolution's input is).
            standardize (callable | None): the kernel, ``standardize_weight`` (None) or one
                with its signature and results (the fused path's).
        """
        standardize = standardize or standardize_weight  # (looked up per call: FX wraps it)
        return standardize(self.weight, self.gain, self.fan_in, self.eps, scale,
                           channels_last and self.kernel_size != (1, 1))

    def eval_weight(self, x: torch.Tensor, scale: float = 1.0,
                    standardize=None) -> torch.Tensor | None:
        """The cached standardized weight for input ``x`` (in ``x``'s layout) when the eval
        cache applies (eval mode, no gradient to the weights, no graph capture), else None."""
        if capturing_graph(x):
            return None
        weight, gain = self.weight, self.gain
        if self.training or (torch.is_grad_enabled()
                             and (weight.requires_grad or gain.requires_grad)):
            return None
        entry = self._derived.get("standardized")
        if entry is None or not entry.serves(weight, gain, scale):
            # A normal tensor even under inference_mode, so it can be served outside it later.
            with torch.inference_mode(False), torch.no_grad():
                value = self.standardized_weight(scale, is_channels_last(x), standardize)
            entry = StandardizedWeight(weight, gain, (weight._version, gain._version), scale,
                                       value)
            self._derived["standardized"] = entry
        elif (self.kernel_size != (1, 1) and is_channels_last(entry.value) != is_channels_last(x)
              and not (x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last))):
            # Convolutions follow their weight's layout too: the entry switches to the input's
            # layout once (an input that is both, as a 1x1 map is, takes either).
            value = entry.value.contiguous(memory_format=torch.channels_last
                                           if is_channels_last(x) else torch.contiguous_format)
            entry = self._derived["standardized"] = entry._replace(value=value)
        return entry.value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._static_pad is None:
            x, padding = pad_same(x, self.kernel_size, self.stride, self.dilation), 0
        else:
            padding = self._static_pad
        weight = self.eval_weight(x)
        if weight is None:
            # Convolutions follow their weight's layout too: standardize into x's (a symbolic
            # FX value has no layout).
            weight = self.standardized_weight(
                1.0, not isinstance(x, torch.fx.Proxy) and is_channels_last(x))
        return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)


@torch.fx.wrap
def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """``x.mean(dim=(2, 3))``, accumulated in float32 at least (a float16 sum over a
    detection-size map overflows), with a backward that keeps a channels_last gradient fast.

    ``mean``'s backward materialises the broadcast gradient divided by H*W in NCHW, which then
    meets the channels_last gradient of the same tensor in a slow mixed-layout addition. Here
    the division happens on the (N, C) result, so the gradient stays a free broadcast.
    """
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    total = x.sum(dim=(2, 3), dtype=compute_dtype)
    return (total * (1.0 / (x.shape[2] * x.shape[3]))).to(x.dtype)


class SqueezeExcite(nn.Module):
    """Squeeze-excite returning the sigmoid gate (the block multiplies its branch by
    ``2 * gate``).

    Args:
        channels (int): input/output channels.
        hidden (int): hidden width.
    """

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = spatial_mean(x)
        h = self.fc2(F.relu(self.fc1(h)))
        return torch.sigmoid(h)[:, :, None, None]


class StochasticDepth(nn.Module):
    """Drops the whole residual branch of a sample with probability ``rate`` while training.

    Args:
        rate (float): drop probability.
        scale_by_keep (bool): divide kept samples by ``1 - rate`` (timm does; DeepMind does not).
    """

    def __init__(self, rate: float = 0.0, scale_by_keep: bool = False):
        super().__init__()
        self.rate = float(rate)
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate <= 0.0:
            return x
        keep = 1.0 - self.rate
        # One draw per sample, broadcast over the rest: the fused path applies this module to
        # the (N, C, 1, 1) gate instead of the branch and draws the same mask.
        mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
        mask.bernoulli_(keep)
        if self.scale_by_keep:
            mask.div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"rate={self.rate:.4f}"
