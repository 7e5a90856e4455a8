"""The per-iteration schedule equals the official formula: linear warmup, then half-cycle cosine to min_lr."""

import argparse
import math

import pytest
import torch

from util.lr_sched import adjust_learning_rate, lr_at

LR, MIN_LR, WARMUP, EPOCHS, STEPS = 2e-3, 1e-5, 5, 20, 10


def official(epoch: float) -> float:
    """facebookresearch/mae util/lr_sched.py, written out."""
    if epoch < WARMUP:
        return LR * epoch / WARMUP
    return MIN_LR + (LR - MIN_LR) * 0.5 * (1.0 + math.cos(math.pi * (epoch - WARMUP) / (EPOCHS - WARMUP)))


@pytest.mark.parametrize(
    "epoch, expected",
    [
        (0.0, 0.0),  # warmup start
        (2.5, LR / 2),  # mid warmup
        (WARMUP, LR),  # warmup end: the peak
        ((WARMUP + EPOCHS) / 2, MIN_LR + (LR - MIN_LR) / 2),  # mid cosine
        (EPOCHS - 1 + (STEPS - 1) / STEPS, None),  # last step of the last epoch
    ],
)
def test_schedule_points(epoch: float, expected: float | None) -> None:
    got = lr_at(epoch, LR, MIN_LR, WARMUP, EPOCHS)
    assert got == pytest.approx(official(epoch), rel=1e-12, abs=1e-15)
    if expected is not None:
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    else:  # just above min_lr, below every earlier value
        assert MIN_LR < got < lr_at(EPOCHS - 1, LR, MIN_LR, WARMUP, EPOCHS)


def test_adjust_sets_every_group_with_its_lr_scale() -> None:
    w = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    opt = torch.optim.AdamW(
        [{"params": [w[0]], "lr_scale": 0.5}, {"params": [w[1]], "lr_scale": 0.25}, {"params": [w[2]]}], lr=1.0
    )
    args = argparse.Namespace(lr=LR, min_lr=MIN_LR, warmup_epochs=WARMUP, epochs=EPOCHS)
    epoch = 7 + 3 / STEPS
    lr = adjust_learning_rate(opt, epoch, args)
    assert lr == pytest.approx(official(epoch))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr * 0.5, lr * 0.25, lr])


def test_schedule_is_monotone_in_each_phase() -> None:
    steps = [e + s / STEPS for e in range(EPOCHS) for s in range(STEPS)]
    lrs = [lr_at(t, LR, MIN_LR, WARMUP, EPOCHS) for t in steps]
    peak = steps.index(WARMUP)
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1 : peak + 1], strict=True))
    assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1 :], strict=False))
