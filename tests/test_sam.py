"""Sharpness-Aware Minimization in the pretraining trainer (nfdet.solver.sam, docs/sam.md).

The reference steps here are written from the definition (Foret et al. 2021, Algorithm 1, with
the NFNet paper's ascent on a share of the same batch, per process): the ascent gradient of the
mean loss on the examples the test names (ceil(fraction x n) of them, spread evenly), e = rho g /
||g|| over all parameters, the descent gradient at w + e on all examples (averaged over the
processes), then AGC per unit, weight decay and Nesterov SGD from w, and the weight EMA. Nothing
of nfdet computes them.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import counting_allreduce, free_port, quick_pretrain_cfg, write_image_folder

from nfdet.classification import MixedBatch, PretrainTrainer
from nfdet.classification.config import load_pretrain_cfg
from nfdet.config import ConfigError
from nfdet.solver import ascent_indices, ascent_size, get_agc_stats, sam_perturb_, sam_restore_

NUM_CLASSES = 3
SMOOTHING = 0.1
BASE_LR = 0.5
WEIGHT_DECAY = 2e-5
MOMENTUM = 0.9
CLIPPING, AGC_EPS = 0.01, 1e-3
EMA_DECAY = 0.9
MAX_ITER = 6
RHO = 0.5  # large, so that the perturbation changes the update far beyond the tolerances


def _folder(root: Path) -> Path:
    return write_image_folder(root, ("a", "b", "c"), 8, 20)


def _cfg(data: Path, out: Path, *opts: str):
    return quick_pretrain_cfg(
        data, out, "MODEL.NUM_CLASSES", str(NUM_CLASSES), "MODEL.DROPOUT", "0.0",
        "MODEL.NFNET.DROP_PATH_RATE", "0.0", "SOLVER.IMS_PER_BATCH", "8",
        "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.WARMUP_EPOCHS", "0.0",
        "SOLVER.REFERENCE_BATCH_SIZE", "0", "SOLVER.BASE_LR", str(BASE_LR),
        "SOLVER.WEIGHT_DECAY", str(WEIGHT_DECAY), "SOLVER.AGC.CLIPPING", str(CLIPPING),
        "SOLVER.EMA.DECAY", str(EMA_DECAY), "SOLVER.CHECKPOINT_PERIOD", "0", "LOG.PERIOD", "1",
        *opts,
    )


def _batches(steps: int, size: int = 8, seed: int = 1) -> list[MixedBatch]:
    """Mixed training batches as the loader delivers them."""
    gen = torch.Generator().manual_seed(seed)
    return [MixedBatch(torch.randint(0, 256, (size, 3, 16, 16), dtype=torch.uint8, generator=gen),
                       torch.randint(0, NUM_CLASSES, (size,), generator=gen),
                       torch.randint(0, NUM_CLASSES, (size,), generator=gen),
                       torch.rand(size, generator=gen)) for _ in range(steps)]


def _split(batch: MixedBatch, parts: int) -> list[MixedBatch]:
    return [MixedBatch(*(t.chunk(parts)[i] for t in batch)) for i in range(parts)]


def _take(batch: MixedBatch, positions: list[int]) -> MixedBatch:
    return MixedBatch(*(t[positions] for t in batch))


def _cat(batches: list[MixedBatch]) -> MixedBatch:
    return MixedBatch(*(torch.cat(ts) for ts in zip(*batches)))


def _open_skip_gains(model: torch.nn.Module) -> None:
    """Deterministic non-zero skip gains (at init they are 0 and the blocks' convs would get no
    gradient); the same on every process."""
    with torch.no_grad():
        gains = [p for n, p in model.named_parameters() if n.endswith("skip_gain")]
        for i, p in enumerate(gains):
            p.fill_(0.3 + 0.1 * (i % 5))


def _trainer(cfg) -> PretrainTrainer:
    trainer = PretrainTrainer(cfg)
    _open_skip_gains(trainer.model)
    return trainer


# --------------------------------------------------------------------------- the reference
def _loss(model: torch.nn.Module, batch: MixedBatch) -> torch.Tensor:
    """Mean cross-entropy of the examples with their mixed, smoothed soft targets."""
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    x = (batch.images.float() - mean) / std
    r = batch.ratio[:, None]
    y = r * F.one_hot(batch.labels, NUM_CLASSES) + (1 - r) * F.one_hot(batch.mix_labels,
                                                                      NUM_CLASSES)
    y = (1 - SMOOTHING) * y + SMOOTHING / NUM_CLASSES
    return F.cross_entropy(model(x), y)


def _agc(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """AGC by its definition, one unit at a time (one unit for tensors of squeezed rank <= 1,
    else one per index of dim 0)."""
    g = g.clone()
    units = [(w, g)] if w.squeeze().dim() <= 1 else [(w[i], g[i]) for i in range(w.shape[0])]
    for w_i, g_i in units:
        max_norm = torch.linalg.vector_norm(w_i).clamp_min(AGC_EPS) * CLIPPING
        g_norm = torch.linalg.vector_norm(g_i)
        if g_norm > max_norm:
            g_i.mul_(max_norm / g_norm.clamp_min(1e-6))
    return g


def _lr(step: int) -> float:
    # No warmup, cosine from BASE_LR to 0 over MAX_ITER steps.
    return BASE_LR * 0.5 * (1 + math.cos(math.pi * step / MAX_ITER))


def reference_steps(model: torch.nn.Module, ema: dict[str, torch.Tensor],
                    steps: list[list[list[MixedBatch]]], rho: float,
                    ascent_positions: list[int]) -> tuple[dict, list[list[float]]]:
    """Run SAM steps on ``model`` (in place) by the definition.

    Args:
        model: the weights w (updated in place).
        ema: the EMA state at the start (updated in place).
        steps: per step, per process, its micro-batches.
        rho: SAM's radius (0: the plain step).
        ascent_positions: the ascent examples' positions in every micro-batch.

    Returns:
        (ema, per step the ||g|| of every process)
    """
    named = list(model.named_parameters())
    params = [p for _, p in named]
    buffers: list[torch.Tensor | None] = [None] * len(params)
    norms = []
    for t, processes in enumerate(steps):
        w = [p.detach().clone() for p in params]
        descents, step_norms = [], []
        for micro_batches in processes:
            if rho > 0:
                ascent = _cat([_take(b, ascent_positions) for b in micro_batches])
                g = torch.autograd.grad(_loss(model, ascent), params)
                norm = torch.sqrt(sum(gi.pow(2).sum() for gi in g))
                step_norms.append(float(norm))
                with torch.no_grad():
                    for p, gi in zip(params, g):
                        p.add_(rho * gi / norm)
            descents.append(torch.autograd.grad(_loss(model, _cat(micro_batches)), params))
            with torch.no_grad():
                for p, w_i in zip(params, w):
                    p.copy_(w_i)
        norms.append(step_norms)
        with torch.no_grad():
            for i, (name, p) in enumerate(named):
                g = sum(d[i] for d in descents) / len(descents)
                if name != "head.fc.weight":
                    g = _agc(w[i], g)
                if not name.endswith(("gain", "bias")):
                    g = g + WEIGHT_DECAY * w[i]
                buffers[i] = g.clone() if buffers[i] is None else MOMENTUM * buffers[i] + g
                p.copy_(w[i] - _lr(t) * (g + MOMENTUM * buffers[i]))
            decay = min(EMA_DECAY, (1 + t) / (10 + t))
            for key, value in model.state_dict().items():
                ema[key] = decay * ema[key] + (1 - decay) * value
    return ema, norms


def _assert_state(model_state: dict, ema_state: dict, model: torch.nn.Module, ema: dict,
                  rtol: float = 1e-4, atol: float = 1e-6) -> None:
    for key, value in model.state_dict().items():
        torch.testing.assert_close(model_state[key], value, rtol=rtol, atol=atol,
                                   msg=lambda m, k=key: f"model {k}: {m}")
    for key, value in ema.items():
        torch.testing.assert_close(ema_state[key], value, rtol=rtol, atol=atol,
                                   msg=lambda m, k=key: f"ema {k}: {m}")


def _max_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ------------------------------------------------------------------------------------ tests
def test_ascent_size_rounds_up_and_keeps_at_least_one():
    assert [ascent_size(n, 0.2) for n in (1, 4, 5, 6, 10, 11)] == [1, 1, 1, 2, 2, 3]
    assert ascent_size(10, 0.3) == 3  # 0.3 * 10 is 3.0000000000000004 in floating point
    assert ascent_size(8, 1.0) == 8 and ascent_size(8, 0.01) == 1


def test_ascent_examples_are_spread_over_the_batch():
    # A mixed batch holds MixUp examples first, CutMix second: both halves are sampled.
    assert ascent_indices(10, 0.2).tolist() == [0, 5]
    assert ascent_indices(8, 0.25).tolist() == [0, 4]
    assert ascent_indices(10, 0.3).tolist() == [0, 3, 6]
    assert ascent_indices(5, 0.2).tolist() == [0]
    assert ascent_indices(4, 1.0).tolist() == [0, 1, 2, 3]


def test_perturbation_divides_out_the_gradient_scale_and_restores_exactly():
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(4, 3, generator=gen, requires_grad=True),
              torch.randn(5, generator=gen, requires_grad=True),
              torch.randn((), generator=gen, requires_grad=True),
              torch.randn(2, generator=gen, requires_grad=True)]  # no gradient: not perturbed
    grads = [torch.randn(p.shape, generator=gen) for p in params[:3]]
    before = [p.detach().clone() for p in params]
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    scale = 1024.0
    for p, g in zip(params, grads):
        p.grad = g * scale
    perturbation = sam_perturb_(params, 0.05, grad_scale=torch.tensor(scale))
    assert float(perturbation.grad_norm) == pytest.approx(norm, rel=1e-6)  # the unscaled norm
    for p, b, g in zip(params, before, grads):
        torch.testing.assert_close(p.detach(), b + 0.05 * g / norm, rtol=1e-6, atol=1e-7)
    assert torch.equal(params[3].detach(), before[3])
    sam_restore_(perturbation)
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


def test_overflowing_ascent_gradient_leaves_the_weights_finite():
    params = [torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)]
    params[0].grad = torch.tensor([1.0, float("inf"), 2.0])
    params[1].grad = torch.tensor([float("nan"), 1.0])
    perturbation = sam_perturb_(params, 0.05, grad_scale=torch.tensor(65536.0),
                                zero_if_nonfinite=True)
    assert not math.isfinite(float(perturbation.grad_norm))
    assert all(torch.equal(p.detach(), torch.ones_like(p)) for p in params)  # e = 0


def test_sam_step_equals_the_definition(tmp_path):
    """Two SAM steps through the trainer (one process, ascent on examples 0 and 4 of 8) equal the
    steps written out by hand, and differ clearly from plain steps."""
    data = _folder(tmp_path / "data")
    trainer = _trainer(_cfg(data, tmp_path / "sam", "SOLVER.SAM.RHO", str(RHO),
                            "SOLVER.SAM.ASCENT_FRACTION", "0.25"))
    model = copy.deepcopy(trainer.model)
    ema = {k: v.clone() for k, v in trainer.ema.module.state_dict().items()}
    batches = _batches(2)
    results = []
    for step, batch in enumerate(batches):
        trainer._set_lr(step)
        results.append(trainer.run_step([batch]))
        assert 0 < get_agc_stats(trainer.optimizer)["agc_clipped_fraction"] < 1
    plain_model = copy.deepcopy(model)
    ema, norms = reference_steps(model, ema, [[[b]] for b in batches], RHO, [0, 4])
    _assert_state(trainer.model.state_dict(), trainer.ema.module.state_dict(), model, ema)
    for result, (norm,) in zip(results, norms):
        assert float(result.ascent_grad_norm) == pytest.approx(norm, rel=1e-4)
    # The same steps without the perturbation land far from these weights.
    reference_steps(plain_model, {k: v.clone() for k, v in ema.items()},
                    [[[b]] for b in batches], 0.0, [])
    assert _max_difference(plain_model.state_dict(), model.state_dict()) > 100 * 1e-4


def test_rho_zero_is_the_plain_step_and_the_default(tmp_path):
    data = _folder(tmp_path / "data")
    assert load_pretrain_cfg(None, []).SOLVER.SAM.RHO == 0.0
    trainer = _trainer(_cfg(data, tmp_path / "plain", "SOLVER.SAM.ASCENT_FRACTION", "0.5",
                            "SOLVER.ACCUM_STEPS", "2"))
    model = copy.deepcopy(trainer.model)
    ema = {k: v.clone() for k, v in trainer.ema.module.state_dict().items()}
    forwards = []
    trainer.model.register_forward_hook(lambda *args: forwards.append(1))
    batches = _batches(2)
    for step, batch in enumerate(batches):
        trainer._set_lr(step)
        result = trainer.run_step(iter(_split(batch, 2)))  # consumed as it arrives
        assert result.ascent_grad_norm is None and result.ascent_loss is None
    assert len(forwards) == 4  # one forward per micro-batch: no ascent pass
    ema, _ = reference_steps(model, ema, [[_split(b, 2)] for b in batches], 0.0, [])
    _assert_state(trainer.model.state_dict(), trainer.ema.module.state_dict(), model, ema)


def test_accumulated_sam_equals_the_big_batch(tmp_path):
    """With SOLVER.ACCUM_STEPS k the ascent uses ceil(f n) examples spread over every micro-batch
    of n; when f n is a whole number these are the examples a k-times larger batch spreads its
    ascent over, so one SAM step of k micro-batches equals one SAM step of the big batch."""
    data = _folder(tmp_path / "data")
    sam = ("SOLVER.SAM.RHO", str(RHO), "SOLVER.SAM.ASCENT_FRACTION", "0.5")
    big = _trainer(_cfg(data, tmp_path / "big", *sam))
    accum = _trainer(_cfg(data, tmp_path / "accum", "SOLVER.ACCUM_STEPS", "4", *sam))
    # Control: the same examples, each micro-batch's two swapped (another ascent set).
    swapped = _trainer(_cfg(data, tmp_path / "swapped", *sam))
    swap = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])
    for step, batch in enumerate(_batches(3)):
        results, fractions = [], []
        for trainer, batches in ((big, [batch]), (accum, _split(batch, 4)),
                                 (swapped, [MixedBatch(*(t[swap] for t in batch))])):
            trainer._set_lr(step)
            results.append(trainer.run_step(batches))
            fractions.append(get_agc_stats(trainer.optimizer)["agc_clipped_fraction"])
        assert fractions[1] == pytest.approx(fractions[0], abs=1e-9)
        for field in ("loss", "correct", "ascent_grad_norm", "ascent_loss"):
            torch.testing.assert_close(getattr(results[1], field).double(),
                                       getattr(results[0], field).double(), rtol=1e-5, atol=1e-6)
    # atol 1e-5: the micro-batches sum in another order (float32 noise ~1e-7), and the large
    # rho carries that noise through a second forward/backward at w + e (up to 2.3e-6 seen with
    # two threads). The control below differs by more than 1e-2.
    _assert_state(accum.model.state_dict(), accum.ema.module.state_dict(), big.model,
                  big.ema.module.state_dict(), atol=1e-5)
    assert _max_difference(swapped.model.state_dict(), big.model.state_dict()) > 100 * 1e-4


def test_float16_grad_scaler_does_not_reach_the_perturbation(tmp_path):
    """float16 AMP's GradScaler (here on CPU, float32 gradients): the ascent gradient carries the
    scale, e and the logged ||g|| do not; the weights match a step without a scaler."""
    data = _folder(tmp_path / "data")
    sam = ("SOLVER.SAM.RHO", str(RHO), "SOLVER.SAM.ASCENT_FRACTION", "0.25")
    plain = _trainer(_cfg(data, tmp_path / "plain", *sam))
    scaled = _trainer(_cfg(data, tmp_path / "scaled", *sam))
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for step, batch in enumerate(_batches(2)):
        results = []
        for trainer in (plain, scaled):
            trainer._set_lr(step)
            results.append(trainer.run_step([batch]))
        assert float(results[1].ascent_grad_norm) == pytest.approx(
            float(results[0].ascent_grad_norm), rel=1e-5)
    _assert_state(scaled.model.state_dict(), scaled.ema.module.state_dict(), plain.model,
                  plain.ema.module.state_dict(), rtol=1e-5, atol=1e-7)


def _losses(out: Path) -> dict[int, tuple]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["sam/ascent_grad_norm"], r["sam/ascent_loss"])
            for r in rows if "loss" in r}


def test_sam_under_bfloat16_autocast_tracks_float32(tmp_path):
    """The SAM step under bfloat16 autocast (the GPU default; on CPU set by hand, since CPU runs
    are float32) stays close to the float32 SAM step and far from the plain bfloat16 step: the
    perturbation is applied and undone in float32 weights, whatever the forward's precision."""
    data = _folder(tmp_path / "data")
    sam = ("SOLVER.SAM.RHO", str(RHO), "SOLVER.SAM.ASCENT_FRACTION", "0.5")
    runs = {}
    for name, dtype, opts in (("fp32", None, sam), ("bf16", torch.bfloat16, sam),
                              ("plain_bf16", torch.bfloat16, ())):
        trainer = _trainer(_cfg(data, tmp_path / name, *opts))
        trainer.amp_dtype = dtype
        start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        for step, batch in enumerate(_batches(2)):
            trainer._set_lr(step)
            result = trainer.run_step([batch])
            assert torch.isfinite(result.loss)
        state = trainer.model.state_dict()
        assert all(v.dtype == start[k].dtype and bool(torch.isfinite(v).all())
                   for k, v in state.items())
        runs[name] = {k: state[k] - start[k] for k in state if state[k].is_floating_point()}
    err = _max_difference(runs["bf16"], runs["fp32"])
    sam_effect = _max_difference(runs["plain_bf16"], runs["fp32"])
    assert err < 0.2 * sam_effect, (err, sam_effect)


