#!/usr/bin/env python
"""Write WebDataset tar shards (for DATA.FORMAT wds) from an ImageNet-layout folder or a file list.

    tools/make_shards.py /data/imagenet/train /data/shards/train --shard-size 1000
    tools/make_shards.py /data/imagenet/val /data/shards/val
    tools/make_shards.py /data/big/train.txt /data/shards/train   # "relative/path label" lines

Writes OUT/<prefix>-000000.tar ... and OUT/info.json (samples, classes, shards); then train with
DATA.FORMAT wds DATA.ROOT /data/shards DATA.TRAIN_SPLIT train DATA.VAL_SPLIT val. The logic
lives in nfdet.classification.shards.write_shards.
"""

import argparse

from nfdet.classification.cli import DATA_ERRORS, one_line
from nfdet.classification.shards import write_shards


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="a folder of class folders, or a file list")
    parser.add_argument("out", help="output folder (created; must hold no shards yet)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--prefix", default=None, help="shard name prefix (default: SRC's name)")
    parser.add_argument("--root", default=None,
                        help="folder a file list's paths are relative to (default: its folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        info = write_shards(args.src, args.out, shard_size=args.shard_size, prefix=args.prefix,
                            root=args.root, seed=args.seed, progress=not args.no_progress)
    except DATA_ERRORS as e:
        parser.exit(1, f"{parser.prog}: error: {one_line(e)}\n")
    print(f"{info['num_samples']} samples in {len(info['shards'])} shard(s) under {args.out}")


if __name__ == "__main__":
    main()
