#!/usr/bin/env python
"""nfdet benchmarks, one subcommand each; every one prints a table and writes JSON (--json).

    python tools/benchmark.py backbone  [--variant F0 --batch-size 8 ...]   nfdet vs timm, ResNet-50
    python tools/benchmark.py agc       [--variant F0 --batch-size 8 ...]   AGC vs a loop, vs a step
    python tools/benchmark.py detection [--configs A,B ...]                 Mask R-CNN NFNet vs R50
    python tools/benchmark.py data      [--variants F0,F3 ...]              data loading per worker
    python tools/benchmark.py shards    [--num-images 512 ...]              folder/list/shards

Every subcommand runs on CPU, and on CUDA (bf16 autocast) with --device cuda (but `data`, which
times CPU loader workers); --smoke runs it at tiny sizes with one repeat. To add one: write a
module with a function that adds its flags to a parser and one that runs it (in
``nfdet/benchmarks/``, or beside the code it needs), and add a line to ``SUBCOMMANDS``.
"""

import argparse

from nfdet.benchmarks import agc, backbone, data, shards
from nfdet.detection import benchmark as detection

# name -> (add its flags to a parser, run it with the parsed args, help)
SUBCOMMANDS = {
    "backbone": (backbone.add_backbone_arguments, backbone.main_backbone,
                 "NFNet vs timm dm_nfnet and ResNet-50: speed, memory"),
    "agc": (agc.add_agc_arguments, agc.main_agc,
            "Adaptive Gradient Clipping vs a loop and a train step"),
    "detection": (detection.add_detection_arguments, detection.main_detection,
                  "Mask R-CNN NFNet-FPN vs detectron2's R50-FPN"),
    "data": (data.add_data_arguments, data.main_data,
             "pretraining input pipeline: images/s per loader worker"),
    "shards": (shards.add_shards_arguments, shards.main_shards,
               "data formats: loader images/s, index memory"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="BENCHMARK")
    for name, (add_arguments, _, help_text) in SUBCOMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    SUBCOMMANDS[args.command][1](args)


if __name__ == "__main__":
    main()
