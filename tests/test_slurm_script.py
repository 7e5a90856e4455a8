"""scripts/slurm_pretrain.sbatch run as SLURM runs it: a copy in a spool folder, started in the folder it was submitted
from, with SLURM's variables (a compressed node list, two nodes of one task), and stand-ins for ``srun`` (runs the
tasks here with SLURM_PROCID / SLURM_LOCALID / SLURM_NODEID) and ``scontrol`` (records its calls) on PATH. A tiny
model on the CPU, appended to the recipe's flags."""

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from train_utils import env_without_dist, free_port, make_image_folder

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "slurm_pretrain.sbatch"
JOB_ID = "4242"
TINY = ["--model", "mae_vit_tiny_patch4", "--input_size", "32", "--batch_size", "2", "--epochs", "1",
        "--warmup_epochs", "0", "--device", "cpu", "--num_workers", "0", "--print_freq", "1"]  # fmt: skip

SRUN = r"""#!/bin/bash
# srun: SLURM_NTASKS tasks, SLURM_NTASKS_PER_NODE per node, all run here; exits with the highest task status.
# SRUN_EXIT=N: run nothing, exit with N.
echo "srun $*" >> "$SLURM_CALLS"
[ -n "${SRUN_EXIT:-}" ] && exit "$SRUN_EXIT"
while [[ $1 == -* ]]; do shift; done  # srun's own options
pids=()
for ((rank = 0; rank < SLURM_NTASKS; rank++)); do
    SLURM_PROCID=$rank SLURM_LOCALID=$((rank % SLURM_NTASKS_PER_NODE)) \
        SLURM_NODEID=$((rank / SLURM_NTASKS_PER_NODE)) SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid"
    s=$?
    ((s > status)) && status=$s
done
exit $status
"""

SCONTROL = r"""#!/bin/bash
# scontrol: records its calls; 'show job' gives the path of the script that was submitted, as SLURM records it.
echo "scontrol $*" >> "$SLURM_CALLS"
if [ "$1 $2" = "show job" ] && [ -n "${SUBMITTED_SCRIPT:-}" ]; then
    echo "JobId=$3 JobName=mae_pretrain"
    echo "   Command=$SUBMITTED_SCRIPT $SUBMITTED_ARGS"
    echo "   WorkDir=$SLURM_SUBMIT_DIR"
fi
"""


def tool(folder: Path, name: str, text: str) -> None:
    path = folder / name
    path.write_text(text)
    path.chmod(0o755)


