"""Signal propagation at initialisation (nfdet.modeling.signal_propagation and
tools/signal_propagation.py)."""

from __future__ import annotations

import runpy

import pytest
import torch
from helpers import TOOLS
from torch import nn

from nfdet.modeling import NFBlock, build_nfnet
from nfdet.modeling.signal_propagation import format_spp_table, plot_spp, signal_propagation

ALPHA = 0.2


@pytest.fixture(scope="module")
def f0():
    torch.manual_seed(0)
    return build_nfnet("F0")


def test_variance_reset_at_every_stage_start(f0):
    """With active branches and a variance-preserving transition (strided subsampling in place of
    the shortcut average pool, see nfdet.modeling.signal_propagation), the stream variance is
    ~1 + alpha**2 after the first block of every stage (the reset) and grows by ~alpha**2 per
    block."""
    # 224 px: at small sizes SAME zero padding pulls the variance of the 7x7 res5 maps down.
    signals = signal_propagation(f0, size=224, batch_size=1, shortcut_pool="subsample")
    starts = [r for r in signals if r.index == 0]
    assert [r.name for r in starts] == ["res2.0", "res3.0", "res4.0", "res5.0"]
    for r in starts:
        assert abs(r.variance - (1 + ALPHA**2)) < 0.1, r
    for r in signals:
        assert abs(r.variance - r.expected_var) < 0.15, r
        assert r.squared_mean < 0.05, r
    # Inside a stage the stream variance grows by alpha**2 times the branch variance.
    for prev, cur in zip(signals, signals[1:]):
        if cur.index > 0:
            growth = cur.variance - prev.variance
            assert abs(growth - ALPHA**2 * cur.residual_variance) < 0.02, (prev, cur)
    # The last block of res4 (6 blocks) sits clearly above the reset value of res5.0.
    res4_last = [r for r in signals if r.name == "res4.5"][0]
    res5_first = [r for r in signals if r.name == "res5.0"][0]
    assert res4_last.variance > res5_first.variance + 0.1


def test_average_pool_shortcut_on_white_noise(f0):
    """The model as built: no explosion; the first stage starts at unit variance and each stride-2
    average pool lowers the variance of spatially uncorrelated input (documented in
    nfdet/modeling/signal_propagation.py)."""
    signals = signal_propagation(f0, size=96, batch_size=2)
    starts = [r for r in signals if r.index == 0]
    assert abs(starts[0].variance - (1 + ALPHA**2)) < 0.15
    for prev, nxt in zip(starts, starts[1:]):
        assert nxt.variance < 0.5 * prev.variance
    assert all(r.variance < 1.5 for r in signals)


def test_init_skip_gains_keep_stream_flat_within_stage():
    torch.manual_seed(0)
    model = build_nfnet("nano")
    signals = signal_propagation(model, size=64, batch_size=2, skip_gain=None)
    stage3 = [r for r in signals if r.stage == 2]
    assert len(stage3) == 2
    # Skip gains are 0 at init: the second block is the identity on the stream.
    assert stage3[1].variance == pytest.approx(stage3[0].variance, rel=1e-9)
    assert stage3[1].residual_variance > 0


def test_model_restored_after_measurement():
    torch.manual_seed(0)
    model = build_nfnet("nano").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pools = [m.pool for m in model.modules() if isinstance(m, NFBlock)]
    signal_propagation(model, size=32, batch_size=2, shortcut_pool="subsample")
    assert model.training
    assert [m.pool for m in model.modules() if isinstance(m, NFBlock)] == pools
    assert any(isinstance(p, nn.AvgPool2d) for p in pools)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="shortcut_pool"):
        signal_propagation(model, size=32, batch_size=1, shortcut_pool="max")


def test_table_and_plot(tmp_path):
    torch.manual_seed(0)
    signals = signal_propagation(build_nfnet("nano").trunk, size=32, batch_size=2)
    table = format_spp_table(signals)
    assert len(table.splitlines()) == 1 + len(signals)
    assert "res5.0" in table
    out = tmp_path / "spp.png"
    plot_spp(signals, str(out), title="nano")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli(tmp_path, capsys):
    main = runpy.run_path(str(TOOLS / "signal_propagation.py"), run_name="cli")["main"]
    out = tmp_path / "spp.png"
    main(["--variant", "nano", "--size", "32", "--batch", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert "res2.0" in text and "avg variance" in text
    assert out.stat().st_size > 1000
