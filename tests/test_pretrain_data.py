"""nfdet.classification.data with bad input: bad images in class folders and file lists, image
modes, missing list entries. Config errors: test_configs.py; detection data: test_detection_data.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_image_folder
from PIL import Image

from nfdet.classification import build_dataset, build_train_transform
from nfdet.classification.config import load_pretrain_cfg
from nfdet.classification.data import ClassificationDataset
from nfdet.data.validate import DatasetError, ImageReadError


def _folder(root: Path, per_class: int = 3, size: int = 24) -> Path:
    return write_image_folder(root, ("a", "b"), per_class, size, splits=("train", "val"))


def _cfg(root: Path, *opts: str):
    return load_pretrain_cfg("nfnet_nano_shapes", ["DATA.ROOT", str(root), "MODEL.NUM_CLASSES",
                                                   "2", *opts])


def _identity(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def test_truncated_and_non_image_skipped_in_train_stop_in_val(tmp_path, nfdet_log):
    root = _folder(tmp_path / "data")
    truncated = root / "train" / "a" / "1.png"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    not_image = root / "train" / "b" / "0.png"
    not_image.write_text("plain text")
    cfg = _cfg(root)

    train = build_dataset(cfg, "train", _identity)
    index = [train.path(i) for i in range(len(train))].index(str(truncated))
    image, label = train[(index, 123)]
    # Replaced by the next image of the dataset (same label here: a/2.png), deterministically.
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(),
                                  np.asarray(Image.open(root / "train" / "a" / "2.png")))
    assert label == 0
    bad = [train.path(i) for i in range(len(train))].index(str(not_image))
    train[bad]
    log = nfdet_log()
    assert f"Skipping image 1 (replaced by the next one): Image '{truncated}' cannot be " \
           "decoded" in log
    assert f"Skipping image 2 (replaced by the next one): Image '{not_image}' is not an image " \
           "file" in log

    val_truncated = root / "val" / "b" / "2.png"
    val_truncated.write_bytes(val_truncated.read_bytes()[: val_truncated.stat().st_size // 2])
    val = build_dataset(cfg, "val", _identity)
    with pytest.raises(ImageReadError, match=rf"Image '{val_truncated}' cannot be decoded"):
        val[len(val) - 1]


def test_broken_train_set_stops_with_the_count(tmp_path):
    root = _folder(tmp_path / "data")
    for path in (root / "train").rglob("*.png"):
        path.write_bytes(b"GIF89a broken")
    train = build_dataset(_cfg(root), "train", _identity)
    with pytest.raises(ImageReadError, match=rf"No image of '{root / 'train'}' can be read"):
        train[0]
    many = ClassificationDataset(str(root / "train"), [f"x{i}.png" for i in range(20)],
                                 [0] * 20, _identity, skip_unreadable=True)
    with pytest.raises(ImageReadError, match=r"11 images of .* could not be read \(limit 10; "
                       r"the last: '.*x10.png'\)"):
        many[0]


def test_file_list_missing_images_named_up_front(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "train.txt").write_text("train/a/0.png 0\ntrain/a/nope.png 0\ntrain/b/0.png 1\n")
    with pytest.raises(DatasetError, match=rf"train.txt: 1 of its first 3 images do not exist "
                       rf"under DATA.ROOT '{root}', e.g. 'train/a/nope.png'"):
        build_dataset(_cfg(root, "DATA.FORMAT", "filelist", "DATA.TRAIN_SPLIT", "train.txt"),
                      "train", _identity)


def test_file_list_not_utf8_names_file_and_line(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "train.txt").write_bytes(b"train/a/0.png 0\ntrain/\xff\xfe.png 1\n")
    with pytest.raises(ValueError, match=r"train.txt:2: not UTF-8 text"):
        build_dataset(_cfg(root, "DATA.FORMAT", "filelist", "DATA.TRAIN_SPLIT", "train.txt"),
                      "train", _identity)


def test_grayscale_rgba_16bit_class_images_load_as_rgb(tmp_path):
    """Other image modes in the class folders: the train transform gets 8-bit RGB with the
    right values (16-bit scaled, not saturated), and a batch reaches the model's input shape."""
    root = _folder(tmp_path / "data", per_class=1)
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (24, 24), dtype=np.uint8)
    rgba = rng.integers(0, 256, (24, 24, 4), dtype=np.uint8)
    Image.fromarray(gray, "L").save(root / "train" / "a" / "gray.png")
    Image.fromarray(rgba, "RGBA").save(root / "train" / "a" / "rgba.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(root / "train" / "b" / "gray16.png")
    assert Image.open(root / "train" / "b" / "gray16.png").mode == "I;16"
    cfg = _cfg(root)
    data = build_dataset(cfg, "train", _identity)
    names = [Path(data.path(i)).name for i in range(len(data))]
    expected = {"gray.png": np.repeat(gray[..., None], 3, 2), "rgba.png": rgba[..., :3],
                "gray16.png": np.repeat(gray[..., None], 3, 2)}
    for name, pixels in expected.items():
        image, _ = data[names.index(name)]
        assert image.dtype == torch.uint8 and image.shape == (3, 24, 24)
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), pixels, err_msg=name)
    train = build_dataset(cfg, "train", build_train_transform(cfg))
    batch = torch.stack([train[(names.index(n), 7)][0] for n in expected])
    assert batch.shape == (3, 3, cfg.INPUT.TRAIN_SIZE, cfg.INPUT.TRAIN_SIZE)
