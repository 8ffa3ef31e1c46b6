"""The paper's batch-size study of AGC (Figure 1a/1b), for any pretraining config:
``tools/agc_sweep.py``.

One pretraining run per cell of a grid of batch sizes x clipping settings, each with

- ``SOLVER.IMS_PER_BATCH`` = the cell's batch ``B``;
- the learning rate scaled linearly with the batch: ``lr = base_lr x B / reference_batch``
  (the paper's 0.1 per 256 by default), set as ``SOLVER.BASE_LR`` + ``SOLVER.REFERENCE_BATCH_SIZE``
  so the trainer applies its own rule;
- AGC with exactly the cell's clipping (``SOLVER.AGC.CLIPPING``), or off (``"none"``:
  ``SOLVER.AGC.ENABLED False``). nfdet's batch rule ``SOLVER.AGC.REFERENCE_BATCH_SIZE`` is turned
  off (0) in every cell, so a cell never rescales its clipping by the batch;
- the same number of epochs (``SOLVER.EPOCHS``, and ``WARMUP_EPOCHS``) in every cell, as in the
  paper: a larger batch takes proportionally fewer steps over the same data. ``SOLVER.MAX_ITER``
  and ``SOLVER.STOP_ITER`` must be 0 (a fixed step count would give the large batches more data).

Each cell runs the pretraining trainer in this process (``PretrainTrainer``), or in ``--num-gpus``
processes on this machine that ``launch`` starts for the cell, with its own ``OUTPUT_DIR``
(``OUT/b<B>_clip<c>`` or ``OUT/b<B>_noclip``), where it leaves what a ``tools/pretrain_net.py`` run
leaves (``log.txt``, ``config.yaml``, ``metrics.jsonl``, checkpoints, ``backbone_final.pth``) plus
``cell_result.json``: the final top-1 of the raw and the EMA weights, the learning rate and steps
the trainer used, the time, and whether the run diverged. A run whose loss (or weights) became NaN
or infinite (the trainer raises ``FloatingPointError``) is a result: recorded as diverged, and the
sweep goes on.
Any other error stops the sweep with one line naming the cell.

Re-running the same sweep reuses every cell whose ``cell_result.json`` exists (settings checked:
a cell run with other settings is an error, not silently reused); a cell interrupted earlier
continues from its last checkpoint. ``force=True`` runs the cells again, after moving each
previous cell folder aside (``<cell>.replaced-<k>``), so nothing written earlier is lost.

After every cell the sweep rewrites ``OUT/results.csv`` and ``OUT/results.md``: the table of every
finished cell of this sweep in ``OUT`` (earlier runs with other batches or clippings included),
and at the end (or when stopped by an error) ``OUT/agc_sweep.png``: top-1 against batch size
(log2 axis), one line per clipping setting, the table beside it. All writes are atomic.
``docs/agc_sweep.md`` describes the design and a full NF-ResNet-50 ImageNet run.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import distributed
from ..checkpoint.io import atomic_write, write_text_atomic
from ..config import ConfigError, resolve_config_file
from .cli import one_line
from .config import load_pretrain_cfg
from .data import check_data_paths
from .engine import PretrainTrainer, get_rank, get_world_size
from .launch import launch, limit_cpu_threads, setup

__all__ = [
    "PAPER_BASE_LR",
    "PAPER_REFERENCE_BATCH",
    "RESULT_FILE",
    "SWEEP_KEYS",
    "Cell",
    "SweepError",
    "parse_batch_sizes",
    "parse_clippings",
    "linear_lr",
    "cell_opts",
    "run_cell",
    "run_sweep",
    "collect_records",
    "format_markdown",
    "write_tables",
    "plot_sweep",
]

logger = logging.getLogger("nfdet.sweep")

# The paper's learning-rate rule for the AGC ablation: 0.1 x B / 256 (docs/reference.md,
# "NF-ResNets").
PAPER_BASE_LR = 0.1
PAPER_REFERENCE_BATCH = 256
RESULT_FILE = "cell_result.json"
# A cell's settings, written before it trains: an interrupted cell resumes only with the same.
SETTINGS_FILE = "cell_settings.json"
# Keys the sweep sets in every cell; an override of one of them on the command line is an error.
SWEEP_KEYS = (
    "SOLVER.IMS_PER_BATCH", "SOLVER.BASE_LR", "SOLVER.REFERENCE_BATCH_SIZE", "SOLVER.AGC.ENABLED",
    "SOLVER.AGC.CLIPPING", "SOLVER.AGC.REFERENCE_BATCH_SIZE", "OUTPUT_DIR",
)
TABLE_COLUMNS = ("batch", "clipping", "lr", "steps", "epochs", "top1", "ema_top1", "diverged",
                 "diverged_step", "seconds", "output_dir")


class SweepError(RuntimeError):
    """The sweep cannot go on; the message is one line naming the cell, flag, key or file."""


@dataclass(frozen=True)
class Cell:
    """One run of the grid.

    Args:
        batch (int): ``SOLVER.IMS_PER_BATCH``.
        clipping (float | None): the AGC clipping; None: AGC off.
    """

    batch: int
    clipping: float | None

    @property
    def name(self) -> str:
        """Folder name: ``b<batch>_clip<clipping>`` or ``b<batch>_noclip``."""
        return f"b{self.batch}_noclip" if self.clipping is None else \
            f"b{self.batch}_clip{self.clipping:g}"

    @property
    def clipping_label(self) -> str:
        return "none" if self.clipping is None else f"{self.clipping:g}"


# ----------------------------------------------------------------------------------- arguments
def _items(text: str | Sequence[str]) -> list[str]:
    parts = text.split(",") if isinstance(text, str) else [str(t) for t in text]
    return [p.strip() for p in parts if p.strip()]


def parse_batch_sizes(text: str | Sequence[str]) -> list[int]:
    """``"8,32,128"`` (or a list) -> ``[8, 32, 128]``, sorted.

    Raises:
        ValueError: an item that is not an integer >= 1, a repeated one, or none at all.
    """
    values = []
    for item in _items(text):
        try:
            value = int(item)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"batch size {item!r} is not an integer >= 1")
        if value in values:
            raise ValueError(f"batch size {value} is given twice")
        values.append(value)
    if not values:
        raise ValueError("no batch size given")
    return sorted(values)


def parse_clippings(text: str | Sequence[str]) -> list[float | None]:
    """``"0.01,0.16,none"`` (or a list) -> ``[0.01, 0.16, None]`` (None: AGC off), in the given
    order.

    Raises:
        ValueError: an item that is neither a number > 0 nor "none", a repeated one, or none.
    """
    values: list[float | None] = []
    for item in _items(text):
        if item.lower() in ("none", "off"):
            value = None
        else:
            try:
                value = float(item)
            except ValueError:
                value = math.nan
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"clipping {item!r} is neither a number > 0 nor 'none'")
        if value in values:
            raise ValueError(f"clipping {item} is given twice")
        values.append(value)
    if not values:
        raise ValueError("no clipping setting given")
    return values


def linear_lr(batch: int, base_lr: float, reference_batch: int) -> float:
    """The paper's linear scaling: ``base_lr x batch / reference_batch``."""
    return base_lr * batch / reference_batch


