"""Distributed setup from a SLURM ``srun`` environment: two CPU tasks find each other and all-reduce (gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from train_utils import free_port

ROOT = Path(__file__).resolve().parent.parent

TASK = """
import argparse, json, sys
import torch
import torch.distributed as dist
from util.dist import init_distributed_mode, cleanup
args = argparse.Namespace(device="cpu", port=int(sys.argv[1]), dist_url="env://")
init_distributed_mode(args)
t = torch.tensor([float(args.rank + 1)])
dist.all_reduce(t)
print(json.dumps({"rank": args.rank, "world_size": args.world_size, "local_rank": args.local_rank,
                  "backend": args.dist_backend, "sum": t.item(), "distributed": args.distributed}))
cleanup()
"""


def test_slurm_tasks_join_one_process_group():
    port = free_port()
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM_")
    }
    base.update(SLURM_NTASKS="2", SLURM_JOB_NODELIST="127.0.0.1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TASK, str(port)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**base, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
        )
        for rank in range(2)
    ]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert [o["rank"] for o in outs] == [0, 1]
    assert [o["local_rank"] for o in outs] == [0, 1]
    for o in outs:
        assert o["world_size"] == 2 and o["distributed"] and o["backend"] == "gloo"
        assert o["sum"] == 3.0  # 1 + 2: both tasks are in one group
