#!/usr/bin/env python
"""Train or evaluate an NFNet detector with detectron2.

    python tools/train_net.py --config nfnet_f0_mask_rcnn.yaml MODEL.WEIGHTS f0.pth
    python tools/train_net.py --config-file configs/quick/nfnet_nano_mask_rcnn_instant.yaml \\
        --register-coco shapes_train train.json train/ --register-coco shapes_val val.json val/ \\
        DATASETS.TRAIN '("shapes_train",)' DATASETS.TEST '("shapes_val",)'
    python tools/train_net.py --config ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config ... --resume

detectron2's standard options (--num-gpus, --num-machines, --machine-rank, --dist-url, trailing
KEY VALUE opts) plus --config (alias of --config-file; a bare name is looked up in configs/) and
--register-coco NAME JSON IMAGE_DIR (repeatable). The logic lives in nfdet.detection.cli.
"""

from nfdet.detection import NFNetTrainer
from nfdet.detection.cli import launch_train, train_main


def main(args):
    # setup (datasets, config, logging) -> NFNetTrainer: train, or --eval-only.
    return train_main(args, trainer_cls=NFNetTrainer)


if __name__ == "__main__":
    launch_train(main=main)
