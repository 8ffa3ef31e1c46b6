#!/usr/bin/env python
"""Export an nfdet model for deployment, in the spirit of detectron2's
tools/deploy/export_model.py (tracing).

    # the detector (detectron2's TracingAdapter): TorchScript or ONNX
    python tools/export_model.py --config nfnet_f0_mask_rcnn.yaml --format torchscript \\
        --output output/export MODEL.WEIGHTS output/model_final.pth [--sample-image img.jpg]
    # the classifier of a pretraining config: TorchScript, ONNX or torch.export
    python tools/export_model.py --model classifier --config pretrain/nfnet_f0_imagenet.yaml \\
        --format onnx --output output/export MODEL.WEIGHTS backbone_final.pth

Writes ``model.ts`` / ``model.onnx`` / ``model.pt2`` and ``export_report.txt`` (the output
check: the exported file run on the sample input against the eager model) into ``--output``.
An unsupported combination or bad input ends with a one-line error.
"""

import argparse
import os
import sys

FORMATS = ("torchscript", "onnx", "torch_export")


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", "--config", dest="config_file", required=True,
                        metavar="FILE", help="a config path, or a name under configs/")
    parser.add_argument("--model", choices=("detector", "classifier"), default="detector",
                        help="a detector config (default) or a pretraining (classifier) config")
    parser.add_argument("--format", choices=FORMATS, default="torchscript",
                        help="torchscript (trace), onnx (trace) or torch_export")
    parser.add_argument("--sample-image", default=None, metavar="FILE",
                        help="the image to trace with (default: a generated one)")
    parser.add_argument("--output", default="output/export", metavar="DIR",
                        help="folder for the exported file and export_report.txt")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="KEY VALUE config overrides, e.g. MODEL.WEIGHTS path.pth")
    return parser


def export(args: argparse.Namespace):
    """Run the export of ``args``; returns the ``ExportReport``."""
    from nfdet.checkpoint import write_text_atomic
    from nfdet.config import resolve_config_file

    config_file = resolve_config_file(args.config_file)
    if args.model == "classifier":
        from nfdet.export import build_classifier, classifier_sample, export_classifier

        model, cfg = build_classifier(config_file, args.opts)
        report = export_classifier(model, classifier_sample(cfg, args.sample_image),
                                   args.format, args.output,
                                   name=f"classifier NFNet-{cfg.MODEL.NFNET.VARIANT}")
    else:
        from nfdet.detection.export import export_detector, load_detector_cfg

        cfg = load_detector_cfg(config_file, args.opts)
        report = export_detector(cfg, args.format, args.output, args.sample_image)
    if not cfg.MODEL.WEIGHTS:
        report.note = "; ".join(filter(None, [report.note, "MODEL.WEIGHTS is empty: random "
                                              "weights were exported"]))
    write_text_atomic(os.path.join(args.output, "export_report.txt"), report.text())
    print(report.text(), end="")
    return report


def main(argv=None) -> int:
    args = argument_parser().parse_args(argv)
    try:
        from nfdet.config import ConfigError
        from nfdet.export import ExportError

        export(args)
    except (ExportError, ConfigError, OSError, ValueError) as e:
        # One line: the unsupported combination or the file/key at fault.
        print(f"export_model.py: error: {str(e).splitlines()[0] if str(e) else repr(e)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
