#!/usr/bin/env python
"""Pretrain an NFNet classifier with DeepMind's recipe (AGC, EMA, MixUp/CutMix, RandAugment).

Examples:
    tools/pretrain_net.py --config nfnet_f0_imagenet.yaml --num-gpus 8 DATA.ROOT /data/imagenet
    tools/pretrain_net.py --config nfnet_f0_imagenet.yaml --num-gpus 8 --resume
    tools/pretrain_net.py --config nfnet_f0_imagenet.yaml --eval-only MODEL.WEIGHTS ckpt.pth
    tools/pretrain_net.py --config nfnet_nano_shapes.yaml DATA.ROOT demo/shapes  # CPU
    tools/pretrain_net.py --config nfnet_f0_imagenet.yaml --num-gpus 8 DATA.FORMAT wds \\
        DATA.ROOT /data/shards DATA.TRAIN_SPLIT 'train/train-{000000..001023}.tar' \\
        DATA.VAL_SPLIT val                    # shards written by tools/make_shards.py

The final step writes OUTPUT_DIR/backbone_final.pth, which tools/train_net.py takes as
MODEL.WEIGHTS. A data error ends the command with one line naming the path or key.
"""

from nfdet.classification.cli import pretrain_command

if __name__ == "__main__":
    pretrain_command()
