"""Adaptive Gradient Clipping (Brock et al. 2021, section 4.1).

For every parameter ``W`` with gradient ``G`` and every unit ``i`` of it::

    max_norm_i = clipping * max(||W_i||, eps)
    G_i <- G_i * max_norm_i / max(||G_i||, 1e-6)      if ||G_i|| > max_norm_i

The units are DeepMind's (``unitwise_norm``, docs/reference.md "AGC"): a tensor whose shape, with
its size-1 dims left out, has rank <= 1 is ONE unit, clipped by the norm of the whole tensor:
scalars (skip gains), vectors (biases), and nfdet's conv gains stored as (O, 1, 1, 1), like
DeepMind's (O,) gain vectors; also (1, O) and (O, 1). Any other tensor has one unit per index of
dim 0: a linear weight per output row, a conv kernel per output channel (over its fan-in).

``clip_grad_agc_`` does this for a list of tensors in a few batched operations; ``with_agc`` turns
any ``torch.optim`` optimizer class into one that clips every parameter group with the group's own
``agc_clipping`` / ``agc_eps`` inside ``step()``: after ``GradScaler`` has unscaled the gradients
(AMP) and after DDP has all-reduced them, before the optimizer adds weight decay.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["clip_grad_agc_", "with_agc", "get_agc_stats", "agc_units", "AGCOptimizerMixin"]

# Floor of the gradient norm in the rescaling factor (DeepMind's value).
_GRAD_NORM_FLOOR = 1e-6
# Tensors with more elements get a norm call of their own (on a view): concatenating them would
# copy more memory than the per-call overhead it saves. Smaller ones are concatenated per fan.
_CONCAT_MAX_NUMEL = 1 << 16


def _num_units(t: torch.Tensor) -> int:
    """Units of ``t``: 1 when its squeezed shape has rank <= 1 (DeepMind's rule), else dim 0."""
    if sum(1 for d in t.shape if d != 1) <= 1:
        return 1
    return t.shape[0]


def agc_units(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a (units, fan) matrix by DeepMind's rule (see ``_num_units``)."""
    if _num_units(t) > 1:
        if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(
                memory_format=torch.channels_last):
            # A channels_last tensor is (out, kh, kw, in) in memory: a view in that order (a
            # unit's norm does not depend on the order of its entries).
            t = t.permute(0, 2, 3, 1)
        return t.reshape(t.shape[0], -1)
    return t.reshape(1, -1)


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    # Norms of half/bfloat16 tensors are accumulated and compared in float32.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _bucket_key(p: torch.Tensor) -> tuple:
    """The bucket whose norms ``p``'s are computed with (see ``_agc_``)."""
    units = _num_units(p)
    if units == 1:
        key = None  # the whole-tensor bucket
    elif p.numel() > _CONCAT_MAX_NUMEL:
        key = ("own", id(p))
    else:
        key = ("fan", p.numel() // units)
    return p.grad.device, p.grad.dtype, key


def _unit_norms(ps: list[torch.Tensor], key: tuple | None,
                ndtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient and parameter norms of every unit of the bucket ``ps``, in order."""
    if key is None:
        grad_norms = torch.stack(torch._foreach_norm([p.grad for p in ps], 2, dtype=ndtype))
        param_norms = torch.stack(torch._foreach_norm([p.detach() for p in ps], 2, dtype=ndtype))
        return grad_norms, param_norms
    if len(ps) == 1:
        g, w = agc_units(ps[0].grad), agc_units(ps[0].detach())
    else:
        g = torch.cat([agc_units(p.grad) for p in ps])
        w = torch.cat([agc_units(p.detach()) for p in ps])
    return (torch.linalg.vector_norm(g, dim=1, dtype=ndtype),
            torch.linalg.vector_norm(w, dim=1, dtype=ndtype))


def _rescale_(params: list[torch.Tensor], grad_norms: torch.Tensor, param_norms: torch.Tensor,
              clipping: float, eps: float) -> torch.Tensor:
    """Rescale the clipped units' gradients of ``params`` (one device/dtype; norms of every unit
    in order); return the number of clipped units (a tensor: no device sync)."""
    max_norms = param_norms.clamp_min(eps) * clipping
    clip = grad_norms > max_norms
    scale = torch.where(clip, max_norms / grad_norms.clamp_min(_GRAD_NORM_FLOOR), 1.0)
    scale = scale.to(params[0].grad.dtype)
    units_list = [_num_units(p) for p in params]
    if grad_norms.device.type == "cpu":
        # Reading the clip mask costs no device sync on CPU: rescale only the tensors that
        # have a clipped unit (usually few), saving a pass over most gradients.
        bounds = torch.tensor([0, *itertools.accumulate(units_list)])
        running = torch.cat([clip.new_zeros(1, dtype=torch.long), clip.cumsum(0)])
        per_tensor = (running[bounds[1:]] > running[bounds[:-1]]).tolist()
    else:
        per_tensor = [True] * len(params)
    factors, grads = [], []
    for f, u, p, any_clipped in zip(scale.split(units_list), units_list, params, per_tensor):
        if any_clipped:
            # Broadcast over every dim but the unit dim (0-dim for one-unit tensors).
            factors.append(f.view((u,) + (1,) * (p.dim() - 1)) if u > 1 else f.view(()))
            grads.append(p.grad)
    if grads:
        torch._foreach_mul_(grads, factors)
    return clip.sum()


def _agc_(
    params: list[torch.Tensor], clipping: float, eps: float
) -> tuple[torch.Tensor | None, int]:
    """Clip the gradients of ``params`` (all with a gradient); return (clipped units, units).

    Norms are computed per bucket of tensors, not per tensor:
    - one-unit tensors (scalars, vectors) of a device/dtype: one ``torch._foreach_norm`` call;
    - small multi-unit tensors of a device/dtype with the same fan (numel per unit): their units
      are concatenated into one (units, fan) matrix and reduced by one norm call;
    - large tensors (more than ``_CONCAT_MAX_NUMEL`` elements): one norm call each on a
      (units, fan) view, no copy; the call overhead is small against their memory traffic.
    The rescaling factors of all buckets of a device/dtype are computed together and applied with
    one ``torch._foreach_mul_``; on CPU only to the tensors that have a clipped unit.
    """
    buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        if p.numel() > 0:
            buckets[_bucket_key(p)].append(p)

    # Per device/dtype: the norms of every unit in bucket order, and the tensors in that order.
    per_device: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for (device, gdtype, key), ps in buckets.items():
        grad_norms, param_norms = _unit_norms(ps, key, _norm_dtype(gdtype))
        entry = per_device[(device, gdtype)]
        entry["grad_norms"].append(grad_norms)
        entry["param_norms"].append(param_norms.to(grad_norms.dtype))
        entry["params"].extend(ps)

    clipped_total: torch.Tensor | None = None
    units_total = 0
    for entry in per_device.values():
        grad_norms = torch.cat(entry["grad_norms"])
        count = _rescale_(entry["params"], grad_norms, torch.cat(entry["param_norms"]),
                          clipping, eps)
        clipped_total = count if clipped_total is None else (
            clipped_total + count.to(clipped_total.device))
        units_total += grad_norms.numel()
    return clipped_total, units_total


def _as_param_list(parameters: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = []
    for p in parameters:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError("clip_grad_agc_ does not support sparse gradients")
        params.append(p)
    return params


def _check_settings(clipping: float, eps: float) -> None:
    if not clipping > 0:
        raise ValueError(f"AGC clipping must be > 0, got {clipping!r}")
    if not eps > 0:
        raise ValueError(f"AGC eps must be > 0, got {eps!r}")


@torch.no_grad()
def clip_grad_agc_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    clipping: float = 0.01,
    eps: float = 1e-3,
) -> torch.Tensor:
    """Adaptive Gradient Clipping of ``p.grad``, in place, unit-wise.

    Args:
        parameters (Tensor or iterable[Tensor]): parameters whose ``.grad`` is clipped; those
            without a gradient are skipped.
        clipping (float): the ratio ``lambda`` of gradient norm to parameter norm allowed per unit.
        eps (float): floor of the parameter norm (lets zero-initialised parameters move).

    Returns:
        Tensor: a 0-dim float tensor on the gradients' device, the fraction of units clipped (0 when
        no parameter has a gradient). Call ``.item()`` only when logging: it syncs a GPU.
    """
    _check_settings(clipping, eps)
    params = _as_param_list(parameters)
    clipped, units = _agc_(params, clipping, eps)
    if clipped is None or units == 0:
        return torch.zeros(())
    return clipped.float() / units


class AGCOptimizerMixin:
    """Adds AGC to a ``torch.optim.Optimizer`` subclass; see ``with_agc``.

    Each parameter group carries ``agc_clipping`` (float, or None for no clipping) and ``agc_eps``;
    groups that leave them out take the constructor's values. ``step()`` clips every group, then
    runs the wrapped optimizer's step.
    """

    _agc_base: type[torch.optim.Optimizer]

    def __init__(self, params: Any, *args: Any, agc_clipping: float | None = 0.01,
                 agc_eps: float = 1e-3, **kwargs: Any):
        super().__init__(params, *args, **kwargs)
        self.defaults["agc_clipping"] = agc_clipping
        self.defaults["agc_eps"] = agc_eps
        for group in self.param_groups:
            group.setdefault("agc_clipping", agc_clipping)
            group.setdefault("agc_eps", agc_eps)
            self._check_group(group)
        # Fused optimizers unscale inside their kernel when GradScaler hands them the scale; AGC
        # must see unscaled gradients, so GradScaler is told to unscale before step() instead.
        self._step_supports_amp_scaling = False
        self._agc_last: tuple[torch.Tensor | None, int] | None = None

    @staticmethod
    def _check_group(group: dict) -> None:
        if group["agc_clipping"] is not None:
            _check_settings(group["agc_clipping"], group["agc_eps"])

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # During __init__ the AGC defaults are filled in (and checked) afterwards.
        if "agc_clipping" in group and "agc_eps" in group:
            self._check_group(group)

    @torch.no_grad()
    def clip_gradients_(self) -> None:
        """Clip the gradients of every group with its AGC settings (``step()`` calls this)."""
        clipped_total, units_total = None, 0
        for group in self.param_groups:
            if group.get("agc_clipping") is None:
                continue
            params = _as_param_list(group["params"])
            clipped, units = _agc_(params, group["agc_clipping"], group["agc_eps"])
            if clipped is None:
                continue
            if clipped_total is None:
                clipped_total = clipped
            else:
                clipped_total = clipped_total + clipped.to(clipped_total.device)
            units_total += units
        self._agc_last = (clipped_total, units_total)

    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            # Gradients must exist before they are clipped; the wrapped step gets no closure so
            # that it cannot recompute (unclipped) gradients.
            with torch.enable_grad():
                loss = closure()
        self.clip_gradients_()
        wrapped_step = super().step
        func = getattr(wrapped_step, "__func__", None)
        if func is not None and getattr(func, "hooked", False):
            # torch wraps a class's step() with the step pre/post hooks once it has an instance;
            # this class's step() is wrapped too, so call the inner one: hooks run once per step.
            func.__wrapped__(self)
        else:
            wrapped_step()
        return loss

    def __reduce__(self):
        # The class is created at run time: pickle rebuilds it from the wrapped optimizer class.
        return (_new_agc_optimizer, (self._agc_base,), self.__getstate__())


_AGC_CLASSES: dict[type, type] = {}


def with_agc(optimizer_cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """Return a subclass of ``optimizer_cls`` that applies AGC inside ``step()``.

    The subclass takes the wrapped class's arguments plus ``agc_clipping`` (default 0.01; None
    disables) and ``agc_eps`` (default 1e-3), the defaults of groups that do not set them.
    ``isinstance(opt, optimizer_cls)`` holds; instances pickle and ``state_dict()`` as usual (the
    AGC settings are saved with the parameter groups). Calling it twice returns the same class.

    Args:
        optimizer_cls (type): a ``torch.optim.Optimizer`` subclass, e.g. ``torch.optim.SGD``.
    """
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(f"with_agc expects a torch.optim.Optimizer subclass, got {optimizer_cls!r}")
    if issubclass(optimizer_cls, AGCOptimizerMixin):
        return optimizer_cls
    if optimizer_cls not in _AGC_CLASSES:
        name = f"AGC{optimizer_cls.__name__}"
        cls = type(
            name,
            (AGCOptimizerMixin, optimizer_cls),
            {"_agc_base": optimizer_cls, "__module__": __name__, "__qualname__": name},
        )
        _AGC_CLASSES[optimizer_cls] = cls
    return _AGC_CLASSES[optimizer_cls]


def _new_agc_optimizer(optimizer_cls: type[torch.optim.Optimizer]) -> torch.optim.Optimizer:
    cls = with_agc(optimizer_cls)
    return cls.__new__(cls)


def get_agc_stats(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """AGC statistics of the optimizer's last ``step()``, for logging.

    Returns:
        dict: ``{"agc_clipped_fraction": float}`` (clipped units / units with a gradient, over all
        clipped groups), or ``{}`` when the optimizer has no AGC or has not stepped yet. Syncs the
        GPU once.
    """
    last = getattr(optimizer, "_agc_last", None)
    if last is None:
        return {}
    clipped, units = last
    if clipped is None or units == 0:
        return {"agc_clipped_fraction": 0.0}
    return {"agc_clipped_fraction": clipped.item() / units}
