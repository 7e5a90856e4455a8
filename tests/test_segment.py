"""Semantic segmentation (main_segment.py, engine_segment.py, util/seg_datasets.py): the ADE20K labels and mmseg's
pipelines, the iteration-based sampler against torch's DistributedSampler, the evaluation against counts worked by
hand, two gloo ranks against one process, resume against the uninterrupted run, both families end to end, and the
one-line errors.

Run as a script under torchrun (``test_two_ranks_equal_one_process`` does), it is the two ranks' side:

    torchrun --nproc_per_node=2 tests/test_segment.py OUT_DIR DATA
"""

import argparse
import colorsys
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_utils import env_without_dist, parse, run_torchrun  # noqa: E402

import engine_segment  # noqa: E402
import main_segment  # noqa: E402
from model_table import build_pretrain_model  # noqa: E402
from models_segment import build_segmenter  # noqa: E402
from util import lr_sched  # noqa: E402
from util.amp import NativeScalerWithGradNormCount  # noqa: E402
from util.errors import Preempted, UsageError  # noqa: E402
from util.preemption import SIGNALS  # noqa: E402
from util.seg_datasets import (  # noqa: E402
    CAT_MAX_RATIO,
    IGNORE_INDEX,
    EvalPipeline,
    IterationSampler,
    SegmentationFolder,
    TrainPipeline,
    crop_box,
    hsv_to_rgb,
    photometric_distortion,
    reduce_zero_label,
    rescale_size,
    rgb_to_hsv,
    segmentation_val_loader,
)

