"""Distributed setup from a SLURM ``srun`` environment: SLURM's compressed node lists, and two CPU tasks that find
each other through one and all-reduce (gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_utils import free_port

from util.dist import expand_nodelist, slurm_master_addr
from util.errors import UsageError

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


# Expected lists written by hand from SLURM's hostlist rules (scontrol show hostnames): a range is as wide as its first
# number, brackets in one name combine with the first varying slowest, commas inside brackets separate ranges.
NODELISTS = {
    "node01": ["node01"],
    "node[01-04]": ["node01", "node02", "node03", "node04"],
    "node[8-11]": ["node8", "node9", "node10", "node11"],
    "node[08-11]": ["node08", "node09", "node10", "node11"],
    "node[098-101]": ["node098", "node099", "node100", "node101"],
    "node[1,3,5-7]": ["node1", "node3", "node5", "node6", "node7"],
    "node[7,1-2]": ["node7", "node1", "node2"],  # SLURM's order is the list's order
    "node[1,01-02]": ["node1", "node01", "node02"],
    "a[1-2],b3": ["a1", "a2", "b3"],
    "b3,a[1-2],c": ["b3", "a1", "a2", "c"],
    "rack[1-2]-node[01-02]": ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"],
    "r[1,3]n[1-2]x[5]": ["r1n1x5", "r1n2x5", "r3n1x5", "r3n2x5"],
    "gpu-a100-[1-2].cluster.org": ["gpu-a100-1.cluster.org", "gpu-a100-2.cluster.org"],
    "login-1.example.com,cn[9-10]": ["login-1.example.com", "cn9", "cn10"],
    "[1-2]x": ["1x", "2x"],
    "10.0.0.[7-8]": ["10.0.0.7", "10.0.0.8"],
}

MALFORMED = {  # the list -> the reason the error line gives
    "": "an empty host name (a comma at an end, or two in a row)",
    "a,": "an empty host name (a comma at an end, or two in a row)",
    "a,,b": "an empty host name (a comma at an end, or two in a row)",
    "node[01-08": "'[' without ']'",
    "node01-08]": "']' without '['",
    "node[1-[2]]": "'[' inside brackets",
    "node[]": "'' in [] is neither a number nor a range a-b",
    "node[a-b]": "'a-b' in [a-b] is neither a number nor a range a-b",
    "node[1,,2]": "'' in [1,,2] is neither a number nor a range a-b",
    "node[-1]": "'-1' in [-1] is neither a number nor a range a-b",
    "node[1-2-3]": "'1-2-3' in [1-2-3] is neither a number nor a range a-b",
    "node[3-1]": "range '3-1' goes down",
    "node[0-99999999]": "range '0-99999999' has more than 65536 hosts",
    "node 1": "white space in 'node 1'",
}


@pytest.mark.parametrize("nodelist", NODELISTS)
def test_expand_nodelist(nodelist: str) -> None:
    assert expand_nodelist(nodelist) == NODELISTS[nodelist]


@pytest.mark.parametrize("nodelist", MALFORMED)
def test_a_malformed_nodelist_is_one_usage_error_line(nodelist: str) -> None:
    with pytest.raises(UsageError) as e:
        expand_nodelist(nodelist)
    assert str(e.value) == f"malformed SLURM node list {nodelist!r}: {MALFORMED[nodelist]}"


def test_the_rendezvous_host_is_the_first_node_of_the_step() -> None:
    """srun's tasks run on the step's nodes, task 0 on the first; a step may use only part of the job's nodes."""
    job = {"SLURM_JOB_NODELIST": "gpu[03-08]", "SLURM_NODELIST": "gpu[03-08]"}
    assert slurm_master_addr(job) == "gpu03"
    assert slurm_master_addr({**job, "SLURM_STEP_NODELIST": "gpu[05-06]"}) == "gpu05"
    assert slurm_master_addr({"SLURM_NODELIST": "c[2-3]"}) == "c2"
    assert slurm_master_addr({}) == "127.0.0.1"


def test_slurm_tasks_join_one_process_group():
    port = free_port()
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM_")
    }
    # compressed, as SLURM writes it: the first host, 127.0.0.1, is the rendezvous host
    base.update(SLURM_NTASKS="2", SLURM_JOB_NODELIST="127.0.0.[1-2]", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
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
