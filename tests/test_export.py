"""Exports (``nfdet.export``, ``nfdet.detection.export``, ``tools/export_model.py``): the
exported files, loaded back with their own runtimes (TorchScript, onnxruntime, torch.export),
compute what the eager models compute."""

from __future__ import annotations

import importlib.util
import os
import warnings

import numpy as np
import pytest
import torch
from helpers import QUICK_NAME, TOOLS, set_skip_gains
from PIL import Image

from nfdet.export import export_classifier
from nfdet.modeling import build_nfnet

NANO_CLASSIFIER = "pretrain/nfnet_nano_shapes.yaml"


def _load_tool():
    path = TOOLS / "export_model.py"
    spec = importlib.util.spec_from_file_location("export_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _classifier(variant: str, num_classes: int = 10):
    torch.manual_seed(0)
    model = build_nfnet(variant, num_classes=num_classes)
    set_skip_gains(model)
    with torch.no_grad():
        model.head.fc.weight.normal_(0.0, 1.0)  # logits of order 1
    return model.eval()


def _run_file(path: str, fmt: str, x: torch.Tensor) -> torch.Tensor:
    """Run an exported classifier with its own runtime (not nfdet's loader)."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream
        if fmt == "torchscript":
            return torch.jit.load(path)(x)
        return torch.export.load(path).module()(x)


def _check_classifier(variant, fmt, size, tmp_path):
    model = _classifier(variant)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    report = export_classifier(model, x, fmt, str(tmp_path))
    assert os.path.isfile(report.path) and report.format == fmt
    got = _run_file(report.path, fmt, x)
    tolerance = 1e-4 * want.abs().max().item()
    assert (got - want).abs().max().item() <= tolerance
    assert report.max_abs_diff <= tolerance
    if fmt != "torch_export":
        # TorchScript and ONNX trace SAME padding from the input's shape: another batch and
        # size of the other parity run as well.
        x2 = torch.randn(3, 3, size[0] + 5, size[1] + 2)
        with torch.no_grad():
            want2 = model(x2)
        got2 = _run_file(report.path, fmt, x2)
        assert (got2 - want2).abs().max().item() <= 1e-4 * want2.abs().max().item()


@pytest.mark.parametrize("size", [(64, 64), (67, 61)], ids=["even", "odd"])
@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "torch_export"])
def test_nano_classifier_exports_match_eager(fmt, size, tmp_path):
    _check_classifier("nano", fmt, size, tmp_path)


@pytest.mark.slow  # F0: 12-20 s per export on 2 cores
@pytest.mark.parametrize("size", [(64, 64), (67, 61)], ids=["even", "odd"])
@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "torch_export"])
def test_f0_classifier_exports_match_eager(fmt, size, tmp_path):
    _check_classifier("F0", fmt, size, tmp_path)


# ---------------------------------------------------------------------------------------------
# The detector, through detectron2's TracingAdapter
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nano_detector():
    from nfdet.config import merge_config, resolve_config_file
    from nfdet.detection.config import get_nfdet_cfg
    from nfdet.detection.export import build_detector

    cfg = get_nfdet_cfg()
    # Every detection kept (random weights score low), 20 per image.
    merge_config(cfg, resolve_config_file(QUICK_NAME),
                 ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    torch.manual_seed(0)
    return cfg, build_detector(cfg)


def _images(cfg):
    from nfdet.detection.export import detector_sample_image

    return [detector_sample_image(cfg, None, seed, size)
            for seed, size in [(1, (300, 500)), (2, (500, 330)), (3, (128, 128))]]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_nano_mask_rcnn_exports_give_the_eager_detections(fmt, nano_detector, tmp_path):
    from detectron2.export import TracingAdapter

    from nfdet.detection.export import export_detector

    cfg, model = nano_detector
    report = export_detector(cfg, fmt, str(tmp_path), model=model)
    assert report.max_abs_diff <= 1e-3
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(report.path, providers=["CPUExecutionProvider"])

        def run(image):
            return [torch.from_numpy(a) for a in session.run(None, {"input0": image.numpy()})]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.load(report.path)

        def run(image):
            with torch.no_grad():
                return traced(image)

    for image in _images(cfg):
        # The eager model's detections, through an adapter of its own whose schema turns flat
        # outputs back into Instances (detectron2's way).
        adapter = TracingAdapter(model, [{"image": image}],
                                 lambda m, i: [{"instances": m.inference(
                                     i, do_postprocess=False)[0]}]).eval()
        with torch.no_grad():
            flat = adapter(image)  # (sets the schema)
        want = adapter.outputs_schema(flat)[0]["instances"]
        got = adapter.outputs_schema(run(image))[0]["instances"]
        assert len(want) > 0 and len(got) == len(want)
        torch.testing.assert_close(got.pred_boxes.tensor, want.pred_boxes.tensor, rtol=1e-4,
                                   atol=1e-3)
        torch.testing.assert_close(got.scores, want.scores, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.pred_classes, want.pred_classes)
        torch.testing.assert_close(got.pred_masks, want.pred_masks, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# tools/export_model.py
# ---------------------------------------------------------------------------------------------


def test_tool_exports_a_classifier_checkpoint(tmp_path, capsys):
    model = _classifier("nano", num_classes=4)
    weights = tmp_path / "backbone.pth"
    torch.save({"model": model.state_dict()}, weights)
    out = tmp_path / "out"
    tool = _load_tool()
    code = tool.main(["--model", "classifier", "--config", NANO_CLASSIFIER, "--format",
                      "torchscript", "--output", str(out), "MODEL.WEIGHTS", str(weights)])
    assert code == 0
    report = (out / "export_report.txt").read_text()
    assert "torchscript" in report and "max |exported - eager|" in report
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    got = _run_file(str(out / "model.ts"), "torchscript", x)
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def test_tool_exports_a_detector_with_a_sample_image(tmp_path, capsys):
    image = tmp_path / "sample.png"
    Image.fromarray(np.full((90, 150, 3), 200, np.uint8)).save(image)
    out = tmp_path / "out"
    code = _load_tool().main(["--config", QUICK_NAME, "--format", "onnx", "--output", str(out),
                              "--sample-image", str(image)])
    assert code == 0
    assert (out / "model.onnx").stat().st_size > 0
    # The image resized as DefaultPredictor does (shortest edge MIN_SIZE_TEST 128, longest at
    # most MAX_SIZE_TEST 160).
    assert "input shape: [3, 96, 160]" in (out / "export_report.txt").read_text()


@pytest.mark.parametrize("argv,message", [
    (["--config", QUICK_NAME, "--format", "torch_export", "--output", "{out}"],
     "--format torch_export of the detector is not supported"),
    (["--model", "classifier", "--config", NANO_CLASSIFIER, "--output", "{out}",
      "MODEL.WEIGHTS", "missing.pth"], "missing.pth"),
    (["--config", QUICK_NAME, "--output", "{out}", "--sample-image", "no_such_image.png"],
     "no_such_image.png"),
], ids=["unsupported", "missing_weights", "missing_image"])
def test_tool_fails_with_one_line(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    code = _load_tool().main([a.format(out=out) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err and message in err[-1] and err[-1].startswith("export_model.py: error:")
    assert not (out / "export_report.txt").exists()


def test_classifier_weights_that_do_not_fit_are_named(tmp_path, capsys):
    weights = tmp_path / "f0.pth"
    torch.save({"model": {"trunk.stem.conv1.weight": torch.zeros(16, 3, 3, 3)}}, weights)
    code = _load_tool().main(["--model", "classifier", "--config", NANO_CLASSIFIER, "--output",
                              str(tmp_path / "out"), "MODEL.WEIGHTS", str(weights)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and str(weights) in err[-1] and "does not fit NFNet nano" in err[-1]
