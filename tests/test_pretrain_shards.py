"""Sharded datasets (DATA.FORMAT wds, issue 19): tools/make_shards.py, training on shards as on the
folder, disjoint shares per process and worker, exact resume, bad shards, and the one-line data
errors of tools/pretrain_net.py."""

from __future__ import annotations

import io
import json
import os
import runpy
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from crash import kill_when, rows_by_step, run_with_faults, start_with_faults
from helpers import FLAT_SHAPES, REPO, run_tool, write_flat_shapes
from PIL import Image
from test_pretrain_train import FULL_RECIPE, _pretrain_args

from nfdet.classification import build_dataset, launch_from_args, pretrain_argument_parser
from nfdet.classification.config import load_pretrain_cfg
from nfdet.classification.data import build_test_loader, build_train_loader
from nfdet.classification.engine import PretrainTrainer
from nfdet.classification.shards import write_shards
from nfdet.data.validate import DatasetError, ImageReadError


def _in_process(name: str, *args: str, capsys) -> subprocess.CompletedProcess:
    """``tools/<name> args`` run in this process (the script itself, without a new
    interpreter's start-up): exit status and output as from a subprocess."""
    argv = sys.argv
    sys.argv = [name, *args]
    code = 0
    try:
        runpy.run_path(str(REPO / "tools" / name), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


# ------------------------------------------------------------------ a folder of numbered images
def _numbered_folder(root: Path, classes: int = 4, per_class: int = 8, size: int = 20) -> Path:
    """ImageNet layout whose image n (0-based over the folder's sorted order) is filled with
    the colour (n, 7 * class, 0): a sample's identity can be read off its pixels."""
    n = 0
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (n, 7 * c, 0)).save(folder / f"{i:03d}.png")
            n += 1
    return root


def _pixel_id(image: Image.Image, seed: int | None = None) -> torch.Tensor:
    """Per-image transform of the tests: the image's identity (its first pixel's red value)."""
    return torch.tensor(int(np.asarray(image)[0, 0, 0]))


def _record(samples):
    """Batch stage of the tests: (identity, label, seed) per sample."""
    return [(int(s[0]), int(s[1]), int(s[2])) for s in samples]


def _wds_cfg(root: Path, *opts: str):
    return load_pretrain_cfg("nfnet_nano_shapes", [
        "DATA.FORMAT", "wds", "DATA.ROOT", str(root), "DATA.TRAIN_SPLIT", "train",
        "DATA.VAL_SPLIT", "", "SOLVER.IMS_PER_BATCH", "8", *opts])


@pytest.fixture(scope="module")
def numbered_shards(tmp_path_factory) -> Path:
    """32 numbered images in 8 shards of 4 (tools/make_shards.py)."""
    root = tmp_path_factory.mktemp("numbered")
    _numbered_folder(root / "images" / "train")
    write_shards(str(root / "images" / "train"), str(root / "shards" / "train"), shard_size=4,
                 progress=False)
    return root / "shards"


def _pass(cfg, rank: int, world: int, data_pass: int = 0, start: int = 0, seed: int = 3):
    dataset = build_dataset(cfg, "train", _pixel_id)
    loader, sampler = build_train_loader(cfg, dataset, rank, world, seed, collate_fn=_record)
    sampler.set_epoch(data_pass, start)
    return [batch for batch in loader]


def test_make_shards_info_and_contents_match_the_folder(tmp_path, capsys):
    src = _numbered_folder(tmp_path / "train", classes=3, per_class=5)
    res = _in_process("make_shards.py", str(src), str(tmp_path / "out"), "--shard-size", "4",
                      capsys=capsys)
    assert res.returncode == 0, res.stderr
    info = json.loads((tmp_path / "out" / "info.json").read_text())
    assert info["classes"] == ["class0", "class1", "class2"] and info["num_samples"] == 15
    assert [e["num_samples"] for e in info["shards"]] == [4, 4, 4, 3]
    members = {}
    for entry in info["shards"]:
        with tarfile.open(tmp_path / "out" / entry["file"]) as tar:
            for m in tar.getmembers():
                members[m.name] = tar.extractfile(m).read()
    # Every image byte for byte with its class index as .cls, each once.
    expected = {}
    for c in range(3):
        for f in sorted((src / f"class{c}").iterdir()):
            expected[f.read_bytes()] = str(c).encode()
    images = {k[:-4]: v for k, v in members.items() if k.endswith(".png")}
    labels = {k[:-4]: v for k, v in members.items() if k.endswith(".cls")}
    assert len(images) == len(labels) == 15
    assert sorted((images[k], labels[k]) for k in images) == sorted(expected.items())
    # Refuses to write over shards; a folder that is not there is one line.
    again = _in_process("make_shards.py", str(src), str(tmp_path / "out"), "--no-progress",
                        capsys=capsys)
    assert again.returncode == 1 and "already holds shards" in again.stderr
    missing = _in_process("make_shards.py", str(tmp_path / "nope.txt"), str(tmp_path / "o2"),
                          capsys=capsys)
    assert missing.returncode == 1 and "nope.txt" in missing.stderr.strip().splitlines()[-1]
    assert "Traceback" not in missing.stderr


