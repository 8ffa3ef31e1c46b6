"""The pretraining loop: model, optimizer, schedule, EMA, evaluation, checkpoints and logging.

One ``PretrainTrainer`` per process. With several processes (``launch``), the model is wrapped in
DistributedDataParallel: gradients are averaged by the all-reduce in ``backward()``, and AGC runs
inside ``optimizer.step()``, i.e. on the averaged (and, with fp16, unscaled) gradients.

Gradient accumulation (``SOLVER.ACCUM_STEPS = k``): an optimizer step runs forward and backward on
``k`` micro-batches of ``IMS_PER_BATCH / (k x processes)`` examples per process, each loss divided
by ``k``, so the accumulated gradient is the mean gradient of the global batch; DDP skips its
all-reduce (``no_sync``) on all but the last micro-batch. AGC, weight decay, the learning-rate
schedule, EMA, logging and checkpoints count optimizer steps; a checkpoint always falls between two
optimizer steps, and ``--resume`` continues with the next step's micro-batches.

SAM (``SOLVER.SAM.RHO > 0``, docs/sam.md): each optimizer step first computes, on every process
and without any all-reduce, the ascent gradient on ``ceil(ASCENT_FRACTION x n)`` examples spread
evenly over each of its micro-batches of ``n``; moves the weights to ``w + e`` with ``e = rho g /
||g||``; runs the usual forward/backward passes of all micro-batches there (all-reduced as
above); restores ``w``; then AGC, weight decay, the optimizer and EMA act as in a plain step.

Steps and epochs: an epoch is ``len(train set) / IMS_PER_BATCH`` optimizer steps (DeepMind's
definition; ``SOLVER.EPOCHS`` and ``WARMUP_EPOCHS`` count these). With MixUp/CutMix a step reads
twice as many source images as it trains on, so one pass over the data (the sampler's epoch)
takes half an epoch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..checkpoint import CheckpointFormatError
from ..modeling import build_nfnet, canonical_name
from ..seed import seed_all
from ..solver import build_optimizer, get_agc_stats
from ..solver.clipping import resolve_agc_clipping
from ..solver.sam import SAMPerturbation, ascent_indices, sam_perturb_, sam_restore_
from ..solver.stats import TrainingStats
from .checkpoint import (
    find_last_checkpoint,
    get_rng_state,
    list_checkpoints,
    load_checkpoint_file,
    save_training_checkpoint,
    set_rng_state,
    state_dict_mismatch,
)
from .config import check_pretrain_config, scaled_lr
from .data import build_dataset, build_test_loader, build_train_loader
from .ema import ModelEMA
from .mixing import MixedBatch, mixed_targets
from .transforms import build_test_transform, build_train_transform, normalize_batch

__all__ = [
    "PretrainTrainer",
    "StepResult",
    "TrainingDiverged",
    "build_pretrain_model",
    "lr_factor",
    "evaluate",
    "export_backbone",
    "get_rank",
    "get_world_size",
]

logger = logging.getLogger("nfdet.pretrain")


class TrainingDiverged(FloatingPointError):
    """The training loss or weights became NaN or infinite.

    Attributes:
        step (int): the first non-finite step (numbering of metrics.jsonl).
    """

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _variant_note(ckpt: dict, variant: str) -> str:
    meta = ckpt.get("meta")
    other = meta.get("variant") if isinstance(meta, dict) else None
    if other is None:
        return ""
    try:
        other = canonical_name(str(other))
    except (KeyError, ValueError):
        pass
    return f" (the checkpoint says variant {other})" if other != variant else ""


def build_pretrain_model(cfg) -> nn.Module:
    """The NFNet classifier of ``cfg`` (variant, classes, dropout, stochastic depth, activation
    checkpointing, the classifier's initialisation)."""
    return build_nfnet(
        cfg.MODEL.NFNET.VARIANT,
        num_classes=cfg.MODEL.NUM_CLASSES,
        drop_rate=cfg.MODEL.DROPOUT,
        drop_path_rate=cfg.MODEL.NFNET.DROP_PATH_RATE,
        activation_checkpoint=cfg.MODEL.NFNET.ACTIVATION_CHECKPOINT,
        head_init_std=cfg.MODEL.HEAD_INIT_STD,
    )


def lr_factor(step: int, max_iter: int, warmup_iters: int) -> float:
    """Multiplier of the learning rate at (0-based) ``step``: linear warmup from 0, cosine to 0.

    Args:
        step (int): the step about to be taken.
        max_iter (int): schedule length.
        warmup_iters (int): warmup length.
    """
    if step < warmup_iters:
        return step / warmup_iters
    decay = max(max_iter - warmup_iters, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_iters, decay) / decay))


