"""The demo's pretrained encoder as a backbone, on Fashion-MNIST, against random initialisation (after ``demo.py``).

1. **Features per block**: the checkpoint loaded by timm's own mechanism into a ``features_only`` backbone
   (``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...), features_only=True)``), and
   20-NN top-1 (temperature 0.07) on the mean of each block's map: the demo's 4,096 labelled train images against its
   2,000 test images (the same seeded subsets as ``demo.py``).
2. **Detection**: Fashion-MNIST scenes (64x64 black canvases holding 1 to 3 garments of 16 to 32 pixels at random
   places; train scenes from the train split, test scenes from the test split), torchvision's Faster R-CNN on
   ``models_backbone.detection_backbone`` (ViTDet's simple feature pyramid for the ViT), trained for ``--steps``
   AdamW steps; box AP at IoU 0.5 (``util/box_ap.py``), the mean over the 10 classes, on the test scenes.

Both run for the pretrained encoder and for the same architecture from the classifier's random initialisation
("scratch"), with the same seed, data and budget; the k-NN also for the untrained pretraining model (the pretraining's
starting point, whose initialisation differs from the classifier's). The table is printed and written to
``output_dir/results.json`` and ``results.md``.

    python demo.py && python demo_backbone.py
"""

import argparse
import json
import logging
import os
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import FashionMNIST
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

import models_backbone
from model_table import build_pretrain_model, resolve_pretrain_name
from util.box_ap import average_precision
from util.cli import run_cli
from util.dist import setup_logging
from util.errors import UsageError
from util.fashion_mnist import CLASSES, FashionMNISTImages, prepare_root
from util.files import write_text_atomic
from util.knn import knn_accuracy
from util.seeding import seed_everything

logger = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("The demo's encoder as a backbone", add_help=False)
    parser.add_argument("--checkpoint", default="./output_demo/pretrain/checkpoint-last.pth",
                        help="the pretraining checkpoint (demo.py writes this one)")  # fmt: skip
    parser.add_argument("--model", default="vit_tiny_patch4", help="the classifier the checkpoint loads into")
    parser.add_argument("--input_size", default=32, type=int, help="the images the encoder was pretrained on")
    parser.add_argument("--output_dir", default="./output_demo/backbone")
    parser.add_argument("--data_path", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--cache_dir", default=None, help="where the unpacked Fashion-MNIST files go")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--labelled_images", default=4096, type=int, help="k-NN: train images with labels")
    parser.add_argument("--test_images", default=2000, type=int, help="k-NN: test images")
    parser.add_argument("--train_scenes", default=4096, type=int)
    parser.add_argument("--test_scenes", default=500, type=int)
    parser.add_argument("--canvas", default=64, type=int, help="scene side in pixels")
    parser.add_argument("--steps", default=300, type=int, help="detection training steps")
    parser.add_argument("--batch_size", default=8, type=int, help="scenes per detection step")
    parser.add_argument("--lr", default=3e-4, type=float, help="AdamW learning rate of the detector")
    parser.add_argument("--weight_decay", default=0.05, type=float)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return parser


# ----------------------------------------------------------------------------- scenes