def cell_opts(cell: Cell, out_dir: str, base_lr: float, reference_batch: int,
              epochs: int | None) -> list[str]:
    """The ``KEY VALUE`` overrides that make a pretraining run the sweep's ``cell``.

    Args:
        cell (Cell): batch and clipping.
        out_dir (str): the cell's ``OUTPUT_DIR``.
        base_lr (float): learning rate at ``reference_batch`` images.
        reference_batch (int): batch size of ``base_lr``.
        epochs (int | None): ``SOLVER.EPOCHS`` (None: the config's).
    """
    opts = ["SOLVER.IMS_PER_BATCH", str(cell.batch), "SOLVER.BASE_LR", repr(float(base_lr)),
            "SOLVER.REFERENCE_BATCH_SIZE", str(int(reference_batch)),
            # The clipping is the cell's as given, not rescaled by nfdet's batch rule.
            "SOLVER.AGC.REFERENCE_BATCH_SIZE", "0",
            "SOLVER.AGC.ENABLED", str(cell.clipping is not None), "OUTPUT_DIR", out_dir]
    if cell.clipping is not None:
        opts += ["SOLVER.AGC.CLIPPING", repr(float(cell.clipping))]
    if epochs is not None:
        opts += ["SOLVER.EPOCHS", str(epochs)]
    return opts


