"""Config keys nfdet adds to a yacs/fvcore ``CfgNode``.

``add_nfnet_config(cfg)`` works on detectron2's config and on the pretraining config alike and
does not import detectron2. Call it before ``cfg.merge_from_file(...)``.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import yaml
from fvcore.common.config import CfgNode as CN

__all__ = [
    "add_nfnet_config",
    "add_agc_config",
    "resolve_config_file",
    "merge_config",
    "check_nfnet_config",
    "ConfigError",
    "CONFIGS_DIR",
]

# The repository's configs/ (nfdet is installed editable from the repository root).
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def add_agc_config(cfg: CN) -> None:
    """Add ``SOLVER.AGC.*`` (Adaptive Gradient Clipping, docs/reference.md, "AGC") to ``cfg``.

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
    # > 0: CLIPPING is the value at this batch size and a run clips with
    # CLIPPING * sqrt(REFERENCE_BATCH_SIZE / batch) (nfdet.solver.clipping); 0: CLIPPING as given.
    cfg.SOLVER.AGC.REFERENCE_BATCH_SIZE = 0
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
    # A name from nfdet.modeling.NFNET_VARIANTS ("F0".."F7", "F0+".."F7+", "nano", and the
    # NF-ResNets "nf_resnet50", "nf_resnet101", "nf_resnet152", "nf_resnet200", "nf_resnet_nano").
    cfg.MODEL.NFNET.VARIANT = "F0"
    cfg.MODEL.NFNET.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Stochastic depth: block i of n is dropped with probability DROP_PATH_RATE * i / n.
    cfg.MODEL.NFNET.DROP_PATH_RATE = 0.0
    # res5 is the activated final 1x1 conv (2x the last stage width, as timm's feature list and
    # the classifier see it). False: res5 is the raw last-stage residual stream and the final conv
    # is not built. NF-ResNets have no final conv: False (res5 = the last stage's output).
    cfg.MODEL.NFNET.RES5_FINAL_CONV = True
    # Activation checkpointing of the trunk in training: "" off, "stage" (the stem and each stage
    # keep only their input and are recomputed in backward) or "block" (each block): less memory
    # for more compute, same losses and gradients (nfdet.modeling.NFNetTrunk).
    cfg.MODEL.NFNET.ACTIVATION_CHECKPOINT = ""
    add_agc_config(cfg)
    # Log per-stage training statistics (nfdet.solver.stats) every N iterations; 0: never.
    cfg.SOLVER.STATS_PERIOD = 20


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


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the file (or the command line),
    the key and the value, and suggests close valid keys."""


def _all_keys(cfg: CN, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        keys.append(prefix + k)
        if isinstance(v, CN):
            keys.extend(_all_keys(v, prefix + k + "."))
    return keys


def _suggest_key(cfg: CN, key: str) -> str:
    """" Did you mean ...?" with the valid keys closest to ``key``, or ""."""
    leaves = [k for k in _all_keys(cfg) if not isinstance(_get(cfg, k), CN)]
    parent, _, last = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in leaves if k.rpartition(".")[0] == parent}
    close = [siblings[k] for k in difflib.get_close_matches(last, list(siblings), n=2,
                                                            cutoff=0.6)]
    if not close:
        # The right name under a wrong parent (SOLVER.VARIANT): match the last component.
        close = [k for k in leaves
                 if difflib.SequenceMatcher(None, k.rpartition(".")[2], last).ratio() >= 0.85]
    if not close:
        close = difflib.get_close_matches(key, leaves, n=2, cutoff=0.6)
    return f" Did you mean {' or '.join(close[:3])}?" if close else ""


def _get(cfg: CN, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _yaml_chain(path: str) -> list[tuple[str, dict]]:
    """(file, parsed mapping) for ``path`` and its ``_BASE_`` files, most derived first.

    Raises:
        ConfigError: a file is missing, not valid YAML, or not a mapping.
    """
    chain, todo = [], [path]
    while todo:
        current = todo.pop(0)
        if not os.path.isfile(current):
            parent = f" (the _BASE_ of {chain[-1][0]})" if chain else ""
            raise ConfigError(f"Config file {current!r}{parent} does not exist")
        try:
            with open(current, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{current}:{mark.line + 1}:{mark.column + 1}" if mark else current
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(f"{where}: not valid YAML: {problem}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"{current}: a config must be a mapping of KEY: value, got {type(data).__name__}"
            )
        chain.append((current, data))
        bases = data.get("_BASE_") or []
        for base in [bases] if isinstance(bases, str) else bases:
            base = os.path.expanduser(str(base))
            todo.append(base if os.path.isabs(base) else
                        os.path.join(os.path.dirname(current), base))
    return chain


def _key_source(chain: list[tuple[str, dict]], key: str) -> str:
    """The file of ``chain`` that sets ``key`` (the first file when none does)."""
    for path, data in chain:
        node = data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return path
    return chain[0][0]


def _failed_key(error: BaseException) -> str | None:
    match = re.search(r"(?:config key|key):\s*([\w.]+)", str(error))
    return match.group(1) if match else None


def merge_config(cfg: CN, config_file: str | None = None,
                 opts: Sequence[str] | None = None) -> CN:
    """Merge a YAML file and then ``KEY VALUE`` overrides into ``cfg``, with clear errors.

    yacs reports an unknown key as ``KeyError: Non-existent config key: X`` (without the file)
    and a bad override as a bare ``AssertionError``. Here every failure is a ``ConfigError``
    that names the file that sets the key (following ``_BASE_``) or "command line", the key,
    and the closest valid keys. A YAML syntax error names the file, line and column. Afterwards
    ``check_nfnet_config`` validates nfdet's keys.

    Args:
        cfg (CfgNode): detectron2's or the pretraining config, with nfdet's keys added.
        config_file (str | None): a YAML path (already resolved).
        opts (sequence[str] | None): ``KEY VALUE`` pairs.

    Returns:
        CfgNode: ``cfg``.

    Raises:
        ConfigError: see above.
    """
    if config_file:
        chain = _yaml_chain(config_file)
        try:
            cfg.merge_from_file(config_file)
        except (KeyError, AssertionError, ValueError, TypeError) as e:
            message = e.args[0] if e.args else str(e)
            key = _failed_key(e)
            if key is None:
                raise ConfigError(f"{config_file}: {message}") from None
            source = _key_source(chain, key)
            if "Non-existent" in str(message):
                raise ConfigError(
                    f"{source}: unknown config key {key}.{_suggest_key(cfg, key)}"
                ) from None
            raise ConfigError(f"{source}: {key}: {message}") from None
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(
            f"command line: overrides must be KEY VALUE pairs; {opts[-1]!r} has no value"
        )
    for key, value in zip(opts[0::2], opts[1::2]):
        try:
            cfg.merge_from_list([key, value])
        except (KeyError, AssertionError) as e:
            if "Non-existent" not in str(e):
                raise ConfigError(f"command line: {key} {value}: {e}") from None
            raise ConfigError(
                f"command line: unknown config key {key}.{_suggest_key(cfg, key)}"
            ) from None
        except (ValueError, TypeError) as e:
            raise ConfigError(f"command line: {key} {value!r}: {e}") from None
    check_nfnet_config(cfg, config_file, opts)
    return cfg


def check_nfnet_config(cfg: CN, config_file: str | None = None,
                       opts: Sequence[str] | None = None) -> None:
    """Check nfdet's keys after merging: ``MODEL.NFNET.VARIANT`` must name a variant and
    ``MODEL.NFNET.ACTIVATION_CHECKPOINT`` be "", "stage" or "block".

    Raises:
        ConfigError: naming the key, the value, where it was set, and the valid values.
    """
    if "MODEL" not in cfg or "NFNET" not in cfg.MODEL:
        return
    from .modeling.variants import get_variant  # no torch import at config level otherwise

    try:
        get_variant(cfg.MODEL.NFNET.VARIANT)
    except ValueError as e:
        where = "command line" if "MODEL.NFNET.VARIANT" in list(opts or [])[0::2] else (
            _key_source(_yaml_chain(config_file), "MODEL.NFNET.VARIANT") if config_file
            else "defaults")
        raise ConfigError(f"{where}: MODEL.NFNET.VARIANT: {e}") from None
    from .modeling.nfnet import ACTIVATION_CHECKPOINT_MODES

    mode = cfg.MODEL.NFNET.get("ACTIVATION_CHECKPOINT", "")
    if mode not in ACTIVATION_CHECKPOINT_MODES:
        raise ConfigError(f"MODEL.NFNET.ACTIVATION_CHECKPOINT must be '', 'stage' or 'block', "
                          f"got {mode!r}")
