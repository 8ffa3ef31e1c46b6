#!/usr/bin/env python
"""Train two detector configs on the same COCO-format data with the same budget over several
seeds, and print mean and spread of box and mask AP side by side.

    python tools/compare_backbones.py \\
        --data train.json train/ val.json val/ \\
        --configs configs/quick/nfnet_f0_mask_rcnn_256.yaml \\
                  configs/quick/resnet50_gn_mask_rcnn_256.yaml \\
        --opts MODEL.ROI_HEADS.NUM_CLASSES 1 INPUT.MASK_FORMAT bitmask \\
        --seeds 3 --iters 300 --out output/compare

    python tools/compare_backbones.py --smoke --out /tmp/compare_smoke   # generated data, seconds

Options: --datasets TRAIN TEST (registered names) instead of --data; --opts-a / --opts-b
(overrides of one side), --opts (both); --names (table labels). Each run is tools/train_net.py in
a subprocess, in OUT/<name>/seed<k>/; finished runs are reused when the command is repeated.
Writes OUT/results.json and OUT/summary.md. See nfdet.detection.compare and docs/small_batch.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nfdet.detection.compare import RunSpec, compare, write_smoke_coco

SMOKE_CONFIG = "quick/nfnet_nano_mask_rcnn_instant.yaml"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data", nargs=4,
                      metavar=("TRAIN_JSON", "TRAIN_IMAGES", "TEST_JSON", "TEST_IMAGES"))
    data.add_argument("--datasets", nargs=2, metavar=("TRAIN", "TEST"),
                      help="registered dataset names")
    p.add_argument("--configs", nargs=2, metavar=("A", "B"))
    p.add_argument("--names", nargs=2, metavar=("A", "B"),
                   help="table labels (default: the config file names)")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY VALUE",
                   help="overrides of both configs")
    p.add_argument("--opts-a", nargs="*", default=[], metavar="KEY VALUE")
    p.add_argument("--opts-b", nargs="*", default=[], metavar="KEY VALUE")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--iters", type=int, default=300, help="SOLVER.MAX_ITER of every run")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--smoke", action="store_true",
                   help="generated data, two tiny configs, one seed, two iterations")
    return p


def main(argv=None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.smoke:
        json_path, image_dir = write_smoke_coco(Path(args.out) / "data")
        args.data = [json_path, image_dir, json_path, image_dir]
        args.configs = [SMOKE_CONFIG, SMOKE_CONFIG]
        args.names = args.names or ["nano-agc", "nano-no-agc"]
        args.opts = ["MODEL.ROI_HEADS.NUM_CLASSES", "1", "INPUT.MASK_FORMAT", "bitmask",
                     "SOLVER.STATS_PERIOD", "1", *args.opts]
        args.opts_b = ["SOLVER.AGC.ENABLED", "False", *args.opts_b]
        args.seeds, args.iters = 1, 2
    if not args.configs:
        parser.error("--configs A B is required (or --smoke)")
    if args.data is None and args.datasets is None:
        parser.error("--data or --datasets is required (or --smoke)")
    for opts in (args.opts, args.opts_a, args.opts_b):
        if len(opts) % 2:
            parser.error(f"overrides must be KEY VALUE pairs; {opts[-1]!r} has no value")
    if args.data is not None:
        for path in args.data:
            if not os.path.exists(path):
                parser.error(f"--data: {path} does not exist")
    names = args.names or [Path(c).stem for c in args.configs]
    if names[0] == names[1]:
        names = [names[0] + "-a", names[1] + "-b"]
    specs = [RunSpec(names[0], args.configs[0], list(args.opts_a)),
             RunSpec(names[1], args.configs[1], list(args.opts_b))]
    try:
        compare(specs, range(args.seeds), args.iters, args.out, data=args.data,
                datasets=args.datasets, common_opts=args.opts)
    except (RuntimeError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
