"""detectron2 hooks of nfdet."""

from __future__ import annotations

from detectron2.engine import HookBase

from ..solver.stats import TrainingStats

__all__ = ["TrainingStatsHook"]


class TrainingStatsHook(HookBase):
    """Every ``period`` iterations, put ``nfdet.solver.stats.TrainingStats`` of that step
    (per-stage gradient/weight ratios, AGC clipped fractions, skip gains, stage output RMS) into
    the event storage, so that they reach metrics.json and TensorBoard. Other iterations cost
    nothing.

    Args:
        period (int): log every ``period`` iterations (and the last one).
    """

    def __init__(self, period: int):
        self._period = int(period)
        self._stats: TrainingStats | None = None

    def before_train(self) -> None:
        self._stats = TrainingStats(self.trainer.model, self.trainer.optimizer)

    def after_train(self) -> None:
        if self._stats is not None:
            self._stats.close()
            self._stats = None

    def before_step(self) -> None:
        it = self.trainer.iter
        log = (it + 1) % self._period == 0 or it == self.trainer.max_iter - 1
        self._stats.before_step(log)

    def after_step(self) -> None:
        scalars = self._stats.after_step()
        if scalars:
            self.trainer.storage.put_scalars(smoothing_hint=False, **scalars)
