"""``tools/benchmark.py detection``: Mask R-CNN with an NFNet-FPN backbone against detectron2's
R50-FPN, side by side.

Each config's detector is built (random weights) and timed, interleaved in one process, on the
same synthetic batch at a fixed input size (random images with random boxes, classes and
box-shaped masks; no resizing, so every detector sees exactly the same pixels):

- a training iteration: forward, losses, backward and the optimizer step (nfdet's optimizer, AGC
  as the config says; detectron2's configs train without AGC; learning rate 0);
- inference on one image in eval mode (per image);
- the peak memory of each.

Configs are nfdet config names or paths, or ``d2:<model zoo path>`` for detectron2's own
(default: ``nfnet_f0_mask_rcnn.yaml`` and ``d2:COCO-InstanceSegmentation/
mask_rcnn_R_50_FPN_1x.yaml``). CUDA runs use bf16 autocast.
"""

from __future__ import annotations

import argparse

import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from ..benchmarks.harness import (
    add_common_arguments,
    autocast,
    describe_machine,
    format_table,
    peak_memory_bytes,
    setup_device,
    time_interleaved,
    write_json,
)
from ..config import merge_config, resolve_config_file
from ..solver import build_optimizer
from .config import get_nfdet_cfg

__all__ = [
    "add_detection_arguments",
    "benchmark_detection",
    "load_benchmark_config",
    "main_detection",
    "synthetic_batch",
]

DEFAULT_CONFIGS = (
    "nfnet_f0_mask_rcnn.yaml",
    "d2:COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
)
# detectron2's MODEL_ZOO.md, mask_rcnn_R_50_FPN_1x: 8 V100 GPUs, 2 images per GPU.
D2_PUBLISHED_R50_FPN = {
    "train_s_per_iter_16_images_8xV100": 0.261,
    "inference_s_per_image_V100": 0.043,
    "train_memory_gb_per_gpu": 3.4,
}


