"""tools/visualize_augmentation.py (nfdet.classification.visualize) on a generated shapes folder:
the grid PNG and its size, one dumped PNG per tile, tiles equal to the trainer's own batches, and
config errors as usage errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_tool
from PIL import Image

from nfdet.classification import PretrainTrainer
from nfdet.classification.config import load_pretrain_cfg
from nfdet.classification.visualize import LABEL_BAND, MIN_CELL_WIDTH, main
from nfdet.data import SyntheticDataParams, make_synthetic_data


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """The demo generator's classification folder, small: 4 classes x 6 images of 48 px."""
    root = tmp_path_factory.mktemp("viz")
    params = SyntheticDataParams(num_train=1, num_val=1, image_size=(32, 32),
                                 object_size=(8, 16), objects_per_image=(1, 1),
                                 cls_train_per_class=6, cls_val_per_class=1, cls_image_size=48)
    result = make_synthetic_data(str(root / "data"), params)
    return Path(result.paths["classification_train"]).parent


OVERRIDES = ["DATA.ROOT", None, "MODEL.NUM_CLASSES", "4", "INPUT.TRAIN_SIZE", "40",
             "INPUT.RANDAUGMENT.ENABLED", "True", "INPUT.RANDAUGMENT.MAGNITUDE", "10",
             "INPUT.MIXUP_ALPHA", "0.2", "INPUT.CUTMIX_ALPHA", "1.0", "SEED", "3"]


def _overrides(root: Path) -> list[str]:
    return [str(root) if v is None else v for v in OVERRIDES]


def test_grid_and_dump(shapes, tmp_path, capsys):
    out, dump = tmp_path / "grid.png", tmp_path / "tiles"
    # Overrides before and after the options, as the usage line shows.
    argv = ["--config", "nfnet_nano_shapes.yaml", *_overrides(shapes)[:6], "--out", str(out),
            "--dump", str(dump), "--batches", "3", "--per-batch", "4", *_overrides(shapes)[6:]]
    assert main(argv) == 0
    grid = Image.open(out)
    size = 40
    # One row per batch, 4 tiles each; cells as wide as the labels need.
    assert grid.size == (4 * max(size, MIN_CELL_WIDTH), 3 * (size + LABEL_BAND))
    pngs = sorted(dump.glob("*.png"))
    assert len(pngs) == 12
    index = json.loads((dump / "tiles.json").read_text())
    assert [t["file"] for t in index] == [p.name for p in pngs]
    classes = {"circle", "rectangle", "triangle", "star"}
    assert all(t["class"] in classes and t["mix_class"] in classes for t in index)
    assert all(0.0 <= t["ratio"] <= 1.0 for t in index)
    assert any(t["ratio"] < 0.99 and t["label"] != t["mix_label"] for t in index)  # mixed
    # The grid shows each tile's pixels unchanged.
    first = np.asarray(Image.open(pngs[0]))
    assert first.shape == (size, size, 3)
    np.testing.assert_array_equal(np.asarray(grid.convert("RGB"))[:size, :size], first)

    # The tiles are the trainer's own first batches at that batch size (same code, same seed).
    cfg = load_pretrain_cfg("nfnet_nano_shapes.yaml", _overrides(shapes) + [
        "SOLVER.IMS_PER_BATCH", "4", "DATA.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path / "o")])
    trainer = PretrainTrainer(cfg)
    trainer.sampler.set_epoch(0)
    batch = next(iter(trainer.train_loader))
    for i in range(4):
        tile = torch.from_numpy(np.array(Image.open(pngs[i]))).permute(2, 0, 1)
        assert torch.equal(tile, batch.images[i]), i
        assert index[i]["label"] == int(batch.labels[i])
        assert index[i]["ratio"] == pytest.approx(float(batch.ratio[i]))


def test_cli_errors_are_usage_errors(shapes, tmp_path):
    res = run_tool("visualize_augmentation.py", "--config", "nfnet_nano_shapes.yaml",
                   *_overrides(shapes), "INPUT.TEST_RESIZE", "crop", "--out", tmp_path / "g.png")
    assert res.returncode == 2
    assert "INPUT.TEST_RESIZE must be one of 'squash', 'shorter_side', got 'crop'" in res.stderr
    assert not (tmp_path / "g.png").exists()
    with pytest.raises(SystemExit) as info:  # 3 examples cannot pair into MixUp + CutMix halves
        main(["--config", "nfnet_nano_shapes.yaml", *_overrides(shapes), "--per-batch", "3",
              "--out", str(tmp_path / "g.png")])
    assert info.value.code == 2
