#!/usr/bin/env python
"""Convert released NFNet weights (DeepMind ``F*_haiku.npz`` dill pickles or timm ``dm_nfnet_f*``
state dicts) into an nfdet checkpoint ``{"model": state_dict, "meta": {...}}``.

Example:
    python tools/convert_weights.py F0_haiku.npz nfnet_f0.pth
    python tools/convert_weights.py dm_nfnet_f1.pth nfnet_f1.pth --variant F1
"""

from __future__ import annotations

import argparse
import sys

from nfdet.checkpoint import CheckpointFormatError, convert_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="DeepMind *_haiku.npz file or timm dm_nfnet state dict")
    parser.add_argument("out", help="output nfdet checkpoint (.pth), written atomically")
    parser.add_argument(
        "--variant", default=None, help="nfdet variant (F0..F7, F0+.., nano); inferred if omitted"
    )
    args = parser.parse_args(argv)
    try:
        ckpt = convert_weights(args.src, args.out, variant=args.variant)
    except (CheckpointFormatError, FileNotFoundError, ImportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    meta = ckpt["meta"]
    n = sum(t.numel() for t in ckpt["model"].values())
    print(
        f"{args.src} ({meta['source']}) -> {args.out}: variant {meta['variant']}, "
        f"{meta['num_classes']} classes, {len(ckpt['model'])} tensors, {n / 1e6:.2f}M parameters"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
