"""The one table of NFNet architectures.

Architecture only: training recipes (resolutions, dropout, RandAugment, schedules) live in the
pretraining configs (``configs/pretrain/``), never here.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

__all__ = ["NFNetSpec", "NFNET_VARIANTS", "get_variant"]


@dataclass(frozen=True)
class NFNetSpec:
    """Architecture of one NFNet variant.

    Args:
        depths (tuple[int, ...]): residual blocks per stage (res2..res5).
        widths (tuple[int, ...]): output channels per stage.
        stem_widths (tuple[int, ...]): channels of the first three stem convs; the fourth stem conv
            has ``widths[0] // 2`` channels.
        group_size (int): channels per group of the two grouped 3x3 convs.
        bottleneck_ratio (float): bottleneck width = output width * ratio, rounded down to a
            multiple of ``group_size``.
        se_ratio (float): squeeze-excite hidden width = output width * ratio.
        final_multiplier (int): the final 1x1 conv has ``final_multiplier * widths[-1]`` channels.
        alpha (float): scale of every residual branch.
        activation (str): gamma-scaled nonlinearity (see ``layers.GammaAct``).
        note (str): what the variant is for.
    """

    depths: tuple[int, ...]
    widths: tuple[int, ...]
    stem_widths: tuple[int, ...] = (16, 32, 64)
    group_size: int = 128
    bottleneck_ratio: float = 0.5
    se_ratio: float = 0.5
    final_multiplier: int = 2
    alpha: float = 0.2
    activation: str = "gelu"
    note: str = ""

    @property
    def stem_out(self) -> int:
        return self.widths[0] // 2

    @property
    def num_features(self) -> int:
        return self.final_multiplier * self.widths[-1]

    def bottleneck_width(self, out_channels: int) -> int:
        groups = max(1, int(out_channels * self.bottleneck_ratio) // self.group_size)
        return groups * self.group_size


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


def get_variant(name: str) -> NFNetSpec:
    """Look up a variant by name (case-insensitive; "dm_nfnet_f0"/"nfnet_f0" prefixes accepted).

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
