"""Parameter groups and the optimizer builder shared by the pretraining and detection trainers.

Groups are chosen by parameter *name*, as DeepMind does: gains (``*gain``, incl. ``skip_gain``),
biases and the parameters of normalization layers get no weight decay; every parameter whose name
matches an AGC include pattern and no exclude pattern (by default all but ``head.fc.weight``, the
classifier weight) is clipped by AGC inside ``optimizer.step()``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .agc import with_agc

__all__ = ["build_param_groups", "build_optimizer", "NO_DECAY_PATTERNS", "OPTIMIZERS"]

# Names (fnmatch, DDP "module." prefix removed) that get no weight decay.
NO_DECAY_PATTERNS = ("*gain", "*bias")

_NORM_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)

# SOLVER.OPTIMIZER values (case-insensitive) -> torch.optim class.
OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


def _strip_ddp(name: str) -> str:
    return name[len("module."):] if name.startswith("module.") else name


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def _check_patterns(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of name patterns (strings), got {value!r}")
    return tuple(value)


def build_param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    agc_clipping: float | None = 0.01,
    agc_eps: float = 1e-3,
    agc_include: Sequence[str] = ("*",),
    agc_exclude: Sequence[str] = ("head.fc.weight",),
    no_decay: Sequence[str] = NO_DECAY_PATTERNS,
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into optimizer groups by name.

    A parameter gets no weight decay when its name (a leading ``module.`` removed) matches one of
    ``no_decay`` or it belongs to a normalization layer (BatchNorm, GroupNorm, LayerNorm). It is
    clipped by AGC when ``agc_clipping`` is not None and its name matches one of ``agc_include``
    and none of ``agc_exclude``. Parameters shared between modules appear once.

    Args:
        model (nn.Module): the model (may be wrapped in DDP).
        base_lr (float): learning rate of every group.
        weight_decay (float): weight decay of the decayed groups.
        agc_clipping (float | None): AGC clipping ``lambda``; None disables AGC.
        agc_eps (float): AGC floor of the parameter norm.
        agc_include (sequence[str]): fnmatch patterns of clipped parameter names.
        agc_exclude (sequence[str]): fnmatch patterns of parameter names never clipped.
        no_decay (sequence[str]): fnmatch patterns of parameter names without weight decay.

    Returns:
        list[dict]: up to four non-empty groups (decay x clipped), each with ``params``, ``lr``,
        ``weight_decay``, ``agc_clipping`` (None when not clipped) and ``agc_eps``.
    """
    agc_include = _check_patterns(agc_include, "agc_include")
    agc_exclude = _check_patterns(agc_exclude, "agc_exclude")
    no_decay = _check_patterns(no_decay, "no_decay")
    norm_params = {
        id(p)
        for m in model.modules()
        if isinstance(m, _NORM_TYPES)
        for p in m.parameters(recurse=False)
    }
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for raw_name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        name = _strip_ddp(raw_name)
        decay = not (_matches(name, no_decay) or id(p) in norm_params)
        clipped = (
            agc_clipping is not None
            and _matches(name, agc_include)
            and not _matches(name, agc_exclude)
        )
        groups.setdefault((decay, clipped), []).append(p)

    out = []
    for decay in (True, False):
        for clipped in (True, False):
            params = groups.get((decay, clipped))
            if not params:
                continue
            out.append(
                {
                    "params": params,
                    "lr": base_lr,
                    "weight_decay": weight_decay if decay else 0.0,
                    "agc_clipping": agc_clipping if clipped else None,
                    "agc_eps": agc_eps,
                }
            )
    return out


def _solver_get(solver: Any, key: str, default: Any) -> Any:
    return solver.get(key, default) if hasattr(solver, "get") else getattr(solver, key, default)


