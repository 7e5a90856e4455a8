"""The GPU path: mixed precision against fp32, MixMIM's SDPA attention against the plain one, compiled against
eager, fused AdamW against the foreach one, the scripts end to end with resume, no host synchronisation between
progress lines, nvJPEG against the CPU decode, and segmentation (UperNet under mixed precision, BEiT's relative
position bias through SDPA, main_segment.py end to end). ``pytest -m cuda`` selects these
(``benchmarks/gpu_check.sh`` runs them on a GPU machine); without CUDA they skip. ``CUDA_TESTS_ON_CPU=1`` runs the
same logic on the CPU (a dry run of the checks before a GPU check; the sync check needs CUDA and still skips).

Tolerances are stated per check. Each test also records what it measured (``record_property``: the junit XML of
gpu_check.sh keeps the figures). Mixed precision is compared on the loss and on the whole gradient vector
(relative L2 error ``|g - g32| / |g32|``), since single small entries of a low-precision gradient are noise.
"""

import json
import os
import random
from pathlib import Path

import pytest
import torch
from train_utils import make_image_folder, parse, tiny_run_args

import engine_pretrain
import main_finetune
import main_linprobe
import main_pretrain
import main_segment
import models_mae
import models_mixmim
from model_table import compile_model
from util.amp import NativeScalerWithGradNormCount, autocast
from util.metrics import StepMetrics

pytestmark = pytest.mark.cuda

# model, image side, masking noise per image: MAE's patches, MixMIM's last-stage cells ((side / encoder_stride) ** 2)
MODELS = {
    "mae_tiny": (models_mae.mae_vit_tiny_patch4, 32, 64),
    "mixmim_tiny": (models_mixmim.mixmim_tiny, 64, 16),
    "mae_base": (models_mae.mae_vit_base_patch16, 224, 196),
    "mixmim_base": (models_mixmim.mixmim_base, 224, 49),
}
# loss: relative error of the loss; grad: relative L2 error of all gradients (bf16 has 8 mantissa bits, fp16 11).
# Measured on the CPU (torch 2.14.1; tiny and MAE-B): bf16 loss <= 8e-4, grads <= 7.3e-3; fp16 (loss scaled)
# loss <= 3e-5, grads <= 8.5e-4. The bounds leave about 5x for the GPU's kernels.
AMP_TOLERANCE = {"bf16": {"loss": 1e-2, "grad": 4e-2}, "fp16": {"loss": 2e-3, "grad": 8e-3}}


@pytest.fixture
def dev() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("CUDA_TESTS_ON_CPU") == "1":
        return torch.device("cpu")
    pytest.skip("needs CUDA (CUDA_TESTS_ON_CPU=1 runs the logic on the CPU)")


