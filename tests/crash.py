"""Crash injection for the kill-and-resume tests of both trainers (test_detection_train.py,
test_pretrain_train.py): a ``tools/`` script run in a subprocess under test-only patches, killed
with SIGKILL inside a checkpoint save or at a chosen moment, and the per-step rows of its logs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import REPO, TOOLS

# Runs a tools/ script after two test-only patches (nothing of this exists in nfdet itself):
# - NFDET_TEST_KILL_IN_SAVE=N: the torch.save of the training checkpoint of iteration/step N
#   writes half of its bytes, flushes them to disk and SIGKILLs its own process;
# - NFDET_TEST_LOSS_LOG=FILE: detectron2's per-iteration losses (before metrics.json's median
#   smoothing) are appended to FILE as JSON lines.
WRAPPER = r'''
import io, json, os, runpy, signal, sys
import torch

kill_at = os.environ.get("NFDET_TEST_KILL_IN_SAVE")
_save = torch.save

def save(obj, f, *args, **kwargs):
    if kill_at is not None and isinstance(obj, dict) and hasattr(f, "write") and \
            obj.get("iteration", obj.get("step")) == int(kill_at):
        buffer = io.BytesIO()
        _save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(obj, f, *args, **kwargs)

torch.save = save

loss_log = os.environ.get("NFDET_TEST_LOSS_LOG")
if loss_log:
    from detectron2.engine.train_loop import SimpleTrainer

    _write_metrics = SimpleTrainer.write_metrics

    def write_metrics(loss_dict, data_time, cur_iter, prefix=""):
        row = {k: v.detach().cpu().item() for k, v in loss_dict.items()}
        with open(loss_log, "a") as out:
            out.write(json.dumps({"iteration": cur_iter, **row}) + "\n")
        return _write_metrics(loss_dict, data_time, cur_iter, prefix)

    SimpleTrainer.write_metrics = staticmethod(write_metrics)

script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''


def start_with_faults(tmp_path: Path, script: str, args: list[str],
                      **env_extra: str) -> subprocess.Popen:
    """Start ``tools/<script>`` under ``WRAPPER`` (one thread), its output to a log file under
    ``tmp_path``; ``env_extra`` sets ``NFDET_TEST_KILL_IN_SAVE`` / ``NFDET_TEST_LOSS_LOG``."""
    wrapper = tmp_path / "run_with_faults.py"
    wrapper.write_text(WRAPPER)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **env_extra)
    log_path = tmp_path / f"output_{len(list(tmp_path.glob('output_*.txt')))}.txt"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(wrapper), str(TOOLS / script), *args],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    proc.log_path = log_path
    return proc


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    """Wait for ``proc``: (return code, its whole output)."""
    rc = proc.wait(timeout=timeout)
    return rc, proc.log_path.read_text()


def run_with_faults(tmp_path: Path, script: str, args: list[str], **env: str) -> tuple[int, str]:
    """``start_with_faults`` and ``finish``: (return code, output)."""
    return finish(start_with_faults(tmp_path, script, args, **env))


def kill_when(proc: subprocess.Popen, ready, delay: float, timeout: float = 240) -> None:
    """SIGKILL ``proc`` ``delay`` seconds after ``ready()`` first holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before the moment it was to be killed at"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def last_checkpoint_pointer(out: Path) -> str:
    """The content of ``out/last_checkpoint`` ("" when there is none)."""
    try:
        return (out / "last_checkpoint").read_text().strip()
    except FileNotFoundError:
        return ""


def rows_by_step(rows: list[dict], step_key: str, keys: list[str]) -> dict[int, dict]:
    """One row per step; a step logged twice (redone after a kill) must have equal values."""
    by_step: dict[int, dict] = {}
    for row in rows:
        values = {k: row[k] for k in keys}
        step = row[step_key]
        assert by_step.setdefault(step, values) == values, (step, by_step[step], values)
    return by_step
