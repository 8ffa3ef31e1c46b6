#!/usr/bin/env python
"""The whole nfdet pipeline on generated data (what ``make demo`` runs).

    python tools/run_demo.py --out demo_output

Generates drawn-shape data, pretrains the nano NFNet with AGC (tools/pretrain_net.py), trains and
evaluates Mask R-CNN nano-FPN from it (tools/train_net.py), draws held-out predictions
(tools/demo.py) and prints a summary (also OUT/summary.json). The logic is nfdet.pipeline.
"""

import argparse

from nfdet.pipeline import run_pipeline

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_output", help="output folder (default: %(default)s)")
    parser.add_argument("--num-vis", type=int, default=8, help="held-out images to draw")
    parser.add_argument("--data-arg", action="append", default=[],
                        help="extra argument for tools/make_demo_data.py (repeatable)")
    parser.add_argument("--pretrain-opts", nargs="*", default=[], metavar="KEY VALUE",
                        help="overrides of configs/demo/nfnet_nano_pretrain.yaml")
    parser.add_argument("--detect-opts", nargs="*", default=[], metavar="KEY VALUE",
                        help="overrides of configs/demo/nfnet_nano_mask_rcnn.yaml")
    args = parser.parse_args()
    run_pipeline(args.out, data_args=args.data_arg, pretrain_opts=args.pretrain_opts,
                 detect_opts=args.detect_opts, num_vis=args.num_vis)