def build(key: str, dev: torch.device, **kwargs) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The model (seed 0), 4 images (seed 1) and the masking noise (seed 2) on ``dev``."""
    factory, side, cells = MODELS[key]
    torch.manual_seed(0)
    model = factory(**kwargs).to(dev)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, side, side, generator=gen).to(dev)
    noise = torch.rand(4 if key.startswith("mae") else 1, cells, generator=torch.Generator().manual_seed(2))
    return model, images, noise.to(dev)


FP16_LOSS_SCALE = 2.0**10  # fp16 gradients underflow unscaled: the scripts' GradScaler scales the loss (adaptively)


def loss_and_grads(model, images, noise, amp: str, dev: torch.device) -> tuple[float, torch.Tensor, torch.Tensor]:
    """One forward + backward under ``amp``: (loss, the prediction in fp32, every gradient concatenated); fp16
    with a fixed loss scale, the gradients unscaled."""
    model.zero_grad(set_to_none=True)
    random.seed(0)  # MixMIM's mask-ratio jitter draws from Python's random
    with autocast(dev, amp):
        loss, pred, _ = model(images, noise=noise.reshape(-1) if noise.shape[0] == 1 else noise)
    scale = FP16_LOSS_SCALE if amp == "fp16" else 1.0
    (loss.float() * scale).backward()
    grads = torch.cat([p.grad.float().reshape(-1) for p in model.parameters() if p.grad is not None]) / scale
    return loss.item(), pred.float().detach(), grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("key", list(MODELS))
def test_mixed_precision_follows_fp32(dev, key: str, amp: str, record_property) -> None:
    if dev.type == "cpu" and amp == "fp16" and key.endswith("base"):
        pytest.skip("fp16 on the CPU is emulated: minutes at base size")
    model, images, noise = build(key, dev)
    loss32, _, grads32 = loss_and_grads(model, images, noise, "none", dev)
    loss_a, _, grads_a = loss_and_grads(model, images, noise, amp, dev)
    assert_follows_fp32((loss32, grads32), (loss_a, grads_a), AMP_TOLERANCE[amp], record_property)


def assert_follows_fp32(fp32: tuple, mixed: tuple, tolerance: dict, record_property) -> None:
    """(loss, gradients) under mixed precision against fp32's: the loss's relative error and the gradients' relative
    L2 error, recorded, below ``tolerance`` (``loss``, ``grad``)."""
    (loss32, grads32), (loss_a, grads_a) = fp32, mixed
    loss_err, grad_err = abs(loss_a - loss32) / abs(loss32), rel(grads_a, grads32)
    record_property("loss_rel_err", loss_err)
    record_property("grad_rel_l2_err", grad_err)
    assert loss_err < tolerance["loss"], (loss32, loss_a)
    assert grad_err < tolerance["grad"]


@pytest.mark.parametrize("amp", ["none", "bf16"])
@pytest.mark.parametrize("key", ["mixmim_tiny", "mixmim_base"])
def test_mixmim_sdpa_attention_follows_the_plain_one(dev, key: str, amp: str, record_property) -> None:
    """The default CUDA path (SDPA with the float bias + mixing mask, padded to 16-aligned rows) against the plain
    softmax(QK^T + mask)V: fp32 within 1e-4 (prediction) and 1e-4 relative L2 (gradients); bf16 autocast within
    the bf16 tolerances of the fp32 comparison above (the two paths round differently)."""
    plain, images, noise = build(key, dev, fused_attn=False)
    fused, _, _ = build(key, dev, fused_attn=True)
    fused.load_state_dict(plain.state_dict())
    loss_p, pred_p, grads_p = loss_and_grads(plain, images, noise, amp, dev)
    loss_f, pred_f, grads_f = loss_and_grads(fused, images, noise, amp, dev)
    pred_err, grad_err = (pred_f - pred_p).abs().max().item(), rel(grads_f, grads_p)
    record_property("pred_max_abs_err", pred_err)
    record_property("grad_rel_l2_err", grad_err)
    if amp == "none":
        assert pred_err < 1e-4 and grad_err < 1e-4 and loss_f == pytest.approx(loss_p, rel=1e-5)
    else:
        assert loss_f == pytest.approx(loss_p, rel=AMP_TOLERANCE["bf16"]["loss"])
        assert grad_err < AMP_TOLERANCE["bf16"]["grad"]


@pytest.mark.parametrize("key", ["mae_tiny", "mixmim_tiny"])
def test_compiled_model_follows_eager_mode(dev, key: str, record_property) -> None:
    """``model_table.compile_model`` (as --compile) under bf16, the scripts' precision on a GPU: the same masks
    (eager random draws), the loss of 3 AdamW steps within 2e-2 relative of eager (fusion changes the rounding, not
    the math; fp32 is compared to 1e-5 on the CPU in test_train_e2e.py)."""
    losses = {}
    for amp in ("bf16",):
        for compiled in (False, True):
            model, images, _ = build(key, dev)
            run = compile_model(model) if compiled else model
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            seen = []
            for step in range(3):
                torch.manual_seed(10 + step)
                random.seed(10 + step)
                with autocast(dev, amp):
                    loss, _, mask = run(images)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                seen.append((loss.item(), mask.detach().clone()))
            losses[amp, compiled] = seen
        torch._dynamo.reset()
    for amp, tol in (("bf16", 2e-2),):
        eager, comp = losses[amp, False], losses[amp, True]
        for (le, me), (lc, mc) in zip(eager, comp, strict=True):
            assert torch.equal(me, mc)  # the same masks
            assert lc == pytest.approx(le, rel=tol)
        record_property(
            f"loss_rel_err_{amp}", max(abs(c[0] - e[0]) / abs(e[0]) for e, c in zip(eager, comp, strict=True))
        )


def test_fused_adamw_follows_the_foreach_one(dev, record_property) -> None:
    """The scripts' AdamW (fused=True on CUDA) against the foreach implementation: 5 steps on the same gradients
    (betas 0.9 / 0.95, weight decay 0.05), the weights within 1e-6 relative to each other."""
    if dev.type != "cuda":
        pytest.skip("fused AdamW is the CUDA path")
    model, _, _ = build("mae_tiny", dev)
    twin, _, _ = build("mae_tiny", dev)
    fused = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    foreach = torch.optim.AdamW(twin.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05, foreach=True)
    gen = torch.Generator(device=dev).manual_seed(3)
    for _ in range(5):
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            p.grad = torch.randn(p.shape, generator=gen, device=dev)
            q.grad = p.grad.clone()
        fused.step()
        foreach.step()
    a = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    b = torch.cat([p.detach().reshape(-1) for p in twin.parameters()])
    record_property("weights_rel_l2_err", rel(a, b))
    assert rel(a, b) < 1e-6


# ----------------------------------------------------------------------------------------------- the scripts

FAMILIES = {"mae": ("mae_vit_tiny_patch4", "vit_tiny_patch4"), "mixmim": ("mixmim_tiny", "mixmim_tiny")}


def log_losses(out: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (out / "log.txt").read_text().splitlines()]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_scripts_on_the_device_with_resume(dev, tmp_path: Path, family: str) -> None:
    """main_pretrain.py (2 steps per epoch), resumed after its first epoch, gives the loss of the run that was not
    stopped (within 1e-4: the same seeds per epoch, so the same masks); main_finetune.py --finetune from its
    checkpoint and main_linprobe.py train on the device with its default precision (bf16 on a current GPU)."""
    pre_model, ft_model = FAMILIES[family]
    data = make_image_folder(tmp_path / "data", per_class=4, val_per_class=2, size=72 if family == "mixmim" else 36)
    size = 64 if family == "mixmim" else 32
    common = dict(device=dev.type, input_size=size, batch_size=4)

    def pretrain(out: Path, epochs: int, **kw) -> None:
        flags = tiny_run_args(data, out, model=pre_model, epochs=epochs, warmup_epochs=1, **common, **kw)
        main_pretrain.main(parse(main_pretrain.get_args_parser(), **flags))

    pretrain(tmp_path / "whole", 2)
    pretrain(tmp_path / "cut", 1)
    pretrain(tmp_path / "cut", 2, resume=tmp_path / "cut" / "checkpoint-last.pth")
    whole, cut = log_losses(tmp_path / "whole"), log_losses(tmp_path / "cut")
    assert len(whole) == 2 and cut == pytest.approx(whole, rel=1e-4)
    ckpt = torch.load(tmp_path / "whole" / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    expected_amp = "none" if dev.type == "cpu" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert torch.device(ckpt["args"]["device"]).type == dev.type and ckpt["args"]["amp"] == expected_amp

    flags = dict(nb_classes=2, epochs=1, warmup_epochs=0, finetune=tmp_path / "whole" / "checkpoint-last.pth")
    ft = main_finetune.main(parse(main_finetune.get_args_parser(), **tiny_run_args(data, tmp_path / "ft",
                            model=ft_model, **common, **flags)))  # fmt: skip
    lp = main_linprobe.main(parse(main_linprobe.get_args_parser(), **tiny_run_args(data, tmp_path / "lp",
                            model=pre_model, **common, **flags)))  # fmt: skip
    for stats in (ft, lp):
        assert 0.0 <= stats["acc1"] <= 100.0 and stats["loss"] == stats["loss"]  # finite, not NaN


@pytest.mark.parametrize("key", ["mae_tiny", "mixmim_tiny"])
def test_no_host_sync_between_progress_lines(dev, key: str, monkeypatch) -> None:
    """``torch.cuda.set_sync_debug_mode("error")`` around the pretraining engine's steps: any host synchronisation
    outside the progress lines (``StepMetrics.flush``, every ``--print_freq`` steps) raises. 6 steps, a progress
    line at steps 0 and 5, pinned uint8 batches as the scripts' loader gives them, bf16, fused AdamW."""
    if dev.type != "cuda":
        pytest.skip("the sync debug mode is CUDA's")
    model, _, _ = build(key, dev)
    side = MODELS[key][1]
    gen = torch.Generator().manual_seed(4)
    batches = [(torch.randint(0, 256, (4, 3, side, side), dtype=torch.uint8, generator=gen).pin_memory(), None)
               for _ in range(6)]  # fmt: skip
    args = parse(main_pretrain.get_args_parser(), model="mae_vit_tiny_patch4" if key == "mae_tiny" else "mixmim_tiny")
    main_pretrain.resolve_args(args)
    args.lr, args.min_lr, args.warmup_epochs, args.epochs, args.amp, args.print_freq = 1e-4, 0.0, 1, 2, "bf16", 5
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)

    flush = StepMetrics.flush

    def flush_allowed(self) -> None:  # the progress lines read the losses back: syncs are allowed there only
        torch.cuda.set_sync_debug_mode(0)
        try:
            flush(self)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(StepMetrics, "flush", flush_allowed)
    engine_pretrain.train_one_epoch(
        model, batches[:1], optimizer, dev, 0, NativeScalerWithGradNormCount(dev, False), args=args
    )  # fmt: skip  (warm-up: cuBLAS handles, allocator, lazy inits)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine_pretrain.train_one_epoch(
            model, batches, optimizer, dev, 0, NativeScalerWithGradNormCount(dev, False), args=args
        )
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_decode_on_device_follows_the_cpu_path(dev, tmp_path: Path, record_property) -> None:
    """``--decode_on_device`` with nvJPEG (one batched call) against the CPU transform (PIL): the same boxes and
    flips, so the pixels differ only by the decoders' rounding (nvJPEG's IDCT and colour conversion against
    libjpeg's): mean absolute difference below 1 level, recorded with the largest one."""
    from PIL import Image
    from test_device_decode import write

    from util.datasets import pretrain_transform
    from util.device_decode import DeviceCrop, collate_encoded, read_encoded
    from util.seeding import seeded_rng

    paths = [write(tmp_path / f"{i}.jpg", "grey_jpeg" if i == 3 else "rgb_jpeg", seed=i) for i in range(8)]
    cpu, device = pretrain_transform(32, normalize=False), DeviceCrop(32)
    expected, items = [], []
    for seed, path in enumerate(paths):
        with seeded_rng(seed):
            expected.append(cpu(Image.open(path).convert("RGB")))
        with seeded_rng(seed):
            items.append(device(read_encoded(str(path))))
    got = collate_encoded(items).to(dev)
    assert got.device.type == dev.type and got.dtype == torch.uint8
    diff = (got.cpu().int() - torch.stack(expected).int()).abs().float()
    record_property("mean_abs_diff", diff.mean().item())
    record_property("max_abs_diff", diff.max().item())
    assert diff.mean() < 1.0


