"""Export of NFNet detectors through detectron2's ``TracingAdapter`` (``tools/export_model.py``).

As detectron2's ``tools/deploy/export_model.py`` does with ``--export-method tracing``: the
model is wrapped so that it takes one image tensor (C, H, W; ``INPUT.FORMAT``, resized as
``DefaultPredictor`` resizes it) and returns flat tensors (boxes, classes, 28x28 ROI masks,
scores, image size: ``model.inference(..., do_postprocess=False)``), then traced. The exported
file is run on the sample image and compared with the eager model (``nfdet.export
.ExportReport``).

Formats: ``torchscript`` and ``onnx`` (TorchScript-based ONNX exporter; the graph's image height
and width are dynamic axes). ``torch_export`` is not supported (``UNSUPPORTED``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from detectron2.export import TracingAdapter
from detectron2.modeling import build_model

from ..export import (
    FILE_NAMES,
    ExportError,
    ExportReport,
    compare_outputs,
    export_traced,
    load_exported,
)
from .checkpoint import NFNetCheckpointer

__all__ = [
    "UNSUPPORTED",
    "build_detector",
    "detector_sample_image",
    "export_detector",
    "load_detector_cfg",
    "traceable_detector",
]

logger = logging.getLogger(__name__)

# Formats the detector cannot be exported to, and why (checked before anything is built).
UNSUPPORTED = {
    "torch_export": "torch.export cannot capture detectron2's R-CNN inference (its proposal and "
                    "detection counts are data-dependent); use --format torchscript or onnx",
}


def load_detector_cfg(config_file: str, opts: Sequence[str] = ()) -> CfgNode:
    """The detector config of ``config_file`` (a path, or a name under ``configs/``) with
    ``KEY VALUE`` overrides, on CPU (where the export runs).

    Raises:
        FileNotFoundError, ConfigError: as ``nfdet.config.merge_config``.
    """
    from ..config import merge_config, resolve_config_file
    from .config import get_nfdet_cfg

    cfg = get_nfdet_cfg()
    merge_config(cfg, resolve_config_file(config_file), list(opts))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def build_detector(cfg: CfgNode) -> torch.nn.Module:
    """detectron2's model of ``cfg`` in eval mode with ``MODEL.WEIGHTS`` loaded by
    ``NFNetCheckpointer`` (random weights, with a warning, when it is empty)."""
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        NFNetCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting a randomly initialised detector")
    return model.eval()


def detector_sample_image(cfg: CfgNode, path: str | None = None, seed: int = 0,
                          size: tuple[int, int] = (480, 640)) -> torch.Tensor:
    """The model input for one image: the file ``path`` (any mode, read as RGB), or a generated
    image of ``size`` (H, W) with a few filled shapes; in ``INPUT.FORMAT`` and resized as
    ``DefaultPredictor`` does (shortest edge ``INPUT.MIN_SIZE_TEST``, longest at most
    ``INPUT.MAX_SIZE_TEST``), as a (C, H, W) float32 tensor.

    Raises:
        ImageReadError: the file cannot be read (the message names it).
    """
    if path:
        from ..data.validate import read_image_rgb

        rgb = np.asarray(read_image_rgb(path))
    else:
        rng = np.random.default_rng(seed)
        h, w = size
        rgb = np.zeros((h, w, 3), np.uint8)
        rgb[:] = rng.integers(0, 80, 3, dtype=np.uint8)
        yy, xx = np.mgrid[:h, :w]
        for _ in range(4):
            cy, cx = rng.integers(h // 8, h - h // 8), rng.integers(w // 8, w - w // 8)
            r = int(rng.integers(min(h, w) // 12, min(h, w) // 5))
            shape = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) if rng.random() < 0.5 else (
                (abs(yy - cy) < r) & (abs(xx - cx) < r))
            rgb[shape] = rng.integers(120, 256, 3, dtype=np.uint8)
    image = rgb[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else rgb
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    image = resize.get_transform(image).apply_image(np.ascontiguousarray(image))
    return torch.as_tensor(image.astype("float32").transpose(2, 0, 1))


def _inference(model: torch.nn.Module, inputs: list[dict]) -> list[dict]:
    # ROI masks, not masks pasted into the image: pasting is a per-image post-processing step
    # (detectron2's export does the same).
    instances = model.inference(inputs, do_postprocess=False)[0]
    return [{"instances": instances}]


def traceable_detector(model: torch.nn.Module, image: torch.Tensor) -> TracingAdapter:
    """``model`` as a function of one image tensor returning flat tensors."""
    # In eval mode itself: exporters restore the wrapper's mode, recursively, when they end.
    return TracingAdapter(model, [{"image": image}], _inference).eval()


def eager_outputs(model: torch.nn.Module, image: torch.Tensor) -> list[torch.Tensor]:
    """The flat outputs of the eager model on ``image`` (what an exported file returns)."""
    with torch.no_grad():
        return list(traceable_detector(model, image)(image))


def export_detector(cfg: CfgNode, fmt: str, output_dir: str, sample_image: str | None = None,
                    model: torch.nn.Module | None = None) -> ExportReport:
    """Export the detector of ``cfg`` and check the file against the eager model.

    Args:
        cfg (CfgNode): a detector config (``MODEL.WEIGHTS`` loaded unless ``model`` is given).
        fmt (str): "torchscript" or "onnx".
        output_dir (str): where ``model.ts`` / ``model.onnx`` is written.
        sample_image (str | None): the image to trace with (else a generated one).
        model (nn.Module | None): an already built detector to export instead.

    Raises:
        ExportError: an unsupported format (``UNSUPPORTED``), or outputs of another shape.
    """
    if fmt in UNSUPPORTED:
        raise ExportError(f"--format {fmt} of the detector is not supported: {UNSUPPORTED[fmt]}")
    if fmt not in FILE_NAMES:
        raise ExportError(f"--format {fmt!r}: must be one of {', '.join(FILE_NAMES)}")
    if model is None:
        model = build_detector(cfg)
    model.eval()
    image = detector_sample_image(cfg, sample_image)
    adapter = traceable_detector(model, image)
    path = os.path.join(output_dir, FILE_NAMES[fmt])
    dynamic = {"input0": {1: "height", 2: "width"}} if fmt == "onnx" else None
    export_traced(adapter, (image,), fmt, path, dynamic_axes=dynamic)
    diff, scale = compare_outputs(load_exported(path, fmt)(image), eager_outputs(model, image))
    name = f"detector {cfg.MODEL.META_ARCHITECTURE} NFNet-{cfg.MODEL.NFNET.VARIANT}"
    return ExportReport(name, fmt, path, tuple(image.shape), diff, scale,
                        note="outputs: boxes, classes, 28x28 ROI masks, scores, image size")