def _check_user_opts(opts: Sequence[str]) -> None:
    if len(opts) % 2:
        raise ConfigError(f"overrides must be KEY VALUE pairs; {opts[-1]!r} has no value")
    for key in opts[0::2]:
        if key in SWEEP_KEYS:
            raise ConfigError(f"{key} is set by the sweep in every cell (--batch-sizes, "
                              "--clipping, --base-lr, --reference-batch, --out); remove it")


def _check_cell_cfg(cfg, cell: Cell) -> None:
    if cfg.SOLVER.MAX_ITER or cfg.SOLVER.STOP_ITER:
        raise ConfigError(
            f"SOLVER.MAX_ITER ({cfg.SOLVER.MAX_ITER}) and SOLVER.STOP_ITER "
            f"({cfg.SOLVER.STOP_ITER}) must be 0 in a sweep: every cell trains SOLVER.EPOCHS "
            "epochs (use --epochs)")
    if not cfg.DATA.VAL_SPLIT:
        raise ConfigError("the sweep compares final top-1: DATA.VAL_SPLIT must name a "
                          "validation set")
    if not cfg.SOLVER.EPOCHS > 0:
        raise ConfigError(f"SOLVER.EPOCHS must be > 0, got {cfg.SOLVER.EPOCHS!r}")


# --------------------------------------------------------------------------------- one cell
def _write_json(path: str | os.PathLike, data: Any) -> None:
    write_text_atomic(os.fspath(path), json.dumps(data, indent=1) + "\n")


def _train_cell(args: argparse.Namespace, record: dict) -> None:
    """Per-process entry point of one cell: train, then (process 0) write ``RESULT_FILE``.

    A ``FloatingPointError`` (the trainer's divergence stop) becomes a result; other errors
    propagate.
    """
    limit_cpu_threads(args)
    cfg = setup(args)
    start = time.perf_counter()
    trainer = PretrainTrainer(cfg)
    record = dict(record)
    record.update(
        # What the trainer uses: the optimizer's peak learning rate and its clipping.
        lr=float(trainer.optimizer.param_groups[0]["initial_lr"]),
        clipping_used=trainer.agc_clipping if cfg.SOLVER.AGC.ENABLED else None,
        steps=int(trainer.max_iter), steps_per_epoch=int(trainer.steps_per_epoch),
        epochs=int(cfg.SOLVER.EPOCHS),
    )
    try:
        results = trainer.train(resume=args.resume)
        record.update(diverged=False, diverged_step=None, message="",
                      top1=results.get("val/top1"), ema_top1=results.get("val_ema/top1"))
    except FloatingPointError as e:
        # The first non-finite step as the trainer names it (else the step it stopped at).
        record.update(diverged=True, diverged_step=getattr(e, "step", trainer.step),
                      message=str(e), top1=None, ema_top1=None)
    record["seconds"] = round(time.perf_counter() - start, 1)
    if get_rank() == 0:
        _write_json(Path(cfg.OUTPUT_DIR) / RESULT_FILE, record)
    if get_world_size() > 1:
        dist.barrier()  # every process sees the result before the next cell starts


def _restore_logger(name: str, state: tuple) -> None:
    """Close the handlers a cell's ``setup`` attached to logger ``name`` and restore ``state``
    (handlers, level, propagate)."""
    log = logging.getLogger(name)
    handlers, level, propagate = state
    for handler in list(log.handlers):
        if handler not in handlers:
            log.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in log.handlers:
            log.addHandler(handler)
    log.setLevel(level)
    log.propagate = propagate


def _common_settings(config_file: str, opts: Sequence[str], base_lr: float,
                     reference_batch: int, epochs: int | None) -> dict:
    """What every cell of a sweep shares; stored in each result to detect a changed sweep."""
    return {"config": os.path.abspath(resolve_config_file(config_file)), "opts": list(opts),
            "base_lr": float(base_lr), "reference_batch": int(reference_batch), "epochs": epochs}