def test_resume_with_sam_is_exact(tmp_path):
    """A SAM run (dropout and stochastic depth on: the ascent pass draws masks too) stopped
    between two optimizer steps and resumed equals the uninterrupted run, bit for bit."""
    data = _folder(tmp_path / "data")
    opts = ("MODEL.DROPOUT", "0.2", "MODEL.NFNET.DROP_PATH_RATE", "0.2", "SOLVER.MAX_ITER", "4",
            "SOLVER.IMS_PER_BATCH", "4", "SOLVER.ACCUM_STEPS", "2", "SOLVER.SAM.RHO", "0.1",
            "SOLVER.SAM.ASCENT_FRACTION", "0.5")
    out, reference = tmp_path / "interrupted", tmp_path / "reference"
    PretrainTrainer(_cfg(data, out, "SOLVER.STOP_ITER", "2", *opts)).train()
    assert (out / "model_0000002.pth").exists()
    PretrainTrainer(_cfg(data, out, *opts)).train(resume=True)
    PretrainTrainer(_cfg(data, reference, *opts)).train()
    losses = _losses(reference)
    assert sorted(losses) == [1, 2, 3, 4]
    assert all(math.isfinite(v) and v > 0 for row in losses.values() for v in row)
    assert _losses(out) == losses  # exact: losses and the ascent statistics
    a = torch.load(out / "model_final.pth", weights_only=True)
    b = torch.load(reference / "model_final.pth", weights_only=True)
    for part in ("model", "ema"):
        state_a = a[part] if part == "model" else a[part]["model"]
        state_b = b[part] if part == "model" else b[part]["model"]
        for key, value in state_b.items():
            assert torch.equal(state_a[key], value), (part, key)


