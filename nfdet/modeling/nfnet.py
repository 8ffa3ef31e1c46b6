"""NFNet trunk and classifier (Brock et al., "High-Performance Large-Scale Image Recognition
Without Normalization", ICML 2021); the same trunk builds NF-ResNets (DeepMind's
``nf_resnet.py``: a 7x7 stem with max pooling, ungrouped blocks without ``conv2b`` and
squeeze-excite, strided 1x1 conv shortcuts, no final conv; docs/nf_resnet.md).

Differences from the official implementation (DeepMind, JAX/Haiku):
    - GELU is exact (``F.gelu``, as timm's PyTorch port of the released weights); DeepMind trained
      with the tanh approximation, available as ``activation="gelu_tanh"``.
    - Squeeze-excite uses ``nn.Linear`` as DeepMind does (timm uses 1x1 convs; the weights
      reshape 1:1).
    - Weights are PyTorch layouts (OIHW convs, out x in linears); ``nfdet.checkpoint`` converts.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import fused
from .activations import get_activation
from .layers import (
    DerivedTensors,
    GammaAct,
    ScaledStdConv2d,
    SqueezeExcite,
    StochasticDepth,
    capturing_graph,
    pad_same,
    spatial_mean,
)
from .variants import NFNetSpec, get_variant

__all__ = [
    "ACTIVATION_CHECKPOINT_MODES",
    "NFBlock",
    "NFStem",
    "NFResNetStem",
    "NFNetTrunk",
    "NFNet",
    "build_nfnet",
    "STAGE_NAMES",
]

STAGE_NAMES = ("res2", "res3", "res4", "res5")
STAGE_STRIDES = (1, 2, 2, 2)
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
# "" off; "stage": keep only the input of the stem and of each stage; "block": of every block.
ACTIVATION_CHECKPOINT_MODES = ("", "stage", "block")

# FX graphs call these functions instead of tracing into their shape and device logic.
torch.fx.wrap("spatial_mean")


class NFBlock(DerivedTensors):
    """Normalizer-free bottleneck block (docs/reference.md, "Architecture" and "NF-ResNets").

    ``out = act(x) * beta``; the branch is 1x1 -> act -> grouped 3x3 (stride) -> act -> grouped
    3x3 -> act -> 1x1, squeeze-excite (gate x 2), stochastic depth and a scalar ``skip_gain``
    (init 0); the result is ``branch * alpha + shortcut``. The shortcut is ``x``, or a 1x1 conv
    of ``act(x) * beta`` (after a 2x2 average pool when strided) when the shape changes.
    NF-ResNet blocks (``conv2b=False``, ``se_hidden=0``, ``shortcut="strided_conv"``, group size
    = bottleneck width) leave out the second 3x3 conv and squeeze-excite, and their shortcut is
    a 1x1 conv with the block's stride (no pool).

    ``forward`` is that formulation, step by step. On CPU in float32 the same function runs
    through ``fused.block_forward`` (gamma and beta folded into the convs, activations fused,
    packed eval weights, reused buffers), unless the fused path steps aside (``fused.applies``:
    graph captures, other devices and dtypes, autocast, hooks on the block's modules).

    Args:
        in_channels (int): input channels.
        out_channels (int): output channels.
        bottleneck_channels (int): width of the grouped convs.
        group_size (int): channels per group (``bottleneck_channels``: ungrouped).
        se_hidden (int): squeeze-excite hidden width; 0: no squeeze-excite.
        stride (int): 1 or 2.
        alpha (float): residual branch scale.
        beta (float): 1 / expected std of the input.
        drop_path_rate (float): stochastic depth rate.
        activation (str): a key of the activation registry.
        conv2b (bool): build the second grouped 3x3 conv (NFNets; NF-ResNets have none).
        shortcut (str): "avg_pool" (2x2 average pool when strided, then a 1x1 conv; NFNets) or
            "strided_conv" (a 1x1 conv with the block's stride; NF-ResNets).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bottleneck_channels: int,
        group_size: int,
        se_hidden: int,
        stride: int = 1,
        alpha: float = 0.2,
        beta: float = 1.0,
        drop_path_rate: float = 0.0,
        activation: str = "gelu",
        conv2b: bool = True,
        shortcut: str = "avg_pool",
    ):
        super().__init__()
        get_activation(activation)  # an unknown name fails here, naming it
        if shortcut not in ("avg_pool", "strided_conv"):
            raise ValueError(f"shortcut must be 'avg_pool' or 'strided_conv', got {shortcut!r}")
        self.alpha = alpha
        self.beta = beta
        self.stride = stride
        self.activation = activation
        groups = bottleneck_channels // group_size
        self.act = GammaAct(activation)
        pooled = shortcut == "avg_pool"
        if stride > 1 and pooled:
            # SAME average pooling: a border window averages only its valid inputs.
            self.pool = nn.AvgPool2d(2, stride=2, ceil_mode=True, count_include_pad=False)
        else:
            self.pool = None
        if stride > 1 or in_channels != out_channels:
            self.shortcut = ScaledStdConv2d(in_channels, out_channels, 1,
                                            stride=1 if pooled else stride)
        else:
            self.shortcut = None
        self.conv1 = ScaledStdConv2d(in_channels, bottleneck_channels, 1)
        self.conv2 = ScaledStdConv2d(
            bottleneck_channels, bottleneck_channels, 3, stride=stride, groups=groups
        )
        if conv2b:
            self.conv2b = ScaledStdConv2d(bottleneck_channels, bottleneck_channels, 3,
                                          groups=groups)
        else:
            self.conv2b = None
        self.conv3 = ScaledStdConv2d(bottleneck_channels, out_channels, 1)
        self.se = SqueezeExcite(out_channels, se_hidden) if se_hidden > 0 else None
        self.drop_path = StochasticDepth(drop_path_rate)
        self.skip_gain = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.applies(x, self):
            return fused.block_forward(self, x)
        # x has std ~expected_std (the trunk's bookkeeping): beta = 1 / expected_std brings it
        # back to unit variance, and act(.) * gamma keeps unit variance for unit-variance input.
        out = self.act(x) * self.beta
        shortcut = x
        if self.shortcut is not None:
            # A transition block re-projects the normalized activations (NFNets: average pool
            # first when strided; NF-ResNets: a strided 1x1 conv): its output starts a stream of
            # unit variance again.
            shortcut = self.shortcut(self.pool(out) if self.pool is not None else out)
        # Weight-standardized convs preserve unit variance; gamma-scaled activations too.
        out = self.conv1(out)
        out = self.conv2(self.act(out))
        if self.conv2b is not None:
            out = self.conv2b(self.act(out))
        out = self.conv3(self.act(out))
        if self.se is not None:
            # The sigmoid gate is ~0.5 at init: the x2 keeps the branch's variance.
            out = 2.0 * self.se(out) * out
        out = self.drop_path(out)
        # skip_gain starts at 0: every block is the identity at init.
        out = out * self.skip_gain
        # The unit-variance branch, scaled by alpha, adds alpha**2 to the stream's variance:
        # Var(x_next) = Var(x) + alpha**2 (what the trunk's expected_std tracks).
        return out * self.alpha + shortcut

    def __setstate__(self, state):
        super().__setstate__(state)
        if "act" not in self._modules:  # pickled by nfdet versions that folded every gamma
            self._modules["act"] = GammaAct(self.activation)

    def extra_repr(self) -> str:
        return (
            f"{self.activation}, alpha={self.alpha}, beta={self.beta:.6f}, stride={self.stride}"
        )


class NFStem(nn.Module):
    """Deep stem, stride 4 (docs/reference.md, "Architecture"): 3x3/2 -> act -> 3x3 -> act ->
    3x3 -> act -> 3x3/2, no activation after the last conv (every block activates its input).

    Args:
        in_channels (int): image channels.
        widths (tuple[int, int, int, int]): output channels of the four convs.
        activation (str): a key of the activation registry.
    """

    def __init__(self, in_channels: int, widths: tuple[int, ...], activation: str = "gelu"):
        super().__init__()
        c1, c2, c3, c4 = widths
        self.activation = activation
        self.act = GammaAct(activation)
        self.conv1 = ScaledStdConv2d(in_channels, c1, 3, stride=2)
        self.conv2 = ScaledStdConv2d(c1, c2, 3)
        self.conv3 = ScaledStdConv2d(c2, c3, 3)
        self.conv4 = ScaledStdConv2d(c3, c4, 3, stride=2)
        self.out_channels = c4
        self.stride = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.applies(x, self):
            return fused.stem_forward(self, x)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.act(self.conv3(x))
        return self.conv4(x)

    def __setstate__(self, state):
        super().__setstate__(state)
        if "act" not in self._modules:  # pickled by nfdet versions that folded every gamma
            self._modules["act"] = GammaAct(self.activation)


class NFResNetStem(nn.Module):
    """NF-ResNet stem, stride 4 (docs/reference.md, "NF-ResNets"): a 7x7 stride-2 conv, then a
    3x3 stride-2 max pool, no activation (the first block activates its input).

    Both pad as TensorFlow's 'SAME' (DeepMind's ``padding='SAME'``): the conv with zeros, as
    every nfdet conv; the max pool with ``-inf``, so a border window takes the maximum of its
    valid inputs only. The fused CPU path does not apply to this stem (one conv: the plain code
    with its eval weight cache).

    Args:
        in_channels (int): image channels.
        widths (tuple[int]): output channels of the conv, ``(64,)`` for DeepMind's variants.
        activation (str): a key of the activation registry (kept for the trunk's bookkeeping;
            the stem applies none).
    """

    def __init__(self, in_channels: int, widths: tuple[int, ...], activation: str = "relu"):
        super().__init__()
        (c1,) = widths
        self.activation = activation
        self.conv1 = ScaledStdConv2d(in_channels, c1, 7, stride=2)
        self.out_channels = c1
        self.stride = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return F.max_pool2d(pad_same(x, (3, 3), (2, 2), value=float("-inf")), 3, stride=2)


STEM_TYPES = {"deep": NFStem, "7x7_pool": NFResNetStem}


@torch.fx.wrap
def to_memory_format(x: torch.Tensor, memory_format: str) -> torch.Tensor:
    """``x`` in the trunk's layout: ``memory_format`` "auto" (channels_last on CPU, the input's
    own layout elsewhere), "channels_last" or "contiguous"."""
    if memory_format == "auto":
        channels_last = x.device.type == "cpu"
    else:
        channels_last = memory_format == "channels_last"
    if channels_last and x.dim() == 4:
        # Convolutions follow their input's layout, and so does everything after them.
        return x.contiguous(memory_format=torch.channels_last)
    if memory_format == "contiguous":
        return x.contiguous()
    return x


class NFNetTrunk(nn.Module):
    """Stem, stages and the final 1x1 conv (for variants with one) and activation: the part
    shared by the classifier and the detector.

    The signal-propagation bookkeeping lives here and only here: each block's ``beta`` is
    ``1 / expected_std`` of its input; after a block ``expected_std`` grows as
    ``sqrt(std**2 + alpha**2)``, except that after the first block of every stage (whose shortcut
    re-projects the normalized stream) it is first reset to 1. The first block of a stage thus
    still divides by the std accumulated over the previous stage (as DeepMind and timm do).
    Stochastic depth grows linearly with the global block index over the *full*
    variant, so a truncated trunk keeps the rates of the full one.

    Args:
        spec (NFNetSpec): the architecture.
        num_stages (int): how many stages to build (1..4); later ones are skipped entirely.
        final_conv (bool): build the classifier's feature head (requires all 4 stages): the
            final 1x1 conv, where the variant has one (``spec.final_multiplier``), and the final
            activation. NF-ResNets have only the activation.
        drop_path_rate (float): stochastic depth rate of the last block.
        in_channels (int): image channels.
        activation (str | None): override the variant's nonlinearity.
        memory_format (str): layout the trunk computes in. "auto" (default): channels_last on
            CPU, where oneDNN's convolutions (grouped ones above all) run faster in it
            (docs/benchmarks.md, "Backbone"), and the input's own layout elsewhere;
            "channels_last" or "contiguous" (NCHW) to force one. Outputs are the same values
            either way; on CPU the feature maps come back channels_last-strided.
        activation_checkpoint (str): activation checkpointing in training: "" off, "stage"
            (the stem and each stage is one segment) or "block" (the stem and each block).
            A segment keeps only its input for the backward pass and runs its forward again
            there (``torch.utils.checkpoint``, non-reentrant): less memory for more compute.
            The recomputation restores the RNG state, so stochastic depth draws the same masks;
            losses and gradients are those without it. Only in training mode with gradients
            enabled and outside graph captures; the attribute may be changed at any time.
    """

    def __init__(
        self,
        spec: NFNetSpec,
        num_stages: int = 4,
        final_conv: bool = True,
        drop_path_rate: float = 0.0,
        in_channels: int = 3,
        activation: str | None = None,
        memory_format: str = "auto",
        activation_checkpoint: str = "",
    ):
        super().__init__()
        if activation_checkpoint not in ACTIVATION_CHECKPOINT_MODES:
            raise ValueError(
                "activation_checkpoint must be one of '', 'stage', 'block', got "
                f"{activation_checkpoint!r}"
            )
        self.activation_checkpoint = activation_checkpoint
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(
                f"memory_format must be one of {', '.join(MEMORY_FORMATS)}, got {memory_format!r}"
            )
        self.memory_format = memory_format
        if not 1 <= num_stages <= len(spec.depths):
            raise ValueError(f"num_stages must be in 1..{len(spec.depths)}, got {num_stages}")
        if final_conv and num_stages != len(spec.depths):
            raise ValueError("final_conv=True needs every stage (num_stages=4)")
        act = activation or spec.activation
        self.spec = spec
        self.stem = STEM_TYPES[spec.stem](in_channels, spec.stem_conv_widths, act)
        total_blocks = sum(spec.depths)
        self.stages = nn.ModuleList()
        self.stage_channels: list[int] = []
        self.stage_strides: list[int] = []
        channels, stride, block_idx = spec.stem_out, self.stem.stride, 0
        expected_std = 1.0
        for s in range(num_stages):
            out_channels = spec.widths[s]
            blocks = []
            for b in range(spec.depths[s]):
                blocks.append(
                    NFBlock(
                        channels,
                        out_channels,
                        bottleneck_channels=spec.bottleneck_width(out_channels),
                        group_size=(spec.bottleneck_width(out_channels)
                                    // spec.conv_groups(out_channels)),
                        se_hidden=spec.se_hidden(out_channels),
                        stride=STAGE_STRIDES[s] if b == 0 else 1,
                        alpha=spec.alpha,
                        beta=1.0 / expected_std,  # the std of this block's input
                        drop_path_rate=drop_path_rate * block_idx / total_blocks,
                        activation=act,
                        conv2b=spec.conv2b,
                        shortcut=spec.shortcut,
                    )
                )
                if b == 0:
                    # The transition block's shortcut re-projects act(x) * beta (unit variance):
                    # the stream is reset, then grows by alpha**2 per block.
                    expected_std = 1.0
                expected_std = (expected_std**2 + spec.alpha**2) ** 0.5
                channels = out_channels
                block_idx += 1
            stride *= STAGE_STRIDES[s]
            self.stages.append(nn.Sequential(*blocks))
            self.stage_channels.append(out_channels)
            self.stage_strides.append(stride)
        if final_conv:
            if spec.final_multiplier:
                self.final_conv = ScaledStdConv2d(channels, spec.num_features, 1)
            else:
                self.final_conv = None
            self.final_act = GammaAct(act)
        else:
            self.final_conv = None
            self.final_act = None

    def _checkpointing(self, x: torch.Tensor) -> bool:
        return (bool(self.activation_checkpoint) and self.training and torch.is_grad_enabled()
                and not capturing_graph(x))

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the output of every built stage (pre-activation residual streams)."""
        x = to_memory_format(x, self.memory_format)
        if not self._checkpointing(x):
            x = self.stem(x)
            outs = []
            for stage in self.stages:
                x = stage(x)
                outs.append(x)
            return outs
        # Each segment saves its input only and is recomputed in backward (RNG state restored).
        x = checkpoint(self.stem, x, use_reentrant=False)
        outs = []
        for stage in self.stages:
            if self.activation_checkpoint == "stage":
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                for block in stage:
                    x = checkpoint(block, x, use_reentrant=False)
            outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stages(x)[-1]
        if self.final_conv is not None:
            # The last stage's stream is not activated by a block: the final 1x1 conv widens it
            # (final_multiplier x) and its activation gives the features the head pools.
            x = self.final_conv(x)
        if self.final_act is not None:
            # (NF-ResNets: the activated last stage, DeepMind's act -> pool.)
            x = self.final_act(x)
        return x


class NFNet(nn.Module):
    """NFNet (or NF-ResNet) image classifier: trunk -> global average pool -> dropout -> linear.

    Args:
        spec (NFNetSpec): the architecture.
        num_classes (int): classifier outputs.
        drop_rate (float): dropout before the classifier (the recipe's per-variant value).
        drop_path_rate (float): stochastic depth rate.
        in_channels (int): image channels.
        activation (str | None): override the variant's nonlinearity.
        memory_format (str): the trunk's layout ("auto", "channels_last", "contiguous").
        activation_checkpoint (str): the trunk's activation checkpointing ("", "stage",
            "block"; see ``NFNetTrunk``).
        head_init_std (float): the classifier weight starts N(0, head_init_std**2) (DeepMind's
            default 0.01), or all zeros with 0; the bias starts at 0.
    """

    def __init__(
        self,
        spec: NFNetSpec,
        num_classes: int = 1000,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        in_channels: int = 3,
        activation: str | None = None,
        memory_format: str = "auto",
        activation_checkpoint: str = "",
        head_init_std: float = 0.01,
    ):
        super().__init__()
        self.spec = spec
        self.num_classes = num_classes
        self.trunk = NFNetTrunk(
            spec, drop_path_rate=drop_path_rate, in_channels=in_channels, activation=activation,
            memory_format=memory_format, activation_checkpoint=activation_checkpoint,
        )
        self.head = nn.Module()
        self.head.drop = nn.Dropout(drop_rate)
        self.head.fc = nn.Linear(spec.num_features, num_classes)
        self.reset_head(head_init_std)

    def reset_head(self, std: float = 0.01) -> None:
        """Initialise the classifier: weight N(0, std**2) (zeros when ``std`` is 0), bias 0.

        Args:
            std (float): the weight's standard deviation (DeepMind's default 0.01).
        """
        if std < 0:
            raise ValueError(f"head_init_std must be >= 0, got {std}")
        if std > 0:
            nn.init.normal_(self.head.fc.weight, 0.0, std)
        else:
            nn.init.zeros_(self.head.fc.weight)
        nn.init.zeros_(self.head.fc.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map before pooling (activated final conv; NF-ResNets: the activated
        last stage)."""
        return self.trunk(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head.fc(self.head.drop(spatial_mean(features)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_nfnet(variant: str, num_classes: int = 1000, **overrides) -> NFNet:
    """Build an NFNet classifier.

    Args:
        variant (str): a key of ``NFNET_VARIANTS`` ("F0".."F7", "F0+".."F7+", "nano",
            "nf_resnet50", "nf_resnet101", "nf_resnet152", "nf_resnet200", "nf_resnet_nano").
        num_classes (int): classifier outputs.
        **overrides: ``drop_rate``, ``drop_path_rate``, ``in_channels``, ``activation``,
            ``memory_format``, ``activation_checkpoint``, ``head_init_std``, or any
            ``NFNetSpec`` field (e.g. ``depths=(1, 1, 1, 1)``) to change the architecture.

    Raises:
        ValueError: unknown variant (the message lists the valid ones) or unknown override.
    """
    spec = get_variant(variant)
    spec_fields = set(NFNetSpec.__dataclass_fields__)
    spec_overrides = {k: v for k, v in overrides.items() if k in spec_fields}
    model_kwargs = {k: v for k, v in overrides.items() if k not in spec_fields}
    allowed = {"drop_rate", "drop_path_rate", "in_channels", "activation", "memory_format",
               "activation_checkpoint", "head_init_std"}
    unknown = set(model_kwargs) - allowed
    if unknown:
        raise ValueError(
            f"Unknown build_nfnet override(s) {sorted(unknown)}; valid: "
            f"{sorted(allowed | spec_fields)}"
        )
    if spec_overrides:
        spec = NFNetSpec(**{**spec.__dict__, **{k: tuple(v) if isinstance(v, list) else v
                                               for k, v in spec_overrides.items()}})
    return NFNet(spec, num_classes=num_classes, **model_kwargs)
