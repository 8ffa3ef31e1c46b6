#!/usr/bin/env python
"""Write the synthetic shapes datasets (classification folder + COCO instance segmentation).

Example:
    python tools/make_demo_data.py demo_output/data --seed 0 --num-train 320 --num-val 80

Re-running with the same parameters reuses the data; other parameters need ``--force`` (which
deletes only the files the previous run listed in its manifest).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from nfdet.data import CATEGORIES, SyntheticDataParams, make_synthetic_data

_DEFAULTS = SyntheticDataParams()


def _pair(name: str, values: list, cast):
    if len(values) not in (1, 2):
        raise SystemExit(f"--{name} takes one value or MIN MAX, got {values}")
    return (cast(values[0]), cast(values[-1]))


def get_parser() -> argparse.ArgumentParser:
    d = _DEFAULTS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out_dir", help="output directory (created if missing)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--num-train", type=int, default=d.num_train, help="COCO training images")
    p.add_argument("--num-val", type=int, default=d.num_val, help="COCO held-out images")
    for name, default, metavar, text in (
        ("image-size", d.image_size, "PX",
         "COCO image side, or MIN MAX (height and width drawn in that range)"),
        ("object-size", d.object_size, "PX", "MIN MAX of a shape's longer bounding-box side"),
        ("objects-per-image", d.objects_per_image, "N", "MIN MAX shapes per COCO image"),
    ):  # one value or MIN MAX: see _pair
        p.add_argument(f"--{name}", nargs="+", default=list(default), metavar=metavar, help=text)
    p.add_argument(
        "--min-visible",
        type=float,
        default=d.min_visible,
        help="least visible fraction of an occluded shape",
    )
    p.add_argument("--cls-train-per-class", type=int, default=d.cls_train_per_class)
    p.add_argument("--cls-val-per-class", type=int, default=d.cls_val_per_class)
    p.add_argument("--cls-image-size", type=int, default=d.cls_image_size)
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a dataset generated here with other parameters",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        params = SyntheticDataParams(
            seed=args.seed,
            num_train=args.num_train,
            num_val=args.num_val,
            image_size=_pair("image-size", args.image_size, int),
            object_size=_pair("object-size", args.object_size, int),
            objects_per_image=_pair("objects-per-image", args.objects_per_image, int),
            min_visible=args.min_visible,
            cls_train_per_class=args.cls_train_per_class,
            cls_val_per_class=args.cls_val_per_class,
            cls_image_size=args.cls_image_size,
        )
        result = make_synthetic_data(args.out_dir, params, force=args.force)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if result.generated:
        print(f"Generated synthetic data in {result.root} ({result.stats['seconds']:.1f} s)")
    else:
        print(f"{result.root} already holds this dataset (same parameters): nothing regenerated")
    print("parameters: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(params).items()))
    print(f"categories (COCO ids 1..{len(CATEGORIES)}): {', '.join(CATEGORIES)}")
    for split in ("train", "val"):
        s = result.stats[f"coco_{split}"]
        anns = ", ".join(f"{k} {v}" for k, v in s["annotations"].items())
        print(
            f"COCO {split}: {result.paths[f'coco_{split}_json']} + "
            f"{result.paths[f'coco_{split}_images']}/ ({s['images']} images; {anns})"
        )
    for split in ("train", "val"):
        n = result.stats[f"classification_{split}"]["images_per_class"]
        print(
            f"classification {split}: {result.paths[f'classification_{split}']}/<class>/ "
            f"({n} images per class)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
