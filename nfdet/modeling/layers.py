"""Small layers of Normalizer-Free networks: scaled weight-standardized conv, gamma-scaled
activations, squeeze-excite and stochastic depth."""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACTIVATION_GAMMA",
    "EvalWorkspace",
    "activation_fn",
    "GammaAct",
    "ScaledStdConv2d",
    "SqueezeExcite",
    "StochasticDepth",
    "same_padding",
    "spatial_mean",
    "standardize_weight",
]

# gamma such that act(x) * gamma has unit variance for x ~ N(0, 1) (DeepMind's constants; the
# relu one is empirical).
ACTIVATION_GAMMA = {
    "gelu": 1.7015043497085571,
    "gelu_tanh": 1.7015043497085571,
    "relu": 1.7139588594436646,
    "silu": 1.7881293296813965,
}

_ACTIVATION_FN = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


# oneDNN post-ops (attr, algorithm) of the activations, for the packed eval convolution.
_FUSED_ACTIVATION = {
    None: ("none", ""),
    "gelu": ("gelu", "none"),
    "gelu_tanh": ("gelu", "tanh"),
    "relu": ("relu", ""),
    "silu": ("swish", ""),
}
_PACKED_CONV = torch.backends.mkldnn.is_available() and all(
    hasattr(torch.ops.mkldnn, op)
    for op in ("_reorder_convolution_weight", "_convolution_pointwise")
)


def activation_fn(name: str):
    """The plain nonlinearity ``name`` (without gamma), for layers that fold gamma elsewhere."""
    if name not in ACTIVATION_GAMMA:
        raise ValueError(f"Unknown activation {name!r}; valid: {', '.join(ACTIVATION_GAMMA)}")
    return _ACTIVATION_FN[name]


class GammaAct(nn.Module):
    """A nonlinearity multiplied by its variance-preserving gain ``gamma``.

    Args:
        name (str): "gelu" (exact, as timm's port), "gelu_tanh" (jax.nn.gelu's default, which
            DeepMind trained with), "relu" or "silu".
    """

    def __init__(self, name: str = "gelu"):
        super().__init__()
        self._fn = activation_fn(name)
        self.name = name
        self.gamma = ACTIVATION_GAMMA[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x) * self.gamma

    def extra_repr(self) -> str:
        return f"{self.name}, gamma={self.gamma:.6f}"


class EvalWorkspace:
    """Scratch tensors a module reuses across forwards run without autograd.

    On CPU every fresh activation-sized tensor costs page faults when the allocator hands back
    memory it had returned to the system (measured: 3.5 ms to zero-fill one fresh 19 MB padded
    input, 0.5 ms to copy into a reused one). A module keeps such tensors here between calls
    instead: only under ``torch.no_grad()``/``inference_mode`` (nothing can save them for a
    backward pass) and for one caller at a time (``try_acquire``; a concurrent caller of the same
    module allocates as usual). A buffer is overwritten by the next call: a forward hook that
    keeps a conv's *input* must clone it. Copies and pickles of a module start empty;
    ``clear()`` frees the buffers (``ScaledStdConv2d`` and ``NFBlock`` do on
    ``train()``/``eval()`` and device moves).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._buffers: dict[str, tuple[torch.Tensor, object]] = {}

    @staticmethod
    def applies(x: torch.Tensor) -> bool:
        """Whether a call on ``x`` may use scratch buffers: CPU, no autograd, not compiling."""
        return (x.device.type == "cpu" and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling())

    def try_acquire(self) -> bool:
        return self._lock.acquire(blocking=False)

    def release(self) -> None:
        self._lock.release()

    def buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor,
               zero: bool = False, tag: object = None) -> torch.Tensor:
        """The buffer ``name`` of ``shape`` in ``like``'s dtype, device and layout (a new one,
        zero-filled if ``zero``, when the last one differs in any of these or in ``tag``, which
        says what else its contents depend on). Call only while acquired."""
        layout = torch.channels_last if _is_channels_last(like) else torch.contiguous_format
        buf, last_tag = self._buffers.get(name, (None, None))
        if (buf is None or last_tag != tag or buf.shape != shape or buf.dtype != like.dtype
                or buf.device != like.device or not buf.is_contiguous(memory_format=layout)):
            # A normal tensor even under inference_mode, so that it can be written outside it.
            with torch.inference_mode(False):
                buf = torch.empty(shape, dtype=like.dtype, device=like.device,
                                  memory_format=layout)
                if zero:
                    buf.zero_()
            self._buffers[name] = (buf, tag)
        return buf

    def clear(self) -> None:
        self._buffers = {}

    def __reduce__(self):
        return (EvalWorkspace, ())

    def __deepcopy__(self, memo):
        return EvalWorkspace()


def activation_into(name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``activation_fn(name)(x)`` written into ``out``."""
    if name in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu.out(
            x, approximate="tanh" if name == "gelu_tanh" else "none", out=out)
    if name == "silu":
        return torch.ops.aten.silu.out(x, out=out)
    if name == "relu":
        return torch.clamp_min(x, 0.0, out=out)
    raise ValueError(f"Unknown activation {name!r}; valid: {', '.join(ACTIVATION_GAMMA)}")