def _move_aside(path: Path) -> Path:
    k = 1
    while path.with_name(f"{path.name}.replaced-{k}").exists():
        k += 1
    target = path.with_name(f"{path.name}.replaced-{k}")
    os.replace(path, target)
    return target


def run_cell(cell: Cell, config_file: str, opts: Sequence[str], out_dir: str | os.PathLike,
             base_lr: float = PAPER_BASE_LR, reference_batch: int = PAPER_REFERENCE_BATCH,
             epochs: int | None = None, force: bool = False,
             num_gpus: int = 1) -> tuple[dict, bool]:
    """Train one cell in ``out_dir/<cell.name>``, or reuse its finished result.

    Args:
        cell (Cell): batch and clipping.
        config_file (str): a pretraining config (a path, or a name under ``configs/``).
        opts (sequence[str]): the user's ``KEY VALUE`` overrides (before the sweep's).
        out_dir (str | PathLike): the sweep's folder.
        base_lr (float): learning rate at ``reference_batch`` images.
        reference_batch (int): batch size of ``base_lr``.
        epochs (int | None): ``SOLVER.EPOCHS`` of every cell (None: the config's).
        force (bool): run again even if a result exists (the old folder is moved aside).
        num_gpus (int): processes of the run (one per GPU; CPU processes without a GPU),
            started for the cell by ``launch``; 1: the run is this process.

    Returns:
        (dict, bool): the cell's record (see ``RESULT_FILE``), and whether it was reused.

    Raises:
        SweepError: the cell was run before with other settings, or it failed (not by
            diverging); one line naming the cell.
    """
    cell_dir = Path(out_dir) / cell.name
    settings = {**_common_settings(config_file, opts, base_lr, reference_batch, epochs),
                "batch": cell.batch, "clipping": cell.clipping}
    result_path = cell_dir / RESULT_FILE
    if result_path.is_file() and not force:
        try:
            record = json.loads(result_path.read_text())
        except (OSError, ValueError) as e:
            raise SweepError(f"cell {cell.name}: cannot read {result_path} ({e}); run with "
                             "--force to redo the cell") from e
        _check_same_settings(cell, cell_dir, record.get("settings", {}), settings)
        return record, True
    if force and cell_dir.exists():
        logger.info("cell %s: previous results moved to %s", cell.name, _move_aside(cell_dir))
    # Interrupted earlier: continue from its last checkpoint, only with the same settings (a
    # run continued with another lr or length would be recorded under settings it never had).
    resume = cell_dir.is_dir()
    settings_path = cell_dir / SETTINGS_FILE
    if resume and settings_path.is_file():
        try:
            started = json.loads(settings_path.read_text())
        except (OSError, ValueError) as e:
            raise SweepError(f"cell {cell.name}: cannot read {settings_path} ({e}); run with "
                             "--force to redo the cell") from e
        _check_same_settings(cell, cell_dir, started, settings)
    cell_dir.mkdir(parents=True, exist_ok=True)
    _write_json(settings_path, settings)
    args = argparse.Namespace(
        config_file=config_file, resume=resume, eval_only=False,
        opts=[*opts, *cell_opts(cell, str(cell_dir), base_lr, reference_batch, epochs)],
        num_gpus=num_gpus, num_machines=1, machine_rank=0, dist_url="auto",
    )
    record = {"batch": cell.batch, "clipping": cell.clipping, "output_dir": str(cell_dir),
              "settings": settings}
    logger.info("cell %s: training (lr %.4g, %s)%s", cell.name,
                linear_lr(cell.batch, base_lr, reference_batch),
                "AGC off" if cell.clipping is None else f"clipping {cell.clipping:g}",
                " (resumed)" if resume else "")
    nfdet_log = logging.getLogger("nfdet")  # a cell's setup() points it at the cell's log.txt
    log_state = (list(nfdet_log.handlers), nfdet_log.level, nfdet_log.propagate)
    try:
        if num_gpus == 1:
            _train_cell(args, record)
        else:
            launch(_train_cell, num_gpus, args=(args, record))
    except Exception as e:
        raise SweepError(f"cell {cell.name} (batch {cell.batch}, clipping "
                         f"{cell.clipping_label}) failed: {type(e).__name__}: {one_line(e)} "
                         f"(log: {cell_dir / 'log.txt'})") from e
    finally:
        _restore_logger("nfdet", log_state)
        # The cell's trainer (model, optimizer, loaders) is garbage now: free it before the next.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if not result_path.is_file():
        raise SweepError(f"cell {cell.name}: training ended without writing {result_path}")
    return json.loads(result_path.read_text()), False