ROOT = Path(__file__).resolve().parent.parent
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_ade_folder(root: Path, train: int = 6, val: int = 2, size: tuple[int, int] = (48, 64)) -> Path:
    """The ADE20K layout with three classes: file value 1 on the left half, 2 on the right, a 16x16 square of 3,
    the top 4 rows 0 ("other"); each class its colour, plus noise. JPEG images, PNG annotations."""
    rng = np.random.default_rng(0)
    colours = np.array([[0, 0, 0], [200, 40, 40], [40, 200, 40], [40, 40, 200]])
    H, W = size
    for split, n in (("training", train), ("validation", val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            label = np.ones((H, W), np.uint8)
            label[:, W // 2 :] = 2
            y, x = rng.integers(4, H - 16), rng.integers(0, W - 16)
            label[y : y + 16, x : x + 16] = 3
            label[:4] = 0
            image = (colours[label] + rng.normal(0, 20, (H, W, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"ADE_{i}.jpg")
            Image.fromarray(label).save(root / "annotations" / split / f"ADE_{i}.png")
    return root


def flags(data: Path, out: Path, **overrides) -> dict:
    """A tiny run: vit_tiny_patch4 on 32x32 crops, 4 iterations in 2 epochs of 2, 16-wide heads, CPU."""
    defaults = dict(data_path=data, output_dir=out, log_dir=out, device="cpu", num_workers=0, model="vit_tiny_patch4",
                    input_size=32, nb_classes=3, batch_size=2, iters=4, eval_freq=2, warmup_iters=1, head_channels=16,
                    print_freq=100)  # fmt: skip
    return {**defaults, **overrides}


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(autouse=True)
def default_signal_handlers():
    yield
    SIGNALS.uninstall()


# ----------------------------------------------------------------------------- labels and pipelines


def test_reduce_zero_label_is_mmsegs() -> None:
    """0 ("other") and 255 are ignored (255), class c is c - 1."""
    values = np.array([[0, 1, 2], [150, 255, 7]], np.uint8)
    assert reduce_zero_label(values).tolist() == [[255, 0, 1], [149, 255, 6]]


def test_rescale_size_is_mmcvs() -> None:
    """The factor is min(long / longer side, short / shorter side), sizes rounded half up: an ADE20K image of
    683x512 (w x h) fits (2048, 512) as it is; 48x64 (h x w) to (128, 32): factor 2/3 -> 32.5 -> 32, 43.2 -> 43;
    a panorama 300x2000 to (2048, 512): 2048 / 2000 binds."""
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert rescale_size(48, 64, (128, 32)) == (32, 43)
    assert rescale_size(300, 2000, (2048, 512)) == (int(300 * 1.024 + 0.5), 2048)


def test_training_pairs_are_crops_with_padding_and_shifted_labels(tmp_path: Path) -> None:
    """Crops of 32x32 with labels 0..2 and 255; with img_scale (64, 16) the 48x64 images are resized to a height of
    16 x U(0.5, 2) < 32, so the bottom row is padding: image 0 (after normalisation), label 255."""
    data = make_ade_folder(tmp_path / "data", train=2, val=1)
    dataset = SegmentationFolder(str(data), "train", 3, TrainPipeline(32, (64, 16), MEAN, STD))
    for key in [(0, 0), (0, 1), (1, 0), (2, 1)]:
        image, label = dataset[key]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert label.shape == (32, 32) and label.dtype == torch.int64
        assert set(label.unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}
        assert (image[:, -1] == 0).all() and (label[-1] == IGNORE_INDEX).all()
        assert (label != IGNORE_INDEX).any()


def test_validation_pairs_keep_the_label_at_its_size(tmp_path: Path) -> None:
    data = make_ade_folder(tmp_path / "data", train=1, val=1)
    dataset = SegmentationFolder(str(data), "val", 3, EvalPipeline((128, 32), MEAN, STD))
    image, label = dataset[0]
    assert image.shape == (3, 32, 43)  # rescale_size(48, 64, (128, 32))
    file_values = np.array(Image.open(data / "annotations" / "validation" / "ADE_0.png"))
    assert label.tolist() == reduce_zero_label(file_values).tolist()


def test_augmentation_is_seeded_by_seed_pass_and_index(tmp_path: Path) -> None:
    """The same (pass, index) gives the same crop whatever the global RNGs hold; another pass or seed another."""
    data = make_ade_folder(tmp_path / "data", train=2, val=1)
    dataset = SegmentationFolder(str(data), "train", 3, TrainPipeline(32, (128, 32), MEAN, STD))
    torch.manual_seed(1)
    np.random.seed(1)
    first = dataset[(3, 1)]
    torch.manual_seed(2)
    np.random.seed(2)
    again = dataset[(3, 1)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], dataset[(4, 1)][0])
    dataset.seed = 1
    assert not torch.equal(first[0], dataset[(3, 1)][0])


def _reference_crop(label: np.ndarray, crop: int, seed: int) -> tuple[int, int]:
    """mmseg's RandomCrop(cat_max_ratio=0.75) with numpy's unique: the first of up to 10 draws whose most frequent
    labelled class covers less than 75% of the labelled pixels (and with two classes or more), else the 11th."""
    rng = np.random.default_rng(seed)
    H, W = label.shape
    for _ in range(10):
        y, x = int(rng.integers(0, H - crop + 1)), int(rng.integers(0, W - crop + 1))
        classes, counts = np.unique(label[y : y + crop, x : x + crop], return_counts=True)
        counts = counts[classes != IGNORE_INDEX]
        if len(counts) > 1 and counts.max() / counts.sum() < 0.75:
            return y, x
    return int(rng.integers(0, H - crop + 1)), int(rng.integers(0, W - crop + 1))


def test_crop_box_is_mmsegs_cat_max_ratio_crop() -> None:
    """A background with a 20x20 square of class 1 and a band of ignored pixels (left out of the ratio): the crops
    equal mmseg's rule for 200 seeds, and most satisfy the ratio that a single draw rarely meets."""
    label = np.zeros((100, 100), np.int64)
    label[60:80, 10:30] = 1
    label[:, 90:] = IGNORE_INDEX
    boxes = []
    for seed in range(200):
        box = crop_box(torch.from_numpy(label), 30, np.random.default_rng(seed))
        assert box == _reference_crop(label, 30, seed), seed
        boxes.append(box)
    share = [np.bincount(label[y : y + 30, x : x + 30].ravel(), minlength=256)[:2].max() / np.isin(
        label[y : y + 30, x : x + 30], [0, 1]).sum() for y, x in boxes]  # fmt: skip
    assert np.mean(np.array(share) < CAT_MAX_RATIO) > 0.5


def test_hsv_conversions_match_colorsys() -> None:
    rgb = torch.rand(3, 5, 7) * 255
    rgb[:, 0, 0] = 128  # grey: hue 0, saturation 0
    hsv = rgb_to_hsv(rgb)
    for i in range(5):
        for j in range(7):
            h, s, v = colorsys.rgb_to_hsv(*(rgb[:, i, j] / 255).tolist())
            assert hsv[:, i, j].tolist() == pytest.approx([h, s, v * 255], abs=1e-5)
    torch.testing.assert_close(hsv_to_rgb(hsv), rgb, atol=1e-3, rtol=0)


def _reference_distortion(img: np.ndarray, seed: int) -> np.ndarray:
    """mmseg's PhotoMetricDistortion, step by step, with colorsys for HSV: (H, W, 3) RGB floats in [0, 255]."""
    rng = np.random.default_rng(seed)

    def hsv_map(x: np.ndarray, fn) -> np.ndarray:
        out = np.empty_like(x)
        for idx in np.ndindex(x.shape[:2]):
            h, s, v = colorsys.rgb_to_hsv(*(x[idx] / 255))
            out[idx] = np.array(colorsys.hsv_to_rgb(*fn(h, s, v))) * 255
        return out

    def contrast(x: np.ndarray) -> np.ndarray:
        return np.floor(np.clip(x * rng.uniform(0.5, 1.5), 0, 255)) if rng.integers(2) else x

    if rng.integers(2):
        img = np.floor(np.clip(img + rng.uniform(-32, 32), 0, 255))
    mode = rng.integers(2)
    if mode == 1:
        img = contrast(img)
    if rng.integers(2):
        alpha = rng.uniform(0.5, 1.5)
        img = hsv_map(img, lambda h, s, v: (h, min(s * alpha, 1.0), v))
    if rng.integers(2):
        shift = int(rng.integers(-18, 18)) / 180
        img = hsv_map(img, lambda h, s, v: ((h + shift) % 1.0, s, v))
    if mode == 0:
        img = contrast(img)
    return img


def test_photometric_distortion_is_mmsegs() -> None:
    """Brightness +-32, contrast x0.5-1.5 first or last, saturation x0.5-1.5, hue +-18 of 180, each with
    probability 1/2, in mmseg's order and draws: 24 seeds (every branch) against a step-by-step reference."""
    img = np.random.default_rng(0).integers(0, 256, (3, 4, 3)).astype(np.float64)
    for seed in range(24):
        ours = photometric_distortion(torch.from_numpy(img).permute(2, 0, 1).float(), np.random.default_rng(seed))
        expected = _reference_distortion(img, seed)
        torch.testing.assert_close(ours.permute(1, 2, 0).double(), torch.from_numpy(expected), atol=2e-3, rtol=0)


# ----------------------------------------------------------------------------- sampler, schedule, evaluation


def test_iteration_sampler_reads_distributed_samplers_passes_one_after_the_other() -> None:
    """Each rank's stream is DistributedSampler's shard (seed + pass, tail dropped) of pass 0, then of pass 1, ...;
    epochs of 4 samples cut it, the last ending at the total; set_start skips into an epoch."""
    size, ranks, seed = 7, 2, 5
    for rank in range(ranks):
        expected = []
        for p in range(4):
            reference = torch.utils.data.DistributedSampler(
                range(size), num_replicas=ranks, rank=rank, shuffle=True, seed=seed, drop_last=True
            )
            reference.set_epoch(p)
            expected += [(p, i) for i in reference]
        sampler = IterationSampler(size, 4, 10, ranks, rank, seed)
        stream = []
        for epoch in range(3):
            sampler.set_epoch(epoch)
            stream += list(sampler)
        assert stream == expected[:10] and len(sampler) == 2  # the last epoch: 2 of 4
        sampler.set_epoch(1)
        sampler.set_start(3)
        assert list(sampler) == expected[7:8]


def test_poly_schedule_with_linear_warmup_is_mmcvs() -> None:
    """lr (1 - it / iters) after the warmup; during it, that times 1 - (1 - it / W)(1 - ratio); per group from its
    own base lr (lr x lr_scale)."""
    args = argparse.Namespace(lr=1e-4, min_lr=0.0, warmup_iters=1500, warmup_ratio=1e-6, iters=160000)
    assert lr_sched.poly_lr(0, 1e-4, 0.0, 1500, 1e-6, 160000) == pytest.approx(1e-10)
    assert lr_sched.poly_lr(750, 1e-4, 0.0, 1500, 1e-6, 160000) == pytest.approx(
        1e-4 * (1 - 750 / 160000) * (1 - 0.5 * (1 - 1e-6))
    )
    assert lr_sched.poly_lr(80000, 1e-4, 0.0, 1500, 1e-6, 160000) == pytest.approx(5e-5)
    assert lr_sched.poly_lr(80000, 1e-4, 1e-6, 1500, 1e-6, 160000) == pytest.approx(5e-5 + 5e-7)
    optimizer = torch.optim.AdamW([{"params": [nn.Parameter(torch.zeros(1))], "lr_scale": 0.5}], lr=1.0)
    assert lr_sched.adjust_learning_rate_poly(optimizer, 80000, args) == pytest.approx(5e-5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-5)


def test_loss_is_mmsegs_mean_over_all_pixels_with_the_auxiliary_head_at_04() -> None:
    """Logits at stride 4 upsampled (bilinear) to the labels; cross-entropy summed over the labelled pixels and
    divided by all pixels, ignored ones included (mmseg's default); the auxiliary head's weighted 0.4."""
    g = torch.Generator().manual_seed(0)
    logits, aux = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 1, 1, generator=g)
    target = torch.randint(0, 3, (2, 8, 8), generator=g)
    target[0, :3] = IGNORE_INDEX

    def by_hand(x: torch.Tensor) -> torch.Tensor:
        up = nn.functional.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
        logp = up.log_softmax(1)  # (2, 3, 8, 8)
        keep = target != IGNORE_INDEX
        picked = logp.gather(1, target.clamp(max=2)[:, None])[:, 0]  # (2, 8, 8)
        return -(picked * keep).sum() / target.numel()

    loss = engine_segment.SegmentationLoss()((logits, aux), target)
    torch.testing.assert_close(loss, by_hand(logits) + 0.4 * by_hand(aux))
    torch.testing.assert_close(engine_segment.SegmentationLoss()((logits, None), target), by_hand(logits))


class ConstantModel(nn.Module):
    """Logits favouring class 0 everywhere, at stride 4 (as a segmenter's)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        B, _, H, W = x.shape
        logits = torch.zeros(B, 3, -(-H // 4), -(-W // 4))
        logits[:, 0] = 1.0
        return logits, None


def test_evaluation_scores_at_the_original_size_against_hand_counts(tmp_path: Path) -> None:
    """A model that says class 0 everywhere: IoU_0 = the class-0 pixels over all labelled ones (= aAcc), other
    classes 0; Acc_0 = 100, others 0 -- counted on the annotations at their own size, not the resized images'."""
    data = make_ade_folder(tmp_path / "data", train=1, val=2)
    dataset = SegmentationFolder(str(data), "val", 3, EvalPipeline((128, 32), MEAN, STD))
    args = argparse.Namespace(num_workers=0, pin_mem=False)
    stats = engine_segment.evaluate(segmentation_val_loader(dataset, args, torch.device("cpu")), ConstantModel(), 3,
                                    32, 21, torch.device("cpu"))  # fmt: skip
    counts = np.zeros(4)
    for path in sorted((data / "annotations" / "validation").glob("*.png")):
        counts += np.bincount(np.array(Image.open(path)).ravel(), minlength=4)[:4]
    labelled = counts[1:].sum()
    assert stats["IoU"] == pytest.approx([100 * counts[1] / labelled, 0.0, 0.0])
    assert stats["aAcc"] == pytest.approx(100 * counts[1] / labelled)
    assert stats["mIoU"] == pytest.approx(100 * counts[1] / labelled / 3)
    assert stats["mAcc"] == pytest.approx(100 / 3)


# ----------------------------------------------------------------------------- two ranks, one process

GLOBAL_BATCH = 4


def ddp_setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor, argparse.Namespace]:
    """The same float64 segmenter (relative position bias on, no dropout or drop path: the ranks' random draws
    differ from one process's), batch (4, 3, 16, 16) and labels (some ignored) on every process."""
    torch.manual_seed(0)
    model = build_segmenter("vit_tiny_patch4", 3, 16, drop_path=0.0, rel_pos_bias=True, channels=8).double()
    model.decode_head.dropout = nn.Identity()
    model.auxiliary_head.dropout = nn.Identity()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (GLOBAL_BATCH, 16, 16), generator=g)
    labels[:, :2] = IGNORE_INDEX
    labels[0, 2:6] = IGNORE_INDEX  # more on rank 0: a mean over the labelled pixels only would differ per rank
    args = argparse.Namespace(
        accum_iter=1, lr=1e-3, min_lr=0.0, warmup_iters=0, warmup_ratio=1e-6, iters=10, eval_freq=10, amp="none",
        print_freq=10, batch_size=GLOBAL_BATCH, weight_decay=0.05, layer_decay=0.65,
    )  # fmt: skip
    for p in model.backbone.rel_pos_bias.parameters():  # not zero: the bias's gradient path is then exercised too
        nn.init.normal_(p, std=0.1)
    return model, images, labels, args


def ddp_step(model: nn.Module, inner: nn.Module, images, labels, args) -> None:
    optimizer = main_segment.build_optimizer(inner, args, torch.device("cpu"))
    scaler = NativeScalerWithGradNormCount("cpu", enabled=False)
    args.batch_size = images.shape[0]
    engine_segment.train_one_epoch(model, engine_segment.SegmentationLoss(), [(images, labels)], optimizer,
                                   torch.device("cpu"), 0, scaler, max_norm=1.0, args=args)  # fmt: skip


class PerChunk(nn.Module):
    """One process doing what two ranks do: the model on each half of the batch (BatchNorm statistics per half, as
    per rank without SyncBatchNorm on the CPU), the outputs put back together."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [self.model(part) for part in x.chunk(2)]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def eval_setup(data: Path) -> tuple[nn.Module, object]:
    """A float32 segmenter (the same on every process) and the validation loader of ``data`` (each rank its shard)."""
    torch.manual_seed(0)
    model = build_segmenter("vit_tiny_patch4", 3, 32, channels=8)
    dataset = SegmentationFolder(str(data), "val", 3, EvalPipeline((128, 32), MEAN, STD))
    return model, segmentation_val_loader(
        dataset, argparse.Namespace(num_workers=0, pin_mem=False), torch.device("cpu")
    )


def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    """One update (layer decay, poly lr, gradient clipping on the all-reduced gradient, the all-pixel mean loss)
    on two gloo ranks, each with half the batch, gives one process's weights; the evaluation of 3 images on two
    ranks (2 and 1 of them, confusion matrices summed) gives one process's metrics."""
    data = make_ade_folder(tmp_path / "data", train=1, val=3)
    proc = run_torchrun([str(ROOT / "tests" / "test_segment.py"), str(tmp_path), str(data)], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, loader = eval_setup(data)
    single = engine_segment.evaluate(loader, model, 3, 32, 21, torch.device("cpu"))
    for rank in (0, 1):
        stats = json.loads((tmp_path / f"eval{rank}.json").read_text())
        assert stats.keys() == single.keys()
        for k, v in single.items():
            assert stats[k] == pytest.approx(v, rel=1e-12), (rank, k)
    ddp_weights = torch.load(tmp_path / "weights.pt", weights_only=True)
    model, images, labels, args = ddp_setup()
    initial = {k: v.clone() for k, v in model.named_parameters()}
    ddp_step(PerChunk(model), model, images, labels, args)
    changed = 0
    for k, v in model.named_parameters():
        torch.testing.assert_close(ddp_weights[k], v.detach(), rtol=1e-9, atol=1e-12, msg=f"{k} differs")
        changed += not torch.equal(v, initial[k])
    assert changed == len(initial)  # every parameter moved: each got a gradient


def ddp_main(out: Path, data: Path) -> None:
    from util.dist import cleanup, get_rank, get_world_size, init_distributed_mode, wrap_ddp

    dist_args = argparse.Namespace(device="cpu", dist_url="env://", dist_on_itp=False, accum_iter=1)
    init_distributed_mode(dist_args)
    model, images, labels, args = ddp_setup()
    rank, world = get_rank(), get_world_size()
    ddp_step(wrap_ddp(model, dist_args), model, images.chunk(world)[rank], labels.chunk(world)[rank], args)
    if rank == 0:
        torch.save(dict(model.named_parameters()), out / "weights.pt")
    model, loader = eval_setup(data)
    stats = engine_segment.evaluate(loader, model, 3, 32, 21, torch.device("cpu"))
    (out / f"eval{rank}.json").write_text(json.dumps(stats))
    cleanup()


# ----------------------------------------------------------------------------- runs of main_segment.py


def test_resume_equals_uninterrupted(tmp_path: Path, monkeypatch) -> None:
    """4 iterations in 2 epochs (6 images, batch 2: the second pass starts inside epoch 1; drop path and the
    augmentation draw random numbers) straight; from the first epoch's checkpoint; and stopped by a signal inside
    epoch 1, then --resume auto: the same weights and optimizer state."""
    from test_train_resume import assert_same_state

    data = make_ade_folder(tmp_path / "data")
    straight = tmp_path / "straight"
    main_segment.main(parse(main_segment.get_args_parser(), **flags(data, straight)))

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(straight / "checkpoint-0.pth", resumed / "checkpoint-0.pth")
    args = parse(main_segment.get_args_parser(), **flags(data, resumed, resume=resumed / "checkpoint-0.pth"))
    main_segment.main(args)
    assert args.start_epoch == 1
    assert_same_state(load(straight / "checkpoint-last.pth"), load(resumed / "checkpoint-last.pth"))

    stopped = tmp_path / "stopped"
    monkeypatch.setenv("MAE_FAULT_INJECT", "signal:2")  # SIGUSR1 before global step 2: epoch 1, step 0
    with pytest.raises(Preempted):
        main_segment.main(parse(main_segment.get_args_parser(), **flags(data, stopped, print_freq=1)))
    assert (load(stopped / "checkpoint-last.pth")["epoch"], load(stopped / "checkpoint-last.pth")["step"]) == (1, 1)
    monkeypatch.delenv("MAE_FAULT_INJECT")
    main_segment.main(parse(main_segment.get_args_parser(), **flags(data, stopped, resume="auto")))
    assert_same_state(load(straight / "checkpoint-last.pth"), load(stopped / "checkpoint-last.pth"))
    lines = [json.loads(line) for line in (straight / "log.txt").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [2, 4]
    assert {"test_mIoU", "test_mAcc", "test_aAcc", "train_loss"} <= lines[0].keys()


@pytest.mark.parametrize(
    "pretrain_model, model, input_size",
    [("mae_vit_tiny_patch4", "vit_tiny_patch4", 32), ("mixmim_tiny", "mixmim_tiny_ft", 32)],
)
def test_a_pretraining_checkpoint_fine_tunes_and_evaluates(tmp_path: Path, pretrain_model, model, input_size) -> None:
    """--finetune with a pretraining checkpoint (decoder and all) loads its encoder (after 2 iterations at a
    warmup lr of ~1e-10 the patch embedding is still the checkpoint's); --eval --resume of the result writes
    mIoU, mAcc and aAcc to segment_eval.json and log.txt, the numbers of the training's own last evaluation."""
    data = make_ade_folder(tmp_path / "data", train=2, val=1)
    torch.manual_seed(0)
    pretrained = build_pretrain_model(pretrain_model, input_size).state_dict()
    ckpt = tmp_path / "pretrain.pth"
    torch.save({"model": pretrained}, ckpt)
    out = tmp_path / "out"
    run = flags(data, out, model=model, finetune=ckpt, iters=2, warmup_iters=100, input_size=input_size)
    trained = main_segment.main(parse(main_segment.get_args_parser(), **run))
    state = load(out / "checkpoint-0.pth")["model"]
    key = "patch_embed.proj.weight"
    torch.testing.assert_close(state[f"backbone.encoder.{key}"], pretrained[key], atol=1e-6, rtol=0)

    evaluated = tmp_path / "eval"
    args = parse(main_segment.get_args_parser(), **flags(data, evaluated, model=model, input_size=input_size,
                                                         eval=True, resume=out / "checkpoint-0.pth"))  # fmt: skip
    stats = main_segment.main(args)
    record = json.loads((evaluated / "segment_eval.json").read_text())
    for k in ("mIoU", "mAcc", "aAcc"):
        assert record[k] == pytest.approx(stats[k]) == pytest.approx(trained[k])
    assert len(record["IoU"]) == 3
    line = json.loads((evaluated / "log.txt").read_text())
    assert line["test_mIoU"] == pytest.approx(stats["mIoU"]) and line["checkpoint"] == str(out / "checkpoint-0.pth")


def test_tensorboard_counts_iterations(tmp_path: Path) -> None:
    """Training scalars at the iterations done (accumulated steps counted once), the evaluation's at the epoch's
    last iteration: one x axis for both."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = make_ade_folder(tmp_path / "data", train=4, val=1)
    out = tmp_path / "out"
    main_segment.main(parse(main_segment.get_args_parser(), **flags(data, out, accum_iter=2)))
    events = EventAccumulator(str(out))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("perf/test_mIoU")] == [2, 4]


# ----------------------------------------------------------------------------- bad input


def _break(data: Path, what: str) -> None:
    annotation = data / "annotations" / "training" / "ADE_1.png"
    if what == "no annotation":
        annotation.unlink()
    elif what == "size":
        Image.fromarray(np.ones((40, 64), np.uint8)).save(annotation)
    elif what == "values":
        Image.fromarray(np.full((48, 64), 9, np.uint8)).save(annotation)
    elif what == "rgb":
        Image.fromarray(np.ones((48, 64, 3), np.uint8)).save(annotation)
    elif what == "no folder":
        shutil.rmtree(data / "annotations" / "validation")


@pytest.mark.parametrize(
    "what, overrides, message",
    [
        ("no folder", {}, r"annotations/validation does not exist: --data_path holds images/"),
        ("no annotation", {}, r"image .*ADE_1.jpg has no annotation .*ADE_1.png"),
        ("size", {}, r"annotation .*ADE_1.png is 64x40, its image .*ADE_1.jpg 64x48"),
        ("values", {}, r"annotation .*ADE_1.png holds class 9, above --nb_classes 3"),
        ("rgb", {}, r"annotation .*ADE_1.png has 3 channels \(mode RGB\), not one"),
        (None, dict(in_chans=1), "--in_chans 1: segmentation reads RGB images"),
        (None, dict(skip_bad_images=True), "--skip_bad_images is for the image-folder scripts"),
        (None, dict(slide_stride=40), r"--slide_stride must be in \[1, --input_size 32\], got 40"),
        (None, dict(eval_freq=0), "--eval_freq must be at least 1, got 0"),
        (None, dict(eval=True, finetune=__file__), "--eval evaluates the --resume checkpoint"),
        (None, dict(model="mixmim_tiny", input_size=40), "--model mixmim_tiny_ft cannot be built for --input_size 40"),
        (None, dict(input_size=36), "crop 36x36: the ViT pyramid needs a multiple of twice the patch size, 8"),
        (None, dict(nb_classes=255), "--nb_classes 255: at most 254, since label 255 is the ignored one"),
        (None, dict(batch_size=1), "--batch_size 1: UperNet's BatchNorm needs at least 2 crops per process"),
        (None, dict(lr=-1), r"--lr must be positive and --min_lr in \[0, --lr\]"),
        (None, dict(layer_decay=1.5), r"--layer_decay must be in \(0, 1\]"),
        (None, dict(head_channels=0), "--head_channels must be at least 1, got 0"),
        (None, dict(clip_grad=0), "--clip_grad must be > 0, got 0"),
    ],
)
def test_bad_input_is_a_one_line_usage_error(tmp_path: Path, what, overrides: dict, message: str) -> None:
    data = make_ade_folder(tmp_path / "data", train=2, val=1)
    if what:
        _break(data, what)
    with pytest.raises(UsageError, match=message) as e:
        main_segment.main(parse(main_segment.get_args_parser(), **flags(data, tmp_path / "out", **overrides)))
    assert "\n" not in str(e.value)


def _unscored(data: Path, split: str, binary: bool) -> None:
    """Every annotation of ``split`` without a scored pixel: all 0 ("other"), or a 0 / 255 binary mask."""
    for path in (data / "annotations" / split).glob("*.png"):
        label = np.array(Image.open(path))
        Image.fromarray(np.where(label == 3, 255, 0).astype(np.uint8) if binary else np.zeros_like(label)).save(path)


@pytest.mark.parametrize("split", ["validation", "training"])
@pytest.mark.parametrize("binary", [False, True], ids=["all 0", "0/255"])
def test_annotations_without_a_scored_pixel_stop_before_training(tmp_path: Path, split: str, binary: bool) -> None:
    """Nothing scored would train on a loss of 0 and evaluate to mIoU nan: one line naming the folder and saying
    which values are scored, before any checkpoint or log line."""
    data = make_ade_folder(tmp_path / "data", train=2, val=1)
    _unscored(data, split, binary)
    with pytest.raises(UsageError, match=rf"annotations/{split} hold no scored pixel: annotation values 1\.\.3 are "
                       r'the classes, 0 \("other"\) and 255 are not scored') as e:  # fmt: skip
        main_segment.main(parse(main_segment.get_args_parser(), **flags(data, tmp_path / "out")))
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "out").glob("checkpoint-*")) and not (tmp_path / "out" / "log.txt").exists()


def test_evaluation_of_labels_without_a_scored_pixel_stops_naming_the_folder(tmp_path: Path) -> None:
    """``evaluate`` itself (datasets given to ``main`` are not scanned up front): no 0 / 0 metrics."""
    data = make_ade_folder(tmp_path / "data", train=1, val=2)
    _unscored(data, "validation", binary=False)
    dataset = SegmentationFolder(str(data), "val", 3, EvalPipeline((128, 32), MEAN, STD))
    loader = segmentation_val_loader(dataset, argparse.Namespace(num_workers=0, pin_mem=False), torch.device("cpu"))
    with pytest.raises(UsageError, match=r"annotations/validation hold no scored pixel") as e:
        engine_segment.evaluate(loader, ConstantModel(), 3, 32, 21, torch.device("cpu"))
    assert "\n" not in str(e.value)


def strict_json(text: str):
    """``json.loads`` that refuses NaN and Infinity (Python writes them; they are not JSON)."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_eval_json_and_log_lines_are_json_with_nan_as_null(tmp_path: Path) -> None:
    """A class absent from the validation labels has IoU / Acc nan (left out of the means, as mmseg's): written as
    null in segment_eval.json; a nan or infinite scalar as null too, in segment_eval.json and log.txt."""
    nan, inf = float("nan"), float("inf")
    stats = {"mIoU": nan, "mAcc": 50.0, "aAcc": inf, "IoU": [50.0, nan], "Acc": [nan, 100.0]}
    engine_segment.write_eval_json(str(tmp_path), stats, iteration=3)
    assert strict_json((tmp_path / "segment_eval.json").read_text()) == {
        "iteration": 3, "mIoU": None, "mAcc": 50.0, "aAcc": None, "IoU": [50.0, None], "Acc": [None, 100.0],
    }  # fmt: skip
    assert {k: engine_segment.json_safe(v) for k, v in stats.items()}["aAcc"] is None


def test_resume_with_another_eval_freq_is_refused(tmp_path: Path) -> None:
    data = make_ade_folder(tmp_path / "data", train=2, val=1)
    out = tmp_path / "out"
    main_segment.main(parse(main_segment.get_args_parser(), **flags(data, out, iters=2)))
    with pytest.raises(UsageError, match="written with --eval_freq 2, this run has --eval_freq 1"):
        main_segment.main(parse(main_segment.get_args_parser(), **flags(data, out, resume="auto", eval_freq=1)))


def test_a_bad_annotation_read_by_a_worker_ends_the_script_with_one_line(tmp_path: Path) -> None:
    """The DataLoader worker hands the problem to the main process: exit status 1, one ``error:`` line naming the
    file, no traceback."""
    data = make_ade_folder(tmp_path / "data", train=2, val=1)
    _break(data, "values")
    argv = []
    for k, v in flags(data, tmp_path / "out", num_workers=1).items():
        argv += [f"--{k}", str(v)]
    proc = subprocess.run([sys.executable, "main_segment.py", *argv], cwd=ROOT, env=env_without_dist(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "ADE_1.png holds class 9" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- the demo

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize(
    "what, message",
    [
        ("output_dir is a file", r"--output_dir .*out is not writable: File exists"),
        ("no Fashion-MNIST", r"--data_path .*empty: no Fashion-MNIST files in .*empty: expected train-images-idx3"),
        ("unclosed quote", r"--segment_args \"--lr '1\" does not split as a shell line: No closing quotation"),
        ("unknown flag", r"--segment_args '--bogus 1': main_segment.py refuses it: unrecognized arguments: --bogus 1"),
        ("bad value", r"--segment_args '--lr x': main_segment.py refuses it: argument --lr: invalid float value: 'x'"),
        ("checkpoint folder", r"empty is a folder, but not a Hugging Face or timm model folder"),
    ],
)
def test_the_demos_bad_input_is_one_line_before_any_scene(tmp_path: Path, what: str, message: str) -> None:
    """Each refused before the scenes are written (the data path is a folder without Fashion-MNIST, which would be
    the error were the flag not checked first)."""
    import demo_segment

    ckpt, empty, out = tmp_path / "pretrain.pth", tmp_path / "empty", tmp_path / "out"
    torch.save({"model": {"w": torch.zeros(1)}}, ckpt)
    empty.mkdir()
    argv = {"checkpoint": ckpt, "output_dir": out, "data_path": empty, "cache_dir": tmp_path / "cache",
            "train_scenes": 1, "val_scenes": 1, "iters": 1, "batch_size": 2}  # fmt: skip
    if what == "output_dir is a file":
        out.write_text("")
    elif what == "checkpoint folder":
        argv["checkpoint"] = empty
    cli = [x for k, v in argv.items() for x in (f"--{k}", str(v))]
    cli += {"unclosed quote": ["--segment_args", "--lr '1"], "unknown flag": ["--segment_args", "--bogus 1"],
            "bad value": ["--segment_args", "--lr x"]}.get(what, [])  # fmt: skip
    with pytest.raises(UsageError, match=message) as e:
        demo_segment.main(demo_segment.get_args_parser().parse_args(cli))
    assert "\n" not in str(e.value)
    assert not (out / "data").exists()


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_the_demo_labels_every_garment_pixel_and_runs_both_arms(tmp_path: Path) -> None:
    """A scene's annotation is a garment class (2..11) exactly where the canvas is not black, background (1)
    elsewhere; a short run of both arms writes results.json."""
    import demo_segment

    torch.manual_seed(0)
    ckpt = tmp_path / "pretrain.pth"
    torch.save({"model": build_pretrain_model("mae_vit_tiny_patch4", 32).state_dict()}, ckpt)
    args = demo_segment.get_args_parser().parse_args(
        ["--checkpoint", str(ckpt), "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"),
         "--device", "cpu", "--train_scenes", "4", "--val_scenes", "2", "--iters", "2", "--batch_size", "2"]
    )  # fmt: skip
    results = demo_segment.main(args)
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results
    for tag in ("pretrained", "scratch"):
        assert 0 <= results[tag]["mIoU"] <= 100 and len(results[tag]["IoU"]) == 11
    for path in (tmp_path / "out" / "data" / "images" / "training").glob("*.png"):
        image = np.array(Image.open(path))[:, :, 0]
        annotation = np.array(Image.open(tmp_path / "out" / "data" / "annotations" / "training" / path.name))
        assert ((annotation > demo_segment.BACKGROUND) == (image > 0)).all()
        assert set(np.unique(annotation)) <= set(range(1, 12))


if __name__ == "__main__":
    ddp_main(Path(sys.argv[1]), Path(sys.argv[2]))
