"""Checkpoints: the shared I/O (nfdet.checkpoint.io), the detection checkpointer
(nfdet.detection.checkpoint) and the pretraining trainer's checkpoints
(nfdet.classification.checkpoint).

Classification checkpoints load as MODEL.WEIGHTS and detectron2 checkpoints round-trip. Bad
checkpoints and diverging runs, in both trainers: a weights file of another variant is an error
naming the mismatching keys and shapes; a truncated or corrupted checkpoint is an error naming the
file; a NaN/inf loss stops training naming the iteration and the last good checkpoint, which stays
intact. Nothing already written is lost."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances
from helpers import (
    REPO,
    nano,
    quick_cfg,
    quick_model,
    quick_pretrain_cfg,
    run_tool,
    truncate,
    write_classifier_checkpoint,
    write_image_folder,
)

from nfdet.checkpoint import (
    CheckpointFormatError,
    load_torch_checkpoint,
    save_checkpoint,
    write_text_atomic,
)
from nfdet.classification import PretrainTrainer
from nfdet.classification.checkpoint import (
    find_last_checkpoint,
    get_rng_state,
    save_training_checkpoint,
    set_rng_state,
)
from nfdet.detection import (
    NFNetCheckpointer,
    NFNetTrainer,
    find_trunk_prefix,
    is_classification_checkpoint,
)
from nfdet.modeling import build_nfnet


def _snapshot(folder: Path) -> dict[str, str]:
    """File name -> sha256 of every file in ``folder`` (to show nothing was changed)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def _flip_bytes(path: Path) -> None:
    """Damage bytes in the middle of the file (inside tensor data), keeping its length."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------- shared loader
def test_truncated_corrupted_and_empty_files_are_named(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"model": {"w": torch.randn(64, 64)}}, path)
    assert torch.equal(load_torch_checkpoint(path)["model"]["w"],
                       torch.load(path, weights_only=True)["model"]["w"])
    damaged = {"truncated": (truncate, "truncated or corrupted"),
               "flipped": (_flip_bytes, "CRC32"),
               "empty": (lambda p: p.write_bytes(b""), "empty")}
    for name, (damage, expected) in damaged.items():
        bad = tmp_path / f"{name}.pth"
        bad.write_bytes(path.read_bytes())
        damage(bad)
        with pytest.raises(CheckpointFormatError, match=expected) as info:
            load_torch_checkpoint(bad)
        assert str(bad) in str(info.value)
    # torch.load alone reads the byte-flipped file without complaint: the CRC check matters.
    flipped = torch.load(tmp_path / "flipped.pth", weights_only=True)["model"]["w"]
    assert not torch.equal(flipped, torch.load(path, weights_only=True)["model"]["w"])


def test_kill_while_replacing_last_checkpoint_keeps_the_old_pointer(tmp_path):
    pointer = tmp_path / "last_checkpoint"
    write_text_atomic(str(pointer), "model_0000001.pth")
    # A process SIGKILLed after writing the new pointer's bytes, before they are in place.
    code = (
        "import os, signal\n"
        "from nfdet.checkpoint import write_text_atomic\n"
        "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"write_text_atomic({str(pointer)!r}, 'model_0000003.pth')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert pointer.read_text() == "model_0000001.pth"
    (torn,) = tmp_path.glob(".tmp-last_checkpoint-*")
    assert torn.read_text() == "model_0000003.pth"
    write_text_atomic(str(pointer), "model_0000003.pth")  # the resumed run's next save
    assert pointer.read_text() == "model_0000003.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint"]


def test_convert_weights_cli_names_a_truncated_file(tmp_path):
    src = tmp_path / "dm_nfnet_nano.pth"
    torch.save(build_nfnet("nano", num_classes=3).state_dict(), src)
    truncate(src)
    out = tmp_path / "out.pth"
    proc = run_tool("convert_weights.py", src, out, timeout=120)
    assert proc.returncode == 1
    assert str(src) in proc.stderr and "truncated or corrupted" in proc.stderr
    assert not out.exists()


def test_checkpoint_helpers_exported():
    import nfdet.checkpoint as checkpoint
    from nfdet.checkpoint import io

    for name in ("load_torch_checkpoint", "atomic_write", "write_text_atomic"):
        assert getattr(checkpoint, name) is getattr(io, name) and name in checkpoint.__all__


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_write_gives_the_mode_open_would(tmp_path, umask):
    from nfdet.checkpoint.io import atomic_write

    old = os.umask(umask)
    try:
        atomic_write(str(tmp_path / "out.bin"), lambda f: f.write(b"x"))
        with open(tmp_path / "plain.bin", "wb") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    mode = (tmp_path / "out.bin").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask == (tmp_path / "plain.bin").stat().st_mode & 0o777


# ------------------------------------------------------------------------------------ detection
HEAD_KEYS = ["head.fc.bias", "head.fc.weight"]


def _classification_checkpoint(tmp_path: Path, **overrides) -> tuple:
    classifier = nano(num_classes=7, seed=1, **overrides)
    # Non-default gains/skip gains, so that "loaded" differs from "freshly initialised".
    with torch.no_grad():
        for name, p in classifier.named_parameters():
            if name.endswith(("gain", "bias")):
                p.add_(torch.rand_like(p))
    path = write_classifier_checkpoint(tmp_path / "classifier.pth", classifier, variant="nano",
                                       num_classes=7)
    return path, classifier.state_dict()


def _classifier_file(tmp_path: Path, name: str, **overrides) -> Path:
    return write_classifier_checkpoint(tmp_path / name, nano(num_classes=3, **overrides),
                                       variant="nano-mod")


@pytest.mark.parametrize(
    "backbone_name, res5_final_conv, prefix",
    [
        ("build_nfnet_fpn_backbone", True, "backbone.bottom_up.trunk."),
        ("build_nfnet_fpn_backbone", False, "backbone.bottom_up.trunk."),
        ("build_nfnet_backbone", True, "backbone.trunk."),
    ],
)
def test_classification_checkpoint_loads(tmp_path, caplog, backbone_name, res5_final_conv, prefix):
    path, source = _classification_checkpoint(tmp_path)
    opts = ["MODEL.BACKBONE.NAME", backbone_name, "MODEL.NFNET.RES5_FINAL_CONV", res5_final_conv]
    if backbone_name == "build_nfnet_backbone":
        # A single-level detector: RPN and ROI heads on res5.
        opts += ["MODEL.RPN.IN_FEATURES", ["res5"], "MODEL.ROI_HEADS.IN_FEATURES", ["res5"],
                 "MODEL.ANCHOR_GENERATOR.SIZES", [[32, 64, 128]], "MODEL.MASK_ON", False]
    model = quick_model(*opts)
    assert find_trunk_prefix(model) == prefix
    checkpointer = NFNetCheckpointer(model)
    with caplog.at_level(logging.INFO):
        checkpointer.load(str(path))
    incompatible = checkpointer.last_incompatible

    expected_unused = list(HEAD_KEYS)
    if not res5_final_conv:
        expected_unused += [k for k in source if k.startswith("trunk.final_conv.")]
    assert sorted(incompatible.unexpected_keys) == sorted(expected_unused)
    assert incompatible.incorrect_shapes == []
    assert not [k for k in incompatible.missing_keys if k.startswith(prefix)]
    # The unused keys are named in the log.
    assert "head.fc.weight" in caplog.text

    state = model.state_dict()
    loaded = 0
    for key, value in source.items():
        if key.startswith("trunk.") and key not in expected_unused:
            torch.testing.assert_close(state[prefix + key[len("trunk."):]], value, rtol=0, atol=0)
            loaded += 1
    assert loaded == len([k for k in state if k.startswith(prefix)])


def test_mismatched_checkpoint_is_an_error_naming_keys_and_shapes(tmp_path):
    # A classifier of another architecture: wider stage widths. detectron2 would only warn and
    # skip those tensors; a backbone that silently stays at random init must be an error.
    path, _ = _classification_checkpoint(tmp_path, widths=(32, 64, 128, 192))
    model = quick_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        NFNetCheckpointer(model).load(str(path))
    message = str(info.value)
    assert str(path) in message and "variant nano" in message
    assert ("backbone.bottom_up.trunk.stages.3.0.conv3.weight: checkpoint (192, 96, 1, 1) vs "
            "model (128, 64, 1, 1)") in message
    # Nothing was loaded.
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_detection_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = quick_model()
    NFNetCheckpointer(model, save_dir=str(tmp_path)).save("model_final", iteration=12)
    other = quick_model()
    checkpointer = NFNetCheckpointer(other, save_dir=str(tmp_path))
    extra = checkpointer.resume_or_load("", resume=True)
    assert extra["iteration"] == 12
    assert checkpointer.last_incompatible.missing_keys == []
    assert checkpointer.last_incompatible.unexpected_keys == []
    for key, value in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value, rtol=0, atol=0)


def test_is_classification_checkpoint():
    assert is_classification_checkpoint({"trunk.stem.conv1.weight": 0, "head.fc.weight": 0})
    assert is_classification_checkpoint({"module.trunk.stem.conv1.weight": 0})
    assert not is_classification_checkpoint({"head.fc.weight": 0})
    assert not is_classification_checkpoint(
        {"trunk.stem.conv1.weight": 0, "backbone.fpn_lateral2.weight": 0}
    )


def test_model_without_nfnet_backbone_is_refused():
    with pytest.raises(ValueError, match="exactly one NFNet backbone"):
        find_trunk_prefix(torch.nn.Linear(2, 2))


def test_detection_weights_of_another_variant_are_an_error(tmp_path):
    # Deeper (an extra block in res3) and shallower (a block of res4 missing) than nano.
    deeper = _classifier_file(tmp_path, "deeper.pth", depths=(1, 2, 2, 1))
    shallower = _classifier_file(tmp_path, "shallower.pth", depths=(1, 1, 1, 1))
    model = quick_model()
    with pytest.raises(ValueError) as info:
        NFNetCheckpointer(model).load(str(deeper))
    message = str(info.value)
    assert str(deeper) in message and "variant nano-mod" in message
    assert ("backbone.bottom_up.trunk.stages.1.1.conv1.weight: in the checkpoint (32, 64, 1, 1) "
            "but not in the model") in message
    with pytest.raises(ValueError) as info:
        NFNetCheckpointer(model).load(str(shallower))
    assert ("backbone.bottom_up.trunk.stages.2.1.conv1.weight: missing from the checkpoint "
            "(model (64, 128, 1, 1))") in str(info.value)

    # A detector checkpoint (resumed through last_checkpoint) of a wider backbone.
    wide = quick_model("MODEL.FPN.OUT_CHANNELS", 64)
    trunk = nano(num_classes=3, widths=(32, 64, 128, 192)).state_dict()
    wide_sd = {k: v for k, v in wide.state_dict().items()
               if not k.startswith("backbone.bottom_up.trunk.")}
    wide_sd.update({"backbone.bottom_up." + k: v for k, v in trunk.items()
                    if k.startswith("trunk.")})
    out = tmp_path / "run"
    out.mkdir()
    save_checkpoint({"model": wide_sd, "iteration": 5}, out / "model_0000005.pth")
    (out / "last_checkpoint").write_text("model_0000005.pth")
    before = _snapshot(out)
    with pytest.raises(ValueError) as info:
        NFNetCheckpointer(quick_model(), save_dir=str(out)).resume_or_load("", resume=True)
    assert str(out / "model_0000005.pth") in str(info.value)
    assert ("backbone.bottom_up.trunk.final_conv.weight: checkpoint (384, 192, 1, 1) vs model "
            "(256, 128, 1, 1)") in str(info.value)
    assert _snapshot(out) == before


def test_detection_weights_of_the_right_variant_still_load(tmp_path):
    # Control for the test above: the same construction with nano's own architecture loads.
    path = _classifier_file(tmp_path, "nano.pth")
    checkpointer = NFNetCheckpointer(quick_model())
    checkpointer.load(str(path))
    assert checkpointer.last_incompatible.incorrect_shapes == []


@pytest.mark.parametrize("damage, expected", [(truncate, "truncated or corrupted"),
                                              (_flip_bytes, "CRC32")])
def test_detection_damaged_checkpoint_is_named(tmp_path, damage, expected):
    out = tmp_path / "run"
    model = quick_model()
    NFNetCheckpointer(model, save_dir=str(out)).save("model_0000003", iteration=3)
    weights = tmp_path / "weights.pth"
    weights.write_bytes((out / "model_0000003.pth").read_bytes())
    damage(weights)
    with pytest.raises(CheckpointFormatError, match=expected) as info:
        NFNetCheckpointer(quick_model()).resume_or_load(str(weights), resume=False)
    assert str(weights) in str(info.value)
    # The same damage to the checkpoint --resume would use.
    damage(out / "model_0000003.pth")
    before = _snapshot(out)
    with pytest.raises(CheckpointFormatError, match=expected) as info:
        NFNetCheckpointer(quick_model(), save_dir=str(out)).resume_or_load("", resume=True)
    assert str(out / "model_0000003.pth") in str(info.value)
    assert _snapshot(out) == before


def test_detection_checkpointer_refuses_non_finite_weights(tmp_path):
    model = quick_model()
    checkpointer = NFNetCheckpointer(model, save_dir=str(tmp_path))
    checkpointer.save("model_0000001", iteration=1)
    before = _snapshot(tmp_path)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(FloatingPointError) as info:
        checkpointer.save("model_0000003", iteration=3)
    message = str(info.value)
    assert "iteration 3" in message and str(tmp_path / "model_0000001.pth") in message
    assert _snapshot(tmp_path) == before  # nothing written, last_checkpoint unchanged


def _tiny_dataset_name(tiny_coco) -> str:
    json_path, image_dir = tiny_coco
    name = f"nfdet_reliability_{abs(hash(str(json_path)))}"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(json_path), str(image_dir))
    return name


def _nan_from(model: torch.nn.Module, trainer, iteration: int) -> None:
    """Make the detector's losses NaN from ``iteration`` on (as a diverged run's would be)."""
    forward = model.forward

    def patched(*args, **kwargs):
        losses = forward(*args, **kwargs)
        if trainer.iter >= iteration:
            losses = {k: v * float("nan") for k, v in losses.items()}
        return losses

    model.forward = patched


@pytest.mark.parametrize("nan_at, last_good", [(4, "model_0000003.pth"), (0, None)])
def test_detection_nan_loss_stops_naming_iteration_and_last_checkpoint(tiny_coco, tmp_path,
                                                                        nan_at, last_good):
    cfg = quick_cfg()
    cfg.DATASETS.TRAIN = (_tiny_dataset_name(tiny_coco),)
    cfg.DATASETS.TEST = ()
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.CHECKPOINT_PERIOD = 8, 2
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    cfg.SEED = 1
    trainer = NFNetTrainer(cfg)
    trainer.resume_or_load(resume=False)
    _nan_from(trainer.model, trainer, nan_at)
    with pytest.raises(FloatingPointError) as info:
        trainer.train()
    message = str(info.value)
    assert f"at iteration {nan_at}" in message
    out = Path(cfg.OUTPUT_DIR)
    saved = sorted(p.name for p in out.glob("model_*.pth"))
    if last_good is None:
        assert "Last good checkpoint: none" in message
        assert saved == []
        return
    assert f"Last good checkpoint: {out / last_good}" in message
    assert saved == ["model_0000001.pth", "model_0000003.pth"]
    assert (out / "last_checkpoint").read_text() == last_good
    state = torch.load(out / last_good, weights_only=True)["model"]
    assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


# --------------------------------------------------------------------------------- pretraining
def _shapes(root: Path) -> Path:
    return write_image_folder(root, ("a", "b"), per_class=8, size=16)


def _pretrain_cfg(data: Path, out: Path, **opts):
    return quick_pretrain_cfg(
        data, out, "MODEL.NUM_CLASSES", "2", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "8",
        "SOLVER.CHECKPOINT_PERIOD", "2", "LOG.PERIOD", "10",
        *[x for kv in opts.items() for x in kv],
    )


def test_pretrain_weights_of_another_variant_are_an_error(tmp_path):
    data = _shapes(tmp_path / "data")
    wide = tmp_path / "wide.pth"
    save_checkpoint({"model": build_nfnet("nano", num_classes=2, widths=(32, 64, 128, 192))
                     .state_dict(), "meta": {"variant": "F0"}}, wide)
    cfg = _pretrain_cfg(data, tmp_path / "out", **{"MODEL.WEIGHTS": str(wide)})
    with pytest.raises(ValueError) as info:
        PretrainTrainer(cfg)
    message = str(info.value)
    assert str(wide) in message and "the checkpoint says variant F0" in message
    assert ("shape mismatch: trunk.stages.3.0.conv3.weight: checkpoint (192, 96, 1, 1) vs model "
            "(128, 64, 1, 1)") in message

    # --resume from a checkpoint of a deeper model.
    out = tmp_path / "resume"
    deeper = build_nfnet("nano", num_classes=2, depths=(1, 2, 2, 1)).state_dict()
    save_training_checkpoint(str(out), {"model": deeper, "step": 2}, step=2, keep=2)
    before = _snapshot(out)
    trainer = PretrainTrainer(_pretrain_cfg(data, out))
    with pytest.raises(ValueError, match="unexpected: trunk.stages.1.1.") as info:
        trainer.resume_or_load(True)
    assert str(out / "model_0000002.pth") in str(info.value)
    assert _snapshot(out) == before


def test_pretrain_damaged_checkpoints_are_named(tmp_path):
    data = _shapes(tmp_path / "data")
    out = tmp_path / "out"
    PretrainTrainer(_pretrain_cfg(data, out, **{"SOLVER.MAX_ITER": "4"})).train()
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    # MODEL.WEIGHTS truncated.
    weights = tmp_path / "weights.pth"
    weights.write_bytes((out / "backbone_final.pth").read_bytes())
    truncate(weights)
    with pytest.raises(CheckpointFormatError, match="truncated or corrupted") as info:
        PretrainTrainer(_pretrain_cfg(data, tmp_path / "o2", **{"MODEL.WEIGHTS": str(weights)}))
    assert str(weights) in str(info.value)
    # --resume from a corrupted last checkpoint: named, with the intact ones listed.
    _flip_bytes(out / "model_final.pth")
    before = _snapshot(out)
    trainer = PretrainTrainer(_pretrain_cfg(data, out, **{"SOLVER.MAX_ITER": "4"}))
    with pytest.raises(CheckpointFormatError, match="CRC32") as info:
        trainer.resume_or_load(True)
    message = str(info.value)
    assert str(out / "model_final.pth") in message
    assert str(out / "model_0000002.pth") in message  # the intact one, to resume from
    assert _snapshot(out) == before


@pytest.mark.parametrize("nan_step, last_good", [(5, "model_0000004.pth"), (1, None)])
def test_pretrain_nan_loss_stops_naming_step_and_last_checkpoint(tmp_path, caplog, nan_step,
                                                                  last_good):
    data = _shapes(tmp_path / "data")
    out = tmp_path / "out"
    trainer = PretrainTrainer(_pretrain_cfg(data, out))
    forward = trainer.model.forward

    def patched(x):
        logits = forward(x)
        # self.step is the number of steps done: the step being taken is step + 1.
        return logits * float("nan") if trainer.step + 1 >= nan_step else logits

    trainer.model.forward = patched
    with caplog.at_level(logging.ERROR, logger="nfdet.pretrain"):
        with pytest.raises(FloatingPointError) as info:
            trainer.train()
    message = str(info.value)
    assert f"at step {nan_step} " in message and message in caplog.text
    assert info.value.step == nan_step  # for tools (tools/agc_sweep.py) that record it
    saved = sorted(p.name for p in out.glob("model_*.pth"))
    if last_good is None:
        assert "saved no checkpoint" in message and saved == []
        return
    # LOG.PERIOD is 10: the check ran when checkpoint 6 was due, which was not written.
    assert f"the last good checkpoint is {out / last_good}" in message
    assert saved == ["model_0000002.pth", "model_0000004.pth"]
    assert (out / "last_checkpoint").read_text() == last_good
    state = torch.load(out / last_good, weights_only=True)
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values()
               if v.is_floating_point())


def test_checkpoint_atomic_and_weights_only(tmp_path, monkeypatch):
    torch.manual_seed(5)
    np.random.seed(5)
    state = {"model": {"w": torch.ones(3)}, "step": 4, "rng": [get_rng_state()]}
    path = save_training_checkpoint(str(tmp_path), state, step=4, keep=2)
    assert find_last_checkpoint(str(tmp_path)) == path
    loaded = torch.load(path, weights_only=True)
    expected = (torch.rand(2), np.random.rand())
    set_rng_state(loaded["rng"][0])
    assert torch.equal(torch.rand(2), expected[0]) and np.random.rand() == expected[1]

    # A crash while writing step 8 leaves step 4 as the intact latest checkpoint.
    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_training_checkpoint(str(tmp_path), {"model": {"w": torch.zeros(3)}}, 8, keep=2)
    monkeypatch.undo()
    assert find_last_checkpoint(str(tmp_path)) == path
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000004.pth"]
    for step in (8, 12):
        save_training_checkpoint(str(tmp_path), {"model": {}}, step, keep=2)
    assert sorted(os.listdir(tmp_path)) == [
        "last_checkpoint", "model_0000008.pth", "model_0000012.pth"
    ]
