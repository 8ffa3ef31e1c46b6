"""NFNet models: the variant table, NF layers, the shared trunk and the classifier."""

from .layers import ACTIVATION_GAMMA, GammaAct, ScaledStdConv2d, SqueezeExcite, StochasticDepth
from .nfnet import STAGE_NAMES, NFBlock, NFNet, NFNetTrunk, NFStem, build_nfnet
from .variants import NFNET_VARIANTS, NFNetSpec, canonical_name, get_variant

__all__ = [
    "ACTIVATION_GAMMA",
    "GammaAct",
    "ScaledStdConv2d",
    "SqueezeExcite",
    "StochasticDepth",
    "STAGE_NAMES",
    "NFBlock",
    "NFNet",
    "NFNetTrunk",
    "NFStem",
    "build_nfnet",
    "NFNET_VARIANTS",
    "NFNetSpec",
    "canonical_name",
    "get_variant",
]
