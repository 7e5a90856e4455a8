"""demo_backbone.py: box AP against a hand-worked example, the Fashion-MNIST scenes' boxes against their pixels, and
a short run of both experiments from a demo-style checkpoint."""

import json
from pathlib import Path

import pytest
import torch

import demo_backbone
import models_mae
from util.box_ap import average_precision
from util.errors import UsageError
from util.fashion_mnist import prepare_root

DATA = Path("/usr/share/datasets/fashion-mnist")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="needs Debian's dataset-fashion-mnist")


def _boxes(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def test_average_precision_of_a_worked_example() -> None:
    """Class 1: 3 boxes (A, B in image 0, C in image 1); detections by score: A (hit), a duplicate of A (false), a
    miss, B (hit), C (hit). Recall 1/3, 1/3, 1/3, 2/3, 1 and precision 1, 1/2, 1/3, 1/2, 3/5; the envelope takes
    3/5 at recall 2/3 (a later, better point), so AP = 1/3 * 1 + 1/3 * 3/5 + 1/3 * 3/5 = 11/15. Class 2: one box,
    detected only at IoU 0.4: AP 0. A class without ground truth (3) is not averaged."""
    targets = [
        {"boxes": _boxes([0, 0, 10, 10], [20, 20, 30, 30]), "labels": torch.tensor([1, 1])},
        {"boxes": _boxes([0, 0, 10, 10], [40, 40, 50, 50]), "labels": torch.tensor([1, 2])},
    ]
    detections = [
        {
            "boxes": _boxes([0, 0, 10, 10], [1, 0, 10, 10], [60, 60, 70, 70], [20, 20, 30, 30]),
            "scores": torch.tensor([0.9, 0.8, 0.7, 0.6]),
            "labels": torch.tensor([1, 1, 1, 1]),
        },
        {
            "boxes": _boxes([0, 0, 10, 10], [40, 40, 44, 50], [0, 0, 5, 5]),
            "scores": torch.tensor([0.5, 0.95, 0.99]),
            "labels": torch.tensor([1, 2, 3]),
        },
    ]
    ap = average_precision(detections, targets, iou=0.5)
    assert ap.keys() == {1, 2}
    assert ap[1] == pytest.approx(11 / 15)
    assert ap[2] == 0.0
    assert average_precision(detections, targets, iou=0.3)[2] == pytest.approx(1.0)  # IoU 0.4 >= 0.3: a hit


@needs_data
def test_scene_boxes_are_the_garments_tight_boxes(tmp_path: Path) -> None:
    root = prepare_root(str(DATA), tmp_path / "cache")
    scenes = demo_backbone.FashionMNISTScenes(root, train=True, num_scenes=40, seed=0)
    counts = set()
    for i in range(len(scenes)):
        image, target = scenes[i]
        assert image.shape == (3, 64, 64) and torch.equal(image[0], image[2])
        boxes = target["boxes"].long()
        counts.add(len(boxes))
        inside = torch.zeros(64, 64, dtype=torch.bool)
        for x1, y1, x2, y2 in boxes.tolist():
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64 and 14 <= max(x2 - x1, y2 - y1) <= 32
            inside[y1:y2, x1:x2] = True
        assert not image[0][~inside].any()  # no garment pixel outside every box
        assert ((target["labels"] >= 1) & (target["labels"] <= 10)).all()
    assert counts == {1, 2, 3}
    again = demo_backbone.FashionMNISTScenes(root, train=True, num_scenes=40, seed=0)[7]
    assert torch.equal(again[0], scenes[7][0])  # a scene is a function of (seed, index)


@needs_data
def test_a_short_run_writes_both_experiments(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ckpt = tmp_path / "checkpoint-last.pth"
    torch.save({"model": models_mae.mae_vit_tiny_patch4().state_dict()}, ckpt)
    args = demo_backbone.get_args_parser().parse_args(
        ["--checkpoint", str(ckpt), "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"),
         "--device", "cpu", "--labelled_images", "100", "--test_images", "50", "--train_scenes", "16",
         "--test_scenes", "8", "--steps", "2", "--batch_size", "4"]
    )  # fmt: skip
    results = demo_backbone.main(args)
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results
    for tag in ("pretrained", "untrained", "scratch"):
        assert len(results["knn_per_block"][tag]) == 6  # the six blocks of the tiny ViT
        assert all(0 <= a <= 100 for a in results["knn_per_block"][tag])
    for tag in ("pretrained", "scratch"):
        assert 0 <= results["detection"][tag]["ap50"] <= 100
    assert results["knn_per_block"]["pretrained"] != results["knn_per_block"]["scratch"]  # the weights were loaded
    assert "| detection box AP50 (%), 2 steps |" in (tmp_path / "out" / "results.md").read_text()

    args.checkpoint = str(tmp_path / "missing.pth")
    with pytest.raises(UsageError, match="run python demo.py first"):
        demo_backbone.main(args)