def _check_same_settings(cell: Cell, cell_dir: Path, old: dict, new: dict) -> None:
    changed = sorted(k for k in new if old.get(k) != new[k])
    if changed:
        k = changed[0]
        raise SweepError(
            f"cell {cell.name}: {cell_dir} was run with other settings ({k}: {old.get(k)!r}, "
            f"now {new[k]!r}); use another output folder or --force")


# ------------------------------------------------------------------------------------ sweep
def run_sweep(config_file: str, opts: Sequence[str], batch_sizes: Sequence[int],
              clippings: Sequence[float | None], out_dir: str | os.PathLike,
              base_lr: float = PAPER_BASE_LR, reference_batch: int = PAPER_REFERENCE_BATCH,
              epochs: int | None = None, force: bool = False, metric: str = "top1",
              num_gpus: int = 1) -> list[dict]:
    """Run (or reuse) every cell of ``batch_sizes`` x ``clippings`` and write the table and plot.

    Every cell's config is built and checked first (unknown keys, data paths, the sweep's
    conditions), so a bad argument ends the sweep before anything is trained or written.

    Args:
        config_file (str): a pretraining config (a path, or a name under ``configs/``).
        opts (sequence[str]): ``KEY VALUE`` overrides of every cell (not the sweep's keys,
            ``SWEEP_KEYS``).
        batch_sizes (sequence[int]): the batches, ascending.
        clippings (sequence[float | None]): the clipping settings (None: AGC off).
        out_dir (str | PathLike): output folder (one folder per cell in it).
        base_lr (float): learning rate at ``reference_batch``; a cell uses
            ``base_lr x B / reference_batch``.
        reference_batch (int): batch size of ``base_lr``.
        epochs (int | None): ``SOLVER.EPOCHS`` of every cell (None: the config's).
        force (bool): run every cell again (previous folders moved aside).
        metric (str): the plotted top-1: ``"top1"`` (raw weights) or ``"ema_top1"``.
        num_gpus (int): processes per cell, on this machine (see ``run_cell``). The sweep itself
            is one process: not started by torchrun or srun (each cell starts its own
            processes).

    Returns:
        list[dict]: the cells' records, in table order.

    Raises:
        ConfigError / FileNotFoundError: a bad config, override or data path (one line).
        ValueError: a bad flag value.
        SweepError: a cell failed other than by diverging (one line naming it); the table and
            plot of the cells finished before it are written first.
    """
    if not base_lr > 0:
        raise ValueError(f"--base-lr must be > 0, got {base_lr!r}")
    if not (isinstance(reference_batch, int) and reference_batch >= 1):
        raise ValueError(f"--reference-batch must be an integer >= 1, got {reference_batch!r}")
    if epochs is not None and not (isinstance(epochs, int) and epochs >= 1):
        raise ValueError(f"--epochs must be an integer >= 1, got {epochs!r}")
    if not (isinstance(num_gpus, int) and num_gpus >= 1):
        raise ValueError(f"--num-gpus must be an integer >= 1, got {num_gpus!r}")
    env = distributed.launcher_env()
    if env is not None and env.world_size > 1:
        raise ValueError(f"started by {env.launcher} with {env.world_size} processes: run the "
                         "sweep as one process with --num-gpus N (each cell starts its own)")
    if metric not in ("top1", "ema_top1"):
        raise ValueError(f"--metric must be 'top1' or 'ema_top1', got {metric!r}")
    opts = list(opts)
    _check_user_opts(opts)
    out = Path(out_dir)
    cells = [Cell(b, c) for b in batch_sizes for c in clippings]
    for cell in cells:
        cfg = load_pretrain_cfg(config_file, [*opts, *cell_opts(
            cell, str(out / cell.name), base_lr, reference_batch, epochs)])
        _check_cell_cfg(cfg, cell)
    check_data_paths(cfg)
    if metric == "ema_top1" and not cfg.SOLVER.EMA.ENABLED:
        raise ConfigError("--metric ema_top1 needs SOLVER.EMA.ENABLED True")
    # The config's epochs made explicit: a cell's stored settings do not depend on whether
    # --epochs was given.
    epochs = int(cfg.SOLVER.EPOCHS)
    common = _common_settings(config_file, opts, base_lr, reference_batch, epochs)
    title = _title(cfg, config_file, base_lr, reference_batch)
    records: list[dict] = []
    try:
        for cell in cells:
            record, reused = run_cell(cell, config_file, opts, out, base_lr, reference_batch,
                                      epochs, force, num_gpus)
            records.append(record)
            logger.info("cell %s: %s%s", cell.name, _summary(record),
                        " (reused)" if reused else "")
            write_tables(collect_records(out, common, clippings), out)
    except BaseException:
        # A failing cell: still write the table and plot of the finished ones, but never let
        # an error there hide the cell's.
        try:
            _write_outputs(out, common, clippings, metric, title)
        except Exception as e:
            logger.error("could not write the table and plot of the finished cells: %s", e)
        raise
    _write_outputs(out, common, clippings, metric, title)
    return records


