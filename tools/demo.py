#!/usr/bin/env python
"""Draw an NFNet detector's predictions on images (boxes, masks, class names) and save PNGs.

    python tools/demo.py --config nfnet_f0_mask_rcnn.yaml --input img1.jpg img2.jpg \\
        --output vis/ --confidence-threshold 0.5 MODEL.WEIGHTS output/model_final.pth

Class names come from the metadata of DATASETS.TEST[0]; --register-coco NAME JSON IMAGE_DIR
registers a COCO-format dataset for that purpose. The logic lives in nfdet.detection.predictor.
"""

from detectron2.utils.logger import setup_logger

from nfdet.detection.engine import register_coco_datasets, setup_cfg
from nfdet.detection.predictor import demo_argument_parser, run_demo

if __name__ == "__main__":
    args = demo_argument_parser().parse_args()
    setup_logger(name="nfdet")
    setup_logger(name="detectron2")
    register_coco_datasets(args.register_coco)
    cfg = setup_cfg(args)
    for path in run_demo(cfg, args.input, args.output, args.confidence_threshold):
        print(path)
