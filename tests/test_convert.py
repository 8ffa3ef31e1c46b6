"""Weight import: timm dm_nfnet state dicts and DeepMind Haiku files -> nfdet checkpoints."""

from __future__ import annotations

import os
import runpy
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TOOLS

from nfdet.checkpoint import CheckpointFormatError, convert_weights
from nfdet.modeling import build_nfnet

GELU_GAMMA = 1.7015043497085571  # DeepMind's constant for GELU


# ---------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------


def _randomised_timm(name: str, seed: int = 0) -> torch.nn.Module:
    """A timm dm_nfnet with every parameter moved far from its init, so every branch matters."""
    timm = pytest.importorskip("timm", reason="timm is the numerical reference (test extra)")
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("skipinit_gain"):
                p.uniform_(0.2, 1.0)
            elif n.endswith(".gain"):
                p.uniform_(0.8, 1.2)
            elif n.endswith(".bias"):
                p.normal_(0.0, 0.1)
            else:  # conv weights, SE 1x1 convs and the classifier: unit variance
                p.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def timm_f0(tmp_path_factory):
    model = _randomised_timm("dm_nfnet_f0")
    path = tmp_path_factory.mktemp("timm") / "dm_nfnet_f0.pth"
    torch.save(model.state_dict(), path)
    return model, path


def _check_logits(reference, ours, shapes):
    for shape in shapes:
        x = torch.randn(shape)
        with torch.no_grad():
            want, got = reference(x), ours(x)
        err = (want - got).abs().max().item()
        assert err < 5e-4 * want.abs().max().item(), (shape, err)


def test_timm_uses_exact_gelu(timm_f0):
    model, _ = timm_f0
    act = model.stages[0][0].act1
    x = torch.linspace(-3, 3, 101)
    torch.testing.assert_close(act(x.clone()), F.gelu(x) * GELU_GAMMA)
    assert not torch.allclose(act(x.clone()), F.gelu(x, approximate="tanh") * GELU_GAMMA)
    assert build_nfnet("nano").trunk.stem.activation == "gelu"


def test_timm_f0_equivalence(timm_f0, tmp_path):
    model, src = timm_f0
    out = tmp_path / "nfnet_f0.pth"
    convert_weights(str(src), str(out))
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["meta"] == {
        "variant": "F0", "num_classes": 1000, "source": "timm", "source_file": src.name,
    }
    assert all(type(v) is torch.Tensor for v in ckpt["model"].values())
    ours = build_nfnet(ckpt["meta"]["variant"]).eval()
    ours.load_state_dict(ckpt["model"], strict=True)
    torch.manual_seed(1)
    _check_logits(model, ours, [(1, 3, 64, 64), (1, 3, 67, 61)])


def test_timm_f1_equivalence_small_input(tmp_path):
    model = _randomised_timm("dm_nfnet_f1", seed=3)
    src = tmp_path / "f1.pth"
    torch.save({"state_dict": model.state_dict()}, src)  # training-checkpoint wrapper
    ckpt = convert_weights(str(src), variant="dm_nfnet_f1")
    assert ckpt["meta"]["variant"] == "F1"
    with torch.device("meta"):  # skip the random init of 132M parameters
        ours = build_nfnet("F1").eval()
    ours.load_state_dict(ckpt["model"], strict=True, assign=True)
    torch.manual_seed(2)
    _check_logits(model, ours, [(1, 3, 33, 32)])


def test_variant_mismatch_names_key(timm_f0):
    _, src = timm_f0
    with pytest.raises(CheckpointFormatError) as info:
        convert_weights(str(src), variant="F0+")
    assert "shape mismatch for stem.conv4.weight" in str(info.value)
    assert "F0+" in str(info.value)
    with pytest.raises(CheckpointFormatError, match="missing"):
        convert_weights(str(src), variant="F1")


def test_timm_shape_mismatch_names_key(timm_f0):
    from nfdet.checkpoint import convert_timm_state_dict

    model, _ = timm_f0
    sd = dict(model.state_dict())
    sd["stages.2.3.conv2b.weight"] = sd["stages.2.3.conv2b.weight"][:, :, :1, :1]
    with pytest.raises(CheckpointFormatError) as info:
        convert_timm_state_dict(sd, variant="F0")
    assert "stages.2.3.conv2b.weight" in str(info.value)
    assert "shape mismatch" in str(info.value)


# ---------------------------------------------------------------------------------------------
# DeepMind
# ---------------------------------------------------------------------------------------------

# nano, described independently of nfdet's table: depths, widths, stem, groups of 16 channels.
NANO = dict(
    depths=(1, 1, 2, 1), widths=(32, 64, 128, 128), stem=(8, 16, 16, 16), group=16, classes=10
)


