"""Inference on image files and drawing of the predictions (``tools/demo.py``).

Images are read with nfdet's reader (``nfdet.data.validate.read_image_rgb``): any mode
(grayscale, RGBA, 16-bit, ...) as 8-bit RGB, then handed to the model in ``INPUT.FORMAT``. A file
that cannot be decoded (truncated, not an image) stops the demo with ``ImageReadError`` naming
it; ``demo_main`` turns that and config errors into a one-line error.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
from collections.abc import Sequence

import numpy as np
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer
from PIL import Image

from ..checkpoint import CheckpointFormatError
from ..config import ConfigError
from ..data.validate import DatasetError, ImageReadError, read_image_rgb
from .checkpoint import NFNetCheckpointer
from .cli import add_nfdet_arguments, register_coco_datasets, setup_cfg

__all__ = [
    "NFNetPredictor",
    "demo_argument_parser",
    "dataset_metadata",
    "expand_inputs",
    "draw_predictions",
    "run_demo",
    "demo_main",
]

logger = logging.getLogger(__name__)


class NFNetPredictor(DefaultPredictor):
    """detectron2's ``DefaultPredictor`` (one BGR ``np.ndarray`` in, converted to
    ``INPUT.FORMAT``; the model's output dict out) loading ``MODEL.WEIGHTS`` with
    ``NFNetCheckpointer``.

    Args:
        cfg (CfgNode): detectron2 config with nfdet's keys.
    """

    def __init__(self, cfg: CfgNode):
        no_weights = cfg.clone()
        no_weights.defrost()
        no_weights.MODEL.WEIGHTS = ""
        super().__init__(no_weights)
        self.cfg = cfg.clone()
        if cfg.MODEL.WEIGHTS:
            NFNetCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        else:
            logger.warning("MODEL.WEIGHTS is empty: predicting with a randomly initialised model")


def demo_argument_parser() -> argparse.ArgumentParser:
    """``--config-file/--config``, ``--input``, ``--output``, ``--confidence-threshold``,
    ``--register-coco`` and trailing ``KEY VALUE`` opts."""
    parser = argparse.ArgumentParser(
        description="Draw an NFNet detector's predictions on images with detectron2's Visualizer"
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    parser.add_argument(
        "--input", nargs="+", required=True, metavar="IMAGE",
        help="image files, directories or glob patterns",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="directory for the PNGs")
    parser.add_argument(
        "--confidence-threshold", type=float, default=0.5,
        help="minimum score of the drawn instances",
    )
    add_nfdet_arguments(parser)
    parser.add_argument(
        "opts", default=[], nargs=argparse.REMAINDER,
        help="config overrides: KEY VALUE pairs, last (not right after --input, which would take "
        "them as images)",
    )
    return parser


def dataset_metadata(cfg: CfgNode):
    """Metadata of ``DATASETS.TEST[0]`` with ``thing_classes`` (loading a registered COCO json's
    categories when they are not known yet); an empty metadata when there is no test set."""
    if not len(cfg.DATASETS.TEST):
        return MetadataCatalog.get("__nfdet_unnamed")
    name = cfg.DATASETS.TEST[0]
    metadata = MetadataCatalog.get(name)
    if not hasattr(metadata, "thing_classes") and name in DatasetCatalog.list():
        # register_coco_instances sets the class names when the json is first read.
        DatasetCatalog.get(name)
    return metadata


_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Expand directories (their images) and glob patterns into a sorted file list.

    Raises:
        FileNotFoundError: an input matches no file.
    """
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, f) for f in os.listdir(item)
                if f.lower().endswith(_IMAGE_EXTENSIONS)
            )
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(glob.glob(os.path.expanduser(item)))
        if not found:
            raise FileNotFoundError(f"--input {item}: no image found")
        files.extend(found)
    return files


def draw_predictions(image_rgb: np.ndarray, predictions: dict, metadata,
                     confidence_threshold: float = 0.0) -> np.ndarray:
    """Draw boxes, masks and labels of ``predictions["instances"]`` scoring at least
    ``confidence_threshold``; returns an RGB uint8 image."""
    instances = predictions["instances"].to("cpu")
    instances = instances[instances.scores >= confidence_threshold]
    visualizer = Visualizer(image_rgb, metadata, instance_mode=ColorMode.IMAGE)
    return visualizer.draw_instance_predictions(instances).get_image()


def run_demo(cfg: CfgNode, inputs: Sequence[str], output_dir: str,
             confidence_threshold: float = 0.5) -> list[str]:
    """Predict on every input image and save the drawings as ``output_dir/<name>.png``.

    Args:
        cfg (CfgNode): detectron2 config with nfdet's keys and ``MODEL.WEIGHTS``.
        inputs (sequence[str]): files, directories or glob patterns.
        output_dir (str): created when missing.
        confidence_threshold (float): minimum score of the drawn instances.

    Returns:
        list[str]: the written PNG paths.

    Raises:
        FileNotFoundError: an input matches no file.
        ImageReadError: an image cannot be decoded (named).
    """
    files = expand_inputs(inputs)
    predictor = NFNetPredictor(cfg)
    metadata = dataset_metadata(cfg)
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for path in files:
        image_rgb = np.asarray(read_image_rgb(path, exif_transpose=True))
        # DefaultPredictor takes BGR and converts to INPUT.FORMAT itself.
        predictions = predictor(np.ascontiguousarray(image_rgb[:, :, ::-1]))
        drawing = draw_predictions(image_rgb, predictions, metadata, confidence_threshold)
        out = os.path.join(output_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
        Image.fromarray(drawing).save(out)
        logger.info(
            f"{path}: {len(predictions['instances'])} instances, "
            f"{int((predictions['instances'].scores >= confidence_threshold).sum())} drawn -> {out}"
        )
        written.append(out)
    return written


def demo_main(argv: Sequence[str] | None = None) -> list[str]:
    """``tools/demo.py``: parse ``argv`` and ``run_demo``. A config or dataset error ends the
    command with a one-line usage error (exit status 2); an input that is missing or cannot be
    decoded, or unreadable ``MODEL.WEIGHTS``, with a one-line error naming it (exit status 1).

    Returns:
        list[str]: the written PNG paths.
    """
    parser = demo_argument_parser()
    args = parser.parse_args(argv)
    setup_logger(name="nfdet")
    setup_logger(name="detectron2")
    try:
        register_coco_datasets(args.register_coco)
        cfg = setup_cfg(args)
    except (FileNotFoundError, ConfigError, DatasetError) as e:
        parser.error(str(e))
    try:
        return run_demo(cfg, args.input, args.output, args.confidence_threshold)
    except (FileNotFoundError, ImageReadError, CheckpointFormatError) as e:
        logger.error("%s", e)
        parser.exit(1, f"{parser.prog}: error: {e}\n")
