"""util/robustness.py and ``main_finetune.py --eval --eval_set``: ImageNet-A/R/Sketch/C read by WNID, A/R scored on
their 200 classes, ImageNet-C's per-severity top-1, mean and mCE, checked against hand computations.

The classifiers' logits are set by hand: a stub model for ``evaluate``, and for the runs of ``main`` a tiny ViT whose
head has zero weights, so every image gets the head's bias as its logits."""

import json
import math
import pkgutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from train_utils import make_image_folder, parse, tiny_run_args

import main_finetune
from engine_finetune import evaluate
from model_table import build_classifier
from util.errors import UsageError
from util.robustness import (
    ALEXNET_ERR,
    CORRUPTIONS,
    class_subset,
    imagenet_c_summary,
    imagenet_synsets,
    wnid_folder,
)


def timm_list(name: str) -> list[str]:
    return pkgutil.get_data("timm.data", f"_info/{name}").decode().split()


A_SYNSETS = timm_list("imagenet_a_synsets.txt")
A_INDICES = [int(i) for i in timm_list("imagenet_a_indices.txt")]
TENCH, GOLDFISH = "n01440764", "n01443537"  # ImageNet-1k classes 0 and 1; neither is one of ImageNet-A's 200


def make_wnid_folders(root: Path, images: dict[str, int]) -> Path:
    """``root/wnid/{i}.JPEG`` with ``images[wnid]`` tiny images each, the folders made in the order given."""
    for wnid, n in images.items():
        (root / wnid).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (12, 12), (i * 40, 90, 200)).save(root / wnid / f"{i}.JPEG")
    return root


def test_class_order_and_subsets_are_timms() -> None:
    """The outputs follow the sorted 1000 WNIDs; A's and R's subsets are timm's index lists (which name the same
    classes by index); Sketch and C are scored on all 1000."""
    assert list(imagenet_synsets()) == sorted(imagenet_synsets()) and len(set(imagenet_synsets())) == 1000
    assert imagenet_synsets()[:2] == (TENCH, GOLDFISH)
    assert class_subset("imagenet-a").tolist() == A_INDICES
    assert class_subset("imagenet-r").tolist() == [int(i) for i in timm_list("imagenet_r_indices.txt")]
    assert class_subset("imagenet-sketch") is None and class_subset("imagenet-c") is None


def test_alexnet_table() -> None:
    """The per-severity table averages to the per-corruption AlexNet errors of the AugMix code (an independent
    copy), and a model with AlexNet's errors has CE 100 on every corruption, hence mCE 100."""
    augmix = [0.886428, 0.894468, 0.922640, 0.819880, 0.826268, 0.785948, 0.798360, 0.866816, 0.826572,
              0.819324, 0.564592, 0.853204, 0.646056, 0.717840, 0.606500]  # fmt: skip
    assert len(CORRUPTIONS) == 15
    for corruption, mean in zip(CORRUPTIONS, augmix, strict=True):
        assert sum(ALEXNET_ERR[corruption]) / 5 == pytest.approx(mean, abs=1e-9), corruption
    alexnet = {c: {str(s + 1): 100 * (1 - e) for s, e in enumerate(errs)} for c, errs in ALEXNET_ERR.items()}
    summary = imagenet_c_summary(alexnet)
    assert summary["mce"] == pytest.approx(100.0)
    assert all(ce == pytest.approx(100.0) for ce in summary["ce"].values())


