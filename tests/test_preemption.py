"""Checkpoints inside an epoch and preemption (util/preemption.py): a run stopped at a step and resumed there ends
with exactly the weights and optimizer state of the uninterrupted run (CPU, deterministic)."""

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train_resume import assert_same_state
from train_utils import env_without_dist, make_image_folder, parse, run_torchrun, tiny_run_args

import main_finetune
import main_pretrain
from util.errors import Preempted, UsageError
from util.preemption import REPEAT_WINDOW_S, REQUEUE_EXIT_CODE, SIGNALS, EpochControl

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4  # 16 images, batch 4: steps per epoch

RUNS = {  # script, flags, the global step (of 2 epochs x 4) before which the process signals itself
    "mae": (main_pretrain, dict(model="mae_vit_tiny_patch4"), 5),
    # MixMIM: masks and mixing
    "mixmim": (main_pretrain, dict(model="mixmim_tiny", mask_ratio=0.5), 1),
    # RandAugment, random erasing, mixup/CutMix (numpy), drop path
    "finetune-mixup": (
        main_finetune,
        dict(model="vit_tiny_patch4", nb_classes=2, mixup=0.8, cutmix=1.0, drop_path=0.1),
        4,
    ),
    # the images' augmentation comes from two DataLoader workers, whose batches move after a resume
    "mae-workers": (main_pretrain, dict(model="mae_vit_tiny_patch4", num_workers=2), 5),
    # at an epoch's last step the epoch's own checkpoint is the one
    "mae-epoch-end": (main_pretrain, dict(model="mae_vit_tiny_patch4"), 3),
}


@pytest.fixture(autouse=True)
def default_signal_handlers():
    yield
    SIGNALS.uninstall()


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("run", RUNS)
def test_a_signal_inside_an_epoch_then_resume_gives_the_uninterrupted_run(tmp_path, monkeypatch, run) -> None:
    script, extra, step = RUNS[run]
    data = make_image_folder(tmp_path / "data", per_class=8)
    flags = dict(epochs=2, warmup_epochs=1, **extra)
    straight = tmp_path / "straight"
    script.main(parse(script.get_args_parser(), **tiny_run_args(data, straight, **flags)))

    out = tmp_path / "interrupted"
    monkeypatch.setenv("MAE_FAULT_INJECT", f"signal:{step}")  # SIGUSR1 to itself before that step
    args = parse(script.get_args_parser(), **tiny_run_args(data, out, print_freq=2, **flags))
    with pytest.raises(Preempted):
        script.main(args)
    ckpt = load(out / "checkpoint-last.pth")
    # the ranks agree at the next progress line (every 2 steps) and stop after it; at an epoch's last step the
    # epoch's own checkpoint is the one
    epoch, in_epoch = divmod(step, STEPS)
    if in_epoch % 2 == 1 and in_epoch != STEPS - 1:  # progress lines at in-epoch steps 0, 2 and the last (3)
        in_epoch += 1
    if in_epoch == STEPS - 1:
        assert ckpt["epoch"] == epoch and "step" not in ckpt
    else:
        assert (ckpt["epoch"], ckpt["step"]) == (epoch, in_epoch + 1)
        assert len(ckpt["rng"]) == 1 and set(ckpt["rng"][0]) == {"torch", "cuda", "numpy", "python"}

    monkeypatch.delenv("MAE_FAULT_INJECT")
    if "step" in ckpt:  # a position inside an epoch holds only for the same processes and batches
        other = parse(script.get_args_parser(), **tiny_run_args(data, out, resume="auto", **flags, batch_size=2))
        with pytest.raises(UsageError, match="was written inside epoch .* 'batch_size': 4.*'batch_size': 2"):
            script.main(other)
    resumed = parse(script.get_args_parser(), **tiny_run_args(data, out, resume="auto", **flags))
    script.main(resumed)
    assert_same_state(load(straight / "checkpoint-last.pth"), load(out / "checkpoint-last.pth"))


