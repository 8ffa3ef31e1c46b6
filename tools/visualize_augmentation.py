#!/usr/bin/env python
"""Draw a few pretraining batches exactly as the model receives them (after the crop, MixUp/CutMix
and RandAugment; before normalization), each tile with its two labels and ratio.

Examples:
    tools/visualize_augmentation.py --config nfnet_f3_imagenet.yaml DATA.ROOT /data/imagenet \
        --out f3_batches.png
    tools/visualize_augmentation.py --config nfnet_nano_shapes.yaml DATA.ROOT demo/shapes \
        --out shapes.png --dump shapes_tiles --batches 4

The logic is nfdet.classification.visualize.
"""

import sys

from nfdet.classification.visualize import main

if __name__ == "__main__":
    sys.exit(main())
