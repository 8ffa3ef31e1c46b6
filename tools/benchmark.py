#!/usr/bin/env python
"""nfdet benchmarks, one subcommand each.

    python tools/benchmark.py agc [--variant F0 --batch-size 2 --image-size 128 ...]
    python tools/benchmark.py maskrcnn [--config quick/nfnet_nano_mask_rcnn_256.yaml ...]

To add a benchmark: write ``add_<name>_arguments(parser)`` and ``main_<name>(args)`` in the nfdet
package and add one line to ``SUBCOMMANDS``.
"""

import argparse
import importlib

# name -> (module, help): the module defines add_<name>_arguments(parser) and main_<name>(args).
SUBCOMMANDS = {
    "agc": ("nfdet.solver.benchmark", "Adaptive Gradient Clipping vs a loop and a train step"),
    "maskrcnn": ("nfdet.detection.benchmark", "Mask R-CNN training/inference speed of a config"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="BENCHMARK")
    entries = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        getattr(module, f"add_{name}_arguments")(sub.add_parser(name, help=help_text))
        entries[name] = getattr(module, f"main_{name}")
    args = parser.parse_args(argv)
    entries[args.command](args)


if __name__ == "__main__":
    main()
