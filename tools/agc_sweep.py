#!/usr/bin/env python
"""The NFNet paper's batch-size study of AGC (Figure 1a/1b): one pretraining run per
(batch size, clipping) cell, then top-1 against batch size, one line per clipping setting.

Examples:
    # nano on the generated shapes (tools/make_demo_data.py output/demo_data), on CPU
    tools/agc_sweep.py --config nfnet_nano_shapes.yaml --batch-sizes 8,32,128 \\
        --clipping 0.01,0.16,none --epochs 40 --base-lr 0.1 --reference-batch 32 \\
        --out output/agc_sweep_nano DATA.ROOT output/demo_data/classification \\
        INPUT.RANDOM_RESIZED_CROP.SCALE "(0.8, 1.0)" \\
        SOLVER.AGC.EXCLUDE '["head.fc.weight", "*skip_gain"]'
    # the paper's NF-ResNet-50 ablation (docs/agc_sweep.md)
    tools/agc_sweep.py --config nf_resnet50_imagenet.yaml --num-gpus 8 \\
        --batch-sizes 256,512,1024,2048,4096 --clipping 0.01,0.02,0.04,0.08,0.16,none \\
        --epochs 90 --out output/agc_sweep_r50 DATA.ROOT /data/imagenet

Every cell trains SOLVER.EPOCHS (or --epochs) epochs at SOLVER.IMS_PER_BATCH = B (fewer steps
at larger B), with lr = BASE_LR x B / REFERENCE_BATCH (--base-lr, --reference-batch: the paper's
0.1 per 256 by default) and AGC clipping exactly as given ("none": AGC off): nfdet's batch rule
SOLVER.AGC.REFERENCE_BATCH_SIZE is set to 0 in every cell. A diverged run (NaN/inf loss) is
recorded as diverged; other errors stop the sweep with one line naming the cell. Cells finished
earlier (OUT/<cell>/cell_result.json) are reused (--force: redo them; the old folders are kept as
<cell>.replaced-<k>). Writes OUT/results.csv, OUT/results.md and OUT/agc_sweep.png.
Trailing KEY VALUE pairs override the config in every cell (as tools/pretrain_net.py takes them).
"""

import argparse
import logging
import sys

from nfdet.classification.cli import one_line
from nfdet.classification.sweep import (
    PAPER_BASE_LR,
    PAPER_REFERENCE_BATCH,
    SweepError,
    format_markdown,
    parse_batch_sizes,
    parse_clippings,
    run_sweep,
)
from nfdet.config import ConfigError


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agc_sweep.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", "--config", dest="config_file", required=True,
                   metavar="FILE", help="a pretraining yaml, or a name under configs/")
    p.add_argument("--batch-sizes", required=True, metavar="B1,B2,...",
                   help="comma-separated batch sizes (SOLVER.IMS_PER_BATCH of each cell)")
    p.add_argument("--clipping", required=True, metavar="C1,C2,...",
                   help="comma-separated AGC clipping values, 'none' for AGC off; used as given "
                   "in every cell (SOLVER.AGC.REFERENCE_BATCH_SIZE is set to 0)")
    p.add_argument("--epochs", type=int, default=None,
                   help="SOLVER.EPOCHS of every cell (default: the config's); equal epochs, so "
                   "larger batches take fewer steps")
    p.add_argument("--base-lr", type=float, default=PAPER_BASE_LR,
                   help=f"learning rate at --reference-batch images (default {PAPER_BASE_LR})")
    p.add_argument("--reference-batch", type=int, default=PAPER_REFERENCE_BATCH,
                   help="a cell of batch B uses lr = base-lr x B / reference-batch "
                   f"(default {PAPER_REFERENCE_BATCH})")
    p.add_argument("--metric", choices=("top1", "ema_top1"), default="top1",
                   help="plotted top-1: raw weights (default) or EMA weights")
    p.add_argument("--out", required=True, help="output folder (one folder per cell in it)")
    p.add_argument("--force", action="store_true",
                   help="train every cell again (previous cell folders are moved aside)")
    p.add_argument("--num-gpus", type=int, default=1,
                   help="processes per cell on this machine (GPUs; CPU processes without a "
                   "GPU), started for each cell; run the sweep itself as one process")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                   help="config overrides of every cell, as KEY VALUE pairs")
    return p


def main(argv=None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    try:
        batch_sizes = parse_batch_sizes(args.batch_sizes)
        clippings = parse_clippings(args.clipping)
    except ValueError as e:
        parser.error(str(e))
    log = logging.getLogger("nfdet.sweep")
    log.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s agc_sweep] %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.propagate = False
    try:
        records = run_sweep(args.config_file, args.opts, batch_sizes, clippings, args.out,
                            base_lr=args.base_lr, reference_batch=args.reference_batch,
                            epochs=args.epochs, force=args.force, metric=args.metric,
                            num_gpus=args.num_gpus)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        parser.error(one_line(e))
    except SweepError as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    print(format_markdown(records), end="")
    print(f"Table: {args.out}/results.md, {args.out}/results.csv; plot: {args.out}/agc_sweep.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