def _autocast_dtype(cfg, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or not cfg.SOLVER.AMP.ENABLED:
        return None
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16}
    if cfg.SOLVER.AMP.DTYPE not in dtypes:
        raise ValueError(
            f"SOLVER.AMP.DTYPE must be 'bfloat16' or 'float16', got {cfg.SOLVER.AMP.DTYPE!r}"
        )
    return dtypes[cfg.SOLVER.AMP.DTYPE]


class StepResult(NamedTuple):
    """What ``PretrainTrainer.run_step`` returns: device tensors, read only when logging.

    Attributes:
        loss (Tensor): mean training loss over this process's examples of the step (with SAM:
            at the perturbed weights, the loss whose gradient the step descends).
        correct (Tensor): correct top-1 predictions among them (int64).
        examples (int): this process's examples of the step.
        ascent_grad_norm (Tensor | None): SAM only: ``||g||`` of this process's ascent gradient.
        ascent_loss (Tensor | None): SAM only: mean loss over this process's ascent examples at
            the unperturbed weights.
    """

    loss: torch.Tensor
    correct: torch.Tensor
    examples: int
    ascent_grad_norm: torch.Tensor | None = None
    ascent_loss: torch.Tensor | None = None


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, mean: torch.Tensor,
             std: torch.Tensor, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False) -> dict[str, float]:
    """Top-1, top-5 and cross-entropy over the loader, summed over all processes.

    Args:
        model (nn.Module): the classifier (not DDP-wrapped).
        loader: this process's shard of the eval set (uint8 images, labels).
        device (torch.device): where to run.
        mean, std (Tensor): (1, 3, 1, 1) normalization on the 0-255 scale.
        amp_dtype (torch.dtype | None): autocast dtype on GPU.
        channels_last (bool): feed channels_last tensors.

    Returns:
        dict: ``{"top1": %, "top5": %, "loss": float, "count": int}``.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        x = normalize_batch(images, mean, std, torch.float32)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == labels[:, None]
        totals += torch.stack([
            hit[:, 0].sum().double(),
            hit.any(dim=1).sum().double(),
            F.cross_entropy(logits, labels, reduction="sum").double(),
            torch.tensor(labels.shape[0], dtype=torch.float64, device=device),
        ])
    if get_world_size() > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    n = max(totals[3].item(), 1.0)
    return {"top1": 100.0 * totals[0].item() / n, "top5": 100.0 * totals[1].item() / n,
            "loss": totals[2].item() / n, "count": int(totals[3].item())}


def export_backbone(model: nn.Module, path: str, meta: dict[str, Any]) -> None:
    """Write an nfdet checkpoint ``{"model": classifier state dict, "meta": meta}`` atomically."""
    from ..checkpoint import save_checkpoint

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_checkpoint({"model": state, "meta": dict(meta)}, path)


class _MetricsWriter:
    """JSON lines (``metrics.jsonl``, appended) and TensorBoard scalars, process 0 only."""

    def __init__(self, output_dir: str, tensorboard: bool):
        self._file = open(os.path.join(output_dir, "metrics.jsonl"), "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(output_dir, "tb"))
            except ImportError as e:
                logger.warning("TensorBoard logging off (%s); set LOG.TENSORBOARD False", e)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class _Window:
    """Sums over the steps since the last log line, on the device (read only when logged: no
    sync per step): loss, correct, examples, and with SAM the ascent gradient norm and loss."""

    def __init__(self, device: torch.device):
        self.totals = torch.zeros(5, dtype=torch.float64, device=device)
        self.reset()

    def reset(self) -> None:
        self.totals.zero_()
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, result: StepResult) -> None:
        zero = self.totals.new_zeros(())
        self.totals += torch.stack([
            result.loss.double(), result.correct.double(),
            torch.tensor(result.examples, dtype=torch.float64, device=self.totals.device),
            zero if result.ascent_grad_norm is None else result.ascent_grad_norm.double(),
            zero if result.ascent_loss is None else result.ascent_loss.double(),
        ])
        self.steps += 1


class _RunOutputs:
    """What one ``train()`` call writes to: the metrics writer and progress bar (process 0) and
    the log window."""

    def __init__(self, writer: _MetricsWriter | None, bar: Any, window: _Window):
        self.writer, self.bar, self.window = writer, bar, window

    @classmethod
    def open(cls, trainer: PretrainTrainer, stop: int) -> _RunOutputs:
        cfg = trainer.cfg
        writer = bar = None
        if trainer.rank == 0:
            writer = _MetricsWriter(cfg.OUTPUT_DIR, cfg.LOG.TENSORBOARD)
            if cfg.LOG.PROGRESS_BAR:
                from tqdm import tqdm

                bar = tqdm(total=stop, initial=trainer.step, desc="pretrain", unit="step",
                           dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
        return cls(writer, bar, _Window(trainer.device))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if self.writer is not None and metrics:
            self.writer.write(step, metrics)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


class PretrainTrainer:
    """Trains an NFNet classifier with DeepMind's recipe (see ``nfdet.classification.config``).

    Args:
        cfg (CfgNode): a frozen pretraining config (``get_pretrain_cfg`` + yaml + overrides).
    """

    def __init__(self, cfg):
        check_pretrain_config(cfg)
        self.cfg = cfg
        self.rank, self.world_size = get_rank(), get_world_size()
        if torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
            torch.backends.cudnn.benchmark = not cfg.CUDNN_DETERMINISTIC
            torch.backends.cudnn.deterministic = cfg.CUDNN_DETERMINISTIC
        else:
            self.device = torch.device("cpu")
        self.seed = cfg.SEED if cfg.SEED >= 0 else self._shared_random_seed()
        self.amp_dtype = _autocast_dtype(cfg, self.device)
        self.channels_last = bool(cfg.MODEL.CHANNELS_LAST)
        self.variant = canonical_name(cfg.MODEL.NFNET.VARIANT)

        # Same init on every process (DDP also broadcasts rank 0's weights).
        seed_all(self.seed)
        self.model = build_pretrain_model(cfg).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.MODEL.WEIGHTS:
            self._load_initial_weights(cfg.MODEL.WEIGHTS)
        # Per-process streams for dropout / stochastic depth.
        seed_all(self.seed + 1 + self.rank)

        # SOLVER.AGC.REFERENCE_BATCH_SIZE > 0: the clipping follows the global batch.
        opt_cfg = resolve_agc_clipping(cfg, cfg.SOLVER.IMS_PER_BATCH).clone()
        opt_cfg.defrost()
        opt_cfg.SOLVER.BASE_LR = scaled_lr(cfg)
        self.agc_clipping = float(opt_cfg.SOLVER.AGC.CLIPPING)
        self.optimizer = build_optimizer(opt_cfg, self.model)
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.scaler = None
        if self.amp_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler("cuda")
        self.ema = ModelEMA(self.model, cfg.SOLVER.EMA.DECAY) if cfg.SOLVER.EMA.ENABLED else None

        self.ddp_model: nn.Module = self.model
        if self.world_size > 1:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        # Per-stage statistics every SOLVER.STATS_PERIOD steps (process 0 writes them).
        self.stats = None
        if cfg.SOLVER.STATS_PERIOD > 0 and self.rank == 0:
            self.stats = TrainingStats(self.ddp_model, self.optimizer, fpn_levels=False)

        self.mean = torch.tensor(cfg.DATA.PIXEL_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.DATA.PIXEL_STD, device=self.device).view(1, 3, 1, 1)
        self.train_set = build_dataset(cfg, "train", build_train_transform(cfg))
        self.train_loader, self.sampler = build_train_loader(
            cfg, self.train_set, self.rank, self.world_size, self.seed
        )
        self.accum_steps = int(cfg.SOLVER.ACCUM_STEPS)
        # SAM (docs/sam.md): rho 0 is off.
        self.sam_rho = float(cfg.SOLVER.SAM.RHO)
        self.sam_fraction = float(cfg.SOLVER.SAM.ASCENT_FRACTION)
        # Seconds spent waiting for the loader since the last log line.
        self._data_time = 0.0
        self.val_loader = None
        if cfg.DATA.VAL_SPLIT:
            val_set = build_dataset(cfg, "val", build_test_transform(cfg))
            self.val_loader = build_test_loader(cfg, val_set, self.rank, self.world_size)

        # Optimizer steps per epoch of IMS_PER_BATCH training examples, and per pass over the data
        # (half as many with mixing: two source images per example).
        self.steps_per_epoch = max(len(self.train_set) // cfg.SOLVER.IMS_PER_BATCH, 1)
        self.steps_per_pass = self.sampler.steps_per_epoch
        self.max_iter = cfg.SOLVER.MAX_ITER or cfg.SOLVER.EPOCHS * self.steps_per_epoch
        self.warmup_iters = min(round(cfg.SOLVER.WARMUP_EPOCHS * self.steps_per_epoch),
                                self.max_iter)
        self.step = 0
        # The checkpoint this run last saved or resumed from: named when training diverges.
        self.last_checkpoint: str | None = None
        # First step (1-based, as in metrics.jsonl) whose loss was not finite; -1 while none.
        # Kept on the device and read only at logging, evaluation and checkpoint time, so the
        # check adds no synchronization per step.
        self._first_nonfinite = torch.full((), -1, dtype=torch.int64, device=self.device)

    # ----------------------------------------------------------------------------------- set-up
    def _shared_random_seed(self) -> int:
        seed = [int.from_bytes(os.urandom(4), "little") % 2**31]
        if self.world_size > 1:
            dist.broadcast_object_list(seed, src=0)
        return seed[0]

    def _load_initial_weights(self, path: str) -> None:
        """Load ``MODEL.WEIGHTS``: every trunk tensor must fit; a classifier of another label
        space (other shape, or none in the file) is skipped and keeps its new initialisation
        (``MODEL.HEAD_INIT_STD``). The log names the loaded, new and skipped keys."""
        ckpt = load_checkpoint_file(path)
        state = dict(ckpt["model"])
        own = self.model.state_dict()
        head = ("head.fc.weight", "head.fc.bias")
        # A classifier of another size (pretrained on other classes) is skipped.
        skipped = [k for k in head if k in state and k in own and state[k].shape != own[k].shape]
        new = [k for k in head if k in own and (k not in state or k in skipped)]
        problems = state_dict_mismatch(own, state, ignore=tuple(new))
        if problems:
            raise ValueError(
                f"MODEL.WEIGHTS {path} does not fit NFNet {self.variant}"
                f"{_variant_note(ckpt, self.variant)}:\n  {problems}"
            )
        for k in skipped:
            del state[k]
        self.model.load_state_dict(state, strict=False)
        logger.info("Initial weights loaded from %s: %d of %d tensors", path, len(state),
                    len(own))
        if new:
            std = float(self.cfg.MODEL.HEAD_INIT_STD)
            init = f"N(0, {std:g}^2)" if std > 0 else "zeros"
            shapes = "; ".join(f"{k}: checkpoint {tuple(ckpt['model'][k].shape)}, "
                               f"model {tuple(own[k].shape)}" for k in skipped)
            logger.warning("MODEL.WEIGHTS: new classifier (%d classes), weight %s, bias 0: "
                           "new keys %s; skipped from the checkpoint %s%s",
                           self.cfg.MODEL.NUM_CLASSES, init, new, skipped or "none",
                           f" ({shapes})" if shapes else "")
        meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
        size = meta.get("train_size")
        if size and int(size) != int(self.cfg.INPUT.TRAIN_SIZE):
            logger.info("MODEL.WEIGHTS was trained at %s px, this run at %d px (no weight "
                        "depends on the resolution)", size, self.cfg.INPUT.TRAIN_SIZE)

    def resume_or_load(self, resume: bool) -> None:
        """With ``resume``, restore the newest checkpoint of ``OUTPUT_DIR`` if there is one.

        Without a checkpoint, training starts from scratch (as detectron2 does) and a warning
        says so.
        """
        if not resume:
            return
        path = find_last_checkpoint(self.cfg.OUTPUT_DIR)
        if path is None:
            logger.warning("--resume: no checkpoint in %s; starting from scratch",
                           self.cfg.OUTPUT_DIR)
            return
        try:
            ckpt = load_checkpoint_file(path)
        except (CheckpointFormatError, OSError) as e:
            others = [p for p in list_checkpoints(self.cfg.OUTPUT_DIR) if p != path]
            raise CheckpointFormatError(
                f"--resume: cannot read the last checkpoint: {e}. Other checkpoints in "
                f"{self.cfg.OUTPUT_DIR}: {others or 'none'} (to resume from one, write its file "
                f"name into {os.path.join(self.cfg.OUTPUT_DIR, 'last_checkpoint')})"
            ) from e
        problems = state_dict_mismatch(self.model.state_dict(), ckpt["model"])
        if problems:
            raise ValueError(
                f"--resume: {path} does not fit NFNet {self.variant}"
                f"{_variant_note(ckpt, self.variant)}:\n  {problems}"
            )
        if ckpt.get("steps_per_epoch") != self.steps_per_epoch:
            raise ValueError(
                f"{path} was written with {ckpt.get('steps_per_epoch')} steps per epoch, this run "
                f"has {self.steps_per_epoch} (dataset or SOLVER.IMS_PER_BATCH changed)"
            )
        if ckpt.get("steps_per_pass", self.steps_per_pass) != self.steps_per_pass:
            raise ValueError(
                f"{path} was written with {ckpt['steps_per_pass']} steps per pass over the data, "
                f"this run has {self.steps_per_pass} (MixUp/CutMix turned on or off: "
                "INPUT.MIXUP_ALPHA / INPUT.CUTMIX_ALPHA)"
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict(ckpt["ema"])
        if self.scaler is not None and ckpt.get("grad_scaler") is not None:
            self.scaler.load_state_dict(ckpt["grad_scaler"])
        self.step = int(ckpt["step"])
        # The run's seed (drawn at random when SEED < 0): the data order and every augmentation
        # stream keep deriving from it.
        self.seed = int(ckpt.get("seed", self.seed))
        self.sampler.seed = self.seed
        rng = ckpt.get("rng") or []
        if ckpt.get("world_size") == self.world_size and len(rng) == self.world_size:
            set_rng_state(rng[self.rank])
        else:
            logger.warning("Checkpoint from %s processes, now %d: RNG streams re-seeded",
                           ckpt.get("world_size"), self.world_size)
            seed_all(self.seed + 1 + self.rank + 7919 * self.step)
        self.last_checkpoint = path
        logger.info("Resumed from %s at step %d (epoch %d)", path, self.step,
                    self.step // self.steps_per_epoch)

    # -------------------------------------------------------------------------------- training
    def _set_lr(self, step: int) -> float:
        factor = lr_factor(step, self.max_iter, self.warmup_iters)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        return self.optimizer.param_groups[0]["lr"]

    def run_step(self, micro_batches: Iterable[MixedBatch]) -> StepResult:
        """One optimizer step on the ``SOLVER.ACCUM_STEPS`` micro-batches of this process.

        Without SAM the micro-batches are consumed one at a time (forward and backward as they
        arrive). With SAM (``SOLVER.SAM.RHO > 0``) all of them are read first: the ascent pass
        (``_sam_ascent``) perturbs the weights, the descent pass below runs at the perturbed
        point, and the weights are restored before the optimizer steps.

        Args:
            micro_batches (iterable[MixedBatch]): uint8 images, both labels and the ratio of
                each example.

        Returns:
            StepResult: the loss (mean over this process's examples of the step), the correct
            top-1 count, the number of examples and, with SAM, the ascent statistics.
        """
        k = self.accum_steps
        self.optimizer.zero_grad(set_to_none=True)
        perturbation: SAMPerturbation | None = None
        ascent_loss = None
        if self.sam_rho > 0:
            micro_batches = list(micro_batches)
            if len(micro_batches) != k:
                raise ValueError(f"run_step needs SOLVER.ACCUM_STEPS ({k}) micro-batches, got "
                                 f"{len(micro_batches)}")
            perturbation, ascent_loss = self._sam_ascent(micro_batches)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        examples = 0
        for i, batch in enumerate(micro_batches):
            if i >= k:
                raise ValueError(f"run_step got more than SOLVER.ACCUM_STEPS ({k}) micro-batches")
            x, labels, targets = self._inputs(batch)
            # The all-reduce runs once per optimizer step, in the last micro-batch's backward.
            sync = self.world_size == 1 or i == k - 1
            with nullcontext() if sync else self.ddp_model.no_sync():
                logits, losses = self._forward(x, targets)
                # Each micro-batch's mean loss / k: the gradients add up to the global mean's.
                loss = losses.mean() / k
                self._backward(loss)
            loss_sum += loss.detach()
            correct += (logits.detach().argmax(dim=1) == labels).sum()
            examples += labels.shape[0]
        if examples == 0 or i != k - 1:
            raise ValueError(f"run_step needs SOLVER.ACCUM_STEPS ({k}) micro-batches")
        if perturbation is not None:
            # SAM: the optimizer steps from w with the gradient taken at w + e.
            sam_restore_(perturbation)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # unscales first: AGC sees true gradients
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return StepResult(loss_sum, correct, examples,
                          None if perturbation is None else perturbation.grad_norm, ascent_loss)

    def _inputs(self, batch: MixedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A micro-batch on the device: (normalized images, labels, soft targets)."""
        cfg = self.cfg
        images = batch.images.to(self.device, non_blocking=True)
        labels = batch.labels.to(self.device, non_blocking=True)
        x = normalize_batch(images, self.mean, self.std, torch.float32)
        targets = mixed_targets(labels, batch.mix_labels.to(self.device, non_blocking=True),
                                batch.ratio.to(self.device, non_blocking=True),
                                cfg.MODEL.NUM_CLASSES, cfg.INPUT.LABEL_SMOOTHING)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, labels, targets

    def _forward(self, x: torch.Tensor,
                 targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, per-example cross-entropy with the soft targets, in float32)."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            logits = self.ddp_model(x)
        return logits, torch.sum(-targets * F.log_softmax(logits.float(), dim=1), dim=1)

    def _backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _sam_ascent(self, micro_batches: list[MixedBatch]) -> tuple[SAMPerturbation,
                                                                    torch.Tensor]:
        """SAM's ascent pass: the gradient ``g`` of the mean loss over ``ceil(fraction x n)``
        examples spread evenly over every micro-batch of ``n`` of this process (``ascent_indices``),
        never all-reduced (each process perturbs its own weights, as in the paper); then ``w <- w
        + rho g / ||g||``.

        Returns:
            (SAMPerturbation, Tensor): the perturbation (for ``sam_restore_``) and the mean ascent
            loss. The gradients are cleared for the descent pass.
        """
        subsets = [ascent_indices(int(batch.labels.shape[0]), self.sam_fraction)
                   for batch in micro_batches]
        total = sum(len(idx) for idx in subsets)
        loss_sum = torch.zeros((), device=self.device)
        # DDP: no_sync on every ascent backward, so nothing is all-reduced.
        with self.ddp_model.no_sync() if self.world_size > 1 else nullcontext():
            for batch, idx in zip(micro_batches, subsets):
                x, _, targets = self._inputs(MixedBatch(*(t[idx] for t in batch)))
                _, losses = self._forward(x, targets)
                # Summed over the micro-batches: the mean over all ascent examples.
                loss = losses.sum() / total
                self._backward(loss)
                loss_sum += loss.detach()
        # float16 AMP: the gradients carry the GradScaler's scale; sam_perturb_ divides it out (and
        # an overflow gives e = 0: the descent pass then runs at w, the scaler judges its step).
        scale = None
        if self.scaler is not None:
            scale = self.scaler.scale(torch.ones((), device=self.device))
        perturbation = sam_perturb_(self.model.parameters(), self.sam_rho, scale,
                                    zero_if_nonfinite=self.scaler is not None)
        self.optimizer.zero_grad(set_to_none=True)
        return perturbation, loss_sum

    def _timed_micro_batches(self, batches: Iterator[MixedBatch]) -> Iterator[MixedBatch]:
        """The next ``ACCUM_STEPS`` batches of the loader, adding the waits to the data time."""
        for _ in range(self.accum_steps):
            mark = time.perf_counter()
            batch = next(batches)
            self._data_time += time.perf_counter() - mark
            yield batch

    def checkpoint_state(self) -> dict:
        """The full training state (call on every process: RNG states are gathered)."""
        rng = [get_rng_state()]
        if self.world_size > 1:
            rng = [None] * self.world_size
            dist.all_gather_object(rng, get_rng_state())
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "step_in_epoch": self.step % self.steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "steps_per_pass": self.steps_per_pass,
            "world_size": self.world_size,
            "seed": self.seed,
            "rng": rng,
            "meta": {"variant": self.variant, "num_classes": self.cfg.MODEL.NUM_CLASSES,
                     "config": self.cfg.dump()},
        }

    def _diverged(self, what: str, step: int) -> TrainingDiverged:
        if self.last_checkpoint is not None:
            where = (f"the last good checkpoint is {self.last_checkpoint}; continue from it with "
                     "--resume (after lowering SOLVER.BASE_LR or SOLVER.AGC.CLIPPING, say)")
        else:
            where = (f"this run has saved no checkpoint yet (nothing in {self.cfg.OUTPUT_DIR} "
                     "was written by it)")
        return TrainingDiverged(
            f"Training diverged: {what} at step {step} (numbering of metrics.jsonl). Stopped "
            f"without saving the diverged weights; {where}.",
            step=step,
        )

    def check_finite(self, weights: bool = False) -> None:
        """Raise ``FloatingPointError`` if a loss since the start was not finite (or, with
        ``weights``, if a parameter is not finite), naming the step and the last good
        checkpoint. Call on every process at the same step (it synchronizes them)."""
        first = self._first_nonfinite.clone()
        if self.world_size > 1:
            first = torch.where(first < 0, torch.iinfo(torch.int64).max, first)
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
            first = torch.where(first == torch.iinfo(torch.int64).max, -1, first)
        step = int(first.item())
        if step >= 0:
            raise self._diverged("the loss is NaN or infinite", step)
        if weights:
            finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
            if not bool(finite):
                raise self._diverged("the weights are NaN or infinite", self.step)

    def save(self, final: bool = False) -> None:
        """Write a training checkpoint (process 0), after checking that loss and weights are
        finite: a diverged state never replaces a good checkpoint."""
        self.check_finite(weights=True)
        state = self.checkpoint_state()
        if self.rank == 0:
            path = save_training_checkpoint(self.cfg.OUTPUT_DIR, state, self.step,
                                            self.cfg.SOLVER.CHECKPOINT_KEEP, final=final)
            self.last_checkpoint = path
            logger.info("Saved %s", path)
        else:
            self.last_checkpoint = os.path.join(
                self.cfg.OUTPUT_DIR, "model_final.pth" if final else f"model_{self.step:07d}.pth"
            )
        if self.world_size > 1:
            dist.barrier()

    def run_eval(self) -> dict[str, float]:
        """Evaluate the raw and the EMA weights; returns ``val/*`` and ``val_ema/*`` metrics."""
        if self.val_loader is None:
            return {}
        out = {}
        models = [("val", self.model)] + ([("val_ema", self.ema.module)] if self.ema else [])
        for prefix, model in models:
            res = evaluate(model, self.val_loader, self.device, self.mean, self.std,
                           self.amp_dtype, self.channels_last)
            out.update({f"{prefix}/{k}": v for k, v in res.items() if k != "count"})
        return out

    def export(self) -> str:
        """Write ``OUTPUT_DIR/backbone_final.pth`` (nfdet format; EMA weights by default)."""
        use_ema = self.ema is not None and self.cfg.EXPORT.USE_EMA
        path = os.path.join(self.cfg.OUTPUT_DIR, "backbone_final.pth")
        export_backbone(self.ema.module if use_ema else self.model, path, {
            "variant": self.variant,
            "num_classes": int(self.cfg.MODEL.NUM_CLASSES),
            "source": "nfdet-pretrain",
            "ema": bool(use_ema),
            "step": int(self.step),
            "train_size": int(self.cfg.INPUT.TRAIN_SIZE),
            "test_size": int(self.cfg.INPUT.TEST_SIZE),
        })
        return path

    def train(self, resume: bool = False) -> dict[str, float]:
        """Run (or continue) training; returns the last evaluation's metrics."""
        self.resume_or_load(resume)
        stop = min(self.max_iter, self.cfg.SOLVER.STOP_ITER or self.max_iter)
        self._log_start()
        self.ddp_model.train()
        self._data_time = 0.0  # loader waits since the last log line
        run = _RunOutputs.open(self, stop)
        results: dict[str, float] = {}
        try:
            while self.step < stop:
                results = self._train_pass(stop, run) or results
            results = self._finish(run) or results
        except FloatingPointError as e:
            logger.error("%s", e)  # into log.txt too
            raise
        finally:
            run.close()
        return results

    def _log_start(self) -> None:
        logger.info("Training NFNet-%s: %d steps (%d per epoch), global batch %d (%d "
                    "micro-batch(es) per step), lr %.4g, AGC clipping %s, SAM %s, %d "
                    "process(es), device %s, precision %s, seed %d",
                    self.variant, self.max_iter, self.steps_per_epoch,
                    self.cfg.SOLVER.IMS_PER_BATCH, self.accum_steps, scaled_lr(self.cfg),
                    f"{self.agc_clipping:.4g}" if self.cfg.SOLVER.AGC.ENABLED else "off",
                    (f"rho {self.sam_rho:g}, ascent on {self.sam_fraction:g} of every "
                     "micro-batch") if self.sam_rho > 0 else "off",
                    self.world_size, self.device, self.amp_dtype or torch.float32, self.seed)

    def _train_pass(self, stop: int, run: _RunOutputs) -> dict[str, float]:
        """The optimizer steps of one pass over the data (a resumed run starts at its step within
        the pass), until the pass or the run ends; returns an evaluation's metrics if one ran."""
        data_pass, in_pass = divmod(self.step, self.steps_per_pass)
        self.sampler.set_epoch(data_pass, in_pass)
        batches = iter(self.train_loader)
        results: dict[str, float] = {}
        for _ in range(in_pass, self.steps_per_pass):
            epoch = self.step // self.steps_per_epoch
            lr = self._set_lr(self.step)
            if self.stats is not None:
                period = self.cfg.SOLVER.STATS_PERIOD
                self.stats.before_step((self.step + 1) % period == 0 or self.step + 1 == stop)
            result = self.run_step(self._timed_micro_batches(batches))
            self.step += 1
            self._first_nonfinite = torch.where(
                ~torch.isfinite(result.loss) & (self._first_nonfinite < 0), self.step,
                self._first_nonfinite,
            )
            run.window.add(result)
            if self.stats is not None:
                run.write(self.step, self.stats.after_step())
            if run.bar is not None:
                run.bar.update(1)
            last = self.step >= stop
            if self.step % self.cfg.LOG.PERIOD == 0 or last:
                self._log_metrics(run, lr, epoch)
            results = self._after_step(run, epoch, last) or results
            if last:
                break
        return results

    def _log_metrics(self, run: _RunOutputs, lr: float, epoch: int) -> None:
        """Check the losses, write the window's averages and start a new window."""
        self.check_finite()
        window = run.window
        metrics = self._log_window(window.totals, window.steps, window.start, self._data_time,
                                   lr, epoch)
        run.write(self.step, metrics)
        if run.bar is not None:
            run.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.3g}")
        window.reset()
        self._data_time = 0.0

    def _after_step(self, run: _RunOutputs, epoch: int, last: bool) -> dict[str, float]:
        """Evaluation and checkpoints due after this step; an evaluation's metrics if one ran."""
        cfg = self.cfg
        results: dict[str, float] = {}
        if cfg.TEST.EVAL_PERIOD > 0 and self.step % cfg.TEST.EVAL_PERIOD == 0 \
                and self.step < self.max_iter:
            self.check_finite()
            results = self._eval_and_log(run.writer, epoch)
        epoch_end = self.step % self.steps_per_epoch == 0
        if self.step == self.max_iter:
            self.save(final=True)
        elif (
            last
            or (cfg.SOLVER.CHECKPOINT_PERIOD > 0
                and self.step % cfg.SOLVER.CHECKPOINT_PERIOD == 0)
            or (cfg.SOLVER.CHECKPOINT_EVERY_EPOCH and epoch_end)
        ):
            self.save()
        return results

    def _finish(self, run: _RunOutputs) -> dict[str, float]:
        """After the last step: the final evaluation and the exported backbone, or a note that
        the run stopped early (``SOLVER.STOP_ITER``)."""
        if self.step >= self.max_iter:
            results = self._eval_and_log(run.writer, self.step // self.steps_per_epoch)
            if self.rank == 0:
                logger.info("Exported backbone weights to %s", self.export())
            return results
        logger.info("Stopped at step %d of %d (SOLVER.STOP_ITER); continue with --resume",
                    self.step, self.max_iter)
        return {}

    def _log_window(self, window: torch.Tensor, steps: int, start: float, data_time: float,
                    lr: float, epoch: int) -> dict[str, Any]:
        totals = window.clone()
        if self.world_size > 1:
            dist.all_reduce(totals)
        elapsed = max(time.perf_counter() - start, 1e-9)
        metrics = {
            "epoch": epoch,
            "loss": totals[0].item() / (steps * self.world_size),
            "lr": lr,
            "train_top1": 100.0 * totals[1].item() / max(totals[2].item(), 1.0),
            "images_per_s": totals[2].item() / elapsed,
            "data_time_fraction": min(data_time / elapsed, 1.0),
        }
        if self.sam_rho > 0:
            # Means over the window's steps and the processes (each process its own ascent).
            metrics["sam/ascent_grad_norm"] = totals[3].item() / (steps * self.world_size)
            metrics["sam/ascent_loss"] = totals[4].item() / (steps * self.world_size)
        metrics.update(get_agc_stats(self.optimizer))
        return metrics

    def _eval_and_log(self, writer: _MetricsWriter | None, epoch: int) -> dict[str, float]:
        results = self.run_eval()
        if results:
            logger.info("step %d eval: %s", self.step,
                        ", ".join(f"{k} {v:.3f}" for k, v in results.items()))
            if writer is not None:
                writer.write(self.step, {"epoch": epoch, **results})
        return results
