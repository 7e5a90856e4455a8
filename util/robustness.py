"""The robustness sets of MAE's Table 3 (ImageNet-A, -R, -Sketch, -C), read and scored for an ImageNet-1k classifier.

Every set is read by the WordNet ID (WNID) that names each class folder, never by folder order: a folder's images get
the ImageNet-1k index of its WNID in timm's ``imagenet_synsets.txt`` (the sorted WNIDs: the order ImageFolder gives
the ImageNet train set, which the classifiers' 1000 outputs follow). Layouts under ``--data_path``:

- ``imagenet-a``, ``imagenet-r``: ``root/nXXXXXXXX/*`` with (some of) their 200 classes (timm's
  ``imagenet_{a,r}_synsets.txt``). They are scored on those 200 outputs only, as by their authors: top-1 and top-5
  among the 200 logits, and the loss as a 200-way cross-entropy.
- ``imagenet-sketch``: ``root/nXXXXXXXX/*`` with the 1000 classes (the archive's ``sketch/`` folder).
- ``imagenet-c``: ``root/corruption/severity/nXXXXXXXX/*``: top-1 per corruption and severity; their mean over the 15
  standard corruptions; per corruption the corruption error CE = sum over the 5 severities of the top-1 error /
  the same sum for AlexNet, and mCE, the mean CE of the 15 (Hendrycks & Dietterich, ICLR 2019). The 4 extra
  corruptions are reported per severity and in their own mean, outside the standard mean and mCE.

A folder whose name is not a WNID of the set is a one-line error.
"""

import argparse
import functools
import json
import logging
import os
import pkgutil
from collections.abc import Callable, Collection, Sequence

import torch

from util.datasets import CheckedImageFolder, build_dataset, data_stats_of, eval_transform
from util.dist import is_main_process
from util.errors import UsageError
from util.files import append_log_line, check_output_dir, write_text_atomic

logger = logging.getLogger(__name__)

EVAL_SETS = ("imagenet", "imagenet-a", "imagenet-r", "imagenet-sketch", "imagenet-c")
_SUBSET_FILES = {"imagenet-a": "imagenet_a_synsets.txt", "imagenet-r": "imagenet_r_synsets.txt"}

# AlexNet's top-1 error (fraction of the 50,000 images) per corruption at severities 1..5: the normaliser of CE.
# From Hendrycks & Dietterich's evaluation as copied in timm's bits_and_tpu branch (imagenetc_alexnet_error_rates);
# the means over severities agree to 1e-9 with the ALEXNET_ERR of the AugMix code (0.886428, 0.894468, ...).
ALEXNET_ERR = {
    "gaussian_noise": (0.69528, 0.82542, 0.93554, 0.98138, 0.99452),
    "shot_noise": (0.71224, 0.85108, 0.93574, 0.98182, 0.99146),
    "impulse_noise": (0.78374, 0.89808, 0.9487, 0.9872, 0.99548),
    "defocus_blur": (0.65624, 0.73202, 0.85036, 0.91364, 0.94714),
    "glass_blur": (0.64308, 0.75054, 0.88806, 0.91622, 0.93344),
    "motion_blur": (0.5843, 0.70048, 0.82108, 0.8975, 0.92638),
    "zoom_blur": (0.70008, 0.76992, 0.80784, 0.84198, 0.87198),
    "snow": (0.71726, 0.88392, 0.86468, 0.9187, 0.94952),
    "frost": (0.6139, 0.79734, 0.8879, 0.89942, 0.9343),
    "fog": (0.67474, 0.7605, 0.84378, 0.8726, 0.945),
    "brightness": (0.4514, 0.48502, 0.54048, 0.62166, 0.7244),
    "contrast": (0.64548, 0.7615, 0.88874, 0.9776, 0.9927),
    "elastic_transform": (0.52596, 0.70116, 0.55686, 0.64076, 0.80554),
    "pixelate": (0.52218, 0.5462, 0.73728, 0.87092, 0.91262),
    "jpeg_compression": (0.51002, 0.54718, 0.57294, 0.65458, 0.74778),
}
CORRUPTIONS = tuple(ALEXNET_ERR)  # the 15 standard ones, in the paper's order
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
SEVERITIES = ("1", "2", "3", "4", "5")


def _timm_synsets(file: str) -> list[str]:
    return pkgutil.get_data("timm.data", f"_info/{file}").decode().split()


@functools.cache
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WNIDs in the classifiers' output order."""
    return tuple(_timm_synsets("imagenet_synsets.txt"))


def set_synsets(eval_set: str) -> tuple[str, ...]:
    """The WNIDs that ``eval_set`` may hold as class folders (A/R: their 200; the other sets: all 1000)."""
    return tuple(_timm_synsets(_SUBSET_FILES[eval_set])) if eval_set in _SUBSET_FILES else imagenet_synsets()