def _write_outputs(out: Path, common: dict, clippings: Sequence[float | None], metric: str,
                   title: str) -> None:
    table = collect_records(out, common, clippings)
    if table:
        write_tables(table, out)
        plot_sweep(table, out / "agc_sweep.png", metric=metric, title=title)


def collect_records(out_dir: str | os.PathLike, common: dict,
                    clippings: Sequence[float | None] = ()) -> list[dict]:
    """Every finished cell in ``out_dir`` of the sweep ``common`` describes (cells of an earlier
    run of the same sweep with other batch sizes or clippings included; folders moved aside by
    ``force`` and cells of other settings left out), ordered by batch, then clipping (the order of
    ``clippings`` first, then the others; AGC off last).

    Args:
        out_dir (str | PathLike): the sweep's folder.
        common (dict): the settings every cell shares (config, overrides, lr rule, epochs).
        clippings (sequence[float | None]): the clipping order of the table.
    """
    records = []
    for path in sorted(Path(out_dir).glob(f"*/{RESULT_FILE}")):
        if ".replaced-" in path.parent.name:
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        settings = record.get("settings", {})
        if all(settings.get(k) == v for k, v in common.items()):
            records.append(record)
    order = list(clippings)

    def key(r: dict) -> tuple:
        c = r["clipping"]
        rank = order.index(c) if c in order else len(order) + (1 if c is None else 0)
        return r["batch"], rank, c if c is not None else math.inf

    return sorted(records, key=key)


def _title(cfg, config_file: str, base_lr: float, reference_batch: int) -> str:
    name = Path(config_file).stem
    return (f"{name} (variant {cfg.MODEL.NFNET.VARIANT}), {cfg.SOLVER.EPOCHS:g} epochs, "
            f"lr {base_lr:g} x B / {reference_batch}")


def _summary(record: dict) -> str:
    if record["diverged"]:
        return f"diverged at step {record['diverged_step']} of {record['steps']}"
    return (f"top-1 {_fmt(record['top1'])}, EMA top-1 {_fmt(record['ema_top1'])}, "
            f"{record['steps']} steps, {record['seconds']:.0f} s")


# ------------------------------------------------------------------------------------ outputs
def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _rows(records: Sequence[dict]) -> list[dict]:
    rows = []
    for r in records:
        rows.append({
            "batch": r["batch"],
            "clipping": "none" if r["clipping"] is None else f"{r['clipping']:g}",
            "lr": f"{r['lr']:.6g}", "steps": r["steps"], "epochs": f"{r['epochs']:g}",
            "top1": "" if r["top1"] is None else f"{r['top1']:.2f}",
            "ema_top1": "" if r["ema_top1"] is None else f"{r['ema_top1']:.2f}",
            "diverged": "yes" if r["diverged"] else "no",
            "diverged_step": "" if r["diverged_step"] is None else r["diverged_step"],
            "seconds": f"{r['seconds']:.1f}", "output_dir": r["output_dir"],
        })
    return rows