class FixedLogits(torch.nn.Module):
    """Image i (its first pixel holds i) gets the logits ``logits[i]``."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0, 0, 0].long()]


def test_scores_are_restricted_to_the_200_classes() -> None:
    """Top-1, top-5 and the loss among the 200 logits of ImageNet-A, whatever the other 800 say."""
    a0, a1, a2, a3, a4, a5, a6 = A_INDICES[:7]
    logits = torch.zeros(4, 1000)
    targets = torch.tensor([a0, a1, a2, a6])
    logits[0, [0, a0, a1]] = torch.tensor([9.0, 5.0, 4.0])  # class 0 (not in A) is higher: correct among the 200
    logits[1, [a0, a1]] = torch.tensor([5.0, 4.0])  # a0 wins: wrong, second among the 200
    logits[2, [a0, a1, a3, a4, a2]] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])  # a2 fifth: top-5 only
    logits[3, [a0, a1, a2, a3, a4, a5]] = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])  # a6 sixth: neither
    images = torch.zeros(4, 3, 2, 2)
    images[:, 0, 0, 0] = torch.arange(4.0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, targets), batch_size=3)

    stats = evaluate(loader, FixedLogits(logits), torch.device("cpu"), class_subset=class_subset("imagenet-a"))
    assert stats["acc1"] == pytest.approx(25.0)
    assert stats["acc5"] == pytest.approx(75.0)
    # 200-way cross-entropy: log(sum of exp over the 200 logits) - the target's logit
    zeros = 200 - torch.tensor([2, 2, 5, 6])  # the subset's logits that are 0
    tops = [[5.0, 4.0], [5.0, 4.0], [5.0, 4.0, 3.0, 2.0, 1.0], [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]]
    target_logit = [5.0, 4.0, 1.0, 0.0]
    losses = [
        math.log(z + sum(math.exp(v) for v in t)) - y
        for z, t, y in zip(zeros.tolist(), tops, target_logit, strict=True)
    ]
    assert stats["loss"] == pytest.approx(sum(losses) / 4, rel=1e-5)

    everything = evaluate(loader, FixedLogits(logits), torch.device("cpu"))  # all 1000: image 0 is wrong
    assert everything["acc1"] == 0.0


def test_folders_map_by_wnid_not_by_order(tmp_path: Path) -> None:
    """A few of A's 200 folders, made out of order: each image's target is its WNID's ImageNet-1k index (timm's
    index list), not the folder's rank; ``classes`` names the target's WNID."""
    picks = {A_SYNSETS[150]: 1, A_SYNSETS[3]: 2, A_SYNSETS[77]: 1}
    dataset = wnid_folder(str(make_wnid_folders(tmp_path / "a", picks)), None, "imagenet-a")
    expected = sorted([A_INDICES[3]] * 2 + [A_INDICES[77], A_INDICES[150]])
    assert sorted(dataset.targets) == expected
    for path, target in dataset.samples:
        assert Path(path).parent.name == dataset.classes[target]
    sketch = wnid_folder(str(make_wnid_folders(tmp_path / "s", {GOLDFISH: 1, "n15075141": 1})), None, "imagenet-sketch")
    assert sorted(sketch.targets) == [1, 999]


@pytest.mark.parametrize(
    "eval_set, folders, message",
    [
        ("imagenet-a", {A_SYNSETS[0]: 1, TENCH: 1}, f"folder {TENCH} is not a WNID of the 200 classes of imagenet-a"),
        ("imagenet-r", {"class0": 1}, "folder class0 is not a WNID of the 200 classes of imagenet-r"),
        ("imagenet-sketch", {"n99999999": 1}, "folder n99999999 is not a WNID of the 1000 classes of imagenet-sketch"),
    ],
)
def test_a_folder_not_in_the_list_is_a_one_line_error(tmp_path: Path, eval_set: str, folders: dict, message: str):
    root = make_wnid_folders(tmp_path / "set", folders)
    with pytest.raises(UsageError, match=message) as e:
        wnid_folder(str(root), None, eval_set)
    assert "\n" not in str(e.value)


def test_imagenet_c_summary_by_hand() -> None:
    """With a two-corruption AlexNet table: the mean over the standard corruptions' parts, CE = sum of errors /
    sum of AlexNet's, mCE only once every corruption of the table has its 5 severities, extras apart."""
    table = {"noise": (0.5, 0.5, 0.5, 0.5, 0.5), "blur": (0.2, 0.4, 0.6, 0.8, 1.0)}
    acc1 = {
        "noise": {"1": 80.0, "2": 70.0, "3": 60.0, "4": 50.0, "5": 40.0},  # errors 20..60, sum 200 -> CE 200/2.5 = 80
        "blur": {"1": 90.0, "2": 80.0, "3": 70.0, "4": 60.0, "5": 50.0},  # errors sum 150 -> CE 150/3.0 = 50
        "spatter": {"1": 10.0, "3": 30.0},
    }
    summary = imagenet_c_summary(acc1, table)
    assert summary["mean_acc1"] == pytest.approx((300 + 350) / 10)
    assert summary["ce"] == pytest.approx({"noise": 80.0, "blur": 50.0})
    assert summary["mce"] == pytest.approx(65.0)
    assert summary["extra_mean_acc1"] == pytest.approx(20.0)
    del acc1["blur"]["5"]  # a severity missing: no CE for blur, no mCE
    summary = imagenet_c_summary(acc1, table)
    assert summary["ce"] == pytest.approx({"noise": 80.0}) and summary["mce"] is None
    assert summary["mean_acc1"] == pytest.approx((300 + 300) / 9)


