"""Signal propagation plots (SPPs; Brock et al. 2021a, "Characterizing signal propagation to close
the performance gap in unnormalized ResNets").

At initialisation, feed a unit Gaussian batch through the trunk and record, after every residual
block, the average channel squared mean and the average channel variance of the residual stream
(plus the variance of the residual branch before it is scaled by ``skip_gain * alpha``).

Skip gains: NFNets initialise ``skip_gain`` to 0, so at init every identity block passes its
input through unchanged and the stream is driven by the stage-transition shortcuts only (flat
within a stage). The paper's SPPs are drawn for NF-ResNets whose branches are active, where the
variance grows by ``alpha**2`` per block and is reset at every transition: the behaviour the
``beta``/``alpha`` bookkeeping is designed for. :func:`signal_propagation` therefore sets every
skip gain to 1 for the measurement by default (``skip_gain=1.0``; restored afterwards); pass
``skip_gain=None`` to measure the model exactly as initialised.

NF-ResNets (``nf_resnet*`` variants) have the strided 1x1 conv shortcut of the SPP paper and no
squeeze-excite: the measurement needs no substitution for them (``shortcut_pool`` changes
nothing, as their blocks have no pool).

Average-pool shortcuts: NFNets downsample the transition shortcut with a 2x2 average pool (the
ResNet-D shortcut), while the NF-ResNets of the SPP paper used a strided 1x1 conv. On a unit
Gaussian input the features are nearly uncorrelated across space, so the pool divides the variance
of the shortcut by ~4 at every stride-2 transition (tests/test_signal_propagation.py checks it on
F0). That is a property of white-noise
input, not of the ``beta`` bookkeeping, which assumes spatially correlated signals such as natural
images. ``shortcut_pool="subsample"`` replaces the pool by strided subsampling (2x2 stride 2 taking
the top-left element; same output size) during the measurement, which shows the designed
behaviour: ~1 + alpha**2 after the first block of every stage, + alpha**2 per block after that.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .nfnet import NFBlock, NFNet, NFNetTrunk

__all__ = ["BlockSignal", "signal_propagation", "format_spp_table", "plot_spp"]


@dataclass
class BlockSignal:
    """Statistics of the residual stream after one block.

    Args:
        name (str): e.g. "res3.0".
        stage (int): stage index (0..3).
        index (int): block index inside the stage.
        expected_var (float): the variance the beta/alpha bookkeeping predicts for the stream
            (``1 + (k + 1) * alpha**2`` after the k-th block of a stage with active branches).
        squared_mean (float): average over channels of the squared channel mean.
        variance (float): average over channels of the channel variance.
        residual_variance (float): the same for the residual branch output (before the skip gain
            and ``alpha``).
    """

    name: str
    stage: int
    index: int
    expected_var: float
    squared_mean: float
    variance: float
    residual_variance: float


class _Subsample(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., ::2, ::2]


def _channel_stats(x: torch.Tensor) -> tuple[float, float]:
    x = x.double()
    mean = x.mean(dim=(0, 2, 3))
    var = x.var(dim=(0, 2, 3), unbiased=False)
    return float((mean**2).mean()), float(var.mean())


def _gaussian_input(trunk: NFNetTrunk, inputs: torch.Tensor | None, size: int,
                    batch_size: int, seed: int) -> torch.Tensor:
    """``inputs``, or a seeded unit Gaussian batch, on the trunk's device and dtype."""
    param = next(trunk.parameters())
    if inputs is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        inputs = torch.randn(batch_size, trunk.stem.conv1.in_channels, size, size, generator=gen)
    return inputs.to(device=param.device, dtype=param.dtype)


def _nf_blocks(trunk: NFNetTrunk) -> list[tuple[int, int, NFBlock]]:
    """(stage index, block index, block) of every residual block, in forward order."""
    return [(s, b, block)
            for s, stage in enumerate(trunk.stages)
            for b, block in enumerate(stage)
            if isinstance(block, NFBlock)]


