"""The reliability pieces as the real entry points use them: NFNetTrainer's test loader (nfdet's
image reader) and train loader (the checked dataset), pretrain_net's config errors, the demo's
image reader, and the checkpoint helpers exported by ``nfdet.checkpoint``. Policy:
docs/reliability.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nfdet.classification import launch_from_args, pretrain_argument_parser
from nfdet.config import merge_config, resolve_config_file
from nfdet.data.validate import DatasetError, ImageReadError
from nfdet.detection import NFNetTrainer, get_nfdet_cfg
from nfdet.detection.data import register_checked_coco
from nfdet.detection.loader import ResumableTrainLoader
from nfdet.detection.predictor import NFNetPredictor, demo_main

REPO = Path(__file__).resolve().parents[1]
QUICK = "quick/nfnet_nano_mask_rcnn_instant.yaml"

_registered: list[str] = []


def _register(prefix: str, data: dict, json_path: Path, image_dir: Path) -> str:
    """Register ``data`` (written to ``json_path``) under a name unique to this session."""
    json_path.write_text(json.dumps(data))
    name = f"wiring_{prefix}_{len(_registered)}"
    register_checked_coco(name, str(json_path), str(image_dir))
    _registered.append(name)
    return name


def _cfg(name: str, *opts: str):
    return merge_config(get_nfdet_cfg(), resolve_config_file(QUICK), [
        "MODEL.ROI_HEADS.NUM_CLASSES", "2", "DATASETS.TRAIN", f"('{name}',)",
        "DATASETS.TEST", f"('{name}',)", *opts,
    ])


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def test_trainer_test_names_a_truncated_test_image(tiny_coco, tmp_path):
    json_path, image_dir = tiny_coco
    truncated = _truncate(image_dir / "0001.png")
    name = _register("eval", json.loads(json_path.read_text()), tmp_path / "a.json", image_dir)
    cfg = _cfg(name, "OUTPUT_DIR", str(tmp_path / "out"))
    model = NFNetTrainer.build_model(cfg)
    # PIL alone says "image file is truncated", without the file.
    with pytest.raises(ImageReadError, match=rf"Image '{truncated}' cannot be decoded"):
        NFNetTrainer.test(cfg, model)


def test_trainer_train_loader_checks_the_dataset(tiny_coco, tmp_path):
    json_path, image_dir = tiny_coco
    data = json.loads(json_path.read_text())
    name = _register("ok", data, tmp_path / "ok.json", image_dir)
    assert isinstance(NFNetTrainer.build_train_loader(_cfg(name)), ResumableTrainLoader)

    # Every annotation invalid (zero-size box): dropped, so no image is left to train on.
    bad = json.loads(json.dumps(data))
    for ann in bad["annotations"]:
        ann["bbox"][2] = 0.0
    name = _register("nothing", bad, tmp_path / "nothing.json", image_dir)
    with pytest.raises(DatasetError, match=rf"DATASETS.TRAIN \('{name}',\): nothing to train on"):
        NFNetTrainer.build_train_loader(_cfg(name))

    # Boxes without masks under MODEL.MASK_ON: named before training, not in the mask head.
    boxes = json.loads(json.dumps(data))
    for ann in boxes["annotations"]:
        del ann["segmentation"]
    name = _register("boxes", boxes, tmp_path / "boxes.json", image_dir)
    with pytest.raises(DatasetError, match=r"an annotation without a mask, but MODEL.MASK_ON"):
        NFNetTrainer.build_train_loader(_cfg(name))


def test_pretrain_net_misspelled_key_exits_2_with_suggestion(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "pretrain_net.py"), "--config",
         "nfnet_nano_shapes.yaml", "OUTPUT_DIR", str(out), "SOLVER.BASE_LRR", "0.1"],
        cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
        text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "pretrain_net.py: error: command line: unknown config key SOLVER.BASE_LRR. Did you mean "
        "SOLVER.BASE_LR?"
    )
    assert "Traceback" not in proc.stderr and not out.exists()


def test_pretrain_unknown_config_name_exits_2(tmp_path, capsys):
    args = pretrain_argument_parser().parse_args(
        ["--config", "nfnet_nano_shape.yaml", "OUTPUT_DIR", str(tmp_path / "out")]
    )
    with pytest.raises(SystemExit) as exit_info:
        launch_from_args(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Config 'nfnet_nano_shape.yaml' is neither a file nor a config" in err
    assert not (tmp_path / "out").exists()


def test_demo_reads_with_nfdet_reader_and_names_a_bad_image(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    gray16 = rng.integers(0, 65536, (80, 96), dtype=np.uint16)
    rgba = rng.integers(0, 256, (80, 96, 4), dtype=np.uint8)
    Image.fromarray(gray16).save(tmp_path / "a_gray16.png")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "b_rgba.png")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "c.png")
    truncated = _truncate(tmp_path / "c.png")
    seen = []
    call = NFNetPredictor.__call__

    def record(self, image):
        seen.append(image.copy())
        return call(self, image)

    monkeypatch.setattr(NFNetPredictor, "__call__", record)
    inputs = [str(tmp_path / n) for n in ("a_gray16.png", "b_rgba.png", "c.png")]
    with pytest.raises(SystemExit) as exit_info:
        demo_main(["--config", QUICK, "--input", *inputs, "--output", str(tmp_path / "vis")])
    assert exit_info.value.code == 1
    # PIL alone says "image file is truncated", without the file.
    last = capsys.readouterr().err.splitlines()[-1]
    assert f"error: Image '{truncated}' cannot be decoded (image file is truncated)" in last
    # The predictor got BGR (it converts to INPUT.FORMAT itself): 16-bit scaled to 8 bits (PIL's
    # own conversion saturates it), alpha dropped. Both drawings were written before the stop.
    gray, color = seen
    np.testing.assert_array_equal(gray, np.repeat(np.rint(gray16 / 257.0).astype(np.uint8)[
        ..., None], 3, 2))
    np.testing.assert_array_equal(color, rgba[..., 2::-1])
    assert sorted(p.name for p in (tmp_path / "vis").iterdir()) == ["a_gray16.png", "b_rgba.png"]


def test_checkpoint_helpers_exported():
    import nfdet.checkpoint as checkpoint
    from nfdet.checkpoint import io

    for name in ("load_torch_checkpoint", "atomic_write", "write_text_atomic"):
        assert getattr(checkpoint, name) is getattr(io, name) and name in checkpoint.__all__