def test_save_every_steps_then_a_kill_resumes_at_that_step(tmp_path) -> None:
    """--save_every_steps 2 writes checkpoint-last.pth after update step 2 (and at the epoch's end); a SIGKILL at
    step 3 loses only step 2's work, and the resumed run ends as the uninterrupted one. All three runs are
    processes with the same thread count (float sums depend on it)."""
    data = make_image_folder(tmp_path / "data", per_class=8)

    def run(out: Path, fault: str = "", *extra: str) -> subprocess.CompletedProcess:
        argv = []
        for k, v in tiny_run_args(
            data, out, model="mae_vit_tiny_patch4", epochs=1, warmup_epochs=0, save_every_steps=2
        ).items():
            argv += [f"--{k}", str(v)]
        env = {**env_without_dist(), **({"MAE_FAULT_INJECT": fault} if fault else {})}
        return subprocess.run(
            [sys.executable, "main_pretrain.py", *argv, *extra],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    straight, out = tmp_path / "straight", tmp_path / "out"
    assert run(straight).returncode == 0
    proc = run(out, "step:3")
    assert proc.returncode == -9, proc.stderr[-3000:]
    ckpt = load(out / "checkpoint-last.pth")
    assert (ckpt["epoch"], ckpt["step"]) == (0, 2)
    proc = run(out, "", "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "continuing epoch 0 at step 2" in proc.stderr
    assert_same_state(load(straight / "checkpoint-last.pth"), load(out / "checkpoint-last.pth"))


class Saves:
    def __init__(self):
        self.steps: list[int] = []

    def __call__(self, step: int, rng: list) -> None:
        self.steps.append(step)


def test_the_agreed_flags_checkpoint_at_the_next_update_step(monkeypatch) -> None:
    """With --accum_iter 2 a request seen after micro-step 0 is served after micro-step 1 (the update); a stop
    raises after its checkpoint; --save_every_min counts on rank 0's clock."""
    import argparse

    import util.preemption as preemption

    saves = Saves()
    control = EpochControl(
        argparse.Namespace(accum_iter=2, save_every_min=1.0, save_every_steps=0, output_dir="out"), saves
    )
    clock = [1000.0]
    monkeypatch.setattr(preemption.time, "monotonic", lambda: clock[0])
    control.last_save = clock[0]
    assert control.local_flags() == [0.0, 0.0]
    clock[0] += 61
    assert control.local_flags() == [0.0, 1.0]  # a minute has passed
    control.agree([0.0, 1.0])
    control.after_step(0, update=False, steps=8)
    assert saves.steps == []
    control.after_step(1, update=True, steps=8)
    assert saves.steps == [2]  # the next step to run
    assert control.local_flags() == [0.0, 0.0]  # the clock restarted at the save
    control.agree([1.0, 0.0])  # another rank was signalled
    with pytest.raises(Preempted, match="at step 4 of the epoch"):
        control.after_step(3, update=True, steps=8)
    assert saves.steps == [2, 4]


def test_two_ranks_stop_together_when_one_is_signalled_and_resume_exactly(tmp_path) -> None:
    """torchrun, 2 gloo ranks: SIGUSR1 to rank 1 only at a random step; both stop at the same step, rank 0 writes
    both ranks' RNG states, both exit with the requeue status; --resume auto then ends as the uninterrupted run."""
    data = make_image_folder(tmp_path / "data", per_class=8)  # 16 images, 2 ranks x batch 2: 4 steps per epoch

    def cli(out: Path, *extra: str) -> list[str]:
        return [
            "main_pretrain.py",
            "--model",
            "mae_vit_tiny_patch4",
            "--data_path",
            str(data),
            "--output_dir",
            str(out),
            "--log_dir",
            "",
            "--device",
            "cpu",
            "--num_workers",
            "0",
            "--input_size",
            "32",
            "--batch_size",
            "2",
            "--epochs",
            "2",
            "--warmup_epochs",
            "1",
            "--print_freq",
            "1",
            *extra,
        ]

    straight = tmp_path / "straight"
    proc = run_torchrun(cli(straight), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "out"
    step = random.Random(18).randrange(1, 2 * STEPS - 1)
    proc = run_torchrun(cli(out), cwd=ROOT, env={"MAE_FAULT_INJECT": f"signal:{step}@rank1"})
    assert proc.returncode != 0
    assert proc.stderr.count("preempted: stopped on SIGUSR1") + proc.stderr.count("preempted: stopped on a") == 2
    assert f"exitcode  : {REQUEUE_EXIT_CODE}" in proc.stderr
    ckpt = load(out / "checkpoint-last.pth")
    epoch, in_epoch = divmod(step, STEPS)
    if in_epoch != STEPS - 1:
        assert (ckpt["epoch"], ckpt["step"]) == (epoch, in_epoch + 1)
        assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])

    proc = run_torchrun(cli(out, "--resume", "auto"), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_state(load(straight / "checkpoint-last.pth"), load(out / "checkpoint-last.pth"))


def test_the_same_signal_twice_at_once_is_one_preemption_and_later_stops_at_once(monkeypatch) -> None:
    """SLURM signals the tasks and srun, which forwards the signal to them: two SIGTERMs within milliseconds must
    still checkpoint. The same signal again after the window does what it would do without the handler."""
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    stopped = []
    previous = signal.signal(signal.SIGTERM, lambda *_: stopped.append("default"))  # stands for "terminate"
    try:
        SIGNALS.install()
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # the forwarded copy
        assert SIGNALS.requested and SIGNALS.received == "SIGTERM" and stopped == []
        now = time.monotonic()
        monkeypatch.setattr(time, "monotonic", lambda: now + REPEAT_WINDOW_S + 1)
        signal.raise_signal(signal.SIGTERM)  # a second request, later: the previous handler runs
        assert stopped == ["default"]
    finally:
        SIGNALS.uninstall()
        signal.signal(signal.SIGTERM, previous)
