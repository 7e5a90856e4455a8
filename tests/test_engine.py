"""Engines: gradient accumulation, the non-finite-loss stop, loss scaling, grad norm, top-1/top-5 evaluation."""

import argparse

import numpy as np
import pytest
import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay
from train_utils import LossPerCall, NoiseFromImages, nan_at_call

import engine_finetune
import engine_pretrain
from model_table import build_classifier, build_pretrain_model
from util.amp import NativeScalerWithGradNormCount, grad_norm
from util.errors import NonFiniteLossError
from util.metrics import MetricLogger, StepMetrics

CPU = torch.device("cpu")


def engine_args(**kw) -> argparse.Namespace:
    base = dict(
        accum_iter=1,
        lr=1e-3,
        min_lr=0.0,
        warmup_epochs=0,
        epochs=1,
        mask_ratio=0.75,
        amp="none",
        clip_grad=None,
        print_freq=10,
        batch_size=4,
    )
    return argparse.Namespace(**{**base, **kw})


def loader(x: torch.Tensor, y: torch.Tensor, chunks: int) -> list:
    return list(zip(x.chunk(chunks), y.chunk(chunks), strict=True))


def pretrain_once(accum_iter: int) -> dict:
    torch.manual_seed(0)
    # float64, so that Adam's per-element normalisation does not turn rounding noise into weight differences
    model = build_pretrain_model("mae_vit_tiny_patch4", 32).double()
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    args = engine_args(accum_iter=accum_iter, batch_size=8 // accum_iter)
    scaler = NativeScalerWithGradNormCount(CPU, enabled=False)
    stats = engine_pretrain.train_one_epoch(
        NoiseFromImages(model), loader(x, torch.zeros(8), accum_iter), opt, CPU, 0, scaler, args=args
    )
    assert stats["grad_norm"] > 0
    return model.state_dict()


def test_pretrain_accumulation_equals_full_batch() -> None:
    full, accum = pretrain_once(1), pretrain_once(2)
    for k in full:
        torch.testing.assert_close(accum[k], full[k], rtol=1e-9, atol=1e-12, msg=k)


def finetune_once(accum_iter: int, steps: int = 1) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = build_classifier("vit_tiny_patch4", 32, num_classes=5, drop_path_rate=0.0, global_pool=True).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8 * steps, 3, 32, 32, dtype=torch.float64, generator=g)
    y = torch.randint(0, 5, (8 * steps,), generator=g)
    opt = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1e-3)
    args = engine_args(accum_iter=accum_iter, batch_size=8 // accum_iter, epochs=2)
    scaler = NativeScalerWithGradNormCount(CPU, enabled=False)
    engine_finetune.train_one_epoch(
        model, nn.CrossEntropyLoss(), loader(x, y, steps * accum_iter), opt, CPU, 0, scaler, args=args
    )
    return model.state_dict(), opt.state_dict()


def test_finetune_accumulation_equals_full_batch() -> None:
    # two updates, so the lr schedule (set on the first micro-batch of each update) is covered too
    (full, full_opt), (accum, accum_opt) = finetune_once(1, steps=2), finetune_once(2, steps=2)
    for k in full:
        torch.testing.assert_close(accum[k], full[k], rtol=1e-9, atol=1e-12, msg=k)
    assert [g["lr"] for g in accum_opt["param_groups"]] == [g["lr"] for g in full_opt["param_groups"]]
    assert accum_opt["state"][0]["step"] == full_opt["state"][0]["step"] == 2


def test_non_finite_loss_stops_with_step_and_hint() -> None:
    model = nan_at_call(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 3, 4, 4)
    args = engine_args(amp="fp16", batch_size=4)
    with pytest.raises(NonFiniteLossError) as e:
        engine_pretrain.train_one_epoch(
            model, loader(x, torch.zeros(16), 4), opt, CPU, 3, NativeScalerWithGradNormCount(CPU, False), args=args
        )
    msg = str(e.value)
    assert "nan" in msg and "epoch 3, step 2/4" in msg and "global step 14" in msg
    assert "amp fp16" in msg and "--amp bf16" in msg and "lr" in msg


class RecordingWriter:
    def __init__(self):
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, x: int) -> None:
        self.scalars.append((tag, value, x))


