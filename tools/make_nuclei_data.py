#!/usr/bin/env python
"""Build the DSB2018 nuclei COCO set (four 256 px tiles: three train, one held out) from the
image and label mask the ``stardist`` wheel ships. nfdet downloads nothing; get the wheel with

    pip download stardist --no-deps -d /tmp/stardist_wheel

then either

    python tools/make_nuclei_data.py data/nuclei --wheel /tmp/stardist_wheel/stardist-*.whl
    python tools/make_nuclei_data.py data/nuclei --tiff img2d.tif mask2d.tif

Writes OUT/train.json, OUT/train/, OUT/val.json, OUT/val/ (RLE masks: train with
INPUT.MASK_FORMAT bitmask). See nfdet.detection.nuclei and docs/small_batch.md.
"""

from __future__ import annotations

import argparse

from nfdet.detection.nuclei import make_nuclei_coco, read_stardist_wheel, read_tiff


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out_dir")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--wheel", help="the stardist wheel (.whl)")
    src.add_argument("--tiff", nargs=2, metavar=("IMAGE", "MASK"),
                     help="img2d.tif and mask2d.tif extracted from the wheel")
    p.add_argument("--min-area", type=int, default=10,
                   help="drop instance fragments with fewer pixels (default 10)")
    args = p.parse_args(argv)
    try:
        if args.wheel:
            image, labels = read_stardist_wheel(args.wheel)
        else:
            image, labels = read_tiff(args.tiff[0], args.tiff[0]), read_tiff(args.tiff[1],
                                                                              args.tiff[1])
        paths = make_nuclei_coco(image, labels, args.out_dir, min_area=args.min_area)
    except ValueError as e:
        p.error(str(e))
    for key, value in paths.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