class FashionMNISTScenes(Dataset):
    """Canvases with 1..3 garments each: ``(image (3, S, S) in [0, 1], target {"boxes", "labels"})``.

    Garment ``k`` of scene ``i`` is drawn from ``split`` with a generator seeded by (seed, i): a random image,
    resized (bilinear) to a side in [16, 32], pasted at a random place (overlaps keep the brighter pixel); its box is
    the tight box of its nonzero pixels, its label the class + 1 (0 is torchvision's background).
    """

    def __init__(self, root: str, train: bool, num_scenes: int, seed: int, canvas: int = 64):
        base = FashionMNIST(root, train=train, download=False)
        self.images, self.labels = base.data, base.targets  # (N, 28, 28) uint8, (N,)
        self.num_scenes, self.seed, self.canvas = num_scenes, seed + (0 if train else 1), canvas

    def __len__(self) -> int:
        return self.num_scenes

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        S = self.canvas
        scene = torch.zeros(S, S)
        boxes, labels = [], []
        for _ in range(int(torch.randint(1, 4, (), generator=g))):
            j = int(torch.randint(len(self.images), (), generator=g))
            side = int(torch.randint(16, 33, (), generator=g))
            item = F.interpolate(self.images[j][None, None].float() / 255, size=side, mode="bilinear")[0, 0]
            item = item * (item > 0.05)  # (side, side), the faint interpolation halo cut
            y, x = (int(torch.randint(S - side + 1, (), generator=g)) for _ in range(2))
            scene[y : y + side, x : x + side] = torch.maximum(scene[y : y + side, x : x + side], item)
            rows, cols = item.sum(1).nonzero()[:, 0], item.sum(0).nonzero()[:, 0]
            boxes.append([x + cols[0], y + rows[0], x + cols[-1] + 1, y + rows[-1] + 1])
            labels.append(int(self.labels[j]) + 1)
        target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}
        return scene.expand(3, -1, -1), target  # grey repeated to 3 channels, as the demo's images


def _collate(batch: list) -> tuple[list, list]:
    return [b[0] for b in batch], [b[1] for b in batch]


# ----------------------------------------------------------------------------- the two experiments


def backbone_features(args: argparse.Namespace, checkpoint: str | None) -> torch.nn.Module:
    """timm's ``features_only`` backbone of ``--model`` (every block), from ``checkpoint`` or random weights."""
    with torch.device("meta"):  # only to count the blocks
        blocks = len(timm.create_model(args.model).feature_info)
    kwargs = dict(features_only=True, out_indices=tuple(range(blocks)))
    if checkpoint:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=checkpoint))
    return timm.create_model(args.model, img_size=args.input_size, **kwargs)


@torch.no_grad()
def knn_per_block(args: argparse.Namespace, checkpoint: str | None, device: torch.device) -> list[float]:
    """20-NN top-1 (%) of the mean of each block's map, labelled train images against test images."""
    seed_everything(args.seed)
    backbone = backbone_features(args, checkpoint).to(device).eval()
    root = prepare_root(args.data_path, args.cache_dir)
    feats = {}
    for split, train, n in (("train", True, args.labelled_images), ("test", False, args.test_images)):
        data = FashionMNISTImages(root, train, n, args.seed, img_size=args.input_size)
        per_block, labels = [], []
        for images, y in DataLoader(data, batch_size=256):
            maps = backbone(images.to(device))  # one (B, D, h, w) per block
            per_block.append(torch.stack([F.normalize(m.mean(dim=(2, 3)), dim=1) for m in maps]))  # (blocks, B, D)
            labels.append(y)
        feats[split] = (torch.cat(per_block, dim=1).cpu(), torch.cat(labels))
    (train_f, train_l), (test_f, test_l) = feats["train"], feats["test"]
    return [
        knn_accuracy(train_f[b], train_l, test_f[b], test_l, [20], 0.07, len(CLASSES))["knn_k20_acc1"]
        for b in range(len(train_f))
    ]