def build_optimizer(cfg: Any, model: nn.Module) -> torch.optim.Optimizer:
    """Build the optimizer of a training run from ``cfg.SOLVER``.

    Reads ``SOLVER.BASE_LR``, ``SOLVER.WEIGHT_DECAY``, ``SOLVER.MOMENTUM``, ``SOLVER.NESTEROV``
    (SGD), ``SOLVER.OPTIMIZER`` ("SGD" when missing, or "AdamW") and ``SOLVER.AGC.{ENABLED,
    CLIPPING, EPS, INCLUDE, EXCLUDE}`` (AGC off when ``SOLVER.AGC`` is missing). Works on
    detectron2's config (``get_cfg()`` + ``add_nfnet_config``) and on any CfgNode with these keys.
    With AGC enabled the optimizer clips inside ``step()`` (see ``with_agc``). With AGC disabled
    and detectron2's ``SOLVER.CLIP_GRADIENTS.ENABLED``, detectron2's clipping is added instead.
    Weight decay and learning rate per group follow ``build_param_groups``: detectron2's
    ``WEIGHT_DECAY_NORM``, ``WEIGHT_DECAY_BIAS`` and ``BIAS_LR_FACTOR`` are not used.

    Args:
        cfg (CfgNode): the config.
        model (nn.Module): the model to optimize (may be wrapped in DDP).

    Raises:
        ValueError: both ``SOLVER.CLIP_GRADIENTS.ENABLED`` and ``SOLVER.AGC.ENABLED`` are set, or a
            key holds an invalid value (the message names it).
    """
    solver = cfg.SOLVER
    agc = _solver_get(solver, "AGC", None)
    agc_enabled = bool(agc is not None and agc.ENABLED)
    clip_gradients = _solver_get(solver, "CLIP_GRADIENTS", None)
    d2_clipping = bool(clip_gradients is not None and clip_gradients.ENABLED)
    if agc_enabled and d2_clipping:
        raise ValueError(
            "SOLVER.AGC.ENABLED and SOLVER.CLIP_GRADIENTS.ENABLED are both True: choose one "
            "gradient clipping (NFNets use AGC; set SOLVER.CLIP_GRADIENTS.ENABLED False)."
        )

    if agc_enabled:
        clipping, eps = float(agc.CLIPPING), float(agc.EPS)
        if not clipping > 0:
            raise ValueError(f"SOLVER.AGC.CLIPPING must be > 0, got {agc.CLIPPING!r}")
        if not eps > 0:
            raise ValueError(f"SOLVER.AGC.EPS must be > 0, got {agc.EPS!r}")
        include = _check_patterns(_solver_get(agc, "INCLUDE", ("*",)), "SOLVER.AGC.INCLUDE")
        exclude = _check_patterns(_solver_get(agc, "EXCLUDE", ()), "SOLVER.AGC.EXCLUDE")
    else:
        clipping, eps, include, exclude = None, 1e-3, ("*",), ()

    base_lr = float(solver.BASE_LR)
    weight_decay = float(solver.WEIGHT_DECAY)
    groups = build_param_groups(
        model,
        base_lr,
        weight_decay,
        agc_clipping=clipping,
        agc_eps=eps,
        agc_include=include,
        agc_exclude=exclude,
    )

    name = str(_solver_get(solver, "OPTIMIZER", "SGD"))
    if name.lower() not in OPTIMIZERS:
        raise ValueError(
            f"SOLVER.OPTIMIZER={name!r} is not supported; valid: SGD, AdamW (case-insensitive)"
        )
    optimizer_cls = OPTIMIZERS[name.lower()]
    if name.lower() == "sgd":
        kwargs = {
            "momentum": float(_solver_get(solver, "MOMENTUM", 0.0)),
            "nesterov": bool(_solver_get(solver, "NESTEROV", False)),
        }
    else:
        kwargs = {}
    kwargs.update(lr=base_lr, weight_decay=weight_decay)

    if agc_enabled:
        return with_agc(optimizer_cls)(groups, agc_clipping=clipping, agc_eps=eps, **kwargs)
    optimizer = optimizer_cls(groups, **kwargs)
    if d2_clipping:
        # Only detectron2's config has CLIP_GRADIENTS, so detectron2 is importable here.
        from detectron2.solver.build import maybe_add_gradient_clipping

        optimizer = maybe_add_gradient_clipping(cfg, optimizer)
    return optimizer
