#!/usr/bin/env python
"""Pretrain an NFNet classifier with DeepMind's recipe (AGC, EMA, MixUp/CutMix, RandAugment).

Examples:
    tools/pretrain_net.py --config nfnet_f0_imagenet.yaml --num-gpus 8 DATA.ROOT /data/imagenet
    tools/pretrain_net.py --config nfnet_f0_imagenet.yaml --num-gpus 8 --resume
    tools/pretrain_net.py --config nfnet_f0_imagenet.yaml --eval-only MODEL.WEIGHTS ckpt.pth
    tools/pretrain_net.py --config nfnet_nano_shapes.yaml DATA.ROOT demo/shapes  # CPU

The final step writes OUTPUT_DIR/backbone_final.pth, which tools/train_net.py takes as
MODEL.WEIGHTS.
"""

from nfdet.classification import launch_from_args, pretrain_argument_parser

if __name__ == "__main__":
    launch_from_args(pretrain_argument_parser().parse_args())
