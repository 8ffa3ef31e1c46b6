"""The AGC batch-size sweep (nfdet.classification.sweep, tools/agc_sweep.py) on generated images
at nano scale: the grid's table and plot, the learning rate of every cell, reuse of finished
cells, --force keeping the old cells, a diverged run recorded as diverged, and one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from helpers import run_tool, write_flat_shapes
from PIL import Image

from nfdet.classification.sweep import SweepError, run_sweep
from nfdet.config import ConfigError

CONFIG = "nfnet_nano_shapes.yaml"
# 16 px, 1 epoch of 64 images, no progress bar or TensorBoard: about a second per cell.
OPTS = ["INPUT.TRAIN_SIZE", "16", "INPUT.TEST_SIZE", "16", "LOG.PERIOD", "1",
        "LOG.PROGRESS_BAR", "False", "LOG.TENSORBOARD", "False"]
BATCHES, CLIPPINGS = [8, 16], [0.05, None]
BASE_LR, REFERENCE = 0.02, 8


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """``root/{train,val}/<shape>/*.png``: 16 training and 4 validation images per class."""
    return write_flat_shapes(tmp_path_factory.mktemp("shapes"), {"train": 16, "val": 4}, size=16)


def _opts(shapes: Path, *extra: str) -> list[str]:
    return ["DATA.ROOT", str(shapes), *OPTS, *extra]


def _sweep(shapes: Path, out: Path, batches=BATCHES, clippings=CLIPPINGS, base_lr=BASE_LR,
           epochs=1, **kwargs) -> list[dict]:
    return run_sweep(CONFIG, _opts(shapes), batches, clippings, out, base_lr=base_lr,
                     reference_batch=REFERENCE, epochs=epochs, **kwargs)


def _table(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def grid(shapes, tmp_path_factory) -> Path:
    """The 2 x 2 sweep: batch 8 and 16, clipping 0.05 and AGC off."""
    out = tmp_path_factory.mktemp("grid")
    _sweep(shapes, out)
    return out


def test_grid_writes_table_and_plot_with_the_linear_lr(grid):
    rows = _table(grid)
    assert [(int(r["batch"]), r["clipping"]) for r in rows] == [
        (8, "0.05"), (8, "none"), (16, "0.05"), (16, "none")]
    for row in rows:
        batch = int(row["batch"])
        # The paper's rule, restated: lr = base x B / reference.
        assert float(row["lr"]) == pytest.approx(BASE_LR * batch / REFERENCE)
        # Equal epochs: 64 training images, so 64 / B steps.
        assert int(row["steps"]) == 64 // batch
        assert row["diverged"] == "no"
        assert 0.0 <= float(row["top1"]) <= 100.0 and 0.0 <= float(row["ema_top1"]) <= 100.0
        assert float(row["seconds"]) > 0
    md = (grid / "results.md").read_text().splitlines()
    assert md[0].startswith("| batch | clipping | lr | steps | top-1 | EMA top-1 | diverged |")
    assert len(md) == 2 + 4
    png = grid / "agc_sweep.png"
    assert png.stat().st_size > 0
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 200 and image.height > 100


def test_each_cell_trains_with_its_batch_and_clipping_as_given(grid):
    for name, batch, enabled, clipping in (("b8_clip0.05", 8, True, 0.05),
                                           ("b16_noclip", 16, False, None)):
        solver = yaml.safe_load((grid / name / "config.yaml").read_text())["SOLVER"]
        assert solver["IMS_PER_BATCH"] == batch
        # nfdet's batch rule for the clipping is off in every cell.
        assert solver["AGC"]["REFERENCE_BATCH_SIZE"] == 0
        assert solver["AGC"]["ENABLED"] is enabled
        if clipping is not None:
            assert solver["AGC"]["CLIPPING"] == clipping
        result = json.loads((grid / name / "cell_result.json").read_text())
        assert result["clipping_used"] == clipping
        lines = [json.loads(x) for x in (grid / name / "metrics.jsonl").read_text().splitlines()]
        assert lines[-1]["step"] == 64 // batch and "val/top1" in lines[-1]


def test_rerun_reuses_finished_cells(grid, shapes):
    before = {p: p.stat().st_mtime_ns for p in grid.glob("*/*") if p.is_file()}
    table = (grid / "results.csv").read_text()
    records = _sweep(shapes, grid)
    assert len(records) == 4
    after = {p: p.stat().st_mtime_ns for p in grid.glob("*/*") if p.is_file()}
    assert after == before  # no cell trained again: not a file of a cell folder touched
    assert (grid / "results.csv").read_text() == table


