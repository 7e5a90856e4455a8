"""DDP on CPU with gloo: one update on two processes equals one process averaging their gradients."""

import json
from pathlib import Path

import pytest
import torch
from ddp_step import setup, train_step
from train_utils import NoiseFromImages, PerChunk, run_torchrun

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("family", ["mae", "mixmim"])
def test_two_ranks_equal_one_process(tmp_path: Path, family: str) -> None:
    proc = run_torchrun([str(ROOT / "tests" / "ddp_step.py"), family, str(tmp_path)], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp_weights = torch.load(tmp_path / "weights.pt", weights_only=True)

    model, images, args = setup(family)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    args.accum_iter = 1
    if family == "mae":
        wrapped = NoiseFromImages(model)  # the doubled batch in one process, same samples, same masks
    else:
        wrapped = PerChunk(model, chunks=2)  # MixMIM mixes within each rank's batch: average per local batch
    train_step(wrapped, model, images, args)
    reference = model.state_dict()

    changed = 0
    for k, v in reference.items():
        torch.testing.assert_close(ddp_weights[k], v, rtol=1e-9, atol=1e-12, msg=f"{family}: {k} differs")
        changed += not torch.equal(v, initial[k])
    assert changed > 10  # the step did move the weights

    at_allreduce = json.loads((tmp_path / "allreduce.json").read_text())
    assert at_allreduce, "no gradient all-reduce happened"
    if family == "mae":  # accum_iter=2: all-reduce only after the second micro-batch (no_sync on the first)
        assert set(at_allreduce) == {2}


def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_that_step(tmp_path: Path) -> None:
    """The loss is averaged over the ranks before the check, so rank 0, whose own loss stays finite, stops too."""
    proc = run_torchrun([str(ROOT / "tests" / "ddp_step.py"), "nan", str(tmp_path)], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        msg = (tmp_path / f"rank{rank}.txt").read_text()
        assert "loss is nan at epoch 0, step 2/4" in msg, f"rank {rank}: {msg}"