def _is_channels_last(t: torch.Tensor) -> bool:
    """A 4-d tensor laid out channels_last (and not also plain contiguous, as 1x1 maps are)."""
    return (t.dim() == 4 and not t.is_contiguous()
            and t.is_contiguous(memory_format=torch.channels_last))


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) for one spatial dimension."""
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def standardize_weight(
    weight: torch.Tensor,
    gain: torch.Tensor,
    fan_in: int,
    eps: float,
    scale: float,
    channels_last: bool = False,
) -> torch.Tensor:
    """``w_hat = (w - mean) * gain * scale / sqrt(max(var * fan_in, eps))`` per output channel
    (differentiable in ``weight`` and ``gain``).

    On CPU, when no channel is at the eps floor (the rule for weights of any real scale), this is
    exactly a batch norm of the ``(1, out_channels, fan_in)`` view with zero eps and the
    per-channel weight ``gain * scale / sqrt(fan_in)``: it runs on ATen's fused batch-norm
    kernels, forward and backward (autograd through ``var_mean``/``sub``/``mul`` makes about ten
    slow passes over every weight per training step; the weights of an F0 are 186 MB). Otherwise
    (a channel at the floor; CUDA, where the floor check would synchronise; under
    ``torch.compile``, which fuses the ops itself) ``_FlooredStandardize`` does it.

    ``channels_last`` asks for a 4-d result in that layout (where the convolution's input is): the
    weight is then standardized in (out, kh, kw, in) order, which for a channels_last weight
    (as ``ScaledStdConv2d`` keeps its kxk weights) is its own memory order, so neither the
    standardization nor the convolution nor the gradient copies it.
    """
    out_channels = weight.shape[0]
    permuted = channels_last and weight.dim() == 4
    if weight.device.type == "cpu" and not torch.compiler.is_compiling():
        src = weight.permute(0, 2, 3, 1) if permuted else weight
        flat = src.reshape(1, out_channels, -1)
        bn_weight = gain.reshape(out_channels) * (scale / math.sqrt(fan_in))
        out, _, invstd = torch.native_batch_norm(
            flat, bn_weight, None, None, None, True, 0.0, 0.0
        )
        # invstd = 1 / sqrt(var): the floor is not reached while invstd <= sqrt(fan_in / eps).
        if bool((invstd.detach() <= math.sqrt(fan_in / eps)).all()):
            out = out.view(src.shape)
            return out.permute(0, 3, 1, 2) if permuted else out
    out = _FlooredStandardize.apply(weight, gain, fan_in, eps, scale)
    if out.dim() == 4:
        layout = torch.channels_last if permuted else torch.contiguous_format
        out = out.contiguous(memory_format=layout)
    return out


class _FlooredStandardize(torch.autograd.Function):
    """``standardize_weight`` with the eps floor, by elementwise ops and a hand-written backward
    (three passes over the weight instead of autograd's ten)."""

    @staticmethod
    def forward(ctx, weight, gain, fan_in: int, eps: float, scale: float):
        ctx.scale, ctx.fan_in = scale, fan_in
        dims = tuple(range(1, weight.dim()))
        var, mean = torch.var_mean(weight, dim=dims, keepdim=True, correction=0)
        var_n = var * fan_in
        inv_std = torch.rsqrt(torch.clamp(var_n, min=eps))
        mult = inv_std * gain * scale
        ctx.save_for_backward(weight, gain, mean, inv_std, var_n >= eps)
        return torch.addcmul(-mean * mult, weight, mult)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        weight, gain, mean, inv_std, unclamped = ctx.saved_tensors
        dims = tuple(range(1, weight.dim()))
        grad_sum = grad.sum(dim=dims, keepdim=True)
        # sum(g * (w - mean)) per channel, without a weight-sized temporary for (w - mean).
        grad_dot = (grad * weight).sum(dim=dims, keepdim=True) - mean * grad_sum
        grad_gain = None
        if ctx.needs_input_grad[1]:
            grad_gain = (grad_dot * inv_std * ctx.scale).to(gain.dtype)
        grad_weight = None
        if ctx.needs_input_grad[0]:
            mult = inv_std * gain * ctx.scale
            # d/dw of (w - mean) * inv_std: inv_std * (g - mean(g)) minus the part through the
            # variance, inv_std**3 * (w - mean) * sum(g * (w - mean)), which is absent where the
            # eps floor holds inv_std constant.
            k = mult * inv_std * inv_std * grad_dot * unclamped
            grad_weight = torch.addcmul(k * mean - mult * grad_sum / ctx.fan_in, grad, mult)
            grad_weight.addcmul_(weight, k, value=-1.0)
        return grad_weight, grad_gain, None, None, None


class ScaledStdConv2d(nn.Conv2d):
    """Conv2d with scaled weight standardization (Brock et al. 2021), TF 'SAME' padding.

    ``w_hat = gain * (w - mean(w)) / sqrt(max(var(w) * fan_in, eps))`` with mean/var over the fan-in
    of each output channel (DeepMind's formulation, ``eps = 1e-4``).

    Inference cache: in eval mode, when no gradient flows to the weights (``torch.no_grad()``,
    ``inference_mode`` or frozen parameters), the standardized weight is computed once and reused
    until the weight or gain changes: any in-place write through the parameters (optimizer steps,
    ``copy_``, ``load_state_dict``) bumps their version counters, and ``train()``/``eval()``,
    ``load_state_dict`` and device/dtype moves drop the cache. Writes through ``param.data``
    bypass PyTorch's version counters: after such writes call ``model.eval()`` (or
    ``clear_cache()``) before the next forward. Under ``torch.compile`` nothing is cached (the
    compiler fuses the standardization instead). The cache costs one extra copy of the weights
    (two with the packed copy below).

    ``input_gain`` (a float attribute, 1 by default; not a parameter) multiplies the input: the
    conv is linear, so it is folded into the standardized weight instead of costing a pass over
    the activations. NF blocks set it to the activation's gamma (and beta). ``activation`` (a
    name of ``ACTIVATION_GAMMA`` or None, the default) is applied to the output, *without* its
    gamma (which the next conv's ``input_gain`` takes): in eval on CPU it is fused into the
    convolution.

    Eval on CPU (fp32, channels_last input, as the trunk computes by default): besides the
    standardized weight, the cache keeps it reordered into oneDNN's blocked layout for the last
    input shape, and the convolution runs through oneDNN's fused conv+activation op (what
    ``torch.compile``'s freezing uses); any other setting takes ``F.conv2d``. Without autograd
    on CPU the zero-padded input of a SAME-padded conv goes into a buffer kept between calls
    (see ``EvalWorkspace``).

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
        self.input_gain = 1.0
        self.activation: str | None = None
        k = self.kernel_size[0]
        # Stride 1 with an odd kernel pads symmetrically: a static padding. Otherwise SAME padding
        # depends on the input size and is computed per call.
        self._static_pad = (k - 1) // 2 if (self.stride[0] == 1 and k % 2 == 1) else None
        self._cache: list | None = None
        self._workspace = EvalWorkspace()  # the padded input of a SAME-padded conv, in eval
        if k > 1:
            # kxk weights live in channels_last, the layout the convolutions compute in on CPU:
            # standardizing them in that order needs no copy, and their gradients come back in
            # it (a plain 1x1 weight is channels_last already).
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

    def standardized_weight(self, channels_last: bool = False) -> torch.Tensor:
        """The weight the convolution uses (``input_gain`` included); ``channels_last`` asks for
        it in that layout (where the convolution's input is)."""
        return standardize_weight(
            self.weight, self.gain, self.fan_in, self.eps, float(self.input_gain),
            channels_last and self.kernel_size != (1, 1),
        )

    def _cached(self) -> list | None:
        """The cache entry ``[key, weight, gain, standardized, packed]`` when the cached path
        applies (eval, no gradient to the weights, not compiling), else None."""
        if (
            self.training
            or (torch.is_grad_enabled() and (self.weight.requires_grad or self.gain.requires_grad))
            or torch.compiler.is_compiling()
        ):
            return None
        weight, gain = self.weight, self.gain
        key = (
            weight._version, gain._version, weight.data_ptr(), gain.data_ptr(), weight.dtype,
            weight.device, weight.shape, self.input_gain,
        )
        cache = self._cache
        # The cache holds the tensors it was computed from, so their memory cannot be reused by
        # other tensors while it lives: an equal data_ptr then means the same storage, and an
        # equal version counter means no in-place write through the parameter since.
        if cache is None or cache[0] != key or cache[1] is not weight or cache[2] is not gain:
            # A normal tensor even under inference_mode, so it can be served outside it later.
            with torch.inference_mode(False), torch.no_grad():
                cache = [key, weight, gain, self.standardized_weight(_is_channels_last(weight)),
                         None]
            self._cache = cache
        return cache

    def _packed_forward(self, x: torch.Tensor, padding: int, cache: list) -> torch.Tensor | None:
        """Eval on CPU: oneDNN's convolution with the standardized weight reordered once into
        its blocked layout (instead of on every call) and the activation fused into it; None
        where that path does not apply."""
        if (
            not _PACKED_CONV
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or cache[3].dtype != torch.float32
            or x.dim() != 4
            # The fused op returns channels_last: keep an NCHW input's layout with F.conv2d.
            or not x.is_contiguous(memory_format=torch.channels_last)
            or torch.is_autocast_enabled("cpu")
            or (x.requires_grad and torch.is_grad_enabled())  # the fused op has no autograd
        ):
            return None
        pad, stride, dilation = [padding] * 2, list(self.stride), list(self.dilation)
        # oneDNN picks the blocked layout for the input shape (for 1x1 convs a weight packed
        # for another shape ran 3x slower): the packed weight serves one shape, the last one.
        entry = cache[4]  # read once: another thread may replace it meanwhile
        if entry is None or entry[0] != x.shape:
            with torch.inference_mode(False), torch.no_grad():
                packed = torch.ops.mkldnn._reorder_convolution_weight(
                    cache[3], pad, stride, dilation, self.groups, list(x.shape)
                )
            entry = cache[4] = (x.shape, packed)
        attr, algorithm = _FUSED_ACTIVATION.get(self.activation, ("none", ""))
        return torch.ops.mkldnn._convolution_pointwise(
            x, entry[1], self.bias, pad, stride, dilation, self.groups, attr, [], algorithm
        )

    def clear_cache(self) -> None:
        self._cache = None
        self._workspace.clear()

    def train(self, mode: bool = True):
        self.clear_cache()
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._static_pad is None:
            ph = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
            pw = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
            if (any(ph) or any(pw)) and x.dim() == 4 and EvalWorkspace.applies(x):
                workspace = self._workspace
                if workspace.try_acquire():
                    try:
                        # The zero border of a reused padded buffer stays: only the interior
                        # is ever written (its place is the tag: an odd and an even size can
                        # pad to the same shape).
                        n, c, h, w = x.shape
                        padded = workspace.buffer(
                            "padded", (n, c, h + sum(ph), w + sum(pw)), x, zero=True,
                            tag=(ph, pw))
                        padded[:, :, ph[0]:ph[0] + h, pw[0]:pw[0] + w].copy_(x)
                        return self._conv(padded, 0)
                    finally:
                        workspace.release()
            if any(ph) or any(pw):
                x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]))
            return self._conv(x, 0)
        return self._conv(x, self._static_pad)

    def _conv(self, x: torch.Tensor, padding: int) -> torch.Tensor:
        cache = self._cached()
        if cache is not None:
            out = self._packed_forward(x, padding, cache)
            if out is not None:
                return out
            weight = cache[3]
            if self.kernel_size != (1, 1) and _is_channels_last(weight) != _is_channels_last(x):
                # Convolutions follow their weight's layout too: the cache switches to the
                # input's layout (once, not per call).
                weight = cache[3] = weight.contiguous(
                    memory_format=torch.channels_last if _is_channels_last(x)
                    else torch.contiguous_format)
        else:
            weight = self.standardized_weight(_is_channels_last(x))
        out = F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)
        return out if self.activation is None else _ACTIVATION_FN[self.activation](out)

    def extra_repr(self) -> str:
        extra = f", input_gain={self.input_gain:.6f}" if self.input_gain != 1.0 else ""
        if self.activation is not None:
            extra += f", activation={self.activation}"
        return super().extra_repr() + extra

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state["_cache"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        # Modules pickled by nfdet versions without eval workspaces.
        self.__dict__.setdefault("_workspace", EvalWorkspace())


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """``x.mean(dim=(2, 3))``, with a backward that keeps a channels_last gradient fast.

    ``mean``'s backward materialises the broadcast gradient divided by H*W in NCHW, which then
    meets the channels_last gradient of the same tensor in a slow mixed-layout addition. Here
    the division happens on the (N, C) result, so the gradient stays a free broadcast.
    """
    return x.sum(dim=(2, 3)) * (1.0 / (x.shape[2] * x.shape[3]))


class SqueezeExcite(nn.Module):
    """Squeeze-excite returning the sigmoid gate (the block multiplies by ``2 * gate``).

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
        mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
        mask.bernoulli_(keep)
        if self.scale_by_keep:
            mask.div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"rate={self.rate:.4f}"