def test_changed_settings_are_an_error_naming_the_cell(grid, shapes):
    table = (grid / "results.md").read_text()
    with pytest.raises(SweepError, match=r"cell b8_clip0.05: .* other settings \(epochs: 1, "
                                         r"now 2\)"):
        _sweep(shapes, grid, epochs=2)
    assert (grid / "results.md").read_text() == table


def test_force_reruns_and_keeps_the_previous_cell(shapes, tmp_path):
    out = tmp_path / "force"
    first = _sweep(shapes, out, batches=[8], clippings=[0.05])[0]
    second = _sweep(shapes, out, batches=[8], clippings=[0.05], force=True)[0]
    kept = out / "b8_clip0.05.replaced-1" / "cell_result.json"
    assert json.loads(kept.read_text()) == first
    assert (out / "b8_clip0.05" / "metrics.jsonl").is_file()
    # Same seed, data and settings: the run is repeated exactly.
    assert second["top1"] == first["top1"] and second["steps"] == first["steps"]
    assert len(_table(out)) == 1  # the moved-aside folder is not a cell of the table


def test_an_interrupted_cell_resumes_from_its_checkpoint(shapes, tmp_path):
    out = tmp_path / "resume"
    first = _sweep(shapes, out, batches=[16], clippings=[0.05])[0]
    cell = out / "b16_clip0.05"
    # As if killed after the final checkpoint, before the result was written.
    (cell / "cell_result.json").unlink()
    rows = (cell / "metrics.jsonl").read_text().splitlines()
    final = (cell / "model_final.pth").read_bytes()
    # Continuing it with another learning rate is refused, and touches nothing.
    with pytest.raises(SweepError, match=r"b16_clip0\.05: .* other settings \(base_lr: "):
        _sweep(shapes, out, batches=[16], clippings=[0.05], base_lr=2 * BASE_LR)
    assert (cell / "model_final.pth").read_bytes() == final
    assert (cell / "metrics.jsonl").read_text().splitlines() == rows
    again = _sweep(shapes, out, batches=[16], clippings=[0.05])[0]
    assert "Resumed from" in (cell / "log.txt").read_text()
    new_rows = [json.loads(x) for x in (cell / "metrics.jsonl").read_text().splitlines()]
    # No step trained again: only the final evaluation is appended, with the same accuracy.
    assert [sorted(r) for r in new_rows[len(rows):]] == [sorted(json.loads(rows[-1]))]
    assert again["top1"] == first["top1"] and again["ema_top1"] == first["ema_top1"]


def test_diverged_runs_are_recorded_and_the_sweep_goes_on(shapes, tmp_path):
    out = tmp_path / "diverged"
    # lr 1e5 x B / 8 without clipping: the loss is not finite within a few steps.
    records = _sweep(shapes, out, clippings=[None], base_lr=1e5)
    assert [r["batch"] for r in records] == [8, 16]
    rows = _table(out)
    assert [r["diverged"] for r in rows] == ["yes", "yes"]
    for row, record in zip(rows, records):
        assert row["top1"] == "" and row["ema_top1"] == ""
        assert 1 <= int(row["diverged_step"]) <= int(row["steps"])
        assert "diverged" in record["message"]
    assert "| yes (step" in (out / "results.md").read_text()
    with Image.open(out / "agc_sweep.png") as image:
        assert image.format == "PNG"