def detection(args: argparse.Namespace, checkpoint: str | None, device: torch.device) -> dict:
    """Faster R-CNN on the encoder's feature pyramid: train ``--steps`` steps, then box AP50 on the test scenes."""
    seed_everything(args.seed)
    root = prepare_root(args.data_path, args.cache_dir)
    backbone = models_backbone.detection_backbone(args.model, checkpoint, out_channels=64, img_size=args.input_size)
    levels = len(backbone.strides) + 1  # and the "pool" level
    anchors = AnchorGenerator(tuple((8 * 2**i,) for i in range(levels)), ((0.5, 1.0, 2.0),) * levels)
    # CPU-sized heads and samples: the default 2x1024 box head on 512 RoIs per image costs ~10x this
    detector = FasterRCNN(
        backbone, min_size=args.canvas, max_size=args.canvas, rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=256, rpn_post_nms_top_n_train=128, rpn_pre_nms_top_n_test=128,
        rpn_post_nms_top_n_test=64, box_batch_size_per_image=64, box_detections_per_img=20,
        box_head=TwoMLPHead(backbone.out_channels * 7 * 7, 256), box_predictor=FastRCNNPredictor(256, len(CLASSES) + 1),
    ).to(device)  # fmt: skip
    optimizer = torch.optim.AdamW(detector.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    train = FashionMNISTScenes(root, True, args.train_scenes, args.seed, args.canvas)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=_collate, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    detector.train()
    step, start, losses = 0, time.time(), []
    while step < args.steps:
        for images, targets in loader:
            images = [im.to(device) for im in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            lr = args.lr * min(1.0, (step + 1) / max(1, args.steps // 10))  # linear warm-up over a tenth
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = sum(detector(images, targets).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if step % 50 == 0 or step == args.steps:
                logger.info("step %d/%d loss %.4f (%.1f s)", step, args.steps, sum(losses[-50:]) / len(losses[-50:]),
                            time.time() - start)  # fmt: skip
            if step == args.steps:
                break
    detector.eval()
    test = FashionMNISTScenes(root, False, args.test_scenes, args.seed, args.canvas)
    detections, targets = [], []
    with torch.no_grad():
        for images, batch_targets in DataLoader(test, batch_size=64, collate_fn=_collate):
            detections += [{k: v.cpu() for k, v in d.items()} for d in detector([im.to(device) for im in images])]
            targets += batch_targets
    ap = average_precision(detections, targets, iou=0.5)
    return {"ap50": 100 * sum(ap.values()) / len(ap), "final_loss": sum(losses[-50:]) / len(losses[-50:])}


def main(args: argparse.Namespace) -> dict:
    """Both experiments, pretrained and from random initialisation; returns (and writes) the results."""
    setup_logging(True)
    if min(args.steps, args.test_scenes, args.batch_size) < 1 or args.train_scenes < args.batch_size:
        raise UsageError("--steps, --test_scenes and --batch_size must be positive, --train_scenes >= --batch_size")
    if not os.path.exists(args.checkpoint):
        raise UsageError(f"--checkpoint {args.checkpoint} does not exist (run python demo.py first)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the pretraining model before any step (its initialisation differs from the classifier's): how much of the
    # gain over the classifier's random initialisation the pretraining itself brings
    seed_everything(args.seed)
    untrained = out / "untrained.pth"
    torch.save({"model": build_pretrain_model(resolve_pretrain_name(args.model), args.input_size).state_dict()},
               untrained)  # fmt: skip
    results: dict = {"knn_per_block": {}, "detection": {}}
    for tag, checkpoint in (("pretrained", args.checkpoint), ("untrained", str(untrained)), ("scratch", None)):
        start = time.time()
        results["knn_per_block"][tag] = knn_per_block(args, checkpoint, device)
        logger.info("%s: 20-NN per block %s (%.0f s)", tag, results["knn_per_block"][tag], time.time() - start)
        if tag == "untrained":
            continue
        start = time.time()
        results["detection"][tag] = detection(args, checkpoint, device)
        logger.info("%s: detection %s (%.0f s)", tag, results["detection"][tag], time.time() - start)

    knn = results["knn_per_block"]
    rows = [
        "| Fashion-MNIST | pretrained | untrained MAE | scratch (classifier init) |",
        "| --- | ---: | ---: | ---: |",
    ]
    rows += [f"| 20-NN top-1 (%), block {b} | {knn['pretrained'][b]:.2f} | {knn['untrained'][b]:.2f} | "
             f"{knn['scratch'][b]:.2f} |" for b in range(len(knn["pretrained"]))]  # fmt: skip
    rows.append(f"| detection box AP50 (%), {args.steps} steps | {results['detection']['pretrained']['ap50']:.2f} | "
                f"- | {results['detection']['scratch']['ap50']:.2f} |")  # fmt: skip
    table = "\n".join(rows)
    print(table)
    write_text_atomic(str(out / "results.json"), json.dumps(results, indent=2) + "\n")
    write_text_atomic(str(out / "results.md"), table + "\n")
    return results


if __name__ == "__main__":
    run_cli(argparse.ArgumentParser("The demo's encoder as a backbone", parents=[get_args_parser()]), main)