def test_metrics_read_back_at_log_steps_equal_the_per_step_values() -> None:
    """Six micro-batches, accum_iter 2, print_freq 4: the flushes at steps 0, 4 and 5 must hand the logger and
    TensorBoard every step's value, in order, as a read after every step would."""
    # loss k * sum(w) at call k: with lr 0 the losses are 3, 6, 9, ... and the gradient of call k is k everywhere
    model = LossPerCall(lambda k, w, x: k * w.sum() + 0 * x.sum())
    writer = RecordingWriter()
    args = engine_args(accum_iter=2, lr=0.0, print_freq=4, batch_size=2)
    stats = engine_pretrain.train_one_epoch(
        model,
        loader(torch.zeros(12, 1), torch.zeros(12), 6),
        torch.optim.SGD(model.parameters(), lr=0.0),
        CPU,
        0,
        NativeScalerWithGradNormCount(CPU, False),
        log_writer=writer,
        args=args,
    )
    assert stats["loss"] == pytest.approx(sum(3 * k for k in range(1, 7)) / 6)
    # the update after calls k and k+1 sees the accumulated gradient (k + (k+1)) / 2 in each of 3 elements
    norms = [(k + k + 1) / 2 * 3**0.5 for k in (1, 3, 5)]
    assert stats["grad_norm"] == pytest.approx(sum(norms) / 3)
    xs = [int(step / 6 * 1000) for step in (1, 3, 5)]  # the update steps
    assert [s for s in writer.scalars if s[0] == "train_loss"] == [
        ("train_loss", 3.0 * (s + 1), x) for s, x in zip((1, 3, 5), xs, strict=True)
    ]
    got_norms = [(v, x) for tag, v, x in writer.scalars if tag == "grad_norm"]
    assert [x for _, x in got_norms] == xs
    assert [v for v, _ in got_norms] == pytest.approx(norms)


def test_a_large_print_freq_still_checks_every_max_pending_steps() -> None:
    """print_freq 1000 over 1000 steps, a NaN loss at step 150: found at the flush after MAX_PENDING steps (step 200),
    not at the end of the epoch, and reported with its own step."""
    metrics = StepMetrics(MetricLogger(), CPU, epoch=0, steps=1000, print_freq=1000, amp="none")
    assert metrics.MAX_PENDING == 100
    with pytest.raises(NonFiniteLossError, match="step 150/1000"):
        for step in range(1000):
            metrics.push(step, torch.tensor(float("nan") if step == 150 else 1.0), None, 0.1, True)
    assert step == 200
    assert metrics.metric_logger.loss.count == 150  # steps 0-149 were logged before the stop


class SyncCounter:
    """Counts the calls that copy a tensor's value to the host (each one a device synchronisation on a GPU)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.calls: list[str] = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(t, *a, _original=original, _name=name, **kw):
                self.calls.append(_name)
                return _original(t, *a, **kw)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("engine", ["pretrain", "finetune"])
def test_training_step_reads_nothing_back_between_log_steps(monkeypatch, engine: str) -> None:
    """Seven steps at print_freq 3 read values back only at the log steps 0, 3 and 6: one ``tolist`` each.

    SGD, because PyTorch's non-fused AdamW reads its per-parameter step counters with ``item()`` (host tensors,
    no device synchronisation; the training scripts use the fused AdamW on CUDA, which does not).
    """
    torch.manual_seed(0)
    x = torch.randn(14, 3, 32, 32)
    args = engine_args(print_freq=3, batch_size=2, clip_grad=1.0)
    scaler = NativeScalerWithGradNormCount(CPU, False)
    if engine == "pretrain":
        model = build_pretrain_model("mae_vit_tiny_patch4", 32)
        run = lambda data, opt: engine_pretrain.train_one_epoch(model, data, opt, CPU, 0, scaler, args=args)  # noqa: E731
    else:
        model = build_classifier("vit_tiny_patch4", 32, num_classes=5, drop_path_rate=0.1, global_pool=True)
        run = lambda data, opt: engine_finetune.train_one_epoch(  # noqa: E731
            model, nn.CrossEntropyLoss(), data, opt, CPU, 0, scaler, max_norm=1.0, args=args
        )
    data = loader(x, torch.randint(0, 5, (14,)), 7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    counter = SyncCounter(monkeypatch)
    stats = run(data, opt)
    assert counter.calls == ["tolist"] * 3
    assert stats["grad_norm"] > 0


def test_fp16_loss_scaler_gives_the_same_step_and_keeps_state() -> None:
    """With a power-of-two scale, scaling then unscaling is exact: an SGD update (which moves by the gradient
    itself) equals the unscaled one, and the norm is the unscaled gradient's. A step with an inf gradient is
    skipped, its norm is inf, and the scale halves (GradScaler's backoff), as the official loss scaler."""
    results = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = nn.Linear(6, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = NativeScalerWithGradNormCount(CPU, enabled=enabled)
        loss = model(torch.randn(4, 6)).pow(2).mean()
        norm = scaler(loss, opt, parameters=model.parameters())
        results.append((model.weight.detach().clone(), norm, scaler.state_dict(), scaler, model, opt))
    (w0, n0, s0, *_), (w1, n1, s1, scaler, model, opt) = results
    torch.testing.assert_close(w1, w0, rtol=0, atol=0)
    torch.testing.assert_close(n1, n0, rtol=0, atol=0)
    assert s0 == {} and s1["scale"] == 65536.0

    before = model.weight.detach().clone()
    norm = scaler(model(torch.full((1, 6), float("inf"))).sum(), opt, parameters=model.parameters())
    assert not torch.isfinite(norm)
    assert torch.equal(model.weight.detach(), before)  # skipped
    assert scaler.state_dict()["scale"] == 32768.0


def test_grad_norm_and_clipping() -> None:
    model = nn.Linear(4, 2)
    model.weight.grad = torch.full_like(model.weight, 3.0)  # norm sqrt(8 * 9)
    model.bias.grad = torch.full_like(model.bias, 4.0)  # norm sqrt(2 * 16)
    assert grad_norm(model.parameters()).item() == pytest.approx((72 + 32) ** 0.5)

    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = NativeScalerWithGradNormCount(CPU, enabled=False)
    loss = model(torch.zeros(1, 4)).sum() * 0.0  # adds zero gradients
    norm = scaler(loss, opt, clip_grad=1.0, parameters=model.parameters())
    assert norm.item() == pytest.approx((72 + 32) ** 0.5)  # the norm before clipping, as official
    assert grad_norm(model.parameters()).item() == pytest.approx(1.0, rel=1e-4)


def test_evaluate_top1_top5() -> None:
    """The 'images' are logits over 6 classes; the model is the identity."""
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5],  # target 0: top-1
            [2.0, 9, 1, 3, 4, 5],  # target 2: rank 6 -> neither
            [5.0, 4, 3, 2, 1, 0],  # target 3: rank 4 -> top-5
            [0.0, 1, 2, 3, 4, 5],  # target 5: top-1
            [5.0, 4, 3, 2, 1, 0],  # target 4: rank 5 -> top-5
        ]
    )
    target = torch.tensor([0, 2, 3, 5, 4])
    stats = engine_finetune.evaluate([(logits[:3], target[:3]), (logits[3:], target[3:])], nn.Identity(), CPU)
    assert stats["acc1"] == pytest.approx(100 * 2 / 5)
    assert stats["acc5"] == pytest.approx(100 * 4 / 5)
    assert stats["loss"] == pytest.approx(nn.functional.cross_entropy(logits, target).item(), rel=1e-6)