def constant_logits_checkpoint(path: Path, bias: torch.Tensor) -> Path:
    """A tiny ViT (32x32, 1000 classes) whose head gives every image the logits ``bias``."""
    model = build_classifier("vit_tiny_patch4", 32, 1000, 0.0, True, torch.device("cpu"))
    model.head.weight.data.zero_()
    model.head.bias.data.copy_(bias)
    torch.save({"model": model.state_dict()}, path)
    return path


def eval_args(tmp_path: Path, data: Path, checkpoint: Path, **flags):
    flags = tiny_run_args(data, tmp_path / "out", model="vit_tiny_patch4", eval=True, resume=checkpoint, **flags)
    return parse(main_finetune.get_args_parser(), **flags)


def test_imagenet_a_run_writes_its_scores(tmp_path: Path) -> None:
    """``--eval --eval_set imagenet-a``: class 0 (not in A) has the highest logit, A[10] the highest of the 200, then
    A[0], A[1], A[2], A[3]: of the images of A[0] (2), A[10] (1) and A[3] (1), one is right at top-1, all at top-5."""
    bias = -1 - torch.arange(1000.0) / 1000  # distinct: lower classes first
    bias[0], bias[A_INDICES[10]], bias[A_INDICES[0]] = 10.0, 5.0, 4.0
    checkpoint = constant_logits_checkpoint(tmp_path / "ckpt.pth", bias)
    data = make_wnid_folders(tmp_path / "imagenet-a", {A_SYNSETS[3]: 1, A_SYNSETS[10]: 1, A_SYNSETS[0]: 2})
    stats = main_finetune.main(eval_args(tmp_path, data, checkpoint, eval_set="imagenet-a"))

    subset = bias[A_INDICES]
    loss = [torch.logsumexp(subset, 0) - bias[A_INDICES[k]] for k in (0, 0, 3, 10)]
    assert stats["acc1"] == pytest.approx(25.0) and stats["acc5"] == pytest.approx(100.0)
    assert stats["loss"] == pytest.approx(float(sum(loss) / 4), rel=1e-5)
    assert stats["classes"] == 200 and stats["images"] == 4
    written = json.loads((tmp_path / "out" / "eval_imagenet-a.json").read_text())
    assert written == json.loads(json.dumps(stats))
    (line,) = (tmp_path / "out" / "log.txt").read_text().splitlines()
    assert json.loads(line) == written


def test_imagenet_c_run(tmp_path: Path) -> None:
    """``--eval_set imagenet-c``: the argmax is class 0 (tench) for every image, so each part's top-1 is its share
    of tench images; the extra corruption (spatter) stays out of the mean; no mCE without all 75 parts."""
    bias = -torch.arange(1000.0) / 1000
    checkpoint = constant_logits_checkpoint(tmp_path / "ckpt.pth", bias)
    root = tmp_path / "imagenet-c"
    make_wnid_folders(root / "spatter" / "1", {TENCH: 1})
    make_wnid_folders(root / "fog" / "3", {GOLDFISH: 1})
    make_wnid_folders(root / "gaussian_noise" / "2", {TENCH: 1})
    make_wnid_folders(root / "gaussian_noise" / "1", {GOLDFISH: 1, TENCH: 1})
    stats = main_finetune.main(eval_args(tmp_path, root, checkpoint, eval_set="imagenet-c"))

    acc1 = {"gaussian_noise": {"1": 50.0, "2": 100.0}, "fog": {"3": 0.0}, "spatter": {"1": 100.0}}
    assert stats["acc1"] == acc1 and list(stats["acc1"]) == list(acc1)  # the paper's order, extras last
    assert stats["mean_acc1"] == pytest.approx(50.0) and stats["extra_mean_acc1"] == 100.0
    assert stats["ce"] == {} and stats["mce"] is None and stats["images"] == 5
    written = json.loads((tmp_path / "out" / "eval_imagenet-c.json").read_text())
    assert written["acc1"] == acc1 and written["mce"] is None


