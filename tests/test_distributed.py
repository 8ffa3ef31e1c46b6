"""Cluster launchers (nfdet.distributed): the environment torchrun and srun set, read as a pure
function of a fake environment; both trainers under a real ``torchrun --nproc-per-node 2`` with
gloo on CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import REPO, free_port, write_flat_shapes

from nfdet.distributed import (
    SLURM_DEFAULT_PORT_BASE,
    LaunchEnv,
    first_slurm_host,
    launch,
    launcher_env,
    slurm_tasks_per_node,
)

SLURM = {
    "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
    "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456",
}


def test_no_launcher():
    assert launcher_env({}) is None
    assert launcher_env({"PATH": "/bin"}) is None
    # A batch script running python itself: one task, the flags decide.
    assert launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1",
                         "SLURM_NODELIST": "n1"}) is None


def test_torchrun_env():
    env = launcher_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4",
                        "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.2",
                        "MASTER_PORT": "29400"})
    assert env == LaunchEnv("torchrun", 3, 1, 4, 2, "10.0.0.2", 29400)
    assert env.init_method == "env://"


def test_torchrun_wins_over_slurm():
    env = launcher_env({**SLURM, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                        "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert env.launcher == "torchrun" and env.world_size == 2


def test_slurm_env():
    env = launcher_env(SLURM)
    # Port: the documented base plus the job id modulo 10000.
    assert env == LaunchEnv("slurm", 5, 1, 8, 4, "gpu07", SLURM_DEFAULT_PORT_BASE + 3456)
    assert env.init_method == f"tcp://gpu07:{SLURM_DEFAULT_PORT_BASE + 3456}"
    # MASTER_ADDR / MASTER_PORT override the node list and the default port; the step's own
    # variables override the job's.
    env = launcher_env({**SLURM, "MASTER_ADDR": "head", "MASTER_PORT": "7777",
                        "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
                        "SLURM_PROCID": "1", "SLURM_LOCALID": "0"})
    assert env == LaunchEnv("slurm", 1, 0, 2, 1, "head", 7777)
    no_job = {k: v for k, v in SLURM.items() if k != "SLURM_JOB_ID"}
    assert launcher_env(no_job).master_port == SLURM_DEFAULT_PORT_BASE


@pytest.mark.parametrize("nodelist,host", [
    ("node1", "node1"),
    ("node[03-05,9],gpu1", "node03"),
    ("gpu1,node[2-3]", "gpu1"),
    ("r[1-2]-n[07-08]", "r1-n07"),
    ("n[9,1-3]-ib", "n9-ib"),
])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_slurm_tasks_per_node():
    assert slurm_tasks_per_node("4(x2),3") == [4, 4, 3]
    assert slurm_tasks_per_node("2") == [2]


@pytest.mark.parametrize("change,message", [
    ({"SLURM_NTASKS": "eight"}, "SLURM_NTASKS='eight'"),
    ({"SLURM_TASKS_PER_NODE": "4,2", "SLURM_NTASKS": "6"}, "same number of tasks"),
    ({"SLURM_NODELIST": "gpu[07-08"}, "gpu[07-08"),
    ({"SLURM_PROCID": "8"}, "out of range"),
])
def test_slurm_env_errors(change, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        launcher_env({**SLURM, **change})


def test_torchrun_env_errors():
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h"}
    with pytest.raises(ValueError, match="MASTER_PORT"):
        launcher_env(env)
    with pytest.raises(ValueError, match="--standalone"):
        launcher_env({**env, "MASTER_PORT": "0"})


def test_launch_uses_flags_without_launcher():
    calls = []

    def spawn(func, n, num_machines, machine_rank, dist_url, args):
        calls.append((n, num_machines, machine_rank, dist_url, args))

    launch(print, 2, dist_url="auto", args=("x",), spawn=spawn, environ={})
    assert calls == [(2, 1, 0, "auto", ("x",))]
    # Under a launcher with one process: runs in place, spawns nothing.
    one = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "h",
           "MASTER_PORT": "1"}
    assert launch(lambda a: a * 2, 4, args=(21,), spawn=spawn, environ=one) == 42
    assert len(calls) == 1


def _torchrun(args: list[str], timeout: int = 240) -> str:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    # A session of its own: on a timeout the whole group goes (torchrun's workers included).
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        output = proc.communicate(timeout=timeout)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-5000:]
    return output


# tools/pretrain_net.py's own entry point, with a trainer that also saves each rank's weights.
PRETRAIN_DRIVER = """
import importlib
import sys

