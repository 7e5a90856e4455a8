"""DDP on CPU with gloo: one update on two processes equals one process averaging their gradients (pretraining,
fine-tuning); evaluation on two processes, with and without ``--dist_eval``, equals one process."""

import json
from pathlib import Path

import pytest
import torch
from ddp_step import finetune_setup, finetune_step, setup, train_step
from train_utils import NoiseFromImages, PerChunk, make_image_folder, parse, run_torchrun

import main_finetune
from model_table import build_classifier

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


def test_fine_tuning_step_on_two_ranks_equals_one_process(tmp_path: Path) -> None:
    """Label smoothing, layer-wise lr decay and gradient clipping (on the all-reduced gradient) included."""
    proc = run_torchrun([str(ROOT / "tests" / "ddp_step.py"), "finetune", str(tmp_path)], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp_weights = torch.load(tmp_path / "weights.pt", weights_only=True)

    model, images, labels, args = finetune_setup()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    finetune_step(model, model, images, labels, args)  # the whole batch in one process
    changed = 0
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp_weights[k], v, rtol=1e-9, atol=1e-12, msg=f"{k} differs")
        changed += not torch.equal(v, initial[k])
    assert changed > 10


@pytest.mark.parametrize("dist_eval", [True, False], ids=["dist_eval", "every-rank-all"])
def test_evaluation_on_two_ranks_equals_one_process(tmp_path: Path, dist_eval: bool) -> None:
    """With --dist_eval each rank evaluates its shard (3 of the 6 images) and the metrics are summed over ranks;
    without it each rank evaluates all. Either way: the single-process numbers."""
    data = make_image_folder(tmp_path / "data", per_class=2, val_per_class=3)
    torch.manual_seed(0)
    model = build_classifier("vit_tiny_patch4", 32, 2, 0.0, True)
    ckpt = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, ckpt)

    proc = run_torchrun(
        [
            str(ROOT / "tests" / "ddp_step.py"),
            "eval",
            str(tmp_path),
            str(data),
            str(ckpt),
            *(["--dist_eval"] if dist_eval else []),
        ],
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = parse(
        main_finetune.get_args_parser(),
        eval=True,
        resume=ckpt,
        model="vit_tiny_patch4",
        input_size=32,
        nb_classes=2,
        batch_size=2,
        data_path=data,
        device="cpu",
        num_workers=0,
    )
    single = main_finetune.main(args)
    assert single["loss"] > 0
    for rank in (0, 1):
        stats = json.loads((tmp_path / f"stats{rank}.json").read_text())
        assert stats.keys() == single.keys()
        for k in single:
            assert stats[k] == pytest.approx(single[k], rel=1e-6), (rank, k)
