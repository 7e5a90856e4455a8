"""Box average precision at one IoU threshold (PASCAL VOC's all-point AP), for detection experiments.

For each class, the detections of all images are ranked by score; each one is a true positive if it overlaps a not
yet matched ground-truth box of its class and image by at least ``iou`` (the best-overlapping box), else a false
positive. AP is the area under the precision-recall curve with precision made monotone (each point takes the best
precision at any higher recall). The mean is over the classes that have ground truth.
"""

import torch
from torchvision.ops import box_iou


def average_precision(
    detections: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]], iou: float = 0.5
) -> dict[int, float]:
    """AP (0..1) per class with ground truth. ``detections``: per image ``boxes`` (n, 4) x1y1x2y2, ``scores`` (n,),
    ``labels`` (n,); ``targets``: per image ``boxes`` (m, 4) and ``labels`` (m,)."""
    if len(detections) != len(targets):
        raise ValueError(f"{len(detections)} images of detections but {len(targets)} of targets")
    classes = sorted({int(c) for t in targets for c in t["labels"]})
    ap = {}
    for c in classes:
        gt = [t["boxes"][t["labels"] == c] for t in targets]
        num_gt = sum(len(g) for g in gt)
        ranked = []  # (score, image, box)
        for i, d in enumerate(detections):
            keep = d["labels"] == c
            ranked += [(float(s), i, b) for s, b in zip(d["scores"][keep], d["boxes"][keep], strict=True)]
        ranked.sort(key=lambda r: -r[0])
        matched = [torch.zeros(len(g), dtype=torch.bool) for g in gt]
        tp = []
        for _, i, box in ranked:
            hit = False
            if len(gt[i]):
                overlaps = box_iou(box[None], gt[i])[0]  # (m,)
                j = int(overlaps.argmax())
                if overlaps[j] >= iou and not matched[i][j]:
                    matched[i][j] = hit = True
            tp.append(hit)
        tp_cum = torch.tensor(tp, dtype=torch.float64).cumsum(0)
        recall = tp_cum / num_gt
        precision = tp_cum / torch.arange(1, len(tp) + 1, dtype=torch.float64)
        # all-point interpolation: precision envelope, summed over the recall steps
        recall = torch.cat([torch.zeros(1, dtype=torch.float64), recall])
        precision = torch.cat([torch.zeros(1, dtype=torch.float64), precision])
        envelope = precision.flip(0).cummax(0).values.flip(0)
        ap[c] = float(((recall[1:] - recall[:-1]) * envelope[1:]).sum())
    return ap
