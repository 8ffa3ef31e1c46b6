#!/usr/bin/env python
"""Signal propagation plot of an NFNet or NF-ResNet at initialisation on unit Gaussian input: per
residual block, the average channel squared mean and variance of the residual stream (printed as
a table and drawn as a PNG). See ``nfdet/modeling/signal_propagation.py`` for the choices behind the
options.

Example:
    python tools/signal_propagation.py --variant F0 --out spp.png
    python tools/signal_propagation.py --variant F0 --shortcut-pool subsample
    python tools/signal_propagation.py --variant nf_resnet50 --out spp_nf_resnet50.png
"""

from __future__ import annotations

import argparse

import torch

from nfdet.modeling import build_nfnet
from nfdet.modeling.signal_propagation import format_spp_table, plot_spp, signal_propagation


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="F0")
    parser.add_argument("--out", default="spp.png", help="PNG path ('' for no plot)")
    parser.add_argument("--size", type=int, default=224, help="input resolution")
    parser.add_argument("--batch", type=int, default=8, help="batch size")
    parser.add_argument(
        "--skip-gain", type=float, default=1.0,
        help="value of every skip gain during the measurement (default 1: branches active)",
    )
    parser.add_argument(
        "--init-skip-gains", action="store_true",
        help="keep the skip gains as initialised (0) instead of --skip-gain",
    )
    parser.add_argument(
        "--shortcut-pool", choices=("avg", "subsample"), default="avg",
        help="'subsample' swaps the shortcut average pool for strided subsampling",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = build_nfnet(args.variant).to(args.device)
    signals = signal_propagation(
        model,
        size=args.size,
        batch_size=args.batch,
        skip_gain=None if args.init_skip_gains else args.skip_gain,
        shortcut_pool=args.shortcut_pool,
        seed=args.seed,
    )
    name = args.variant if args.variant.lower().startswith("nf_") else f"NFNet-{args.variant}"
    print(f"{name}, input {args.batch}x3x{args.size}x{args.size} N(0, 1)")
    print(format_spp_table(signals))
    if args.out:
        title = f"{name} signal propagation at init ({args.shortcut_pool} shortcut)"
        plot_spp(signals, args.out, title=title)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
