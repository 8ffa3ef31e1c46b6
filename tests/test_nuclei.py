"""tools/make_nuclei_data.py (nfdet.detection.nuclei) on a generated 16-bit image and label mask,
read from TIFFs and from a wheel-like zip."""

from __future__ import annotations

import io
import json
import runpy
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import TOOLS, run_tool
from PIL import Image
from pycocotools import mask as mask_util

from nfdet.detection.nuclei import NUCLEI_WHEEL_MEMBERS, make_nuclei_coco, read_stardist_wheel


def _scene():
    image = np.full((512, 512), 100, dtype=np.uint16)
    labels = np.zeros((512, 512), dtype=np.uint16)
    labels[10:40, 20:60] = 1          # tile (0, 0)
    labels[100:120, 240:280] = 2      # crosses the vertical border: tiles (0, 0) and (0, 1)
    labels[300:330, 300:340] = 3      # tile (1, 1), held out
    labels[255:258, 400:402] = 4      # 2 px in tile (0, 1) and 4 px in (1, 1): fragments
    labels[400:450, 50:90] = 5        # tile (1, 0)
    image[labels > 0] = 3000
    return image, labels


def _tiff_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="TIFF")
    return buf.getvalue()


def test_tiles_and_annotations(tmp_path):
    image, labels = _scene()
    paths = make_nuclei_coco(image, labels, tmp_path / "out", min_area=5)
    train = json.loads(Path(paths["train_json"]).read_text())
    val = json.loads(Path(paths["val_json"]).read_text())
    assert [i["file_name"] for i in train["images"]] == ["tile_00.png", "tile_01.png",
                                                           "tile_10.png"]
    assert [i["file_name"] for i in val["images"]] == ["tile_11.png"]
    # Label 2 is cut in two instances; label 4's fragments (2 and 4 px) are below min_area.
    per_image = {i["id"]: sorted(a["area"] for a in train["annotations"] if a["image_id"] ==
                                 i["id"]) for i in train["images"]}
    assert per_image == {1: [16 * 20, 30 * 40], 2: [24 * 20], 3: [50 * 40]}
    assert [a["area"] for a in val["annotations"]] == [30 * 40]
    ids = [a["id"] for a in train["annotations"]]
    assert len(set(ids)) == len(ids)
    for ann in train["annotations"] + val["annotations"]:
        assert ann["iscrowd"] == 0 and ann["category_id"] == 1
        decoded = mask_util.decode(ann["segmentation"])
        assert decoded.sum() == ann["area"]
        ys, xs = np.nonzero(decoded)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                               ys.max() - ys.min() + 1]
    # 8-bit tiles, intensities rescaled from the image's (min, max) to 0-255.
    tile = np.array(Image.open(Path(paths["val_images"]) / "tile_11.png"))
    assert tile.dtype == np.uint8 and tile.shape == (256, 256)
    assert tile[300 - 256, 300 - 256] == 255 and tile[0, 0] == 0


def test_tool_reads_a_wheel_and_tiffs(tmp_path, monkeypatch):
    image, labels = _scene()
    wheel = tmp_path / "stardist-0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for member, array in zip(NUCLEI_WHEEL_MEMBERS, (image, labels)):
            zf.writestr(member, _tiff_bytes(array))
    read_image, read_labels = read_stardist_wheel(wheel)
    assert np.array_equal(read_image, image) and np.array_equal(read_labels, labels)

    proc = run_tool("make_nuclei_data.py", tmp_path / "from_wheel", "--wheel", wheel, timeout=120)
    assert proc.returncode == 0, proc.stderr
    tiffs = []
    for name, array in (("img.tif", image), ("mask.tif", labels)):
        (tmp_path / name).write_bytes(_tiff_bytes(array))
        tiffs.append(str(tmp_path / name))
    # The --tiff path in this process (one interpreter start is enough for the test).
    monkeypatch.setattr(sys, "argv", ["make_nuclei_data.py", str(tmp_path / "from_tiff"),
                                      "--tiff", *tiffs])
    runpy.run_path(str(TOOLS / "make_nuclei_data.py"), run_name="__main__")
    for split in ("train.json", "val.json"):
        assert ((tmp_path / "from_wheel" / split).read_text()
                == (tmp_path / "from_tiff" / split).read_text())


def test_bad_input(tmp_path):
    not_a_wheel = tmp_path / "x.whl"
    not_a_wheel.write_text("hello")
    with pytest.raises(ValueError, match="x.whl"):
        read_stardist_wheel(not_a_wheel)
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("other.txt", "")
    with pytest.raises(ValueError, match="img2d.tif"):
        read_stardist_wheel(empty)
    with pytest.raises(ValueError, match="512x512"):
        make_nuclei_coco(np.zeros((256, 256)), np.zeros((256, 256)), tmp_path / "o")
