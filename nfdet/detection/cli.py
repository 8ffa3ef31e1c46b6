"""Command-line plumbing shared by ``tools/train_net.py`` and ``tools/demo.py``.

detectron2's standard command line plus: ``--config`` as an alias of ``--config-file``, a bare
config name resolved under the repository's ``configs/``, and ``--register-coco NAME JSON
IMAGE_DIR`` (repeatable) to use any COCO-format dataset in ``DATASETS.TRAIN`` / ``DATASETS.TEST``
(checked when loaded: ``nfdet.detection.data``). Under ``torchrun`` or a multi-task ``srun``
each started process joins the process group from its environment and nothing is spawned
(``nfdet.distributed``).

Bad input fails before workers start where it can: an unknown config name, key or variant
(``ConfigError``, with close matches), a missing annotation file or image folder, an
unregistered dataset name (``DatasetError``) end the command with a one-line usage error. A
dataset error found while loading (e.g. an invalid annotation file) ends a single-process run
with a one-line error too (exit status 1).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import CONFIGS_DIR, ConfigError, merge_config, resolve_config_file
from ..distributed import launch, launcher_env
from .checkpoint import NFNetCheckpointer
from .config import get_nfdet_cfg
from .data import DatasetError, ImageReadError, check_dataset_names, register_checked_coco
from .trainer import NFNetTrainer

__all__ = [
    "CONFIGS_DIR",
    "add_nfdet_arguments",
    "train_argument_parser",
    "resolve_config_file",
    "register_coco_datasets",
    "setup_cfg",
    "setup",
    "train_main",
    "launch_train",
]

def add_nfdet_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config`` (alias of ``--config-file``) and ``--register-coco`` to ``parser``.

    ``--config`` is declared explicitly: argparse's prefix matching would otherwise stop
    accepting it as soon as another option starts with ``--config``.
    """
    parser.add_argument(
        "--config", dest="config_file", default=argparse.SUPPRESS, metavar="FILE",
        help="alias of --config-file; a bare name (nfnet_f0_mask_rcnn.yaml) is looked up in "
        "configs/",
    )
    parser.add_argument(
        "--register-coco", nargs=3, action="append", default=[],
        metavar=("NAME", "JSON", "IMAGE_DIR"),
        help="register a COCO-format dataset under NAME (repeatable); use NAME in "
        "DATASETS.TRAIN / DATASETS.TEST",
    )
    return parser


def train_argument_parser() -> argparse.ArgumentParser:
    """detectron2's ``default_argument_parser`` with nfdet's additions."""
    return add_nfdet_arguments(default_argument_parser())


def register_coco_datasets(specs: Sequence[Sequence[str]]) -> None:
    """Register COCO-format datasets with ``nfdet.detection.data.register_checked_coco`` (the
    file is checked when the dataset is loaded; see ``docs/reliability.md``).

    Registering a name again with the same files is a no-op (launched workers repeat it).

    Args:
        specs (sequence of (name, json_file, image_dir)): the ``--register-coco`` values.

    Raises:
        FileNotFoundError: a JSON file or image directory does not exist.
        ValueError: the name is already registered with other files (e.g. a builtin dataset).
    """
    for spec in specs:
        name, json_file, image_dir = spec
        if not os.path.isfile(json_file):
            raise FileNotFoundError(f"--register-coco {name}: annotation file {json_file} missing")
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"--register-coco {name}: image directory {image_dir} missing")
        json_file, image_dir = os.path.abspath(json_file), os.path.abspath(image_dir)
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if (
                getattr(meta, "json_file", None) == json_file
                and getattr(meta, "image_root", None) == image_dir
            ):
                continue
            raise ValueError(
                f"--register-coco {name}: a dataset of that name is already registered "
                f"(json_file={getattr(meta, 'json_file', None)}); choose another name"
            )
        register_checked_coco(name, json_file, image_dir)


def setup_cfg(args: argparse.Namespace, freeze: bool = True) -> CfgNode:
    """Config from ``args.config_file`` (resolved) and ``args.opts``.

    Args:
        args (Namespace): parsed command line.
        freeze (bool): freeze the config.

    Raises:
        FileNotFoundError: the config does not exist (close names listed).
        ConfigError: an unknown key (the closest valid keys suggested), a bad value or variant,
            naming the file or the command line.
    """
    cfg = get_nfdet_cfg()
    args.config_file = resolve_config_file(args.config_file)
    merge_config(cfg, args.config_file, args.opts)
    if freeze:
        cfg.freeze()
    return cfg


def setup(args: argparse.Namespace) -> CfgNode:
    """Register ``--register-coco`` datasets, build the frozen config, and run detectron2's
    ``default_setup`` (logger, environment log, config saved to ``OUTPUT_DIR``)."""
    register_coco_datasets(args.register_coco)
    cfg = setup_cfg(args)
    check_dataset_names(cfg)
    default_setup(cfg, args)
    # nfdet's own messages (e.g. dropped annotations, skipped images) in the log too.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="nfdet",
                 abbrev_name="nfdet")
    return cfg


def train_main(args: argparse.Namespace, trainer_cls: type = NFNetTrainer):
    """Train, or evaluate with ``--eval-only``; runs in every launched process.

    Returns:
        dict | None: evaluation results (None when training without evaluation).
    """
    cfg = setup(args)
    if args.eval_only:
        model = trainer_cls.build_model(cfg)
        NFNetCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return trainer_cls.test(cfg, model)
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def launch_train(argv: Sequence[str] | None = None, main=train_main):
    """Parse ``argv`` and ``launch`` ``main(args)`` on ``--num-gpus`` processes per machine, or
    in this process when torchrun / srun started the processes (``nfdet.distributed``)."""
    parser = train_argument_parser()
    args = parser.parse_args(argv)
    # Fail before spawning workers on a config that cannot be found or merged, or datasets
    # that are not there.
    try:
        args.config_file = resolve_config_file(args.config_file)
        register_coco_datasets(args.register_coco)
        check_dataset_names(setup_cfg(args, freeze=False))
        launcher_env()  # a variable torchrun / srun set that cannot be read
    except (FileNotFoundError, ConfigError, DatasetError, ValueError) as e:
        parser.error(str(e))
    print("Command Line Args:", args)
    try:
        return launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except (DatasetError, ImageReadError) as e:
        # Found while loading the data (a single process runs in place): the message names the
        # culprit, a traceback would only bury it.
        logging.getLogger(__name__).error("%s", e)
        parser.exit(1, f"{parser.prog}: error: {e}\n")
