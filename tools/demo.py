#!/usr/bin/env python
"""Draw an NFNet detector's predictions on images (boxes, masks, class names) and save PNGs.

    python tools/demo.py --config nfnet_f0_mask_rcnn.yaml --input img1.jpg img2.jpg \\
        --output vis/ --confidence-threshold 0.5 MODEL.WEIGHTS output/model_final.pth

Class names come from the metadata of DATASETS.TEST[0]; --register-coco NAME JSON IMAGE_DIR
registers a COCO-format dataset for that purpose. The logic lives in nfdet.detection.predictor.
"""

from nfdet.detection.predictor import demo_main

if __name__ == "__main__":
    for path in demo_main():
        print(path)
