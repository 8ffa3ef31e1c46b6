"""Command line, config set-up and multi-process launch of the pretraining trainer.

``tools/pretrain_net.py`` is a thin wrapper around ``pretrain_argument_parser`` and
``launch_from_args``. Processes are started by detectron2's ``launch`` (imported lazily, so
``import nfdet.classification`` does not need detectron2): one per GPU with NCCL, or, without a
GPU, ``--num-gpus N`` CPU processes with gloo. Under ``torchrun`` or a multi-task ``srun``
every process is already there and joins the process group from its environment
(``nfdet.distributed``); nothing is spawned then.

A config that cannot be found or merged (an unknown name or key, with the closest valid ones
suggested; a bad value) ends the command with a one-line usage error (exit status 2) before any
process starts or anything is written to ``OUTPUT_DIR``, as ``tools/train_net.py`` does.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from .. import distributed
from ..config import ConfigError, resolve_config_file
from .config import load_pretrain_cfg
from .engine import PretrainTrainer, get_rank

__all__ = [
    "pretrain_argument_parser",
    "resolve_config_file",
    "setup",
    "main",
    "launch",
    "launch_from_args",
]

logger = logging.getLogger("nfdet.pretrain")

def pretrain_argument_parser() -> argparse.ArgumentParser:
    """detectron2's training flags: ``--config-file`` (alias ``--config``), ``--resume``,
    ``--eval-only``, ``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url`` and
    trailing ``KEY VALUE`` config overrides."""
    parser = argparse.ArgumentParser(
        description="Pretrain an NFNet classifier (DeepMind's ImageNet recipe).",
        epilog="Example: tools/pretrain_net.py --config nfnet_f0_imagenet.yaml --num-gpus 8 "
        "DATA.ROOT /data/imagenet",
    )
    parser.add_argument("--config-file", "--config", dest="config_file", default="",
                        metavar="FILE",
                        help="a yaml file, or a bare name looked up (recursively) under configs/")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT_DIR/last_checkpoint (fresh start if none)")
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate MODEL.WEIGHTS (or, with --resume, the last checkpoint)")
    parser.add_argument("--num-gpus", type=int, default=1,
                        help="processes per machine (GPUs; CPU processes without a GPU)")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0)
    parser.add_argument("--dist-url", default="auto",
                        help="torch.distributed init URL; 'auto' picks a free local port "
                        "(single machine only)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=None,
                        help="config overrides as KEY VALUE pairs")
    return parser


def _setup_logging(output_dir: str, rank: int) -> None:
    root = logging.getLogger("nfdet")
    root.setLevel(logging.INFO)
    root.propagate = False
    for handler in list(root.handlers):
        root.removeHandler(handler)
    fmt = logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%m/%d %H:%M:%S")
    if rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(fmt)
        root.addHandler(console)
    name = "log.txt" if rank == 0 else f"log.txt.rank{rank}"
    file_handler = logging.FileHandler(os.path.join(output_dir, name))
    file_handler.setFormatter(fmt)
    root.addHandler(file_handler)


def setup(args: argparse.Namespace):
    """Build the frozen config from ``args`` and prepare ``OUTPUT_DIR`` and logging.

    Raises:
        FileNotFoundError: no such config (close names listed).
        ConfigError: an unknown key (closest valid keys suggested) or a bad value.
    """
    cfg = load_pretrain_cfg(args.config_file, args.opts)
    cfg.freeze()
    rank = get_rank()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    _setup_logging(cfg.OUTPUT_DIR, rank)
    if rank == 0:
        with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
            f.write(cfg.dump())
        logger.info("Command line: %s", " ".join(sys.argv))
        logger.info("Config saved to %s", os.path.join(cfg.OUTPUT_DIR, "config.yaml"))
    return cfg


def limit_cpu_threads(args: argparse.Namespace) -> None:
    """Share a machine's cores among ``args.num_gpus`` (or the launcher's local) CPU processes."""
    # Several CPU processes on one machine share its cores (torchrun sets OMP_NUM_THREADS).
    env = distributed.launcher_env()
    per_machine = env.local_world_size if env is not None else args.num_gpus
    if not torch.cuda.is_available() and per_machine > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_machine))


def main(args: argparse.Namespace) -> dict:
    """The per-process entry point: train, or evaluate with ``--eval-only``."""
    limit_cpu_threads(args)
    cfg = setup(args)
    trainer = PretrainTrainer(cfg)
    if args.eval_only:
        if args.resume:
            trainer.resume_or_load(True)
        results = trainer.run_eval()
        if not results:
            raise ValueError("--eval-only needs a validation set (DATA.VAL_SPLIT is empty)")
        logger.info("Evaluation: %s", ", ".join(f"{k} {v:.3f}" for k, v in results.items()))
        return results
    return trainer.train(resume=args.resume)


def launch(main_func, num_gpus_per_machine: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str = "auto", args: tuple = ()) -> None:
    """Start ``main_func(*args)`` in ``num_gpus_per_machine * num_machines`` processes, or run
    it in this process when torchrun / srun started the processes (``nfdet.distributed``).

    Uses detectron2's ``launch``, which picks NCCL with GPUs and gloo without (CPU processes).
    A single process runs in place without torch.distributed.

    Raises:
        ValueError: more processes than GPUs, or ``dist_url='auto'`` with several machines.
    """
    if distributed.launcher_env() is not None:
        distributed.launch(main_func, num_gpus_per_machine, num_machines=num_machines,
                           machine_rank=machine_rank, dist_url=dist_url, args=args)
        return
    if torch.cuda.is_available() and num_gpus_per_machine > torch.cuda.device_count():
        raise ValueError(f"--num-gpus {num_gpus_per_machine} but only "
                         f"{torch.cuda.device_count()} GPU(s) visible")
    if num_machines > 1 and dist_url == "auto":
        raise ValueError("--dist-url auto works on one machine only; give tcp://HOST:PORT")
    from detectron2.engine import launch as d2_launch

    d2_launch(main_func, num_gpus_per_machine, num_machines=num_machines,
              machine_rank=machine_rank, dist_url=dist_url, args=args)


def launch_from_args(args: argparse.Namespace) -> None:
    """Run ``main(args)`` with the process layout the flags ask for.

    A config error ends the command first (usage error, exit status 2; see the module
    docstring).
    """
    try:
        load_pretrain_cfg(args.config_file, args.opts)
        env = distributed.launcher_env()  # a variable torchrun / srun set that cannot be read
    except (FileNotFoundError, ConfigError, ValueError) as e:
        pretrain_argument_parser().error(str(e))
    if args.num_gpus * args.num_machines == 1 and env is None:
        main(args)  # no need to import detectron2 for a single process
        return
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))