# ----------------------------------------------------------------------------------------------- segmentation

# name, crop, build kwargs: the ViT with BEiT's relative position bias (a float attn_mask into timm's SDPA) and
# MixMIM (its windows' SDPA); heads 32 wide, no drop path
SEGMENTERS = {
    "vit_rel_pos": ("vit_tiny_patch4", 32, dict(rel_pos_bias=True)),
    "mixmim": ("mixmim_tiny", 64, {}),
}
# UperNet's gradients round more than the pretraining models' (BatchNorm's backward subtracts the batch means):
# measured on the CPU (torch 2.14.1) bf16 grads <= 2.6e-2, fp16 <= 9.2e-3, losses <= 3e-5; about 4x left here.
SEG_AMP_TOLERANCE = {"bf16": {"loss": 1e-2, "grad": 1e-1}, "fp16": {"loss": 2e-3, "grad": 4e-2}}


def build_segmenter_on(key: str, dev: torch.device, fused: bool = True):
    """The segmenter (seed 0) in training mode without dropout (the comparisons draw no random numbers), the
    relative position tables drawn from N(0, 2) so that the bias changes the attention, and 4 crops with labels
    (seed 1): classes in 8x8 squares, each class its colour plus noise, a tenth of the pixels ignored (random labels
    per pixel would make the gradient a small sum of large terms that cancel, and measure that cancellation)."""
    from models_segment import build_segmenter
    from util.seg_datasets import IGNORE_INDEX

    name, side, kwargs = SEGMENTERS[key]
    torch.manual_seed(0)
    model = build_segmenter(name, 5, side, drop_path=0.0, channels=32, **kwargs)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout | torch.nn.Dropout2d):
            module.p = 0.0
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("relative_position_bias_table"):
                p.normal_(0, 2.0, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(1)
    cells = torch.randint(0, 5, (4, side // 8, side // 8), generator=gen)  # classes in 8x8 squares, each its colour
    labels = cells.repeat_interleave(8, 1).repeat_interleave(8, 2)
    colours = torch.randn(5, 3, generator=gen)
    images = colours[labels].permute(0, 3, 1, 2) + 0.5 * torch.randn(4, 3, side, side, generator=gen)
    labels[torch.rand(labels.shape, generator=gen) < 0.1] = IGNORE_INDEX
    return model.to(dev).train(), images.to(dev), labels.to(dev)


def segment_loss_and_grads(model, images, labels, amp: str, dev: torch.device) -> tuple[float, torch.Tensor]:
    """engine_segment's loss (main and auxiliary head) and every gradient, as loss_and_grads above."""
    from engine_segment import SegmentationLoss

    model.zero_grad(set_to_none=True)
    with autocast(dev, amp):
        loss = SegmentationLoss()(model(images), labels)
    scale = FP16_LOSS_SCALE if amp == "fp16" else 1.0
    (loss.float() * scale).backward()
    grads = torch.cat([p.grad.float().reshape(-1) for p in model.parameters() if p.grad is not None]) / scale
    return loss.item(), grads


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("key", list(SEGMENTERS))
def test_segmenter_mixed_precision_follows_fp32(dev, key: str, amp: str, record_property) -> None:
    """UperNet on both backbones under autocast (BatchNorm in training mode, the losses on fp32 logits) against
    fp32, within SEG_AMP_TOLERANCE."""
    model, images, labels = build_segmenter_on(key, dev)
    fp32 = segment_loss_and_grads(model, images, labels, "none", dev)
    mixed = segment_loss_and_grads(model, images, labels, amp, dev)
    assert_follows_fp32(fp32, mixed, SEG_AMP_TOLERANCE[amp], record_property)


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_rel_pos_bias_in_sdpa_follows_the_plain_attention(dev, amp: str, record_property) -> None:
    """The relative position bias as SDPA's float attn_mask (timm's fused path; under autocast the queries are bf16)
    against timm's plain softmax(QK^T * scale + bias)V: the backbone's four levels (relative L2) and all gradients
    within 1e-4 in fp32, within the bf16 tolerances under bf16 (the levels: the pretraining models'); the bias
    matters (levels without it differ from the plain path's by more than 10x that, 100x in fp32)."""
    plain, images, labels = build_segmenter_on("vit_rel_pos", dev, fused=False)
    fused, _, _ = build_segmenter_on("vit_rel_pos", dev, fused=True)
    loss_p, grads_p = segment_loss_and_grads(plain, images, labels, amp, dev)
    loss_f, grads_f = segment_loss_and_grads(fused, images, labels, amp, dev)

    def levels(model) -> torch.Tensor:
        with torch.no_grad(), autocast(dev, amp):
            return torch.cat([level.float().reshape(-1) for level in model.backbone(images)])

    levels_p, levels_f = levels(plain), levels(fused)
    with torch.no_grad():
        for p in fused.backbone.rel_pos_bias.parameters():
            p.zero_()
    level_err, grad_err, unbiased_err = rel(levels_f, levels_p), rel(grads_f, grads_p), rel(levels(fused), levels_p)
    record_property("levels_rel_l2_err", level_err)
    record_property("grad_rel_l2_err", grad_err)
    record_property("levels_without_bias_rel_l2", unbiased_err)
    if amp == "none":
        assert level_err < 1e-4 and grad_err < 1e-4 and loss_f == pytest.approx(loss_p, rel=1e-5)
        assert unbiased_err > 100 * max(level_err, 1e-4)
    else:
        assert loss_f == pytest.approx(loss_p, rel=SEG_AMP_TOLERANCE["bf16"]["loss"])
        assert level_err < AMP_TOLERANCE["bf16"]["grad"] and grad_err < SEG_AMP_TOLERANCE["bf16"]["grad"]
        assert unbiased_err > 10 * level_err


@pytest.mark.parametrize("model", ["vit_tiny_patch4", "mixmim_tiny"])
def test_segment_script_on_the_device_with_resume(dev, tmp_path: Path, model: str) -> None:
    """main_segment.py on the device with its default precision: 4 iterations in 2 epochs straight, and from the
    first epoch's checkpoint (the same losses within 1e-3: CUDA's bilinear backward adds atomically); --eval
    --resume of the last checkpoint scores what the training's last evaluation scored (sliding windows on the
    device)."""
    from test_segment import flags, make_ade_folder

    mixmim = model.startswith("mixmim")  # its tiny model needs crops of 64 (patch 2, four stages of windows)
    data = make_ade_folder(tmp_path / "data", size=(96, 128) if mixmim else (48, 64))
    extra = dict(device=dev.type, model=model, input_size=64 if mixmim else 32)

    def run(out: Path, **kw) -> dict:
        return main_segment.main(parse(main_segment.get_args_parser(), **flags(data, out, **extra, **kw)))

    straight = run(tmp_path / "straight")
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "checkpoint-0.pth").write_bytes((tmp_path / "straight" / "checkpoint-0.pth").read_bytes())
    run(resumed, resume=resumed / "checkpoint-0.pth")
    whole, cut = log_losses(tmp_path / "straight"), log_losses(resumed)
    assert len(whole) == 2 and cut[-1] == pytest.approx(whole[-1], rel=1e-3)
    ckpt = torch.load(tmp_path / "straight" / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    expected_amp = "none" if dev.type == "cpu" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert ckpt["args"]["amp"] == expected_amp
    evaluated = run(tmp_path / "eval", eval=True, resume=tmp_path / "straight" / "checkpoint-last.pth")
    assert evaluated["mIoU"] == pytest.approx(straight["mIoU"]) and 0.0 <= straight["mIoU"] <= 100.0