def add_detection_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``benchmark.py detection`` to ``parser``."""
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help="comma-separated configs: nfdet names/paths or d2:<model zoo path>")
    parser.add_argument("--batch-size", type=int, default=2, help="images per training iteration")
    parser.add_argument("--height", type=int, default=512, help="input height (fixed)")
    parser.add_argument("--width", type=int, default=640, help="input width (fixed)")
    parser.add_argument("--objects", type=int, default=4, help="objects per image")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--activation-checkpoint", default=None, metavar="MODES",
                        help="comma-separated MODEL.NFNET.ACTIVATION_CHECKPOINT modes to run "
                        "each NFNet config in, side by side (off, stage, block), e.g. off,block")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="KEY VALUE overrides applied to every config")
    add_common_arguments(parser, repeats=3, warmup=1)


def synthetic_batch(batch_size: int, height: int, width: int, objects: int, num_classes: int,
                    seed: int = 0) -> list[dict]:
    """Random images with ``objects`` random boxes (and box-shaped masks) each, in detectron2's
    input format (uint8 CHW ``image`` + ``instances``)."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([width, height], dtype=torch.float32)
    batch = []
    for _ in range(batch_size):
        image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
        xy = torch.rand(objects, 2, generator=g) * size * 0.7
        wh = 12 + torch.rand(objects, 2, generator=g) * (size * 0.3 - 12).clamp(min=1)
        boxes = torch.cat([xy, torch.minimum(xy + wh, size - 1)], dim=1)
        masks = torch.zeros(objects, height, width, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            masks[i, y0:y1, x0:x1] = True
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(boxes)
        instances.gt_classes = torch.randint(0, num_classes, (objects,), generator=g)
        instances.gt_masks = BitMasks(masks)
        batch.append({"image": image, "height": height, "width": width, "instances": instances})
    return batch


def load_benchmark_config(name: str, opts: list[str], device: torch.device):
    """An nfdet config (name or path) or ``d2:<model zoo path>``, with ``opts``, random weights
    and ``MODEL.DEVICE`` set; detectron2's configs get AGC off (their own recipe)."""
    cfg = get_nfdet_cfg()
    if name.startswith("d2:"):
        from detectron2 import model_zoo

        merge_config(cfg, model_zoo.get_config_file(name[3:]))
        cfg.SOLVER.AGC.ENABLED = False
    else:
        merge_config(cfg, resolve_config_file(name))
    merge_config(cfg, None, opts)
    cfg.MODEL.DEVICE = str(device)
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    return cfg


def _detector_cases(cfg, batch: list[dict], device: torch.device):
    """(train iteration, one-image inference, training model, optimizer) for a config.

    Training and inference get a model each (same weights), kept in their mode: switching a
    model between train and eval on every call would cost time of its own (and drops nfdet's
    cached standardized weights)."""
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    optimizer = build_optimizer(cfg, model)
    # Learning rate 0: the step costs the same, and repeating it on one batch of random-weight
    # detectors cannot diverge.
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    torch.manual_seed(0)
    eval_model = build_model(cfg).eval()
    inputs = [{k: v for k, v in batch[0].items() if k != "instances"}]

    def train_step() -> None:
        with EventStorage(0), autocast(device):  # detectron2's heads log into a storage
            losses = model(batch)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    def infer() -> None:
        with torch.no_grad(), autocast(device):
            eval_model(inputs)

    return train_step, infer, model, optimizer


def benchmark_detection(args: argparse.Namespace) -> dict:
    """Run the benchmark; return the machine, the setting and one row per config."""
    device = setup_device(args)
    if args.smoke:
        args.repeats, args.warmup, args.batch_size = 1, 1, 1
        args.height, args.width, args.objects = 128, 160, 2
    names, runs = [], {}
    for config in (c.strip() for c in args.configs.split(",") if c.strip()):
        # --activation-checkpoint: the config once per mode (detectron2's own configs once).
        modes: list[str | None] = [None]
        if args.activation_checkpoint and not config.startswith("d2:"):
            modes = [m.strip().replace("off", "") for m in args.activation_checkpoint.split(",")]
        for mode in modes:
            name = config if mode is None else f"{config} [checkpoint {mode or 'off'}]"
            opts = [] if mode is None else ["MODEL.NFNET.ACTIVATION_CHECKPOINT", mode]
            names.append(name)
            runs[name] = (config, opts)
    cases, models = {}, {}
    for name in names:
        config, opts = runs[name]
        cfg = load_benchmark_config(config, list(args.opts or []) + opts, device)
        batch = synthetic_batch(args.batch_size, args.height, args.width, args.objects,
                                cfg.MODEL.ROI_HEADS.NUM_CLASSES)
        train_step, infer, model, optimizer = _detector_cases(cfg, batch, device)
        backbone = cfg.MODEL.BACKBONE.NAME
        if "nfnet" in backbone:
            backbone += f" ({cfg.MODEL.NFNET.VARIANT})"
        models[name] = {"backbone": backbone, "model": model, "optimizer": optimizer}
        cases[f"{name} train"] = train_step
        cases[f"{name} inference"] = infer

    log = (lambda s: print(s, flush=True)) if args.verbose else None
    timings = time_interleaved(cases, args.repeats, args.warmup, device, log=log)
    rows = []
    for name in names:
        train, infer = timings[f"{name} train"], timings[f"{name} inference"]
        row = {
            "config": name,
            "backbone": models[name]["backbone"],
            "parameters_m": sum(p.numel() for p in models[name]["model"].parameters()) / 1e6,
            "train_iter_s": train["median_s"],
            "train_images_per_s": args.batch_size / train["median_s"],
            "inference_s_per_image": infer["median_s"],
        }
        if not args.no_memory:
            opt = models[name]["optimizer"]
            row["train_peak_memory_mb"] = peak_memory_bytes(
                cases[f"{name} train"], device, lambda o=opt: o.zero_grad(set_to_none=True)
            ) / 2**20
            row["inference_peak_memory_mb"] = (
                peak_memory_bytes(cases[f"{name} inference"], device) / 2**20
            )
        rows.append(row)
    return {
        "benchmark": "detection",
        "machine": describe_machine(device),
        "batch_size": args.batch_size,
        "height": args.height,
        "width": args.width,
        "repeats": args.repeats,
        "rows": rows,
        "detectron2_published_r50_fpn": D2_PUBLISHED_R50_FPN,
    }


def main_detection(args: argparse.Namespace) -> dict:
    """Entry point of ``benchmark.py detection``: run, print the table, optionally write JSON."""
    r = benchmark_detection(args)
    m = r["machine"]
    print(f"Detection benchmark: Mask R-CNN on {m['device']} ({m.get('gpu', m['cpu'])}, "
          f"{m['threads']} threads, {m['precision']}), {r['height']}x{r['width']} input, "
          f"training batch {r['batch_size']}, median of {r['repeats']} interleaved repeats")
    headers = ["config", "backbone", "params M", "train s/iter", "train img/s", "infer s/img"]
    if not args.no_memory:
        headers += ["train peak MB", "infer peak MB"]
    table = []
    for row in r["rows"]:
        line = [row["config"], row["backbone"], f"{row['parameters_m']:.1f}",
                f"{row['train_iter_s']:.3f}", f"{row['train_images_per_s']:.2f}",
                f"{row['inference_s_per_image']:.3f}"]
        if not args.no_memory:
            line += [row["train_peak_memory_mb"], row["inference_peak_memory_mb"]]
        table.append(line)
    print(format_table(headers, table))
    pub = r["detectron2_published_r50_fpn"]
    print(f"detectron2's published R50-FPN Mask R-CNN: "
          f"{pub['train_s_per_iter_16_images_8xV100']} s/iter (16 images on 8 V100s), "
          f"{pub['inference_s_per_image_V100']} s/image inference (V100)")
    if args.json:
        write_json(args.json, r)
    return r