# ------------------------------------------------------------------------- 2 processes, gloo
def _ddp_worker(rank: int, port: int, data: str, out: str) -> None:
    import torch.distributed as dist

    import nfdet.classification.engine as engine

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        trainer = _trainer(_cfg(Path(data), Path(out) / f"rank{rank}", "SOLVER.ACCUM_STEPS", "2",
                                "SOLVER.SAM.RHO", str(RHO), "SOLVER.SAM.ASCENT_FRACTION", "0.5"))
        initial = {"model": copy.deepcopy(trainer.model.state_dict()),
                   "ema": copy.deepcopy(trainer.ema.module.state_dict())}
        reduced: list[int] = []
        trainer.ddp_model.register_comm_hook(None, counting_allreduce(reduced))
        # Watch (not replace) the perturbation: the all-reduces so far and the ascent gradient.
        seen = []
        perturb = engine.sam_perturb_

        def watching_perturb(params, *args, **kwargs):
            params = list(params)
            seen.append((len(reduced), [p.grad.clone() for p in params]))
            return perturb(params, *args, **kwargs)

        engine.sam_perturb_ = watching_perturb
        starts, norms = [], []
        for step, batch in enumerate(_batches(2)):
            pieces = _split(batch, 4)  # micro-batch m of rank r: piece 2 m + r (sampler order)
            trainer._set_lr(step)
            starts.append(len(reduced))
            result = trainer.run_step([pieces[rank], pieces[2 + rank]])
            norms.append(float(result.ascent_grad_norm))
        torch.save({"model": trainer.model.state_dict(), "ema": trainer.ema.module.state_dict(),
                    "initial": initial, "starts": starts, "ends": len(reduced),
                    "at_perturbation": [count for count, _ in seen],
                    "first_ascent_grad": seen[0][1], "norms": norms},
                   os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_sam_perturbs_locally_and_stays_in_sync(tmp_path):
    """2 gloo processes, 2 micro-batches each: nothing is all-reduced before the perturbation;
    each process's ascent gradient is the one of its own examples (so the perturbations differ);
    the descent gradients are averaged, and both processes end with the weights of the steps
    written out by hand."""
    import torch.multiprocessing as mp

    data = _folder(tmp_path / "data")
    mp.spawn(_ddp_worker, args=(free_port(), str(data), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for part in ("model", "ema"):
        for key, value in ranks[0][part].items():
            assert torch.equal(value, ranks[1][part][key]), (part, key)
    for r in ranks:
        assert r["at_perturbation"] == r["starts"]  # the ascent is never all-reduced
        assert r["ends"] > r["starts"][-1]  # the descent is
    assert ranks[0]["norms"][0] != pytest.approx(ranks[1]["norms"][0], rel=1e-3)

    model = nano_from(ranks[0]["initial"]["model"], data, tmp_path)
    params = list(model.parameters())
    batches = _batches(2)
    steps = []
    for batch in batches:
        pieces = _split(batch, 4)
        steps.append([[pieces[0], pieces[2]], [pieces[1], pieces[3]]])
    # Each process's first ascent gradient is its own examples' (the first of each micro-batch).
    for rank, micro in enumerate(steps[0]):
        local = torch.autograd.grad(_loss(model, _cat([_take(b, [0]) for b in micro])), params)
        for got, want in zip(ranks[rank]["first_ascent_grad"], local):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    ema, norms = reference_steps(model, dict(ranks[0]["initial"]["ema"]), steps, RHO, [0])
    _assert_state(ranks[0]["model"], ranks[0]["ema"], model, ema)
    for rank in range(2):
        assert ranks[rank]["norms"] == pytest.approx([n[rank] for n in norms], rel=1e-4)


def nano_from(state: dict, data: Path, tmp_path: Path) -> torch.nn.Module:
    """The trainer's classifier (architecture from the test config) with the weights ``state``."""
    from nfdet.classification.engine import build_pretrain_model

    model = build_pretrain_model(_cfg(data, tmp_path / "reference_model"))
    model.load_state_dict(state)
    return model.train()


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("key, value", [
    ("SOLVER.SAM.RHO", "-0.05"),
    ("SOLVER.SAM.RHO", "1e999"),
    ("SOLVER.SAM.RHO", "'large'"),
    ("SOLVER.SAM.ASCENT_FRACTION", "0.0"),
    ("SOLVER.SAM.ASCENT_FRACTION", "1.5"),
    ("SOLVER.SAM.ASCENT_FRACTION", "[0.2]"),
])
def test_bad_sam_values_give_one_line_errors(key, value):
    with pytest.raises(ConfigError) as info:
        load_pretrain_cfg(None, [key, value])
    message = str(info.value)
    assert key in message and "\n" not in message


def test_finetune_config_uses_the_papers_rho():
    cfg = load_pretrain_cfg("nfnet_f0_finetune_imagenet.yaml", [])
    assert cfg.SOLVER.SAM.RHO == 0.05 and cfg.SOLVER.SAM.ASCENT_FRACTION == 0.2
