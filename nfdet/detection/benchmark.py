"""``tools/benchmark.py maskrcnn``: training and inference speed of an NFNet Mask R-CNN.

Builds the detector of a config (default: the CPU-scale nano config) and times, on a synthetic
batch (random images with random boxes, classes and masks at the config's test size), one
training iteration (forward, losses, backward, the nfdet optimizer step with AGC) and one
inference call in eval mode. It also times the backbone in eval mode with the standardized
weights cached (the default) against recomputing them on every call.
"""

from __future__ import annotations

import argparse
import json

import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from ..modeling import ScaledStdConv2d
from ..solver import build_optimizer
from ..solver.benchmark import time_calls
from .config import get_nfdet_cfg
from .engine import resolve_config_file

__all__ = ["add_maskrcnn_arguments", "benchmark_maskrcnn", "main_maskrcnn", "synthetic_batch"]


def add_maskrcnn_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``benchmark.py maskrcnn`` to ``parser``."""
    parser.add_argument("--config", default="quick/nfnet_nano_mask_rcnn_256.yaml",
                        help="detection config (a path or a name under configs/)")
    parser.add_argument("--batch-size", type=int, default=2, help="images per iteration")
    parser.add_argument("--image-size", type=int, default=0,
                        help="square image side (0: the config's INPUT.MIN_SIZE_TEST)")
    parser.add_argument("--objects", type=int, default=4, help="objects per image")
    parser.add_argument("--iters", type=int, default=5, help="timed calls of each measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")


def synthetic_batch(batch_size: int, size: int, objects: int, num_classes: int,
                    seed: int = 0) -> list[dict]:
    """Random images with ``objects`` random boxes (and box-shaped masks) each, in detectron2's
    input format (uint8 CHW ``image`` + ``instances``)."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(batch_size):
        image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        xy = torch.rand(objects, 2, generator=g) * size * 0.7
        wh = 12 + torch.rand(objects, 2, generator=g) * (size * 0.3 - 12)
        boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], dim=1)
        masks = torch.zeros(objects, size, size, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            masks[i, y0:y1, x0:x1] = True
        instances = Instances((size, size))
        instances.gt_boxes = Boxes(boxes)
        instances.gt_classes = torch.randint(0, num_classes, (objects,), generator=g)
        instances.gt_masks = BitMasks(masks)
        batch.append({"image": image, "height": size, "width": size, "instances": instances})
    return batch


def benchmark_maskrcnn(args: argparse.Namespace) -> dict:
    """Run the benchmark; return its figures (seconds per call, best and median)."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = get_nfdet_cfg()
    cfg.merge_from_file(resolve_config_file(args.config))
    cfg.merge_from_list(list(args.opts or []))
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    device = torch.device(args.device)
    size = args.image_size or cfg.INPUT.MIN_SIZE_TEST
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    batch = synthetic_batch(args.batch_size, size, args.objects, cfg.MODEL.ROI_HEADS.NUM_CLASSES)

    def train_step() -> None:
        losses = model(batch)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    timing = (args.iters, args.warmup, device)
    model.train()
    with EventStorage(0):  # detectron2's heads log training statistics into one
        train_s, train_med = time_calls(train_step, *timing)

    model.eval()
    inputs = [{k: v for k, v in d.items() if k != "instances"} for d in batch]
    with torch.no_grad():
        infer_s, infer_med = time_calls(lambda: model(inputs), *timing)
        images = model.preprocess_image(inputs).tensor
        backbone = model.backbone
        cached_s, _ = time_calls(lambda: backbone(images), *timing)
        convs = [m for m in model.modules() if isinstance(m, ScaledStdConv2d)]

        def uncached() -> None:
            for m in convs:
                m.clear_cache()
            backbone(images)

        uncached_s, _ = time_calls(uncached, *timing)
    return {
        "config": args.config,
        "variant": cfg.MODEL.NFNET.VARIANT,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "image_size": size,
        "train_iter_s": train_s,
        "train_iter_median_s": train_med,
        "inference_s": infer_s,
        "inference_median_s": infer_med,
        "backbone_eval_cached_s": cached_s,
        "backbone_eval_uncached_s": uncached_s,
    }


def main_maskrcnn(args: argparse.Namespace) -> dict:
    """Entry point of ``benchmark.py maskrcnn``: run, print a summary, optionally write JSON."""
    r = benchmark_maskrcnn(args)
    print(
        f"Mask R-CNN benchmark: {r['config']} (NFNet-{r['variant']}) on {r['device']} "
        f"({r['threads']} threads), batch {r['batch_size']} at {r['image_size']}px"
    )
    print("  times: best (median) of the timed calls")
    print(f"  training iteration: {1e3 * r['train_iter_s']:9.1f} ms "
          f"({1e3 * r['train_iter_median_s']:.1f})")
    print(f"  inference:          {1e3 * r['inference_s']:9.1f} ms "
          f"({1e3 * r['inference_median_s']:.1f})")
    print(f"  backbone in eval mode: {1e3 * r['backbone_eval_cached_s']:.1f} ms with cached "
          f"standardized weights, {1e3 * r['backbone_eval_uncached_s']:.1f} ms recomputing them")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return r