class Recorder(nn.Module):
    """A classifier that keeps every batch it is given."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(3, num_classes)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.fc(x.mean((2, 3)))


class RecordingCriterion(nn.Module):
    def __init__(self, criterion: nn.Module):
        super().__init__()
        self.criterion, self.targets = criterion, []

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.targets.append(targets.detach().clone())
        return self.criterion(outputs, targets)


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mixup_and_cutmix_mix_the_images_with_the_weight_of_the_labels(mode: str) -> None:
    """The model sees x_mix = lam * x + (1 - lam) * x.flip(0) (mixup), or x with a box of x.flip(0) covering
    1 - lam of each image (cutmix), where lam is the weight the soft targets give to each image's own label
    (label smoothing 0.1 over 3 classes: on = 1 - 0.1 + 0.1/3, off = 0.1/3)."""
    import main_finetune
    from util.mixup import build_criterion, build_mixup

    fargs = main_finetune.get_args_parser().parse_args(
        ["--nb_classes", "3", "--batch_size", "4", *(["--mixup", "0.8"] if mode == "mixup" else ["--cutmix", "1.0"])]
    )
    mixup_fn = build_mixup(fargs)
    criterion = RecordingCriterion(build_criterion(fargs, mixup_fn))
    model = Recorder(3)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0])  # flipped: 0, 2, 1, 0
    np.random.seed(3)  # timm's Mixup draws lam and the box with numpy (and mixes the batch in place: x.clone())
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine_finetune.train_one_epoch(
        model,
        criterion,
        [(x.clone(), y)],
        opt,
        CPU,
        0,
        NativeScalerWithGradNormCount(CPU, enabled=False),
        mixup_fn=mixup_fn,
        args=engine_args(),
    )
    seen, targets = model.seen[0], criterion.targets[0]
    off = 0.1 / 3
    on = 1 - 0.1 + off
    lam = ((targets[1, 1] - off) / (on - off)).item()  # image 1 (label 1) mixed with image 2 (label 2)
    assert 0.05 < lam < 0.95
    smooth = torch.full((4, 3), off).scatter_(1, y[:, None], on)
    torch.testing.assert_close(targets, lam * smooth + (1 - lam) * smooth.flip(0))
    if mode == "mixup":
        torch.testing.assert_close(seen, lam * x + (1 - lam) * x.flip(0))
    else:
        from_partner = (seen == x.flip(0)) & (seen != x)
        assert torch.all((seen == x) | from_partner)
        box = from_partner[:, 0]  # (4, H, W); one box for the whole batch ("batch" mode), on every channel
        assert torch.equal(from_partner, box[:, None].expand_as(from_partner))
        assert box[1].float().mean().item() == pytest.approx(1 - lam, abs=1e-6)
