"""Config keys nfdet adds to a yacs/fvcore ``CfgNode``.

``add_nfnet_config(cfg)`` works on detectron2's config and on the pretraining config alike and
does not import detectron2. Call it before ``cfg.merge_from_file(...)``.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from fvcore.common.config import CfgNode as CN

__all__ = ["add_nfnet_config", "add_agc_config", "resolve_config_file", "CONFIGS_DIR"]

# The repository's configs/ (nfdet is installed editable from the repository root).
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def add_agc_config(cfg: CN) -> None:
    """Add ``SOLVER.AGC.*`` (Adaptive Gradient Clipping, NFNET_REFERENCE.md) to ``cfg``.

    Args:
        cfg (CfgNode): a config; ``SOLVER`` is created when missing.
    """
    # New nodes take cfg's own class: yacs refuses to merge a YAML's detectron2 CfgNode into an
    # fvcore CfgNode ("Type mismatch ... for config key: SOLVER.AGC").
    node = type(cfg)
    if "SOLVER" not in cfg:
        cfg.SOLVER = node()
    cfg.SOLVER.AGC = node()
    cfg.SOLVER.AGC.ENABLED = True
    # max ||G_i|| = CLIPPING * max(||W_i||, EPS), per output unit i.
    cfg.SOLVER.AGC.CLIPPING = 0.01
    cfg.SOLVER.AGC.EPS = 1e-3
    # Parameters are clipped when their name matches one of INCLUDE and none of EXCLUDE
    # (fnmatch patterns on the parameter name, a DDP "module." prefix removed).
    cfg.SOLVER.AGC.INCLUDE = ["*"]
    # DeepMind does not clip the final classifier weight.
    cfg.SOLVER.AGC.EXCLUDE = ["head.fc.weight"]


def add_nfnet_config(cfg: CN) -> None:
    """Add nfdet's keys (``MODEL.NFNET.*``, ``SOLVER.AGC.*``) to ``cfg``.

    Args:
        cfg (CfgNode): detectron2's config (``get_cfg()``) or nfdet's pretraining config.
    """
    node = type(cfg)  # see add_agc_config
    if "MODEL" not in cfg:
        cfg.MODEL = node()
    cfg.MODEL.NFNET = node()
    # A name from nfdet.modeling.NFNET_VARIANTS ("F0".."F7", "F0+".."F7+", "nano").
    cfg.MODEL.NFNET.VARIANT = "F0"
    cfg.MODEL.NFNET.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Stochastic depth: block i of n is dropped with probability DROP_PATH_RATE * i / n.
    cfg.MODEL.NFNET.DROP_PATH_RATE = 0.0
    # res5 is the activated final 1x1 conv (2x the last stage width, as timm's feature list and
    # the classifier see it). False: res5 is the raw last-stage residual stream and the final conv
    # is not built.
    cfg.MODEL.NFNET.RES5_FINAL_CONV = True
    add_agc_config(cfg)


def resolve_config_file(name: str, configs_dir: str | os.PathLike | None = None) -> str:
    """Return the path of a config: ``name`` itself when it is a file, else the unique file under
    ``configs_dir`` (recursively) whose path ends with ``name`` (".yaml" may be left out).

    Args:
        name (str): a path, or a name such as ``nfnet_f0_mask_rcnn.yaml`` /
            ``quick/nfnet_nano_mask_rcnn_instant``.
        configs_dir (str | None): where to search; the repository's ``configs/`` by default.

    Raises:
        FileNotFoundError: nothing matches (the message lists close names), or several do.
    """
    if not name:
        raise FileNotFoundError("No config given: pass --config-file/--config FILE")
    if os.path.isfile(name):
        return name
    if configs_dir is not None:
        root = Path(configs_dir)
    else:
        # A non-editable install has no configs/ beside the package: use the working directory's.
        root = CONFIGS_DIR if CONFIGS_DIR.is_dir() else Path.cwd() / "configs"
    wanted = name if name.endswith((".yaml", ".yml")) else name + ".yaml"
    wanted_parts = Path(wanted).parts
    available = sorted(p for p in root.rglob("*.y*ml") if p.is_file()) if root.is_dir() else []
    matches = [p for p in available if p.parts[-len(wanted_parts):] == wanted_parts]
    if len(matches) == 1:
        return str(matches[0])
    relative = [str(p.relative_to(root)) for p in available]
    if len(matches) > 1:
        raise FileNotFoundError(
            f"Config {name!r} is ambiguous under {root}: "
            + ", ".join(str(p.relative_to(root)) for p in matches)
        )
    close = difflib.get_close_matches(wanted, relative, n=5, cutoff=0.5) or relative
    raise FileNotFoundError(
        f"Config {name!r} is neither a file nor a config under {root}. "
        f"Candidates: {', '.join(close) if close else '(none)'}"
    )
