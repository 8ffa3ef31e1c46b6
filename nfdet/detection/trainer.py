"""detectron2 ``DefaultTrainer`` for NFNet detectors: nfdet optimizer (weight-decay groups + AGC),
COCO evaluation, AGC statistics in the event storage, nfdet classification checkpoints as
``MODEL.WEIGHTS``."""

from __future__ import annotations

import os
import weakref

from detectron2.engine import DefaultTrainer, HookBase, hooks
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator

from ..solver import build_optimizer, get_agc_stats
from .checkpoint import NFNetCheckpointer

__all__ = ["NFNetTrainer", "AGCStatsHook"]


class AGCStatsHook(HookBase):
    """After every step, put the optimizer's AGC statistics (``get_agc_stats``, e.g.
    ``agc_clipped_fraction``: clipped units / clipped-group units) into the event storage, so
    they reach metrics.json and TensorBoard. Nothing is written when AGC is off."""

    def after_step(self) -> None:
        stats = get_agc_stats(self.trainer.optimizer)
        if stats:
            self.trainer.storage.put_scalars(smoothing_hint=False, **stats)


class NFNetTrainer(DefaultTrainer):
    """``DefaultTrainer`` with nfdet's optimizer, COCO evaluation, AGC logging and a checkpointer
    that reads nfdet classification checkpoints (``NFNetCheckpointer``).

    Args:
        cfg (CfgNode): detectron2 config with nfdet's keys.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        # DefaultTrainer builds a plain DetectionCheckpointer; swap in ours, also in the periodic
        # checkpoint hook that already holds the old one.
        self.checkpointer = NFNetCheckpointer(
            self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        for hook in self._hooks:
            if isinstance(hook, hooks.PeriodicCheckpointer):
                hook.checkpointer = self.checkpointer

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_folder: str | None = None
                        ) -> DatasetEvaluator:
        """COCO box (and mask, with ``MODEL.MASK_ON``) AP through pycocotools' COCOeval when
        detectron2's compiled evaluator is absent."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder)

    def build_hooks(self):
        ret = super().build_hooks()
        # Before the PeriodicWriter (last), so the statistics of a step are written with it.
        index = len(ret) - 1 if ret and isinstance(ret[-1], hooks.PeriodicWriter) else len(ret)
        ret.insert(index, AGCStatsHook())
        return ret
