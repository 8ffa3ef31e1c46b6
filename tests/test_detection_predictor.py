"""nfdet.detection.predictor as tools/demo.py uses it: images read with nfdet's reader (modes
converted, a bad image named). Policy: docs/reliability.md."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import QUICK_NAME, truncate
from PIL import Image

from nfdet.detection.predictor import NFNetPredictor, demo_main


def test_demo_reads_with_nfdet_reader_and_names_a_bad_image(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    gray16 = rng.integers(0, 65536, (80, 96), dtype=np.uint16)
    rgba = rng.integers(0, 256, (80, 96, 4), dtype=np.uint8)
    Image.fromarray(gray16).save(tmp_path / "a_gray16.png")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "b_rgba.png")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "c.png")
    truncated = truncate(tmp_path / "c.png")
    seen = []
    call = NFNetPredictor.__call__

    def record(self, image):
        seen.append(image.copy())
        return call(self, image)

    monkeypatch.setattr(NFNetPredictor, "__call__", record)
    inputs = [str(tmp_path / n) for n in ("a_gray16.png", "b_rgba.png", "c.png")]
    with pytest.raises(SystemExit) as exit_info:
        demo_main(["--config", QUICK_NAME, "--input", *inputs, "--output", str(tmp_path / "vis")])
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
