"""NFNet models (and NF-ResNets): the variant table, the activation registry, NF layers, the
shared trunk and the classifier (``fused`` holds the CPU float32 fast path of the block and
stem)."""

from . import fused
from .activations import ACTIVATION_GAMMA, ACTIVATIONS, Activation, get_activation
from .layers import GammaAct, ScaledStdConv2d, SqueezeExcite, StochasticDepth
from .nfnet import STAGE_NAMES, NFBlock, NFNet, NFNetTrunk, NFResNetStem, NFStem, build_nfnet
from .variants import NF_RESNET_DEPTHS, NFNET_VARIANTS, NFNetSpec, canonical_name, get_variant

__all__ = [
    "ACTIVATIONS",
    "ACTIVATION_GAMMA",
    "Activation",
    "get_activation",
    "fused",
    "GammaAct",
    "ScaledStdConv2d",
    "SqueezeExcite",
    "StochasticDepth",
    "STAGE_NAMES",
    "NFBlock",
    "NFNet",
    "NFNetTrunk",
    "NFStem",
    "NFResNetStem",
    "build_nfnet",
    "NFNET_VARIANTS",
    "NF_RESNET_DEPTHS",
    "NFNetSpec",
    "canonical_name",
    "get_variant",
]