def test_a_failing_cell_stops_the_sweep_naming_it(shapes, tmp_path):
    out = tmp_path / "fails"
    opts = _opts(shapes, "MODEL.WEIGHTS", str(tmp_path / "missing.pth"))
    with pytest.raises(SweepError) as info:
        run_sweep(CONFIG, opts, [8], [0.05], out, base_lr=BASE_LR, reference_batch=REFERENCE,
                  epochs=1)
    message = str(info.value)
    assert message.startswith("cell b8_clip0.05 (batch 8, clipping 0.05) failed: ")
    assert "missing.pth" in message and "\n" not in message


def test_sweep_keys_and_step_budgets_are_refused(shapes, tmp_path):
    with pytest.raises(ConfigError, match="SOLVER.IMS_PER_BATCH is set by the sweep"):
        run_sweep(CONFIG, _opts(shapes, "SOLVER.IMS_PER_BATCH", "4"), [8], [None], tmp_path)
    with pytest.raises(ConfigError, match="SOLVER.MAX_ITER"):
        run_sweep(CONFIG, _opts(shapes, "SOLVER.MAX_ITER", "3"), [8], [None], tmp_path)
    with pytest.raises(ConfigError, match="DATA.VAL_SPLIT"):
        run_sweep(CONFIG, _opts(shapes, "DATA.VAL_SPLIT", ""), [8], [None], tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flags, message", [
    (["--batch-sizes", "8,abc"], "batch size 'abc' is not an integer >= 1"),
    (["--clipping", "0.01,big"], "clipping 'big' is neither a number > 0 nor 'none'"),
    (["--config", "nfnet_nano_shape.yaml"], "Config 'nfnet_nano_shape.yaml' is neither a file"),
    (["SOLVER.BASE_LRR", "1"], "unknown config key SOLVER.BASE_LRR. Did you mean SOLVER.BASE_LR?"),
])
def test_cli_bad_argument_is_one_line(shapes, tmp_path, capsys, flags, message):
    import importlib.util

    from helpers import TOOLS

    spec = importlib.util.spec_from_file_location("agc_sweep_tool", TOOLS / "agc_sweep.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = {"--config": CONFIG, "--batch-sizes": "8,16", "--clipping": "0.05,none",
            "--out": str(tmp_path / "out")}
    opts = []
    for i in range(0, len(flags), 2):
        if flags[i].startswith("--"):
            args[flags[i]] = flags[i + 1]
        else:
            opts += flags[i:i + 2]
    argv = [x for kv in args.items() for x in kv] + ["DATA.ROOT", str(shapes), *opts]
    with pytest.raises(SystemExit) as exit_info:
        tool.main(argv)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("agc_sweep") and message in last, last
    assert not (tmp_path / "out").exists()


def test_cli_runs_as_a_script(tmp_path):
    proc = run_tool("agc_sweep.py", "--config", CONFIG, "--batch-sizes", "abc", "--clipping",
                    "none", "--out", tmp_path / "out", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "agc_sweep.py: error: batch size 'abc' is not an integer >= 1")
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cells_in_two_gloo_processes(shapes, tmp_path):
    # --num-gpus 2 without a GPU: each cell is two CPU processes (gloo), started per cell.
    out = tmp_path / "ddp"
    records = _sweep(shapes, out, batches=[16], clippings=[0.05, None], num_gpus=2)
    assert [r["clipping"] for r in records] == [0.05, None]
    for record in records:
        assert record["lr"] == pytest.approx(BASE_LR * 16 / REFERENCE)
        assert record["steps"] == 64 // 16 and not record["diverged"]
        assert record["top1"] is not None
        assert (out / Path(record["output_dir"]).name / "log.txt.rank1").is_file()
    assert len(_table(out)) == 2


def test_without_epochs_the_cells_train_the_configs_epochs(grid, shapes):
    # nfnet_nano_shapes.yaml trains 30 epochs: without --epochs the cells are those of epochs=30,
    # which the grid's cells (epochs=1) are not.
    with pytest.raises(SweepError, match="epochs: 1, now 30"):
        run_sweep(CONFIG, _opts(shapes), BATCHES, CLIPPINGS, grid, base_lr=BASE_LR,
                  reference_batch=REFERENCE)
