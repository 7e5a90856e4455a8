"""Semantic segmentation metrics: a confusion matrix accumulated over a data set, and mmseg's mIoU / mAcc / aAcc.

The confusion matrix is summed over images (and over processes with an all-reduce: it is a plain int64 tensor), then
``segmentation_metrics`` turns it into mmseg's numbers (``mmseg.core.evaluation.mean_iou``, ``total_area_to_metrics``
then the nan-mean of its evaluation summary): per class IoU = intersection / union and Acc = intersection / ground
truth area; a class whose ratio is 0 / 0 is nan and left out of the means (Acc: absent from the ground truth; IoU:
absent from both the ground truth and the prediction, a class only predicted counts as IoU 0); aAcc = correctly
labelled pixels / labelled pixels. Pixels labelled ``ignore_index`` (255: ADE20K's "other" after
``reduce_zero_label``) are not counted.

Shape legend: B batch size, H, W image size, K classes.
"""

import torch


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, nb_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """(K, K) int64 counts of pixels by (ground truth row, predicted column) for predicted labels ``pred`` and
    labels ``target`` of the same shape (e.g. (B, H, W)); pixels whose label is ``ignore_index`` or outside
    [0, K) are skipped."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and labels {tuple(target.shape)} differ in shape")
    target = target.reshape(-1).long()
    pred = pred.reshape(-1).long()
    keep = (target != ignore_index) & (target >= 0) & (target < nb_classes)
    pairs = target[keep] * nb_classes + pred[keep]  # row-major index of (truth, prediction)
    return torch.bincount(pairs, minlength=nb_classes * nb_classes).reshape(nb_classes, nb_classes)


def segmentation_metrics(conf: torch.Tensor) -> dict:
    """mmseg's metrics of a (K, K) confusion matrix (rows: ground truth), in percent: ``mIoU``, ``mAcc``, ``aAcc``
    (floats), ``IoU`` and ``Acc`` (lists of K floats, nan for a 0 / 0 class)."""
    conf = conf.double()
    intersect = conf.diag()  # (K,)
    area_label = conf.sum(1)  # (K,) ground truth pixels per class
    area_pred = conf.sum(0)  # (K,) predicted pixels per class
    union = area_label + area_pred - intersect
    iou = intersect / union  # 0 / 0 = nan: left out of the mean
    acc = intersect / area_label
    return {
        "mIoU": 100 * iou.nanmean().item(),
        "mAcc": 100 * acc.nanmean().item(),
        "aAcc": 100 * (intersect.sum() / area_label.sum()).item(),
        "IoU": (100 * iou).tolist(),
        "Acc": (100 * acc).tolist(),
    }
