"""Training statistics per stage, cheap enough to log every few iterations of any trainer.

What they show (see ``docs/small_batch.md`` for how to read them):

- ``grad_ratio/<group>``: ``||G|| / ||W||`` over the weight tensors (rank >= 2) of a group, with
  the gradient as the optimizer receives it (before clipping): how far one raw gradient would move
  the group's weights, relative to their size;
- ``clipped_ratio/<group>``: the same after AGC (each unit's gradient norm capped at
  ``clipping * max(||W_i||, eps)``): what clipping lets through;
- ``agc_clipped/<group>``: the fraction of AGC units clipped in this step, per group of clipped
  parameters; gains and skip gains are groups of their own (``gains``, ``skip_gains``);
- ``skip_gain/<stage>``: the mean |skip gain| of a stage's blocks (NF blocks start at 0: the
  residual branches contribute nothing until these grow);
- ``out_rms/<stage>``: the root mean square of a stage's output (the residual stream) during a
  training forward pass; for a detectron2 FPN also of every output level (``p2`` ...).

Groups follow the parameter names: ``stem``, ``res2`` .. ``res5`` (NFNet trunk stages, or
detectron2 ResNet stages), ``final_conv``, ``fpn``, ``rpn``, ``box_head``, ``mask_head``, ``head``
(a classifier), ``other``.

AGC units follow DeepMind's rule: a tensor whose shape without its size-1 dims has rank <= 1 (a
bias, a gain vector, a skip gain) is one unit; otherwise every slice along dim 0 is one.

Use (any training loop; ``nfdet.detection.hooks.TrainingStatsHook`` does this for detectron2)::

    stats = TrainingStats(model, optimizer)
    for it in ...:
        stats.before_step(log=(it + 1) % period == 0)   # arms the forward probes
        loss = model(batch); loss.backward(); optimizer.step()
        scalars = stats.after_step()                     # {} when not armed
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

import torch
from torch import nn

from .agc import agc_units

__all__ = ["TrainingStats", "param_group_name", "stage_modules"]

# (pattern on a parameter name without "module.", group); the first match wins.
_GROUP_PATTERNS = (
    (re.compile(r"(?:^|\.)(?:trunk|bottom_up)\.stem\."), "stem"),
    (re.compile(r"(?:^|\.)trunk\.stages\.(\d+)\."), None),  # res{i + 2}
    (re.compile(r"(?:^|\.)bottom_up\.(res\d)\."), None),
    (re.compile(r"(?:^|\.)trunk\.final_conv\."), "final_conv"),
    (re.compile(r"^backbone\.(?:fpn_|top_block)"), "fpn"),
    (re.compile(r"^proposal_generator\."), "rpn"),
    (re.compile(r"^roi_heads\.(?:box_head|box_predictor)\."), "box_head"),
    (re.compile(r"^roi_heads\.mask_head\."), "mask_head"),
    (re.compile(r"^head\."), "head"),
)
# Modules whose output is a stage's: (pattern on a module name without "module.", name).
_STAGE_MODULES = (
    (re.compile(r"(?:.*\.)?(?:trunk|bottom_up)\.stem"), "stem"),
    (re.compile(r"(?:.*\.)?trunk\.stages\.(\d+)"), None),
    (re.compile(r"(?:.*\.)?bottom_up\.(res\d)"), None),
    (re.compile(r"(?:.*\.)?trunk\.final_conv"), "final_conv"),
)


def _strip(name: str) -> str:
    return name[len("module."):] if name.startswith("module.") else name


def _stage_name(match: re.Match, fixed: str | None) -> str:
    if fixed is not None:
        return fixed
    value = match.group(1)
    return f"res{int(value) + 2}" if value.isdigit() else value


def param_group_name(name: str) -> str:
    """The statistics group of a parameter name (see the module docstring)."""
    name = _strip(name)
    for pattern, fixed in _GROUP_PATTERNS:
        match = pattern.search(name)
        if match:
            return _stage_name(match, fixed)
    return "other"


def stage_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules whose outputs are the stages' (stem, res2..res5, final_conv), by stage name."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        name = _strip(name)
        for pattern, fixed in _STAGE_MODULES:
            match = pattern.fullmatch(name)
            if match:
                found.setdefault(_stage_name(match, fixed), module)
                break
    return found


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().float().pow(2).mean().sqrt())


class TrainingStats:
    """Collects the statistics of the module docstring for one training step at a time.

    Registers a step pre-hook on ``optimizer`` (it sees the gradients after AMP unscaling and the
    DDP all-reduce, before AGC clips them) and forward hooks on the stage modules; both do nothing
    until ``before_step(log=True)`` arms them, so the iterations that are not logged pay nothing.

    Args:
        model (nn.Module): the trained model (may be wrapped in DDP).
        optimizer (Optimizer): its optimizer; the AGC settings (``agc_clipping``, ``agc_eps``) of
            its parameter groups decide what is clipped.
        fpn_levels (bool): also record the RMS of a detectron2 FPN's outputs (``model.backbone``
            returning a dict of feature maps).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 fpn_levels: bool = True):
        self._armed = False
        self._result: dict[str, float] = {}
        self._params: dict[str, list[tuple[str, nn.Parameter]]] = defaultdict(list)
        for name, p in model.named_parameters():
            if p.requires_grad:
                self._params[param_group_name(name)].append((_strip(name), p))
        self._agc: dict[int, tuple[float, float]] = {}
        for group in optimizer.param_groups:
            clipping = group.get("agc_clipping")
            if clipping is not None:
                for p in group["params"]:
                    self._agc[id(p)] = (float(clipping), float(group.get("agc_eps", 1e-3)))
        self._handles = [optimizer.register_step_pre_hook(self._on_step)]
        for stage, module in stage_modules(model).items():
            self._handles.append(module.register_forward_hook(self._probe(stage)))
        inner = model.module if hasattr(model, "module") else model
        backbone = getattr(inner, "backbone", None)
        if fpn_levels and backbone is not None and any(
                n.startswith("fpn_") for n, _ in backbone.named_children()):
            self._handles.append(backbone.register_forward_hook(self._probe_levels))

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -------------------------------------------------------------------------------- hooks
    def _probe(self, stage: str):
        def hook(module, inputs, output):
            if self._armed and module.training and isinstance(output, torch.Tensor):
                self._result[f"out_rms/{stage}"] = _rms(output)
        return hook

    def _probe_levels(self, module, inputs, output):
        if self._armed and module.training and isinstance(output, dict):
            for level, feature in output.items():
                self._result[f"out_rms/{level}"] = _rms(feature)

    def _on_step(self, optimizer, args, kwargs) -> None:
        if self._armed:
            self._result.update(self.gradient_stats())

    # ------------------------------------------------------------------------------- public
    def before_step(self, log: bool) -> None:
        """Arm (``log=True``) or disarm the probes for the coming forward/backward/step."""
        self._armed = bool(log)
        self._result = {}

    def after_step(self) -> dict[str, float]:
        """The statistics of the step just taken (``{}`` when it was not armed); disarms."""
        result, self._result, self._armed = self._result, {}, False
        return result

    @torch.no_grad()
    def gradient_stats(self) -> dict[str, float]:
        """``grad_ratio``, ``clipped_ratio``, ``agc_clipped`` and ``skip_gain`` of the current
        gradients and weights (see the module docstring); call between backward and step."""
        out: dict[str, float] = {}
        # Tensors are summed on their device and read once at the end (one sync on a GPU).
        # group -> [||G||^2, ||G_clipped||^2, ||W||^2] summed over its weight tensors.
        sums: dict[str, list] = defaultdict(lambda: [0.0, 0.0, 0.0])
        # AGC group -> [clipped units, units].
        clipped: dict[str, list] = defaultdict(lambda: [0, 0])
        skip: dict[str, list] = defaultdict(list)
        for group, params in self._params.items():
            for name, p in params:
                if name.endswith("skip_gain"):
                    skip[group].append(p.detach().abs().float().mean())
                if p.grad is None:
                    continue
                g_norm = torch.linalg.vector_norm(agc_units(p.grad.detach()).float(), dim=1)
                w_norm = torch.linalg.vector_norm(agc_units(p.detach()).float(), dim=1)
                g_after = g_norm
                agc = self._agc.get(id(p))
                if agc is not None:
                    clipping, eps = agc
                    max_norm = w_norm.clamp_min(eps) * clipping
                    is_clipped = g_norm > max_norm
                    g_after = torch.where(is_clipped, max_norm, g_norm)
                    key = ("skip_gains" if name.endswith("skip_gain")
                           else "gains" if name.endswith("gain") else group)
                    clipped[key][0] = clipped[key][0] + is_clipped.sum()
                    clipped[key][1] += is_clipped.numel()
                if p.dim() >= 2 and not name.endswith("gain"):
                    s = sums[group]
                    s[0] = s[0] + g_norm.pow(2).sum()
                    s[1] = s[1] + g_after.pow(2).sum()
                    s[2] = s[2] + w_norm.pow(2).sum()
        for group, (g2, c2, w2) in sums.items():
            g2, c2, w2 = float(g2), float(c2), float(w2)
            if w2 > 0:
                out[f"grad_ratio/{group}"] = math.sqrt(g2 / w2)
                out[f"clipped_ratio/{group}"] = math.sqrt(c2 / w2)
        for key, (n_clipped, n_units) in clipped.items():
            if n_units:
                out[f"agc_clipped/{key}"] = float(n_clipped) / n_units
        for group, values in skip.items():
            out[f"skip_gain/{group}"] = float(torch.stack(values).mean())
        return out