def sbatch(tmp_path: Path, *extra: str, spool: bool = True, **env: str) -> tuple[subprocess.CompletedProcess, list]:
    """Run the script with bash as sbatch and slurmd would (``spool``: a copy in a spool folder, started in the
    submission folder with the job's variables; else the file itself, outside SLURM): data and job folder given
    relative to the submission folder, ``extra`` appended. Returns the process and the calls of srun and scontrol."""
    submit, bin_dir = tmp_path / "submit", tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tool(bin_dir, "srun", SRUN)
    tool(bin_dir, "scontrol", SCONTROL)
    if not (submit / "data").exists():
        make_image_folder(submit / "data", per_class=4, val_per_class=0)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    args = ["data", "job", *TINY, "--port", str(free_port()), *extra]
    base = {k: v for k, v in env_without_dist().items() if not k.startswith(("SLURM_", "MASTER_", "MAE_"))}
    base.update(PATH=f"{bin_dir}{os.pathsep}{base['PATH']}", SLURM_CALLS=str(calls))
    script = SCRIPT
    if spool:
        script = tmp_path / "spool" / f"job{JOB_ID}" / "slurm_script"
        script.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SCRIPT, script)
        nodes = "127.0.0.[1-2]"  # the first host is the rendezvous host
        base.update(
            SLURM_JOB_ID=JOB_ID, SLURM_JOBID=JOB_ID, SLURM_JOB_NAME="mae_pretrain", SLURM_SUBMIT_DIR=str(submit),
            SLURM_JOB_NODELIST=nodes, SLURM_NODELIST=nodes, SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2",
            SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SUBMITTED_SCRIPT=str(SCRIPT), SUBMITTED_ARGS=" ".join(args),
        )  # fmt: skip
    proc = subprocess.Popen(
        ["bash", str(script), *args],
        cwd=submit,
        env={**base, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the job script timed out:\n{err[-3000:]}") from None
    lines = calls.read_text().splitlines() if calls.exists() else []
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), lines


def python_and_script() -> str:
    """What the script should run: the repository's venv Python (else python3) on main_pretrain.py, by full path."""
    venv = ROOT / ".venv" / "bin" / "python"
    return f"{venv if venv.exists() else 'python3'} -u {ROOT}/main_pretrain.py"


def test_a_finished_run_writes_its_checkpoint_and_is_not_requeued(tmp_path: Path) -> None:
    proc, calls = sbatch(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "submit" / "job" / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 0 and "step" not in ckpt
    assert (tmp_path / "submit" / "job" / "log.txt").exists()
    # the repository came from SLURM's record of the submitted script; the tiny flags follow the recipe's
    assert calls[0] == f"scontrol show job {JOB_ID}"
    assert calls[1].startswith(f"srun --kill-on-bad-exit=1 {python_and_script()} --model mae_vit_large_patch16 ")
    assert f" --resume auto --save_every_min 30 {' '.join(TINY)} --port " in calls[1]
    assert not [c for c in calls if c.startswith("scontrol requeue")]


def test_exit_status_3_requeues_the_job(tmp_path: Path) -> None:
    """Both ranks are sent SIGUSR1 before their first step (as at the time limit): they checkpoint after it and exit
    with status 3, and the script requeues its job."""
    proc, calls = sbatch(tmp_path, MAE_FAULT_INJECT="signal:0")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "preempted: stopped on SIGUSR1" in proc.stderr
    ckpt = torch.load(tmp_path / "submit" / "job" / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (0, 1)
    assert [c for c in calls if c.startswith("scontrol requeue")] == [f"scontrol requeue {JOB_ID}"]


@pytest.mark.parametrize("status", [0, 1, 2, 3, 137])
def test_only_status_3_requeues(tmp_path: Path, status: int) -> None:
    """The status srun returns (here without running tasks) decides alone, and is the script's own: a finished run
    (0), a usage error or a lost rank (1), a task killed (137) are not requeued."""
    proc, calls = sbatch(tmp_path, SRUN_EXIT=str(status))
    assert proc.returncode == status
    assert [c for c in calls if c.startswith("scontrol requeue")] == ([f"scontrol requeue {JOB_ID}"] * (status == 3))


def test_the_repository_from_mae_repo_or_the_script_itself(tmp_path: Path) -> None:
    """MAE_REPO wins; run with plain bash outside SLURM, the script finds the repository from its own path; with
    neither, nor SLURM's record of the submitted script, it stops with one line."""
    proc, calls = sbatch(tmp_path, MAE_REPO=str(ROOT), SUBMITTED_SCRIPT="", SRUN_EXIT="0")
    assert proc.returncode == 0 and calls[0].startswith(f"srun --kill-on-bad-exit=1 {python_and_script()} ")

    proc, calls = sbatch(tmp_path, spool=False, SRUN_EXIT="0")
    assert proc.returncode == 0 and calls[0].startswith(f"srun --kill-on-bad-exit=1 {python_and_script()} ")

    proc, calls = sbatch(tmp_path, SUBMITTED_SCRIPT="", SRUN_EXIT="0")
    assert proc.returncode == 1 and calls == [f"scontrol show job {JOB_ID}"]
    assert proc.stderr.strip().splitlines() == [
        "error: cannot find the repository (no main_pretrain.py in ''): submit with MAE_REPO=/path/to/it"
    ]

    proc, calls = sbatch(tmp_path, MAE_REPO=str(tmp_path), SRUN_EXIT="0")
    assert proc.returncode == 1 and calls == [] and f"no main_pretrain.py in '{tmp_path}'" in proc.stderr