def class_subset(eval_set: str) -> torch.Tensor | None:
    """The ImageNet-1k indices (sorted, (K,)) of the outputs ``eval_set`` is scored on; None for all 1000."""
    if eval_set not in _SUBSET_FILES:
        return None
    index = {wnid: i for i, wnid in enumerate(imagenet_synsets())}
    return torch.tensor(sorted(index[wnid] for wnid in set_synsets(eval_set)))


class WnidFolder(CheckedImageFolder):
    """An ImageFolder whose class folders are WNIDs: an image's target is the ImageNet-1k index of its folder's WNID,
    whichever folders exist; ``classes`` are the 1000 WNIDs in that order (``classes[target]`` is the image's WNID).
    A folder not in ``allowed`` is a one-line error naming it."""

    def __init__(self, root: str, transform, allowed: Collection[str], what: str, in_chans: int = 3):
        self.allowed, self.what = frozenset(allowed), what
        super().__init__(root, transform=transform, in_chans=in_chans)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        folders = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
        unknown = [name for name in folders if name not in self.allowed]
        if unknown:
            raise UsageError(
                f"{directory}: folder {unknown[0]} is not a WNID of the {len(self.allowed)} classes of {self.what} "
                f"({len(unknown)} such folders); class folders are named by WNID, e.g. n01440764"
            )
        index = {wnid: i for i, wnid in enumerate(imagenet_synsets())}
        return list(imagenet_synsets()), {wnid: index[wnid] for wnid in folders}


def wnid_folder(root: str, transform, eval_set: str, in_chans: int = 3) -> WnidFolder:
    """``WnidFolder(root)`` for ``eval_set``'s WNIDs, with one-line errors for a missing folder or empty classes."""
    if not os.path.isdir(root):
        raise UsageError(f"--eval_set {eval_set}: folder {root} does not exist (expected one folder per WNID)")
    try:
        dataset = WnidFolder(root, transform, set_synsets(eval_set), eval_set, in_chans)
    except (FileNotFoundError, RuntimeError) as e:
        raise UsageError(f"--eval_set {eval_set}: {root} holds no images in WNID folders: {e}") from e
    return dataset


def _subfolders(root: str) -> list[str]:
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())


def imagenet_c_parts(root: str, transform, in_chans: int = 3) -> dict[str, WnidFolder]:
    """``{"corruption/severity": dataset}`` for ``root/corruption/severity/wnid/*``: the standard corruptions in the
    paper's order, then the extra ones, severities ascending. Unknown corruption or severity folders are refused."""
    if not os.path.isdir(root):
        raise UsageError(f"--eval_set imagenet-c: folder {root} does not exist")
    known = CORRUPTIONS + EXTRA_CORRUPTIONS
    present = _subfolders(root)
    for name in present:
        if name not in known:
            raise UsageError(
                f"--eval_set imagenet-c: {os.path.join(root, name)} is not an ImageNet-C corruption folder "
                f"(expected root/corruption/severity/wnid, corruptions: {', '.join(known)})"
            )
    if not present:
        raise UsageError(f"--eval_set imagenet-c: {root} has no corruption folders (root/corruption/severity/wnid)")
    parts = {}
    for corruption in (c for c in known if c in present):
        folder = os.path.join(root, corruption)
        severities = _subfolders(folder)
        if not severities or any(s not in SEVERITIES for s in severities):
            raise UsageError(
                f"--eval_set imagenet-c: {folder} holds {severities or 'no folders'}, not severity folders 1 to 5"
            )
        for severity in severities:
            parts[f"{corruption}/{severity}"] = wnid_folder(
                os.path.join(folder, severity), transform, "imagenet-c", in_chans
            )
    return parts


def eval_set_parts(args: argparse.Namespace) -> dict[str, CheckedImageFolder]:
    """The datasets ``--eval_set`` is scored on, by name (one for every set but ImageNet-C's corruption/severity
    parts), with the evaluation transform; ``imagenet`` is ``data_path/val`` exactly as ``--eval`` reads it."""
    if args.eval_set == "imagenet":
        return {"imagenet": build_dataset(is_train=False, args=args)}
    in_chans = getattr(args, "in_chans", 3)
    transform = eval_transform(args.input_size, in_chans, *data_stats_of(args))
    if args.eval_set == "imagenet-c":
        return imagenet_c_parts(args.data_path, transform, in_chans)
    dataset = wnid_folder(args.data_path, transform, args.eval_set, in_chans)
    classes = len(set_synsets(args.eval_set))
    logger.info(
        "%s: %d images in %d of its %d classes", args.data_path, len(dataset), len(dataset.class_to_idx), classes
    )
    if len(dataset.class_to_idx) < classes:
        logger.warning(
            "%s: %d of the %d classes of %s have no folder",
            args.data_path,
            classes - len(dataset.class_to_idx),
            classes,
            args.eval_set,
        )
    return {args.eval_set: dataset}


