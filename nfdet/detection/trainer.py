"""detectron2 ``DefaultTrainer`` for NFNet detectors: nfdet optimizer (weight-decay groups + AGC),
COCO evaluation, AGC statistics in the event storage, nfdet classification checkpoints as
``MODEL.WEIGHTS``, and training that resumes exactly.

Exact resumption: a run killed at any moment and continued with ``--resume`` computes the same
losses as a run never interrupted (bit for bit on CPU). For that, nothing a step does may depend
on the history of the process:

- the data order is one seeded stream of indices, grouped into batches at the index level
  (aspect-ratio groups from the dataset's ``width``/``height``) and positioned by iteration: a
  resumed run replays the index stream (no image is read) up to its start iteration;
- every sample is mapped (augmented) under RNGs seeded from (run seed, iteration, rank, position
  in the batch), whichever process or loader worker maps it;
- before every step the RNGs of the model (proposal sampling, stochastic depth) are seeded from
  (run seed, iteration, rank).

The run seed is ``SEED`` when set (>= 0), otherwise drawn once and stored in every checkpoint, so
that a resumed run uses the seed of the run it continues. The loader (``ResumableTrainLoader``,
``build_resumable_train_loader``, ``derive_seed``; re-exported here) lives in
``nfdet.detection.loader``; the dataset checks and the mapper it uses in ``nfdet.detection.data``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import weakref
from typing import Any

from detectron2.engine import DefaultTrainer, HookBase, hooks
from detectron2.engine import defaults as d2_defaults
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter

from ..seed import seed_all
from ..solver import build_optimizer, get_agc_stats
from ..solver.clipping import resolve_agc_clipping
from . import loader as nfdet_loader
from .checkpoint import NFNetCheckpointer
from .hooks import TrainingStatsHook
from .loader import MODEL_STREAM, ResumableTrainLoader, build_resumable_train_loader, derive_seed

__all__ = [
    "NFNetTrainer",
    "AGCStatsHook",
    "ResumableTrainLoader",
    "build_resumable_train_loader",
    "derive_seed",
]

logger = logging.getLogger(__name__)


class AGCStatsHook(HookBase):
    """After every step, put the optimizer's AGC statistics (``get_agc_stats``, e.g.
    ``agc_clipped_fraction``: clipped units / clipped-group units) into the event storage, so
    they reach metrics.json and TensorBoard. Nothing is written when AGC is off."""

    def after_step(self) -> None:
        stats = get_agc_stats(self.trainer.optimizer)
        if stats:
            self.trainer.storage.put_scalars(smoothing_hint=False, **stats)


class _SeedStepHook(HookBase):
    """Before every step, seed the global RNGs from (run seed, iteration, rank)."""

    def before_step(self) -> None:
        seed_all(derive_seed(self.trainer.seed, MODEL_STREAM, self.trainer.iter,
                             comm.get_rank()))


class _WriteBeforeCheckpoint(HookBase):
    """Write the metrics of every finished iteration (metrics.json, TensorBoard, console) just
    before a checkpoint is saved, so that a run killed after the save and resumed from it has
    logged every iteration once. detectron2's ``PeriodicWriter`` alone writes every 20
    iterations, after the checkpoint."""

    def __init__(self, writers: list, period: int):
        self._writers = writers
        self._period = period

    def after_step(self) -> None:
        it, last = self.trainer.iter, self.trainer.iter >= self.trainer.max_iter - 1
        if last:
            # PeriodicWriter writes this step too: only what must be on disk before the save.
            for writer in self._writers:
                if not isinstance(writer, CommonMetricPrinter):
                    writer.write()
        elif self._period > 0 and (it + 1) % self._period == 0:
            for writer in self._writers:
                writer.write()


@contextlib.contextmanager
def _ddp_on_model_device():
    """While inside, detectron2's ``create_ddp_model`` wraps a model on the device it is on:
    detectron2 passes ``device_ids=[local rank]``, which DDP refuses for a CPU model (gloo
    processes, e.g. under ``torchrun``) and which is wrong when each process sees only its own
    GPU (``srun --gpus-per-task 1``: the local rank may be 3, the device ``cuda:0``)."""
    original = d2_defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        devices = {p.device for p in model.parameters()}
        if len(devices) == 1:
            device = devices.pop()
            kwargs.setdefault("device_ids", None if device.type == "cpu" else [device.index])
        return original(model, **kwargs)

    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = original


class NFNetTrainer(DefaultTrainer):
    """``DefaultTrainer`` with nfdet's optimizer, COCO evaluation, AGC logging, a checkpointer
    that reads nfdet classification checkpoints and writes atomically (``NFNetCheckpointer``),
    a data loader and RNG seeding that make ``--resume`` exact (see the module docstring), and
    a clear stop when the loss diverges.

    Args:
        cfg (CfgNode): detectron2 config with nfdet's keys.
    """

    def __init__(self, cfg):
        with _ddp_on_model_device():
            super().__init__(cfg)
        self.seed = int(cfg.SEED) if cfg.SEED >= 0 else int(comm.shared_random_seed())
        # DefaultTrainer builds a plain DetectionCheckpointer; swap in ours, also in the periodic
        # checkpoint hook that already holds the old one.
        self.checkpointer = NFNetCheckpointer(
            self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        for hook in self._hooks:
            if isinstance(hook, hooks.PeriodicCheckpointer):
                hook.checkpointer = self.checkpointer
        self._position_loader()

    @classmethod
    def build_optimizer(cls, cfg, model):
        # SOLVER.AGC.REFERENCE_BATCH_SIZE > 0: clipping from the batch size (docs/small_batch.md).
        resolved = resolve_agc_clipping(cfg, cfg.SOLVER.IMS_PER_BATCH)
        if resolved is not cfg and cfg.SOLVER.AGC.ENABLED:
            logger.info("AGC clipping %.4g at batch %d (%.4g at batch %d)",
                        resolved.SOLVER.AGC.CLIPPING, cfg.SOLVER.IMS_PER_BATCH,
                        cfg.SOLVER.AGC.CLIPPING, cfg.SOLVER.AGC.REFERENCE_BATCH_SIZE)
        return build_optimizer(resolved, model)

    @classmethod
    def build_train_loader(cls, cfg):
        """``nfdet.detection.loader.build_train_loader``: the checked ``DATASETS.TRAIN``
        (``load_train_dataset``) in a ``ResumableTrainLoader`` with ``NFNetDatasetMapper``.

        Raises:
            DatasetError: nothing to train on, or masks ``MODEL.MASK_ON`` cannot train on.
        """
        return nfdet_loader.build_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name: str):
        """detectron2's test loader with ``NFNetDatasetMapper``: any image mode read as RGB; an
        unreadable image stops the evaluation with ``ImageReadError`` naming the file."""
        return nfdet_loader.build_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_folder: str | None = None
                        ) -> DatasetEvaluator:
        """COCO box (and mask, with ``MODEL.MASK_ON``) AP through pycocotools' COCOeval when
        detectron2's compiled evaluator is absent."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder)

    def build_writers(self):
        self._writers = super().build_writers()
        return self._writers

    def build_hooks(self):
        ret = super().build_hooks()
        ret.insert(0, _SeedStepHook())
        # AGC statistics and a metrics write before the checkpointer, so that everything up to
        # a checkpoint is logged before it is saved.
        index = next((i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicCheckpointer)),
                     None)
        if index is None:  # processes other than the main one save nothing
            index = next(i for i, h in enumerate(ret) if isinstance(h, hooks.LRScheduler)) + 1
        statistics: list[HookBase] = [AGCStatsHook()]
        if self.cfg.SOLVER.STATS_PERIOD > 0:  # per-stage statistics (docs/small_batch.md)
            statistics.append(TrainingStatsHook(self.cfg.SOLVER.STATS_PERIOD))
        writers = getattr(self, "_writers", None)
        if writers and comm.is_main_process():
            # After every hook that puts statistics, before the checkpointer.
            statistics.append(_WriteBeforeCheckpoint(writers, self.cfg.SOLVER.CHECKPOINT_PERIOD))
        ret[index:index] = statistics
        return ret

    # ------------------------------------------------------------------------------ resuming
    def _position_loader(self) -> None:
        loader = self._trainer.data_loader
        if isinstance(loader, ResumableTrainLoader):
            loader.seed, loader.start_iter = self.seed, self.start_iter

    def resume_or_load(self, resume: bool = True) -> None:
        """detectron2's ``resume_or_load``; with a checkpoint, the run seed it stores is used and
        the data stream continues at the next iteration."""
        super().resume_or_load(resume=resume)
        self._position_loader()

    def state_dict(self) -> dict[str, Any]:
        ret = super().state_dict()
        ret["seed"] = self.seed
        return ret

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = copy.copy(state_dict)
        seed = state_dict.pop("seed", None)
        super().load_state_dict(state_dict)
        if seed is None:
            logger.warning("The checkpoint holds no run seed (written by another trainer): the "
                           "data order after --resume differs from an uninterrupted run's")
        elif int(seed) != self.seed:
            if self.cfg.SEED >= 0:
                logger.warning("SEED %d differs from the checkpoint's run seed %d; continuing "
                               "with the checkpoint's", self.cfg.SEED, int(seed))
            self.seed = int(seed)

    # ------------------------------------------------------------------------------ training
    def run_step(self) -> None:
        try:
            super().run_step()
        except FloatingPointError as e:
            last = self.checkpointer.last_good_checkpoint or (
                "none (this run has not saved or resumed one; nothing in "
                f"{self.cfg.OUTPUT_DIR} was written with diverged weights)"
            )
            raise FloatingPointError(
                "Training diverged: the loss (or the predictions it comes from) became NaN or "
                f"infinite at iteration {self.iter}. "
                f"Stopped without saving the diverged weights. Last good checkpoint: {last} "
                "(continue from it with --resume, e.g. with a lower SOLVER.BASE_LR or "
                f"SOLVER.AGC.CLIPPING). detectron2 reported: {e}"
            ) from e