def format_markdown(records: Sequence[dict]) -> str:
    """The markdown table: batch, clipping, lr, steps, final top-1, EMA top-1, diverged, time."""
    lines = ["| batch | clipping | lr | steps | top-1 | EMA top-1 | diverged | time (s) |",
             "|---:|---|---:|---:|---:|---:|---|---:|"]
    for r, row in zip(records, _rows(records)):
        diverged = f"yes (step {r['diverged_step']})" if r["diverged"] else "no"
        lines.append(f"| {row['batch']} | {row['clipping']} | {row['lr']} | {row['steps']} | "
                     f"{_fmt(r['top1'])} | {_fmt(r['ema_top1'])} | {diverged} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def write_tables(records: Sequence[dict], out_dir: str | os.PathLike) -> None:
    """Write ``results.csv`` (``TABLE_COLUMNS``) and ``results.md`` into ``out_dir``,
    atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TABLE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(_rows(records))
    write_text_atomic(os.path.join(out_dir, "results.csv"), buffer.getvalue())
    write_text_atomic(os.path.join(out_dir, "results.md"), format_markdown(records))


def plot_sweep(records: Sequence[dict], path: str | os.PathLike, metric: str = "top1",
               title: str = "") -> None:
    """Top-1 against batch size (log2 axis), one line per clipping setting, the table beside it;
    a diverged cell is a cross in a band below 0 (it has no top-1). Written atomically as a PNG.

    Args:
        records (sequence[dict]): cell records (``run_cell``).
        path (str | PathLike): the PNG.
        metric (str): ``"top1"`` (raw weights) or ``"ema_top1"``.
        title (str): the figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.transforms

    clippings: list = []
    for r in records:
        if r["clipping"] not in clippings:
            clippings.append(r["clipping"])
    batches = sorted({r["batch"] for r in records})
    fig, (ax, tab) = plt.subplots(1, 2, figsize=(13, 4.8), width_ratios=[1.0, 1.15])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # Diverged cells have no top-1: a cross in the line's colour in a grey band below 0, one row
    # per clipping setting.
    valid = [r[metric] for r in records if not r["diverged"] and r[metric] is not None]
    top = 1.08 * max(valid, default=100.0)
    depth = 0.16 * top
    any_diverged = False
    for i, clip in enumerate(clippings):
        rows = sorted((r for r in records if r["clipping"] == clip), key=lambda r: r["batch"])
        color = colors[i % len(colors)]
        label = "AGC off" if clip is None else f"clipping {clip:g}"
        xs = [r["batch"] for r in rows]
        ys = [math.nan if r["diverged"] or r[metric] is None else r[metric] for r in rows]
        ax.plot(xs, ys, marker="o", color=color, label=label)
        bad = [r["batch"] for r in rows if r["diverged"]]
        if bad:
            y = -depth * (i + 1) / (len(clippings) + 1)
            ax.scatter(bad, [y] * len(bad), marker="x", s=70, color=color, zorder=3)
            any_diverged = True
    if any_diverged:
        ax.axhspan(-depth, 0.0, color="0.85", zorder=0)
        ax.text(0.01, -depth / 2, "diverged", transform=matplotlib.transforms.
                blended_transform_factory(ax.transAxes, ax.transData), va="center", fontsize=8)
        ax.scatter([], [], marker="x", color="black", label="diverged (no top-1)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.set_ylim(-depth if any_diverged else 0.0, top)
    ax.set_xlabel("batch size")
    ax.set_ylabel(("EMA " if metric == "ema_top1" else "") + "top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    tab.axis("off")
    cells = [[row["batch"], row["clipping"], row["lr"], row["steps"], _fmt(r["top1"]),
              _fmt(r["ema_top1"]),
              f"step {row['diverged_step']}" if r["diverged"] else "no",
              f"{r['seconds']:.0f}"] for r, row in zip(records, _rows(records))]
    table = tab.table(cellText=cells, colLabels=["batch", "clipping", "lr", "steps", "top-1",
                                                 "EMA top-1", "diverged", "time (s)"],
                      loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1.0, 1.25)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    atomic_write(os.fspath(path), lambda f: f.write(buffer.getvalue()))