def test_make_shards_from_file_list_is_atomic(tmp_path, capsys):
    src = _numbered_folder(tmp_path / "data" / "train", classes=2, per_class=3)
    lines = [f"train/class{c}/{i:03d}.png {c}" for c in range(2) for i in range(3)]
    (tmp_path / "data" / "train.txt").write_text("\n".join(lines) + "\n")
    res = _in_process("make_shards.py", str(tmp_path / "data" / "train.txt"), str(tmp_path / "a"),
                "--shard-size", "4", "--no-progress", capsys=capsys)
    assert res.returncode == 0, res.stderr
    info = json.loads((tmp_path / "a" / "info.json").read_text())
    assert info["num_samples"] == 6 and info["num_classes"] == 2 and info["classes"] is None
    # A missing image: the shard being written is left under a temporary name, no info.json.
    os.remove(src / "class1" / "002.png")
    bad = _in_process("make_shards.py", str(tmp_path / "data" / "train.txt"), str(tmp_path / "b"),
                "--shard-size", "2", "--no-progress", capsys=capsys)
    assert bad.returncode == 1 and "002.png" in bad.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "b" / "info.json").exists()
    written = sorted(os.listdir(tmp_path / "b"))
    assert any(n.endswith(".part") for n in written)
    for name in written:
        if name.endswith(".tar"):  # complete shards hold 2 samples each
            with tarfile.open(tmp_path / "b" / name) as tar:
                assert len(tar.getnames()) == 4


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_see_disjoint_samples_covering_the_epoch(numbered_shards, workers):
    # The trainer builds its loader with build_train_loader(cfg, set, rank, world_size, seed):
    # called here for rank 0 and 1 of 2, as two gloo processes would.
    cfg = _wds_cfg(numbered_shards, "DATA.NUM_WORKERS", str(workers))
    seen = {}
    for rank in range(2):
        batches = _pass(cfg, rank, 2)
        assert len(batches) == 4 and all(len(b) == 4 for b in batches)  # 32 / 8 per step
        seen[rank] = [s[0] for b in batches for s in b]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(32))
    # Labels are the class folders' indices (images 0-7 in class 0, ...).
    batches = _pass(cfg, 0, 2)
    assert all(label == ident // 8 for b in batches for ident, label, _ in b)
    # Seeds differ per sample; the next pass has another order; the same pass is repeatable.
    seeds = [s[2] for b in batches for s in b]
    assert len(set(seeds)) == len(seeds)
    assert [s[0] for b in _pass(cfg, 0, 2, data_pass=1) for s in b] != seen[0]
    assert _pass(cfg, 0, 2) == batches


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_pass_continues_the_sample_stream(numbered_shards, workers):
    cfg = _wds_cfg(numbered_shards, "DATA.NUM_WORKERS", str(workers), "DATA.WDS.SHUFFLE_BUFFER",
                   "3", "SOLVER.IMS_PER_BATCH", "4")
    full = _pass(cfg, 1, 2, data_pass=2)
    assert len(full) == 8
    for start in (1, 3, 6):
        assert _pass(cfg, 1, 2, data_pass=2, start=start) == full[start:]


def test_too_few_shards_for_the_readers_is_named(numbered_shards):
    cfg = _wds_cfg(numbered_shards, "DATA.NUM_WORKERS", "3")
    dataset = build_dataset(cfg, "train", _pixel_id)
    with pytest.raises(DatasetError, match=r"8 shard\(s\).*3 process\(es\) x 3 loader worker"):
        build_train_loader(cfg, dataset, 0, 3, 0, collate_fn=_record)


def test_shards_train_the_nano_model_as_the_folder(tmp_path, capsys):
    write_flat_shapes(tmp_path / "shapes", {"train": 8, "val": 4}, size=32)
    for split in ("train", "val"):
        res = _in_process("make_shards.py", str(tmp_path / "shapes" / split),
                          str(tmp_path / "shards" / split), "--shard-size", "4", "--no-progress",
                          capsys=capsys)
        assert res.returncode == 0, res.stderr
    common = ["INPUT.TRAIN_SIZE", "32", "INPUT.TEST_SIZE", "32", "SOLVER.IMS_PER_BATCH", "8",
              "SOLVER.MAX_ITER", "3", "LOG.PROGRESS_BAR", "False", "LOG.TENSORBOARD", "False"]
    folder = load_pretrain_cfg("nfnet_nano_shapes", [
        "DATA.ROOT", str(tmp_path / "shapes"), "OUTPUT_DIR", str(tmp_path / "f"), *common])
    shards = load_pretrain_cfg("nfnet_nano_shapes", [
        "DATA.FORMAT", "wds", "DATA.ROOT", str(tmp_path / "shards"),
        "OUTPUT_DIR", str(tmp_path / "s"), *common])
    for cfg in (folder, shards):
        os.makedirs(cfg.OUTPUT_DIR)
    a, b = PretrainTrainer(folder), PretrainTrainer(shards)
    assert b.train_set.classes == a.train_set.classes == sorted(os.listdir(tmp_path / "shapes" /
                                                                           "train"))
    assert len(b.train_set) == len(a.train_set) == 32
    assert (b.steps_per_epoch, b.steps_per_pass) == (a.steps_per_epoch, a.steps_per_pass) == (4, 4)
    results = b.train()
    assert b.step == 3 and 0 <= results["val/top1"] <= 100
    rows = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    # The evaluation saw every val sample once.
    val = build_dataset(shards, "val", _pixel_id)
    seen = [int(y) for _, labels in build_test_loader(shards, val, 0, 1) for y in labels]
    assert sorted(seen) == sorted(c for c in range(4) for _ in range(4))


def test_interrupted_and_resumed_on_shards_gives_the_same_losses(tmp_path, capsys):
    # Three short runs with the full recipe (mixing, RandAugment, dropout): ~12 s on 2 cores.
    write_flat_shapes(tmp_path / "shapes", {"train": 16, "val": 1}, size=32)
    res = _in_process("make_shards.py", str(tmp_path / "shapes" / "train"),
                      str(tmp_path / "shards" / "train"), "--shard-size", "8", "--no-progress",
                      capsys=capsys)
    assert res.returncode == 0, res.stderr
    recipe = [x if x != "16" else "8" for x in FULL_RECIPE]  # IMS_PER_BATCH 8: 4 steps a pass
    common = ["--config", "nfnet_nano_shapes.yaml", "DATA.FORMAT", "wds", "DATA.ROOT",
              str(tmp_path / "shards"), *recipe, "DATA.NUM_WORKERS", "2",
              "DATA.WDS.SHUFFLE_BUFFER", "5"]

    def run(argv):
        launch_from_args(pretrain_argument_parser().parse_args(argv))

    def losses(out):
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [(d["step"], d["loss"]) for d in rows if "loss" in d]

    run(common + ["OUTPUT_DIR", str(tmp_path / "a")])
    b = ["OUTPUT_DIR", str(tmp_path / "b")]
    run(common + b + ["SOLVER.STOP_ITER", "10"])  # pass 2 (4 steps each), step 2 of it
    assert losses(tmp_path / "b")[-1][0] == 10
    run(["--resume"] + common + b)
    uninterrupted = losses(tmp_path / "a")
    assert [s for s, _ in uninterrupted] == list(range(1, 17))
    assert losses(tmp_path / "b") == uninterrupted


@pytest.mark.slow
def test_killed_anywhere_and_resumed_on_shards_gives_the_same_losses(tmp_path):
    # ~45 s on 2 cores: the real command in subprocesses (tests/crash.py's harness),
    # SIGKILLed mid-pass at an arbitrary moment, resumed with a loader worker.
    write_flat_shapes(tmp_path / "shapes", {"train": 22}, size=32,
                      classes=FLAT_SHAPES[:3])  # 66 images: 4 steps of 16 a pass
    write_shards(str(tmp_path / "shapes" / "train"), str(tmp_path / "shards" / "train"),
                 shard_size=8, progress=False)
    wds = ["DATA.FORMAT", "wds", "DATA.ROOT", str(tmp_path / "shards"), "SOLVER.MAX_ITER", "12",
           "DATA.WDS.SHUFFLE_BUFFER", "6", "SOLVER.CHECKPOINT_PERIOD", "3"]
    rc, log = run_with_faults(tmp_path, "pretrain_net.py",
                              _pretrain_args(tmp_path, tmp_path / "ref", 0) + wds)
    assert rc == 0, log[-4000:]
    out = tmp_path / "killed"
    args = _pretrain_args(tmp_path, out, 1) + wds
    proc = start_with_faults(tmp_path, "pretrain_net.py", args)
    # Killed once step 4 is logged: resumed from the checkpoint of step 3, mid-pass.
    metrics = out / "metrics.jsonl"
    kill_when(proc, lambda: metrics.exists() and '"step": 4,' in metrics.read_text(), delay=0.0)
    rc, log = run_with_faults(tmp_path, "pretrain_net.py", ["--resume", *args])
    assert rc == 0 and "model_0000003.pth at step 3" in log, log[-4000:]

    def rows(path):
        lines = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        return rows_by_step([r for r in lines if "loss" in r], "step", ["loss", "lr"])

    expected = rows(tmp_path / "ref")
    assert sorted(expected) == list(range(1, 13))
    assert rows(out) == expected  # exact


# ---------------------------------------------------------------------------------- bad shards
def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_tar(path: Path, samples: list[dict]) -> None:
    from webdataset import TarWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        writer = TarWriter(f, encoder=False)
        for sample in samples:
            writer.write(sample)
        writer.close()


def _good(i: int) -> dict:
    return {"__key__": f"s{i:03d}", "png": _png(i), "cls": str(i % 2).encode()}


def _read_pass(root: Path, *opts: str):
    cfg = load_pretrain_cfg("nfnet_nano_shapes", [
        "DATA.FORMAT", "wds", "DATA.ROOT", str(root), "DATA.TRAIN_SPLIT", "t-{0..1}.tar",
        "DATA.VAL_SPLIT", "", "MODEL.NUM_CLASSES", "2", "DATA.WDS.NUM_SAMPLES", "8",
        "SOLVER.IMS_PER_BATCH", "4", *opts])
    return _pass(cfg, 0, 1)


def test_sample_without_label_names_shard_and_key(tmp_path):
    _write_tar(tmp_path / "t-0.tar", [_good(i) for i in range(4)])
    _write_tar(tmp_path / "t-1.tar", [_good(4), {"__key__": "nolabel", "png": _png(5)},
                                      _good(6), _good(7)])
    with pytest.raises(DatasetError, match=r"without label.*t-1.tar.*'nolabel'"):
        _read_pass(tmp_path)


def test_label_out_of_range_names_shard_and_key(tmp_path):
    _write_tar(tmp_path / "t-0.tar", [_good(i) for i in range(3)] + [
        {"__key__": "big", "png": _png(3), "cls": b"7"}])
    _write_tar(tmp_path / "t-1.tar", [_good(i) for i in range(4, 8)])
    with pytest.raises(DatasetError, match=r"Label 7 of shard '.*t-0.tar', key 'big'.*NUM_CLASSES"):
        _read_pass(tmp_path)


def test_truncated_shard_names_shard(tmp_path):
    _write_tar(tmp_path / "t-0.tar", [_good(i) for i in range(4)])
    _write_tar(tmp_path / "t-1.tar", [_good(i) for i in range(4, 8)])
    data = (tmp_path / "t-1.tar").read_bytes()
    (tmp_path / "t-1.tar").write_bytes(data[:1536 + 300])  # cut inside the 2nd member
    with pytest.raises(DatasetError, match=r"Shard '.*t-1.tar' is not a readable tar"):
        _read_pass(tmp_path)


def test_truncated_shard_against_info_json(tmp_path, capsys):
    src = _numbered_folder(tmp_path / "train", classes=2, per_class=4)
    res = _in_process("make_shards.py", str(src), str(tmp_path / "s"), "--shard-size", "4",
                "--no-progress", capsys=capsys)
    assert res.returncode == 0, res.stderr
    shard = tmp_path / "s" / "train-000001.tar"
    data = shard.read_bytes()
    # Cut at a member boundary (tar itself cannot tell): the size and count in info.json do.
    shard.write_bytes(data[:2 * 1024])
    cfg = _wds_cfg(tmp_path, "DATA.TRAIN_SPLIT", "s", "MODEL.NUM_CLASSES", "2",
                   "SOLVER.IMS_PER_BATCH", "4")
    with pytest.raises(DatasetError, match=r"train-000001.tar' has 2048 bytes.*info.json says"):
        build_dataset(cfg, "train", _pixel_id)
    info = json.loads((tmp_path / "s" / "info.json").read_text())
    for entry in info["shards"]:
        del entry["bytes"]
    (tmp_path / "s" / "info.json").write_text(json.dumps(info))
    with pytest.raises(DatasetError, match=r"train-000001.tar' ends after 1 samples.*says 4"):
        _pass(cfg, 0, 1)


def test_undecodable_image_is_a_counted_skip_in_training(tmp_path, nfdet_log):
    _write_tar(tmp_path / "t-0.tar", [_good(0), {"__key__": "junk", "png": b"not an image",
                                                 "cls": b"1"}, _good(2), _good(3)])
    _write_tar(tmp_path / "t-1.tar", [_good(i) for i in range(4, 8)])
    batches = _read_pass(tmp_path, "DATA.WDS.SHUFFLE_BUFFER", "0")
    log = nfdet_log()
    assert "Skipping image 1" in log and "junk.png of shard" in log and "t-0.tar" in log
    idents = sorted(s[0] for b in batches for s in b)
    # The bad sample (1) is replaced by the next readable one of its micro-batch (2).
    assert 1 not in idents and idents.count(2) == 2 and len(idents) == 8
    # In the validation set it stops the run, naming shard and key.
    cfg = load_pretrain_cfg("nfnet_nano_shapes", [
        "DATA.FORMAT", "wds", "DATA.ROOT", str(tmp_path), "DATA.VAL_SPLIT", "t-{0..1}.tar",
        "MODEL.NUM_CLASSES", "2"])
    val = build_dataset(cfg, "val", _pixel_id)
    with pytest.raises(ImageReadError, match=r"junk.png of shard '.*t-0.tar'"):
        list(build_test_loader(cfg, val, 0, 1))


# --------------------------------------------------------------- one-line errors of the tool
def _assert_one_line(res, code: int, name: str) -> None:
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == code, res.stderr[-2000:]
    assert name in last and last.startswith("pretrain_net.py: error:"), last
    assert "Traceback" not in res.stderr, res.stderr[-2000:]


BASE = ["--config", "nfnet_nano_shapes.yaml", "INPUT.TRAIN_SIZE", "32", "LOG.PROGRESS_BAR",
        "False", "LOG.TENSORBOARD", "False"]


def test_pretrain_net_missing_data_is_one_line(tmp_path, capsys):
    (tmp_path / "empty" / "train" / "class0").mkdir(parents=True)
    cases = [  # (options, exit status, what the line names)
        (["DATA.ROOT", str(tmp_path / "missing")], 2, "missing"),
        (["DATA.ROOT", str(tmp_path), "DATA.TRAIN_SPLIT", "nope"], 2, "nope"),
        (["DATA.ROOT", str(tmp_path), "DATA.FORMAT", "filelist", "DATA.TRAIN_SPLIT", "l.txt"], 2,
         "l.txt"),
        (["DATA.ROOT", str(tmp_path), "DATA.FORMAT", "wds", "DATA.TRAIN_SPLIT",
          "x-{0..3}.tar"], 2, "x-0.tar"),
        # Found while building the dataset: a class folder without images.
        (["DATA.ROOT", str(tmp_path / "empty"), "DATA.VAL_SPLIT", ""], 1, "class0"),
    ]
    for opts, code, name in cases:
        res = _in_process("pretrain_net.py", *BASE, "OUTPUT_DIR", str(tmp_path / "o"), *opts,
                          capsys=capsys)
        _assert_one_line(res, code, name)


def test_pretrain_net_error_in_a_loader_worker_is_one_line(tmp_path):
    # The real command (a subprocess); the label out of range is found in a loader worker.
    _write_tar(tmp_path / "t-0.tar", [_good(i) for i in range(3)] + [
        {"__key__": "big", "png": _png(3), "cls": b"9"}])
    _write_tar(tmp_path / "t-1.tar", [_good(i) for i in range(4, 8)])
    res = run_tool("pretrain_net.py", *BASE, "OUTPUT_DIR", str(tmp_path / "o"), "DATA.ROOT",
                str(tmp_path), "DATA.FORMAT", "wds", "DATA.TRAIN_SPLIT", "t-{0..1}.tar",
                "DATA.VAL_SPLIT", "", "DATA.WDS.NUM_SAMPLES", "8", "SOLVER.IMS_PER_BATCH", "4",
                "DATA.NUM_WORKERS", "2")
    _assert_one_line(res, 1, "t-0.tar', key 'big'")
