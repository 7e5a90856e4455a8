"""Several nodes on one machine (gloo, CPU): two torchrun agents with ``--nnodes 2`` and c10d rendezvous on
127.0.0.1, and SLURM-style tasks spread over two "nodes", give exactly the run of one node with the same number of
processes."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_resume import assert_same_state
from train_utils import env_without_dist, free_port, make_image_folder, run_torchrun

ROOT = Path(__file__).resolve().parent.parent
RUNS = {
    "pretrain": ["main_pretrain.py", "--model", "mae_vit_tiny_patch4"],
    "finetune": ["main_finetune.py", "--model", "vit_tiny_patch4", "--nb_classes", "2", "--mixup", "0.8"],
}


def script_args(run: str, data: Path, out: Path) -> list[str]:
    return [
        *RUNS[run], "--data_path", str(data), "--output_dir", str(out), "--log_dir", "", "--device", "cpu",
        "--num_workers", "0", "--input_size", "32", "--batch_size", "2", "--epochs", "2", "--warmup_epochs", "1",
        "--print_freq", "1",
    ]  # fmt: skip


def spawn(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def torchrun_nodes(argv: list[str], env: dict | None = None, *flags: str) -> list[subprocess.Popen]:
    """Two torchrun agents, one process each: ``--nnodes 2`` with c10d rendezvous on 127.0.0.1."""
    port = free_port()
    return [
        spawn(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={i}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=test",
                *flags,
                *argv,
            ],
            env or env_without_dist(),
        )  # fmt: skip
        for i in range(2)
    ]


def slurm_tasks(argv: list[str], per_node: int, nodes: str, **env) -> list[subprocess.Popen]:
    """``srun``'s tasks: SLURM_PROCID, SLURM_LOCALID and SLURM_NODEID for ``per_node`` tasks on each node of the
    comma-separated ``nodes`` (names that resolve here; the first is the rendezvous host)."""
    n = per_node * len(nodes.split(","))
    base = {k: v for k, v in env_without_dist().items() if not k.startswith(("SLURM_", "MASTER_", "TORCHELASTIC"))}
    base.update(SLURM_NTASKS=str(n), SLURM_JOB_NODELIST=nodes, SLURM_JOB_ID="1", **env)
    ids = [{"SLURM_PROCID": str(r), "SLURM_LOCALID": str(r % per_node), "SLURM_NODEID": str(r // per_node)}
           for r in range(n)]  # fmt: skip
    port = free_port()  # --port: MASTER_PORT of every task, as in the official MixMIM launches
    return [spawn([sys.executable, *argv, "--port", str(port)], {**base, **i}) for i in ids]


def wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    results = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                os.killpg(q.pid, signal.SIGKILL)
            raise AssertionError("a node did not finish") from None
        results.append((p.returncode, err))
    return results


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def one_node(run: str, data: Path, out: Path, nproc: int) -> dict:
    proc = run_torchrun(script_args(run, data, out), cwd=ROOT, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load(out / "checkpoint-last.pth")


@pytest.mark.parametrize("run", RUNS)
def test_two_torchrun_nodes_equal_one_node(tmp_path: Path, run: str) -> None:
    data = make_image_folder(tmp_path / "data", per_class=8, val_per_class=2)
    expected = one_node(run, data, tmp_path / "one", nproc=2)
    for code, err in wait_all(torchrun_nodes(script_args(run, data, tmp_path / "two"))):
        assert code == 0, err[-3000:]
    assert_same_state(expected, load(tmp_path / "two" / "checkpoint-last.pth"))


def test_slurm_tasks_on_two_nodes_equal_one_node(tmp_path: Path) -> None:
    """srun with two tasks per node on two nodes (SLURM_PROCID 0-3, SLURM_LOCALID 0,1,0,1, SLURM_NODEID 0,0,1,1)."""
    data = make_image_folder(tmp_path / "data", per_class=8)
    expected = one_node("pretrain", data, tmp_path / "one", nproc=4)
    tasks = slurm_tasks(script_args("pretrain", data, tmp_path / "two"), 2, "localhost,127.0.0.1", SLURM_NNODES="2")
    for code, err in wait_all(tasks):
        assert code == 0, err[-3000:]
    assert_same_state(expected, load(tmp_path / "two" / "checkpoint-last.pth"))


def test_torchrun_restarts_both_nodes_after_a_rank_is_killed_and_resumes(tmp_path: Path) -> None:
    """Rank 1 (the second node's) is SIGKILLed in epoch 1; the agents restart the group (--max-restarts), which
    resumes from epoch 0's checkpoint and ends with the uninterrupted run's weights."""
    data = make_image_folder(tmp_path / "data", per_class=8)
    expected = one_node("pretrain", data, tmp_path / "one", nproc=2)
    two, marker = tmp_path / "two", tmp_path / "fired"
    env = {**env_without_dist(), "MAE_FAULT_INJECT": "step:5@rank1", "MAE_FAULT_INJECT_ONCE": str(marker)}
    results = wait_all(
        torchrun_nodes(script_args("pretrain", data, two), env, "--max-restarts=1", "--monitor-interval=0.2")
    )
    for code, err in results:
        assert code == 0, err[-3000:]
    assert marker.exists()
    err = "".join(e for _, e in results)
    assert "SIGKILL at step 5" in err and "continuing at epoch 1" in err
    assert_same_state(expected, load(two / "checkpoint-last.pth"))


@pytest.mark.parametrize("fault", ["step", "stop"], ids=["rank-dies", "rank-hangs"])
def test_a_lost_rank_stops_the_others_with_one_line(tmp_path: Path, fault: str) -> None:
    """Two SLURM tasks; rank 1 dies (SIGKILL) or hangs (SIGSTOP) at step 3. Rank 0 does not wait forever: it stops
    at once (the connection breaks) or after --dist_timeout (0.1 min), with one line naming the problem."""
    data = make_image_folder(tmp_path / "data", per_class=8)
    argv = [*script_args("pretrain", data, tmp_path / "out"), "--dist_timeout", "0.1"]
    tasks = slurm_tasks(argv, 2, "127.0.0.1", MAE_FAULT_INJECT=f"{fault}:3@rank1")
    try:
        _, err = tasks[0].communicate(timeout=120)
    finally:
        for t in tasks:
            if t.poll() is None:
                os.killpg(t.pid, signal.SIGKILL)
        tasks[1].communicate()
    assert tasks[0].returncode == 1
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert line and "a collective with the other processes failed" in line[0], err[-3000:]
    assert "Traceback" not in err
    if fault == "stop":
        assert "imed out" in line[0]
