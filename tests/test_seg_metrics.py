"""Segmentation metrics: the confusion matrix and mmseg's mIoU / mAcc / aAcc, against a hand-computed case and an
independent NumPy reference (per-class areas by np.bincount, mmseg's definitions)."""

import math

import numpy as np
import pytest
import torch

from util.seg_metrics import confusion_matrix, segmentation_metrics


def test_hand_computed_case() -> None:
    # 3 classes; 255 ignored. Pixels (truth, prediction):
    # (0,0) (0,0) (0,1) (1,1) (1,2) (2,2) and two ignored pixels predicted 2 and 0
    target = torch.tensor([[0, 0, 0, 1], [1, 2, 255, 255]])
    pred = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 0]])
    conf = confusion_matrix(pred, target, 3)
    assert conf.dtype == torch.int64
    assert conf.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]  # rows: ground truth
    m = segmentation_metrics(conf)
    # IoU = intersection / (truth + predicted - intersection): 2 / (3 + 2 - 2), 1 / (2 + 2 - 1), 1 / (1 + 2 - 1)
    assert m["IoU"] == pytest.approx([200 / 3, 100 / 3, 50.0])
    assert m["mIoU"] == pytest.approx((200 / 3 + 100 / 3 + 50) / 3)
    # Acc = intersection / truth: 2/3, 1/2, 1; aAcc: 4 correct of 6 labelled pixels
    assert m["Acc"] == pytest.approx([200 / 3, 50.0, 100.0])
    assert m["mAcc"] == pytest.approx((200 / 3 + 50 + 100) / 3)
    assert m["aAcc"] == pytest.approx(400 / 6)


def test_absent_classes_follow_mmseg() -> None:
    # class 2 only predicted (IoU 0, counted; Acc 0/0, left out); class 3 nowhere (both nan, left out)
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])
    m = segmentation_metrics(confusion_matrix(pred, target, 4))
    assert m["IoU"][2] == 0.0 and math.isnan(m["IoU"][3]) and math.isnan(m["Acc"][2])
    assert m["mIoU"] == pytest.approx((50 + 100 + 0) / 3)
    assert m["mAcc"] == pytest.approx((50 + 100) / 2)


def _reference(pred: np.ndarray, target: np.ndarray, K: int, ignore: int) -> dict:
    """mmseg's definitions over per-class pixel areas counted with np.bincount."""
    keep = target != ignore
    p, t = pred[keep], target[keep]
    inter = np.bincount(t[p == t], minlength=K).astype(float)
    area_pred = np.bincount(p, minlength=K).astype(float)
    area_label = np.bincount(t, minlength=K).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / (area_pred + area_label - inter)
        acc = inter / area_label
    return {
        "mIoU": 100 * np.nanmean(iou),
        "mAcc": 100 * np.nanmean(acc),
        "aAcc": 100 * inter.sum() / area_label.sum(),
        "IoU": 100 * iou,
    }


def test_against_numpy_reference() -> None:
    rng = np.random.default_rng(0)
    K = 7
    target = rng.integers(0, K - 2, size=(3, 20, 30))  # classes 5 and 6 absent from the ground truth
    target[rng.random(target.shape) < 0.2] = 255
    pred = np.where(rng.random(target.shape) < 0.6, np.clip(target, 0, K - 1), rng.integers(0, K - 1, target.shape))
    conf = torch.zeros(K, K, dtype=torch.int64)
    for i in range(3):  # accumulated image by image, as evaluation does
        conf += confusion_matrix(torch.from_numpy(pred[i]), torch.from_numpy(target[i]), K)
    got, want = segmentation_metrics(conf), _reference(pred, target, K, 255)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert got[key] == pytest.approx(want[key], rel=1e-12)
    np.testing.assert_allclose(np.array(got["IoU"]), want["IoU"], rtol=1e-12)
    assert np.isnan(want["IoU"][6]) and want["IoU"][5] == 0  # 5 predicted somewhere, 6 never


def test_ignore_index_inside_the_class_range() -> None:
    # an ignore label that is also a class number (e.g. 0 for data sets without reduce_zero_label) is skipped
    target = torch.tensor([0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1])
    assert confusion_matrix(pred, target, 3, ignore_index=1).tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 0]]
    # labels outside [0, K) are skipped too, as mmseg's histograms skip them
    assert confusion_matrix(pred, torch.tensor([0, 5, -1, 2]), 3).sum() == 2