@contextmanager
def _recording(blocks: list[tuple[int, int, NFBlock]]) -> Iterator[dict[int, dict[str, float]]]:
    """Hooks that fill ``records[i]`` with the stream and branch statistics of block ``i``."""
    records: dict[int, dict[str, float]] = {}
    handles = []
    for i, (_, _, block) in enumerate(blocks):

        # The branch before skip_gain * alpha is no module's output: rebuild it from conv3's
        # output and the squeeze-excite gate (with hooks, blocks run their plain code). Without
        # squeeze-excite (NF-ResNets) conv3's output is the branch.
        def on_conv3(_module, _args, out, i=i, has_se=block.se is not None):
            if has_se:
                records.setdefault(i, {})["_conv3"] = out
            else:
                records.setdefault(i, {})["residual_variance"] = _channel_stats(out)[1]

        def on_gate(_module, _args, gate, i=i):
            branch = records[i].pop("_conv3") * (2.0 * gate)
            records[i]["residual_variance"] = _channel_stats(branch)[1]

        def on_block(_module, _args, out, i=i):
            sq, var = _channel_stats(out)
            records.setdefault(i, {}).update(squared_mean=sq, variance=var)

        handles.append(block.conv3.register_forward_hook(on_conv3))
        if block.se is not None:
            handles.append(block.se.register_forward_hook(on_gate))
        handles.append(block.register_forward_hook(on_block))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _measurement_setup(trunk: NFNetTrunk, blocks: list[tuple[int, int, NFBlock]],
                       skip_gain: float | None, shortcut_pool: str) -> Iterator[None]:
    """Eval mode, the measured skip gains and shortcut pools; the model as it was afterwards."""
    was_training = trunk.training
    saved = [(block.skip_gain.detach().clone(), block.pool) for _, _, block in blocks]
    try:
        trunk.eval()
        for _, _, block in blocks:
            if shortcut_pool == "subsample" and block.pool is not None:
                block.pool = _Subsample()
            if skip_gain is not None:
                block.skip_gain.fill_(skip_gain)
        yield
    finally:
        for (_, _, block), (value, pool) in zip(blocks, saved):
            block.skip_gain.copy_(value)
            block.pool = pool
        trunk.train(was_training)


@torch.no_grad()
def signal_propagation(
    model: nn.Module,
    inputs: torch.Tensor | None = None,
    size: int = 224,
    batch_size: int = 8,
    skip_gain: float | None = 1.0,
    shortcut_pool: str = "avg",
    seed: int = 0,
) -> list[BlockSignal]:
    """Measure the signal propagation of an NFNet (or NF-ResNet) on a unit Gaussian input.

    Args:
        model (nn.Module): an ``NFNet`` or ``NFNetTrunk`` (used in eval mode; its mode, and its
            skip gains, are restored afterwards).
        inputs (Tensor | None): the input batch; by default ``batch_size`` unit Gaussian images of
            ``size`` x ``size`` (on the model's device).
        size (int): input resolution when ``inputs`` is None.
        batch_size (int): batch size when ``inputs`` is None.
        skip_gain (float | None): value every ``skip_gain`` is set to during the measurement
            (default 1: branches active, as in the paper's SPPs); None keeps the model's values.
        shortcut_pool (str): "avg" (the model as built) or "subsample" (strided subsampling in
            the transition shortcuts during the measurement; see the module docstring).
        seed (int): seed of the generated input.

    Returns:
        list[BlockSignal]: one entry per residual block, in forward order.
    """
    trunk = model.trunk if isinstance(model, NFNet) else model
    if not isinstance(trunk, NFNetTrunk):
        raise TypeError(f"expected an NFNet or NFNetTrunk, got {type(model).__name__}")
    if shortcut_pool not in ("avg", "subsample"):
        raise ValueError(f"shortcut_pool must be 'avg' or 'subsample', got {shortcut_pool!r}")
    inputs = _gaussian_input(trunk, inputs, size, batch_size, seed)
    blocks = _nf_blocks(trunk)
    with _recording(blocks) as records, _measurement_setup(trunk, blocks, skip_gain,
                                                           shortcut_pool):
        trunk.forward_stages(inputs)
    # With active branches, the k-th block of a stage should leave variance 1 + (k + 1) alpha^2.
    return [BlockSignal(name=f"res{s + 2}.{b}", stage=s, index=b,
                        expected_var=(1.0 + (b + 1) * block.alpha**2 if skip_gain == 1.0
                                      else float("nan")),
                        **records[i])
            for i, (s, b, block) in enumerate(blocks)]


def format_spp_table(signals: list[BlockSignal]) -> str:
    """Render the measurements as a fixed-width text table."""
    lines = [
        f"{'block':>8} {'avg sq. mean':>13} {'avg variance':>13} {'expected var':>13} "
        f"{'branch var':>11}"
    ]
    for r in signals:
        lines.append(
            f"{r.name:>8} {r.squared_mean:13.4f} {r.variance:13.4f} {r.expected_var:13.4f} "
            f"{r.residual_variance:11.4f}"
        )
    return "\n".join(lines)


def plot_spp(signals: list[BlockSignal], path: str, title: str = "") -> None:
    """Draw the signal propagation plot (three panels, one point per block) to a PNG file.

    Needs matplotlib (the Agg backend is used; no display required).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = list(range(1, len(signals) + 1))
    panels = [
        ("Avg. channel squared mean", [r.squared_mean for r in signals]),
        ("Avg. channel variance", [r.variance for r in signals]),
        ("Residual branch avg. channel variance", [r.residual_variance for r in signals]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    starts = [i + 1 for i, r in enumerate(signals) if r.index == 0]
    for ax, (label, values) in zip(axes, panels):
        ax.plot(depth, values, marker="o", markersize=3)
        for x in starts:
            ax.axvline(x, color="0.85", linewidth=0.8, zorder=0)
        ax.set_xlabel("residual block")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
