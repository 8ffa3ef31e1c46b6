"""The pretraining trainer (nfdet.classification.engine): gradient accumulation gives the optimizer
step of the big batch (weights, EMA, AGC statistics) on one process and under 2-process gloo DDP
(with no all-reduce on the micro-batches that do not step); SEED -1 draws a run seed that every
stream derives from, stored in the checkpoint and reused by --resume."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from helpers import counting_allreduce, free_port, quick_pretrain_cfg, write_image_folder

from nfdet.classification import MixedBatch, PretrainTrainer
from nfdet.solver import get_agc_stats


def _folder(root: Path, per_class: int = 8, size: int = 20) -> Path:
    return write_image_folder(root, ("a", "b", "c"), per_class, size)


def _cfg(data: Path, out: Path, *opts: str):
    return quick_pretrain_cfg(
        data, out, "MODEL.NUM_CLASSES", "3", "MODEL.DROPOUT", "0.0",
        "MODEL.NFNET.DROP_PATH_RATE", "0.0", "SOLVER.IMS_PER_BATCH", "8", "SOLVER.MAX_ITER", "6",
        "SOLVER.WARMUP_EPOCHS", "0.0", "SOLVER.REFERENCE_BATCH_SIZE", "0", "SOLVER.BASE_LR", "0.5",
        "SOLVER.AGC.CLIPPING", "0.01", "SOLVER.EMA.DECAY", "0.9", "SOLVER.CHECKPOINT_PERIOD", "0",
        "LOG.PERIOD", "1", *opts,
    )


def _batches(steps: int, size: int = 8, seed: int = 1) -> list[MixedBatch]:
    """Training batches as the loader delivers them (already mixed): uint8 images, both labels
    and the ratio per example."""
    gen = torch.Generator().manual_seed(seed)
    return [MixedBatch(torch.randint(0, 256, (size, 3, 16, 16), dtype=torch.uint8, generator=gen),
                       torch.randint(0, 3, (size,), generator=gen),
                       torch.randint(0, 3, (size,), generator=gen),
                       torch.rand(size, generator=gen)) for _ in range(steps)]


def _split(batch: MixedBatch, parts: int) -> list[MixedBatch]:
    return [MixedBatch(*(t.chunk(parts)[i] for t in batch)) for i in range(parts)]


def _steps(trainer: PretrainTrainer, batches: list[MixedBatch], parts: int) -> list[float]:
    fractions = []
    for step, batch in enumerate(batches):
        trainer._set_lr(step)
        trainer.run_step(_split(batch, parts))
        fractions.append(get_agc_stats(trainer.optimizer)["agc_clipped_fraction"])
    return fractions


def _assert_same_state(a: PretrainTrainer, b: PretrainTrainer) -> None:
    for part in ("model", "ema"):
        sa = (a.model if part == "model" else a.ema.module).state_dict()
        sb = (b.model if part == "model" else b.ema.module).state_dict()
        for key, value in sa.items():
            torch.testing.assert_close(sb[key], value, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, k=key, p=part: f"{p} {k}: {m}")


def test_accumulated_micro_batches_equal_one_big_batch(tmp_path):
    data = _folder(tmp_path / "data")
    big = PretrainTrainer(_cfg(data, tmp_path / "big"))
    accum = PretrainTrainer(_cfg(data, tmp_path / "accum", "SOLVER.ACCUM_STEPS", "4"))
    assert accum.accum_steps == 4
    initial = big.model.head.fc.weight.detach().clone()
    batches = _batches(3)
    fractions_big = _steps(big, batches, 1)
    fractions_accum = _steps(accum, batches, 4)
    assert all(0 < f < 1 for f in fractions_big)  # AGC clipped some units, not all
    assert fractions_accum == pytest.approx(fractions_big, abs=1e-9)
    _assert_same_state(big, accum)
    # Weights moved: the comparison is not between two untouched models.
    assert not torch.allclose(big.model.head.fc.weight, initial)
    with pytest.raises(ValueError, match="SOLVER.ACCUM_STEPS"):
        accum.run_step(_split(batches[0], 2))


def _ddp_worker(rank: int, port: int, data: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        trainer = PretrainTrainer(_cfg(Path(data), Path(out) / f"rank{rank}",
                                       "SOLVER.ACCUM_STEPS", "2"))
        reduced = []
        trainer.ddp_model.register_comm_hook(None, counting_allreduce(reduced))
        before_second = []
        fractions = []
        for step, batch in enumerate(_batches(3)):
            # Micro-batch m of rank r is slice m * world + r of the step's 4 slices (the
            # sampler's order).
            pieces = _split(batch, 4)

            def micro(pieces=pieces):
                yield pieces[rank]
                before_second.append(len(reduced))  # after the first backward
                yield pieces[2 + rank]

            trainer._set_lr(step)
            start = len(reduced)
            trainer.run_step(micro())
            assert before_second[-1] == start  # no all-reduce on the micro-batch without a step
            assert len(reduced) > start
            fractions.append(get_agc_stats(trainer.optimizer)["agc_clipped_fraction"])
        torch.save({"model": trainer.model.state_dict(), "ema": trainer.ema.module.state_dict(),
                    "fractions": fractions}, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_accumulation_under_two_process_gloo_ddp(tmp_path):
    import torch.multiprocessing as mp

    data = _folder(tmp_path / "data")
    mp.spawn(_ddp_worker, args=(free_port(), str(data), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for part in ("model", "ema"):
        for key, value in r0[part].items():
            assert torch.equal(value, r1[part][key]), (part, key)
    # One process, one big batch per step: the same optimizer steps.
    single = PretrainTrainer(_cfg(data, tmp_path / "single"))
    fractions = _steps(single, _batches(3), 1)
    assert r0["fractions"] == pytest.approx(fractions, abs=1e-9)
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(r0["model"][key], value, rtol=1e-4, atol=1e-6)
    for key, value in single.ema.module.state_dict().items():
        torch.testing.assert_close(r0["ema"][key], value, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------ seeds
def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


# Mixing and RandAugment on: the seed drives the data order and every augmentation draw.
RECIPE = ("INPUT.MIXUP_ALPHA", "0.2", "INPUT.CUTMIX_ALPHA", "1.0", "INPUT.RANDAUGMENT.ENABLED",
          "True", "INPUT.RANDAUGMENT.NUM_OPS", "2", "INPUT.RANDAUGMENT.MAGNITUDE", "10",
          "SOLVER.IMS_PER_BATCH", "4", "SOLVER.ACCUM_STEPS", "2")


def test_seed_minus_one_draws_a_run_seed_for_every_stream(tmp_path):
    data = _folder(tmp_path / "data")
    a = PretrainTrainer(_cfg(data, tmp_path / "a", "SEED", "-1", *RECIPE))
    b = PretrainTrainer(_cfg(data, tmp_path / "b", "SEED", "-1", *RECIPE))
    assert a.seed != b.seed and a.seed >= 0
    assert a.sampler.seed == a.seed and b.sampler.seed == b.seed  # not seed 0
    for trainer in (a, b):
        trainer.sampler.set_epoch(0)
    order_a = [i for batch in a.sampler for i, _ in batch]
    order_b = [i for batch in b.sampler for i, _ in batch]
    assert order_a != order_b
    zero = PretrainTrainer(_cfg(data, tmp_path / "zero", "SEED", "0", *RECIPE))
    zero.sampler.set_epoch(0)
    assert [i for batch in zero.sampler for i, _ in batch] not in (order_a, order_b)


@pytest.mark.slow
def test_resume_uses_the_stored_seed(tmp_path):
    """A SEED -1 run interrupted at step 2 (between two optimizer steps of 2 micro-batches) and
    resumed by another SEED -1 command continues with the stored seed: its losses are those of
    an uninterrupted run with SEED set to that seed."""
    data = _folder(tmp_path / "data")
    out = tmp_path / "interrupted"
    first = PretrainTrainer(_cfg(data, out, "SEED", "-1", "SOLVER.STOP_ITER", "2", *RECIPE))
    first.train()
    seed = torch.load(out / "model_0000002.pth", weights_only=True)["seed"]
    assert seed == first.seed
    resumed = PretrainTrainer(_cfg(data, out, "SEED", "-1", *RECIPE))
    assert resumed.seed != seed  # a fresh draw, until --resume reads the checkpoint
    resumed.train(resume=True)
    assert resumed.seed == seed and resumed.sampler.seed == seed
    reference = tmp_path / "reference"
    PretrainTrainer(_cfg(data, reference, "SEED", str(seed), *RECIPE)).train()
    assert sorted(_losses(out)) == list(range(1, 7))
    assert _losses(out) == _losses(reference)  # exact
    a = torch.load(out / "model_final.pth", weights_only=True)
    b = torch.load(reference / "model_final.pth", weights_only=True)
    for key, value in b["ema"]["model"].items():
        assert torch.equal(a["ema"]["model"][key], value), key


def test_statistics_in_metrics_and_clipping_from_the_batch_size(tmp_path):
    """SOLVER.STATS_PERIOD puts the per-stage statistics into metrics.jsonl every N steps and at
    the last one; SOLVER.AGC.REFERENCE_BATCH_SIZE sets the clipping to CLIPPING * sqrt(ref / B)."""
    data = _folder(tmp_path / "data")
    out = tmp_path / "run"
    trainer = PretrainTrainer(_cfg(data, out, "SOLVER.MAX_ITER", "3", "SOLVER.STATS_PERIOD", "2",
                                   "SOLVER.AGC.REFERENCE_BATCH_SIZE", "4096"))
    expected = 0.01 * math.sqrt(4096 / 8)
    clipped = [g["agc_clipping"] for g in trainer.optimizer.param_groups
               if g.get("agc_clipping") is not None]
    assert clipped and all(c == pytest.approx(expected, rel=1e-12) for c in clipped)
    trainer.train()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = sorted(r["step"] for r in rows if "grad_ratio/res2" in r)
    assert logged == [2, 3]  # every 2 steps, and the last step
    for row in (r for r in rows if "grad_ratio/res2" in r):
        for key in ("grad_ratio/stem", "clipped_ratio/res5", "agc_clipped/res3",
                    "agc_clipped/skip_gains", "skip_gain/res4", "out_rms/res2",
                    "out_rms/final_conv", "grad_ratio/head"):
            assert key in row and math.isfinite(row[key]), (row["step"], key)