def imagenet_c_summary(
    acc1: dict[str, dict[str, float]], alexnet: dict[str, Sequence[float]] = ALEXNET_ERR
) -> dict[str, object]:
    """``acc1[corruption][severity]`` (top-1, percent) -> ``mean_acc1`` over the standard corruptions (``alexnet``'s
    keys) present, ``ce`` (percent) for each standard corruption with all 5 severities, ``mce`` (their mean, or None
    unless every standard corruption is complete) and ``extra_mean_acc1`` over the others (None without any).

    CE_c = sum_s (100 - acc1[c][s]) / sum_s alexnet[c][s], with AlexNet's errors as fractions: percent.
    """
    standard = [a for c, by_severity in acc1.items() if c in alexnet for a in by_severity.values()]
    extra = [a for c, by_severity in acc1.items() if c not in alexnet for a in by_severity.values()]
    ce = {
        c: sum(100.0 - by_severity[s] for s in SEVERITIES) / sum(alexnet[c])
        for c, by_severity in acc1.items()
        if c in alexnet and set(by_severity) == set(SEVERITIES)
    }
    return {
        "mean_acc1": sum(standard) / len(standard) if standard else None,
        "ce": ce,
        "mce": sum(ce.values()) / len(ce) if set(ce) == set(alexnet) else None,
        "extra_mean_acc1": sum(extra) / len(extra) if extra else None,
    }


def evaluate_eval_set(
    args: argparse.Namespace,
    parts: dict[str, CheckedImageFolder],
    evaluate_part: Callable[[CheckedImageFolder, torch.Tensor | None], dict[str, float]],
) -> dict[str, object]:
    """Score every part of ``--eval_set`` with ``evaluate_part(dataset, class_subset)`` (acc1, acc5, loss), log the
    results and, on the main process, write them to ``output_dir/eval_{set}.json`` and as one line to ``log.txt``.

    Returns ``{eval_set, data_path, resume, images, ...}`` with acc1 / acc5 / loss (and ``classes``, the outputs
    scored) for one dataset; for ImageNet-C ``acc1`` as ``{corruption: {severity: top-1}}`` and ``imagenet_c_summary``.
    """
    if args.output_dir:  # before the evaluation, not after it; on every rank, so that all stop alike
        check_output_dir(args.output_dir)
    subset = class_subset(args.eval_set)
    stats = {}
    for name, dataset in parts.items():
        logger.info("--eval_set %s: %s (%d images)", args.eval_set, name, len(dataset))
        stats[name] = evaluate_part(dataset, subset)
    results = {
        "eval_set": args.eval_set,
        "data_path": str(args.data_path),
        "resume": str(args.resume),
        "images": sum(len(d) for d in parts.values()),
    }
    if args.eval_set == "imagenet-c":
        acc1: dict[str, dict[str, float]] = {}
        for name, part_stats in stats.items():
            corruption, severity = name.split("/")
            acc1.setdefault(corruption, {})[severity] = part_stats["acc1"]
        results.update(acc1=acc1, **imagenet_c_summary(acc1))
        for corruption, by_severity in acc1.items():
            ce = results["ce"].get(corruption)
            logger.info(
                "ImageNet-C %-17s top-1 by severity %s%s",
                corruption,
                " ".join(f"{s}:{a:.2f}" for s, a in by_severity.items()),
                f", CE {ce:.2f}" if ce is not None else "",
            )
        mean, mce = results["mean_acc1"], results["mce"]
        logger.info(
            "ImageNet-C: mean top-1 %s over the standard corruptions; mCE %s",
            f"{mean:.2f}" if mean is not None else "-",
            f"{mce:.2f}" if mce is not None else "not given (it needs the 15 corruptions at the 5 severities)",
        )
    else:
        (part_stats,) = stats.values()
        (dataset,) = parts.values()
        results.update(part_stats, classes=len(subset) if subset is not None else len(dataset.classes))
        logger.info(
            "%s (%d classes scored): Acc@1 %.3f Acc@5 %.3f loss %.3f",
            args.eval_set,
            results["classes"],
            results["acc1"],
            results["acc5"],
            results["loss"],
        )
    if args.output_dir and is_main_process():
        write_text_atomic(
            os.path.join(args.output_dir, f"eval_{args.eval_set}.json"), json.dumps(results, indent=2) + "\n"
        )
        append_log_line(args.output_dir, results)
    return results