def _deepmind_tree(seed: int = 0) -> dict:
    """A random param tree in DeepMind's Haiku layout (HWIO convs, IO linears) for nano."""
    rng = np.random.default_rng(seed)
    f32 = np.float32

    def conv(cin, cout, k, groups=1):
        return {
            "w": rng.standard_normal((k, k, cin // groups, cout)).astype(f32),
            "gain": rng.uniform(0.8, 1.2, cout).astype(f32),
            "b": rng.normal(0.0, 0.1, cout).astype(f32),
        }

    def linear(cin, cout):
        return {
            "w": rng.normal(0.0, cin**-0.5, (cin, cout)).astype(f32),
            "b": rng.normal(0.0, 0.1, cout).astype(f32),
        }

    tree = {}
    cin = 3
    for i, c in enumerate(NANO["stem"]):
        tree[f"NFNet/~/stem_conv{i}"] = conv(cin, c, 3)
        cin = c
    idx = 0
    for depth, width in zip(NANO["depths"], NANO["widths"]):
        mid = width // 2
        groups = mid // NANO["group"]
        for b in range(depth):
            p = f"NFNet/~/nf_block_{idx}"
            tree[p] = {"skip_gain": np.asarray(rng.uniform(0.2, 1.0), dtype=f32)}
            if b == 0:
                tree[p + "/~/conv_shortcut"] = conv(cin, width, 1)
            tree[p + "/~/conv0"] = conv(cin, mid, 1)
            tree[p + "/~/conv1"] = conv(mid, mid, 3, groups)
            tree[p + "/~/conv1b"] = conv(mid, mid, 3, groups)
            tree[p + "/~/conv2"] = conv(mid, width, 1)
            tree[p + "/~/squeeze_excite/~/linear"] = linear(width, width // 2)
            tree[p + "/~/squeeze_excite/~/linear_1"] = linear(width // 2, width)
            cin = width
            idx += 1
    tree["NFNet/~/final_conv"] = conv(cin, 2 * cin, 1)
    tree["NFNet/~/linear"] = linear(2 * cin, NANO["classes"])
    return tree


def _reference_forward(tree: dict, x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """NFNet forward written directly from DeepMind's param tree and formulas (NCHW)."""

    def act(t):
        return F.gelu(t, approximate=approximate) * GELU_GAMMA

    def same(t, k, s):
        def pad(n):
            total = max((-(-n // s) - 1) * s + k - n, 0)
            return total // 2, total - total // 2

        (top, bottom), (left, right) = pad(t.shape[2]), pad(t.shape[3])
        return F.pad(t, (left, right, top, bottom))

    def wsconv(t, p, stride=1):
        w = torch.from_numpy(p["w"]).double()  # HWIO
        fan_in = w.shape[0] * w.shape[1] * w.shape[2]
        mean = w.mean(dim=(0, 1, 2), keepdim=True)
        var = w.var(dim=(0, 1, 2), keepdim=True, unbiased=False)
        w = (w - mean) / torch.sqrt(torch.clamp(var * fan_in, min=1e-4))
        w = w * torch.from_numpy(p["gain"]).double()
        groups = t.shape[1] // w.shape[2]
        t = same(t, w.shape[0], stride)
        return F.conv2d(
            t, w.permute(3, 2, 0, 1), torch.from_numpy(p["b"]).double(), stride, groups=groups
        )

    def dense(t, p):
        return t @ torch.from_numpy(p["w"]).double() + torch.from_numpy(p["b"]).double()

    x = x.double()
    x = act(wsconv(x, tree["NFNet/~/stem_conv0"], 2))
    x = act(wsconv(x, tree["NFNet/~/stem_conv1"]))
    x = act(wsconv(x, tree["NFNet/~/stem_conv2"]))
    x = wsconv(x, tree["NFNet/~/stem_conv3"], 2)
    expected_std, idx = 1.0, 0
    for s, depth in enumerate(NANO["depths"]):
        for b in range(depth):
            p = f"NFNet/~/nf_block_{idx}"
            stride = 2 if (b == 0 and s > 0) else 1
            out = act(x) * (1.0 / expected_std)
            if b == 0:
                sc = out
                if stride == 2:
                    # SAME average pool: mean over the valid elements of each 2x2 window.
                    padded = same(sc, 2, 2)
                    count = same(torch.ones_like(sc[:, :1]), 2, 2)
                    sc = F.avg_pool2d(padded, 2, 2) / F.avg_pool2d(count, 2, 2)
                shortcut = wsconv(sc, tree[p + "/~/conv_shortcut"])
            else:
                shortcut = x
            out = wsconv(out, tree[p + "/~/conv0"])
            out = wsconv(act(out), tree[p + "/~/conv1"], stride)
            out = wsconv(act(out), tree[p + "/~/conv1b"])
            out = wsconv(act(out), tree[p + "/~/conv2"])
            se = out.mean(dim=(2, 3))
            se = dense(torch.relu(dense(se, tree[p + "/~/squeeze_excite/~/linear"])),
                       tree[p + "/~/squeeze_excite/~/linear_1"])
            out = out * (2.0 * torch.sigmoid(se))[:, :, None, None]
            skip = float(tree[p]["skip_gain"])
            x = out * skip * 0.2 + shortcut
            if b == 0:
                expected_std = 1.0
            expected_std = (expected_std**2 + 0.2**2) ** 0.5
            idx += 1
    x = act(wsconv(x, tree["NFNet/~/final_conv"]))
    return dense(x.mean(dim=(2, 3)), tree["NFNet/~/linear"])


@pytest.fixture
def deepmind_file(tmp_path):
    dill = pytest.importorskip("dill", reason="dill is needed to write DeepMind-format files")
    tree = _deepmind_tree()
    path = tmp_path / "nano_haiku.npz"
    with open(path, "wb") as f:
        dill.dump(tree, f)
    return tree, path


@pytest.mark.parametrize("activation,approximate", [("gelu", "none"), ("gelu_tanh", "tanh")])
def test_deepmind_file_matches_independent_forward(deepmind_file, tmp_path, activation,
                                                   approximate):
    tree, src = deepmind_file
    out = tmp_path / "nano.pth"
    convert_weights(str(src), str(out))
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["meta"]["variant"] == "nano"
    assert ckpt["meta"]["source"] == "deepmind"
    assert ckpt["meta"]["num_classes"] == NANO["classes"]
    model = build_nfnet("nano", num_classes=NANO["classes"], activation=activation).eval()
    model.load_state_dict(ckpt["model"], strict=True)
    torch.manual_seed(0)
    for shape in [(2, 3, 64, 64), (1, 3, 45, 38)]:
        x = torch.randn(shape)
        with torch.no_grad():
            got = model(x).double()
        want = _reference_forward(tree, x, approximate)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_missing_dill_gives_install_hint(deepmind_file, monkeypatch):
    _, src = deepmind_file
    monkeypatch.setitem(sys.modules, "dill", None)  # makes `import dill` raise ImportError
    with pytest.raises(ImportError) as info:
        convert_weights(str(src))
    message = str(info.value)
    assert "dill" in message and "pip install dill" in message and "nfdet[deepmind]" in message


def test_deepmind_shape_mismatch_names_key(tmp_path):
    dill = pytest.importorskip("dill", reason="dill is needed to write DeepMind-format files")
    tree = _deepmind_tree()
    key = "NFNet/~/nf_block_2/~/squeeze_excite/~/linear_1"
    tree[key]["w"] = tree[key]["w"][:, :100]
    src = tmp_path / "bad.npz"
    with open(src, "wb") as f:
        dill.dump(tree, f)
    with pytest.raises(CheckpointFormatError) as info:
        convert_weights(str(src), variant="nano")
    assert key + "/w" in str(info.value)
    assert str(src) in str(info.value)


def test_unrecognized_files_are_named(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    with pytest.raises(CheckpointFormatError, match="notes.txt"):
        convert_weights(str(text))
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, other)
    with pytest.raises(CheckpointFormatError, match="other.pth"):
        convert_weights(str(other))
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        convert_weights(str(tmp_path / "missing.npz"))


def test_output_written_atomically(deepmind_file, tmp_path, monkeypatch):
    _, src = deepmind_file
    out = tmp_path / "out" / "nano.pth"
    out.parent.mkdir()
    out.write_bytes(b"previous checkpoint")

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert_weights(str(src), str(out))
    assert out.read_bytes() == b"previous checkpoint"
    assert os.listdir(out.parent) == ["nano.pth"]


def test_cli(deepmind_file, tmp_path, capsys):
    _, src = deepmind_file
    main = runpy.run_path(str(TOOLS / "convert_weights.py"), run_name="cli")["main"]
    out = tmp_path / "cli.pth"
    assert main([str(src), str(out), "--variant", "nano"]) == 0
    assert "nano" in capsys.readouterr().out
    model = build_nfnet("nano", num_classes=NANO["classes"])
    model.load_state_dict(torch.load(out, weights_only=True)["model"], strict=True)
    assert main([str(src), str(tmp_path / "x.pth"), "--variant", "F0"]) == 1
    assert "F0" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()