def test_imagenet_c_layout_errors(tmp_path: Path) -> None:
    """A corruption folder given as the root, or an unknown corruption, is a one-line error."""
    make_wnid_folders(tmp_path / "fog" / "1", {TENCH: 1})
    args = eval_args(tmp_path, tmp_path / "fog", "", eval_set="imagenet-c")
    with pytest.raises(UsageError, match="fog/1 is not an ImageNet-C corruption folder") as e:
        main_finetune.main(args)
    assert "\n" not in str(e.value)
    make_wnid_folders(tmp_path / "c" / "fog" / "six", {TENCH: 1})
    with pytest.raises(UsageError, match=r"fog holds \['six'\], not severity folders 1 to 5"):
        main_finetune.main(eval_args(tmp_path, tmp_path / "c", "", eval_set="imagenet-c"))


def test_eval_set_without_eval_is_refused(tmp_path: Path) -> None:
    args = parse(main_finetune.get_args_parser(), **tiny_run_args(tmp_path, tmp_path / "out"), eval_set="imagenet-r")
    with pytest.raises(UsageError, match="--eval_set imagenet-r chooses the set --eval evaluates: add --eval") as e:
        main_finetune.main(args)
    assert "\n" not in str(e.value)


def test_eval_set_with_a_validation_set_passed_in_is_refused(tmp_path: Path) -> None:
    """--eval_set reads the set's own layout from --data_path: a dataset given to main would be ignored."""
    data = make_image_folder(tmp_path / "data", per_class=1, val_per_class=1)
    args = parse(main_finetune.get_args_parser(), **tiny_run_args(data, tmp_path / "out"), eval=True,
                 eval_set="imagenet-a", nb_classes=1000)  # fmt: skip
    given = torch.utils.data.TensorDataset(torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))
    with pytest.raises(UsageError, match="--eval_set imagenet-a reads its set from --data_path"):
        main_finetune.main(args, dataset_val=given)


def test_every_rank_checks_the_output_dir_before_evaluating(tmp_path: Path, monkeypatch) -> None:
    """An unwritable --output_dir stops every rank before the evaluation, not the main process alone (the others
    would wait in the evaluation's all-reduce): here a process that is not the main one."""
    checkpoint = constant_logits_checkpoint(tmp_path / "ckpt.pth", torch.zeros(1000))
    data = make_wnid_folders(tmp_path / "imagenet-a", {A_SYNSETS[0]: 1})
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr("util.robustness.is_main_process", lambda: False)
    args = eval_args(tmp_path, data, checkpoint, eval_set="imagenet-a")
    args.output_dir = str(tmp_path / "a_file" / "sub")
    with pytest.raises(UsageError, match="--output_dir .*a_file/sub is not writable"):
        main_finetune.main(args)


def test_eval_set_imagenet_is_plain_eval(tmp_path: Path) -> None:
    """``--eval_set imagenet`` scores ``data_path/val`` exactly as ``--eval`` alone (which writes nothing)."""
    data = make_image_folder(tmp_path / "data", classes=3, per_class=1, val_per_class=2)
    model = build_classifier("vit_tiny_patch4", 32, 3, 0.0, True, torch.device("cpu"))
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pth")
    plain = main_finetune.main(eval_args(tmp_path, data, tmp_path / "ckpt.pth"))
    assert not (tmp_path / "out").exists()
    chosen = main_finetune.main(eval_args(tmp_path, data, tmp_path / "ckpt.pth", eval_set="imagenet"))
    assert {k: chosen[k] for k in plain} == plain and chosen["classes"] == 3
    assert json.loads((tmp_path / "out" / "eval_imagenet.json").read_text())["acc1"] == plain["acc1"]
