"""NFNet (or NF-ResNet) as a detectron2 backbone, alone or under an FPN.

The backbone wraps the classifier's own ``NFNetTrunk`` (attribute ``trunk``), so classifier
weights ``trunk.*`` are the detector's ``backbone.trunk.*`` (plain) or
``backbone.bottom_up.trunk.*`` (FPN): one fixed prefix, no second copy of the architecture.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

from ..modeling import STAGE_NAMES, NFNetSpec, NFNetTrunk, get_variant

__all__ = ["NFNetBackbone", "build_nfnet_backbone", "build_nfnet_fpn_backbone"]


class NFNetBackbone(Backbone):
    """An NFNet trunk returning ``res2``..``res5`` at strides 4, 8, 16, 32.

    Which tensor each output is:

    - ``res2``, ``res3``, ``res4``: the raw output of that stage, i.e. the pre-activation residual
      stream (NF blocks activate their input themselves; there is no normalization to apply).
    - ``res5``: with ``res5_final_conv=True`` (default) the *activated final 1x1 conv* on top of
      the last stage (``final_multiplier`` x the last stage width, e.g. 3072 channels for F0), the
      tensor the classifier pools and timm lists as its last feature; its pretrained weights are
      then used too. With ``res5_final_conv=False`` it is the raw last-stage output (1536 channels
      for F0) and the final conv is not built (its checkpoint weights are reported as unused).
    - NF-ResNets have no final conv: ``res5`` is the raw output of the last stage (2048 channels),
      in the same pre-activation convention as ``res2``..``res4`` and as timm's feature taps
      (docs/nf_resnet.md, "Detection"); they need ``res5_final_conv=False``.

    Only the stages needed for ``out_features`` are built, and never a classifier head, so every
    parameter takes part in the loss (detectron2 wraps DDP without ``find_unused_parameters``).
    The backbone contains no normalization layer.

    Differences from the paper: Brock et al. report using NFNets as Mask R-CNN backbones "without
    any modification" but publish no detection code (docs/reference.md, "Detection"); the choice
    of ``res5`` and freezing with ``requires_grad`` (there is no BatchNorm to freeze) are nfdet's.

    Args:
        spec (NFNetSpec): the architecture (``nfdet.modeling.get_variant(name)``).
        out_features (sequence[str]): a non-empty subset of ``("res2", "res3", "res4", "res5")``.
        res5_final_conv (bool): make ``res5`` the activated final 1x1 conv (see above).
        drop_path_rate (float): stochastic depth rate of the full variant's last block.
        freeze_at (int): detectron2's meaning: 0 trains everything, 1 freezes the stem, k >= 2
            freezes the stem and ``res2``..``res{k}`` (5 includes the final conv).
        in_channels (int): image channels.
        activation_checkpoint (str): the trunk's activation checkpointing in training ("",
            "stage", "block"; ``MODEL.NFNET.ACTIVATION_CHECKPOINT``, see ``NFNetTrunk``).
    """

    def __init__(
        self,
        spec: NFNetSpec,
        out_features: Sequence[str] = STAGE_NAMES,
        res5_final_conv: bool = True,
        drop_path_rate: float = 0.0,
        freeze_at: int = 0,
        in_channels: int = 3,
        activation_checkpoint: str = "",
    ):
        super().__init__()
        out_features = list(out_features)
        unknown = [f for f in out_features if f not in STAGE_NAMES]
        if not out_features or unknown:
            raise ValueError(
                f"NFNet out_features must be a non-empty subset of {list(STAGE_NAMES)}, "
                f"got {out_features}"
            )
        num_stages = max(STAGE_NAMES.index(f) for f in out_features) + 1
        if res5_final_conv and "res5" in out_features and not spec.final_multiplier:
            raise ValueError(
                "res5_final_conv=True needs a variant with a final 1x1 conv; this one has none "
                "(an NF-ResNet): use res5_final_conv=False (res5 = the last stage's output)"
            )
        self.res5_final_conv = bool(res5_final_conv) and "res5" in out_features
        self.trunk = NFNetTrunk(
            spec,
            num_stages=num_stages,
            final_conv=self.res5_final_conv,
            drop_path_rate=drop_path_rate,
            in_channels=in_channels,
            activation_checkpoint=activation_checkpoint,
        )
        # Keep detectron2's order (res2 first) whatever order the config lists.
        self._out_features = [f for f in STAGE_NAMES if f in out_features]
        self._out_feature_channels = {}
        self._out_feature_strides = {}
        for name, channels, stride in zip(
            STAGE_NAMES, self.trunk.stage_channels, self.trunk.stage_strides
        ):
            if name in self._out_features:
                self._out_feature_channels[name] = channels
                self._out_feature_strides[name] = stride
        if self.res5_final_conv:
            self._out_feature_channels["res5"] = self.trunk.final_conv.out_channels
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int = 0) -> NFNetBackbone:
        """Stop gradients (``requires_grad=False``) of the stem and the first stages.

        Args:
            freeze_at (int): 0 none, 1 the stem, k >= 2 the stem and ``res2``..``res{k}``
                (``res5`` includes the final conv).

        Returns:
            NFNetBackbone: self.
        """
        if not 0 <= freeze_at <= 1 + len(STAGE_NAMES):
            raise ValueError(
                f"MODEL.BACKBONE.FREEZE_AT must be in 0..{1 + len(STAGE_NAMES)}, got {freeze_at}"
            )
        modules: list[torch.nn.Module] = []
        if freeze_at >= 1:
            modules.append(self.trunk.stem)
        modules.extend(self.trunk.stages[: max(0, freeze_at - 1)])
        if freeze_at >= 1 + len(STAGE_NAMES) and self.trunk.final_conv is not None:
            modules.append(self.trunk.final_conv)
        for module in modules:
            for p in module.parameters():
                p.requires_grad_(False)
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """
        Args:
            x (Tensor): images (N, C, H, W), normalized.

        Returns:
            dict[str, Tensor]: the ``out_features`` maps.
        """
        if x.dim() != 4:
            raise ValueError(f"NFNetBackbone takes (N, C, H, W) inputs, got shape {tuple(x.shape)}")
        outputs = {}
        for name, feature in zip(STAGE_NAMES, self.trunk.forward_stages(x)):
            if name in self._out_features:
                outputs[name] = feature
        if self.res5_final_conv:
            outputs["res5"] = self.trunk.final_act(self.trunk.final_conv(outputs["res5"]))
        return outputs

    @property
    def size_divisibility(self) -> int:
        # Inputs padded to the coarsest stride: every stride-2 layer halves exactly, so feature
        # maps line up with each other and with the anchors.
        return 32

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }


def _spec_from_cfg(cfg) -> NFNetSpec:
    try:
        return get_variant(cfg.MODEL.NFNET.VARIANT)
    except ValueError as e:
        raise ValueError(f"MODEL.NFNET.VARIANT: {e}") from None


def build_nfnet_backbone(cfg, input_shape: ShapeSpec) -> NFNetBackbone:
    """Build an ``NFNetBackbone`` from ``cfg.MODEL.NFNET`` and ``MODEL.BACKBONE.FREEZE_AT``.

    Args:
        cfg (CfgNode): detectron2 config with nfdet's keys (``add_nfnet_config``).
        input_shape (ShapeSpec): image channels.
    """
    spec = _spec_from_cfg(cfg)
    if (cfg.MODEL.NFNET.RES5_FINAL_CONV and "res5" in cfg.MODEL.NFNET.OUT_FEATURES
            and not spec.final_multiplier):
        raise ValueError(
            f"MODEL.NFNET.RES5_FINAL_CONV is True but MODEL.NFNET.VARIANT "
            f"{cfg.MODEL.NFNET.VARIANT!r} has no final 1x1 conv (NF-ResNets): set "
            "MODEL.NFNET.RES5_FINAL_CONV False (res5 is then the last stage's output)"
        )
    return NFNetBackbone(
        spec,
        out_features=cfg.MODEL.NFNET.OUT_FEATURES,
        res5_final_conv=cfg.MODEL.NFNET.RES5_FINAL_CONV,
        drop_path_rate=cfg.MODEL.NFNET.DROP_PATH_RATE,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        in_channels=input_shape.channels,
        activation_checkpoint=cfg.MODEL.NFNET.ACTIVATION_CHECKPOINT,
    )


def build_nfnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """Build an FPN (``p2``..``p6``, max-pooled ``p6``) on an ``NFNetBackbone``.

    The NFNet is the FPN's ``bottom_up``; channels and strides come from its ``output_shape()``.
    ``MODEL.FPN.NORM`` is "" in nfdet's configs: no normalization anywhere.

    Args:
        cfg (CfgNode): detectron2 config with nfdet's keys (``add_nfnet_config``).
        input_shape (ShapeSpec): image channels.
    """
    bottom_up = build_nfnet_backbone(cfg, input_shape)
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    missing = [f for f in in_features if f not in bottom_up.output_shape()]
    if missing:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES {in_features} needs {missing}, which "
            f"MODEL.NFNET.OUT_FEATURES {list(cfg.MODEL.NFNET.OUT_FEATURES)} does not produce"
        )
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


# Re-importing (e.g. importlib.reload) must not register twice: the registry refuses duplicates.
for _builder in (build_nfnet_backbone, build_nfnet_fpn_backbone):
    if _builder.__name__ not in BACKBONE_REGISTRY:
        BACKBONE_REGISTRY.register(_builder)
