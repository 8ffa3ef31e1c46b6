#!/usr/bin/env python
"""nfdet benchmarks, one subcommand each; every one prints a table and writes JSON (--json).

    python tools/benchmark.py backbone  [--variant F0 --batch-size 8 ...]   nfdet vs timm, ResNet-50
    python tools/benchmark.py agc       [--variant F0 --batch-size 8 ...]   AGC vs a loop, vs a step
    python tools/benchmark.py detection [--configs A,B ...]                 Mask R-CNN NFNet vs R50
    python tools/benchmark.py data      [--variants F0,F3 ...]              data loading per worker
    python tools/benchmark.py shards    [--num-images 512 ...]              folder/list/shards

Every subcommand runs on CPU, and on CUDA (bf16 autocast) with --device cuda (but `data`, which
times CPU loader workers); --smoke runs it at tiny sizes with one repeat. To add one: write
``add_<name>_arguments(parser)`` and ``main_<name>(args)`` in the nfdet package and add a line to
``SUBCOMMANDS``.
"""

import argparse
import importlib

# name -> (module, help): the module defines add_<name>_arguments(parser) and main_<name>(args).
SUBCOMMANDS = {
    "backbone": ("nfdet.modeling.benchmark", "NFNet vs timm dm_nfnet and ResNet-50: speed, memory"),
    "agc": ("nfdet.solver.benchmark", "Adaptive Gradient Clipping vs a loop and a train step"),
    "detection": ("nfdet.detection.benchmark", "Mask R-CNN NFNet-FPN vs detectron2's R50-FPN"),
    "data": ("nfdet.benchmarks.data", "pretraining input pipeline: images/s per loader worker"),
    "shards": ("nfdet.benchmarks.shards", "data formats: loader images/s, index memory"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="BENCHMARK")
    entries = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        # Import lazily per subcommand: `detection` needs detectron2, the others do not.
        entries[name] = (module_name, sub.add_parser(name, help=help_text))
    for name, (module_name, sub_parser) in entries.items():
        module = importlib.import_module(module_name)
        getattr(module, f"add_{name}_arguments")(sub_parser)
        entries[name] = getattr(module, f"main_{name}")
    args = parser.parse_args(argv)
    entries[args.command](args)


if __name__ == "__main__":
    main()