import torch

# (the package exports a function named launch too)
L = importlib.import_module("nfdet.classification.launch")


class Trainer(L.PretrainTrainer):
    def train(self, resume=False):
        out = super().train(resume)
        torch.save({"model": self.model.state_dict(), "ema": self.ema.module.state_dict(),
                    "world_size": torch.distributed.get_world_size()},
                   f"{self.cfg.OUTPUT_DIR}/rank{self.rank}.pth")
        return out


L.PretrainTrainer = Trainer
L.launch_from_args(L.pretrain_argument_parser().parse_args(sys.argv[1:]))
"""


@pytest.mark.slow
def test_torchrun_pretraining_ranks_agree(tmp_path):
    from test_pretrain_train import FULL_RECIPE

    write_flat_shapes(tmp_path / "shapes", {"train": 8, "val": 0}, size=32)
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(PRETRAIN_DRIVER))
    out = tmp_path / "out"
    # --num-gpus 1 (the default): torchrun's processes are used, none spawned. Activation
    # checkpointing on: it runs under DDP too.
    _torchrun([str(driver), "--config", "nfnet_nano_shapes.yaml",
               "DATA.ROOT", str(tmp_path / "shapes"), *FULL_RECIPE,
               "SOLVER.IMS_PER_BATCH", "8", "SOLVER.MAX_ITER", "3", "OUTPUT_DIR", str(out),
               "MODEL.NFNET.ACTIVATION_CHECKPOINT", "block"])
    r0, r1 = (torch.load(out / f"rank{r}.pth", weights_only=True) for r in range(2))
    assert r0["world_size"] == r1["world_size"] == 2
    for part in ("model", "ema"):
        for key, value in r0[part].items():
            assert torch.equal(value, r1[part][key]), (part, key)
    # Training happened: the skip gains (zero at init) moved, for the 3 logged steps.
    assert any(v.abs().sum() > 0 for k, v in r0["model"].items() if k.endswith("skip_gain"))
    assert torch.load(out / "model_final.pth", weights_only=True)["step"] == 3
    assert (out / "log.txt.rank1").exists()


@pytest.mark.slow
def test_torchrun_detection_two_processes(tiny_coco, tmp_path):
    json_path, image_dir = tiny_coco
    out = tmp_path / "out"
    _torchrun([str(REPO / "tools" / "train_net.py"),
               "--config", "quick/nfnet_nano_mask_rcnn_instant.yaml",
               "--register-coco", "tiny_train", str(json_path), str(image_dir),
               "DATASETS.TRAIN", "('tiny_train',)", "DATASETS.TEST", "()",
               "MODEL.ROI_HEADS.NUM_CLASSES", "2", "SOLVER.MAX_ITER", "2",
               "SOLVER.CHECKPOINT_PERIOD", "100", "OUTPUT_DIR", str(out)])
    log1 = (out / "log.txt.rank1").read_text()
    assert "World size: 2" in log1
    assert (out / "model_final.pth").exists()


# What each srun task runs: joins the group from SLURM's variables; detectron2's per-machine
# group must work as under detectron2's own launch.
SLURM_TASK = """
from detectron2.utils import comm

from nfdet.distributed import launch


def main():
    print("task", comm.get_rank(), comm.get_world_size(), comm.get_local_rank(),
          comm.get_local_size(), flush=True)


launch(main, 1)
"""


def test_srun_tasks_join_one_group(tmp_path):
    port = free_port()
    script = tmp_path / "task.py"
    script.write_text(textwrap.dedent(SLURM_TASK))
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))}
    base.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), SLURM_NTASKS="2",
                SLURM_TASKS_PER_NODE="1(x2)", SLURM_NODELIST="localhost",
                MASTER_PORT=str(port))
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=dict(base, SLURM_PROCID=str(r), SLURM_LOCALID="0"))
             for r in range(2)]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], outputs
    # Two "nodes" of one task each: global ranks 0 and 1, local rank 0 of 1 on each.
    assert "task 0 2 0 1" in outputs[0] and "task 1 2 0 1" in outputs[1], outputs
