"""Small layers of Normalizer-Free networks: scaled weight-standardized conv, gamma-scaled
activations, squeeze-excite and stochastic depth."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACTIVATION_GAMMA",
    "GammaAct",
    "ScaledStdConv2d",
    "SqueezeExcite",
    "StochasticDepth",
    "same_padding",
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


class GammaAct(nn.Module):
    """A nonlinearity multiplied by its variance-preserving gain ``gamma``.

    Args:
        name (str): "gelu" (exact, as timm's port), "gelu_tanh" (jax.nn.gelu's default, which
            DeepMind trained with), "relu" or "silu".
    """

    def __init__(self, name: str = "gelu"):
        super().__init__()
        if name not in ACTIVATION_GAMMA:
            raise ValueError(f"Unknown activation {name!r}; valid: {', '.join(ACTIVATION_GAMMA)}")
        self.name = name
        self.gamma = ACTIVATION_GAMMA[name]
        self._fn = _ACTIVATION_FN[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x) * self.gamma

    def extra_repr(self) -> str:
        return f"{self.name}, gamma={self.gamma:.6f}"


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) for one spatial dimension."""
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


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
    compiler fuses the standardization instead). The cache costs one extra copy of the weights.

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
        # Stride 1 with an odd kernel pads symmetrically: a static padding. Otherwise SAME padding
        # depends on the input size and is computed per call.
        self._static_pad = (k - 1) // 2 if (self.stride[0] == 1 and k % 2 == 1) else None
        self._cache: tuple | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Variance scaling over fan-in (normal); standardization makes the scale irrelevant.
        if not hasattr(self, "gain") or self.weight.is_meta:
            return  # nn.Conv2d's call before gain exists; meta tensors hold no values
        nn.init.normal_(self.weight, 0.0, 1.0 / math.sqrt(self.weight[0].numel()))
        nn.init.ones_(self.gain)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
        scale = torch.rsqrt(torch.clamp(var * self.fan_in, min=self.eps)) * self.gain
        return (w - mean) * scale

    def _weight_for_forward(self) -> torch.Tensor:
        if (
            self.training
            or (torch.is_grad_enabled() and (self.weight.requires_grad or self.gain.requires_grad))
            or torch.compiler.is_compiling()
        ):
            return self.standardized_weight()
        weight, gain = self.weight, self.gain
        key = (
            weight._version, gain._version, weight.data_ptr(), gain.data_ptr(), weight.dtype,
            weight.device, weight.shape,
        )
        cache = self._cache
        # The cache holds the tensors it was computed from, so their memory cannot be reused by
        # other tensors while it lives: an equal data_ptr then means the same storage, and an
        # equal version counter means no in-place write through the parameter since.
        if cache is None or cache[0] != key or cache[1] is not weight or cache[2] is not gain:
            # A normal tensor even under inference_mode, so it can be served outside it later.
            with torch.inference_mode(False), torch.no_grad():
                cache = (key, weight, gain, self.standardized_weight())
            self._cache = cache
        return cache[3]

    def clear_cache(self) -> None:
        self._cache = None

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._cache = None
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._static_pad is None:
            ph = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
            pw = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
            if any(ph) or any(pw):
                x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]))
            padding = 0
        else:
            padding = self._static_pad
        return F.conv2d(
            x, self._weight_for_forward(), self.bias, self.stride, padding, self.dilation,
            self.groups,
        )

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state["_cache"] = None
        return state


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
        h = x.mean(dim=(2, 3))
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
