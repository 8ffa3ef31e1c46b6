"""The one table of architectures: NFNets (F0-F7, F0+-F7+, nano) and NF-ResNets
(50/101/152/200, nano), built by the same trunk (``nfdet.modeling.nfnet``).

Architecture only: training recipes (resolutions, dropout, RandAugment, schedules) live in the
pretraining configs (``configs/pretrain/``), never here.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

__all__ = ["NFNetSpec", "NFNET_VARIANTS", "NF_RESNET_DEPTHS", "get_variant"]


STEMS = ("deep", "7x7_pool")
SHORTCUTS = ("avg_pool", "strided_conv")


@dataclass(frozen=True)
class NFNetSpec:
    """Architecture of one variant (an NFNet or an NF-ResNet: the same trunk builds both).

    Args:
        depths (tuple[int, ...]): residual blocks per stage (res2..res5).
        widths (tuple[int, ...]): output channels per stage.
        stem (str): "deep": NFNet's four 3x3 convs (stride 4, docs/reference.md, "Architecture");
            "7x7_pool": one 7x7 stride-2 conv and a 3x3 stride-2 max pool, no activation
            (NF-ResNets, docs/reference.md, "NF-ResNets").
        stem_widths (tuple[int, ...]): "deep": channels of the first three stem convs (the
            fourth has ``widths[0] // 2``); "7x7_pool": the one conv's channels, ``(64,)``.
        group_size (int): channels per group of the 3x3 convs; 0: ungrouped (one group, the
            group size is the full bottleneck width).
        bottleneck_ratio (float): bottleneck width = output width * ratio, rounded down to a
            multiple of ``group_size`` (when grouped).
        se_ratio (float): squeeze-excite hidden width = output width * ratio; 0: no
            squeeze-excite.
        conv2b (bool): a second grouped 3x3 conv after the strided one (NFNets: yes).
        shortcut (str): the transition shortcut: "avg_pool" (a 2x2 average pool when strided,
            then a 1x1 conv; NFNets) or "strided_conv" (a 1x1 conv with the block's stride;
            NF-ResNets). Both act on the activated input ``act(x) * beta``.
        final_multiplier (int): the final 1x1 conv has ``final_multiplier * widths[-1]``
            channels; 0: no final conv (the head activates the last stage's output).
        alpha (float): scale of every residual branch.
        activation (str): gamma-scaled nonlinearity (see ``layers.GammaAct``).
        note (str): what the variant is for.
    """

    depths: tuple[int, ...]
    widths: tuple[int, ...]
    stem: str = "deep"
    stem_widths: tuple[int, ...] = (16, 32, 64)
    group_size: int = 128
    bottleneck_ratio: float = 0.5
    se_ratio: float = 0.5
    conv2b: bool = True
    shortcut: str = "avg_pool"
    final_multiplier: int = 2
    alpha: float = 0.2
    activation: str = "gelu"
    note: str = ""

    def __post_init__(self):
        if self.stem not in STEMS:
            raise ValueError(
                f"NFNetSpec.stem must be one of {', '.join(STEMS)}, got {self.stem!r}"
            )
        if self.shortcut not in SHORTCUTS:
            raise ValueError(
                f"NFNetSpec.shortcut must be one of {', '.join(SHORTCUTS)}, got {self.shortcut!r}"
            )

    @property
    def stem_out(self) -> int:
        """Channels of the stem's output."""
        return self.widths[0] // 2 if self.stem == "deep" else self.stem_widths[-1]

    @property
    def stem_conv_widths(self) -> tuple[int, ...]:
        """Output channels of every stem conv, in order."""
        if self.stem == "deep":
            return tuple(self.stem_widths) + (self.stem_out,)
        return tuple(self.stem_widths)

    @property
    def num_features(self) -> int:
        """Channels of the features the classifier pools."""
        if self.final_multiplier:
            return self.final_multiplier * self.widths[-1]
        return self.widths[-1]

    def bottleneck_width(self, out_channels: int) -> int:
        if not self.group_size:
            return int(out_channels * self.bottleneck_ratio)
        groups = max(1, int(out_channels * self.bottleneck_ratio) // self.group_size)
        return groups * self.group_size

    def conv_groups(self, out_channels: int) -> int:
        """Groups of the 3x3 convs of a block with ``out_channels`` outputs."""
        if not self.group_size:
            return 1
        return self.bottleneck_width(out_channels) // self.group_size

    def se_hidden(self, out_channels: int) -> int:
        """Squeeze-excite hidden width (0: no squeeze-excite)."""
        return max(1, int(out_channels * self.se_ratio)) if self.se_ratio > 0 else 0


_F_WIDTHS = (256, 512, 1536, 1536)
_F_PLUS_WIDTHS = (384, 768, 2048, 2048)
# DeepMind's nfnet_params: F<n> has depths n+1 times [1, 2, 6, 3].
_F_DEPTHS = {f"F{n}": tuple((n + 1) * d for d in (1, 2, 6, 3)) for n in range(8)}

NFNET_VARIANTS: dict[str, NFNetSpec] = {}
for _name, _depths in _F_DEPTHS.items():
    NFNET_VARIANTS[_name] = NFNetSpec(
        depths=_depths, widths=_F_WIDTHS, note="Brock et al. 2021, Table 7"
    )
    NFNET_VARIANTS[_name + "+"] = NFNetSpec(
        depths=_depths, widths=_F_PLUS_WIDTHS, note="wider F+ variant (Brock et al. 2021)"
    )

# Not from the paper: the same block design, shrunk so that a Mask R-CNN training iteration at
# 256 px takes well under a second on 2 CPU cores. For tests, smoke runs and the CPU demo.
NFNET_VARIANTS["nano"] = NFNetSpec(
    depths=(1, 1, 2, 1),
    widths=(32, 64, 128, 128),
    stem_widths=(8, 16, 16),
    group_size=16,
    note="nfdet's tiny variant for tests and CPU demos (not from the paper)",
)


# DeepMind's NF_ResNet.variant_dict (nf_resnet.py): blocks per stage; widths 4 x (64, 128, 256,
# 512), a 64-channel 7x7 stem, bottleneck ratio 0.25, ungrouped 3x3 convs, no second 3x3 conv,
# squeeze-excite off, strided 1x1 conv shortcuts, no final conv, ReLU (docs/reference.md,
# "NF-ResNets").
NF_RESNET_DEPTHS = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}
_NF_RESNET = dict(
    stem="7x7_pool",
    stem_widths=(64,),
    group_size=0,
    bottleneck_ratio=0.25,
    se_ratio=0.0,
    conv2b=False,
    shortcut="strided_conv",
    final_multiplier=0,
    activation="relu",
)
for _depth, _depths in NF_RESNET_DEPTHS.items():
    NFNET_VARIANTS[f"nf_resnet{_depth}"] = NFNetSpec(
        depths=_depths, widths=(256, 512, 1024, 2048), **_NF_RESNET,
        note=f"NF-ResNet-{_depth} (DeepMind nf_resnet.py; Brock et al. 2021)",
    )
# Not from DeepMind: the NF-ResNet block design at nano size, for tests and CPU runs.
NFNET_VARIANTS["nf_resnet_nano"] = NFNetSpec(
    depths=(1, 1, 2, 1),
    widths=(32, 64, 128, 256),
    **{**_NF_RESNET, "stem_widths": (16,)},
    note="nfdet's tiny NF-ResNet for tests and CPU runs (not from DeepMind)",
)


def get_variant(name: str) -> NFNetSpec:
    """Look up a variant by name (case-insensitive; "dm_nfnet_f0"/"nfnet_f0" prefixes accepted;
    NF-ResNets are "nf_resnet50", "nf_resnet101", "nf_resnet152", "nf_resnet200",
    "nf_resnet_nano").

    Raises:
        ValueError: when the name is unknown; the message lists the valid names.
    """
    key = str(name).strip()
    for prefix in ("dm_nfnet_", "nfnet_"):
        if key.lower().startswith(prefix):
            key = key[len(prefix):]
    for valid in NFNET_VARIANTS:
        if valid.lower() == key.lower():
            return NFNET_VARIANTS[valid]
    by_lower = {valid.lower(): valid for valid in NFNET_VARIANTS}
    close = [by_lower[k] for k in difflib.get_close_matches(key.lower(), by_lower, n=3)]
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise ValueError(
        f"Unknown NFNet variant {name!r}.{hint} Valid variants: {', '.join(NFNET_VARIANTS)}"
    )


def canonical_name(name: str) -> str:
    """The table key of a variant name (e.g. ``"dm_nfnet_f0"`` -> ``"F0"``)."""
    spec = get_variant(name)
    return next(k for k, v in NFNET_VARIANTS.items() if v is spec)
