"""The whole method on real images in about 4 minutes on 2 CPU cores: Fashion-MNIST, a tiny MAE (or MixMIM).

1. MAE pretraining of ``mae_vit_tiny_patch4`` on (a subset of) the Fashion-MNIST train split;
2. k-NN (``main_knn.py``, 20-NN), linear probe and fine-tuning from that checkpoint, and the same three from random
   initialisation, with the same budget (images, epochs, learning rates);
3. top-1 on the test split, pretrained vs scratch: printed as a table and written to ``results.json``; and
   reconstructions of test images (``reconstructions.png``, see ``visualize.py``).

Every stage takes its flags from the project's own entry script's parser (``main_pretrain.py``, ``main_linprobe.py``,
``main_finetune.py``; the equivalent command of each stage is logged and its ``args.json`` saved). Pretraining and
fine-tuning are the scripts' ``main(args, datasets)`` on the in-memory sets; the linear probe runs the scripts'
building blocks (the model builder, the ``--finetune`` loader, the probe head, LARS, the engine's
``train_one_epoch`` and ``evaluate``) on the frozen encoder's features, computed once. The data are read with
torchvision's ``FashionMNIST`` (from Debian's ``dataset-fashion-mnist`` package, or any folder holding the same files)
and kept in memory as tensors (padded to 32x32, 3 channels, random flips for training). docs/demo.md ("What differs
from running the scripts") lists what differs from running them on an ImageFolder.

    python demo.py                       # MAE, about 4 min on 2 CPU cores
    python demo.py --family mixmim       # the same with mixmim_tiny (64x64 inputs)
"""

import argparse
import json
import logging
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import engine_finetune
import main_finetune
import main_knn
import main_linprobe
import main_pretrain
import visualize
from engine_finetune import evaluate
from model_table import add_probe_head, build_classifier
from util.amp import NativeScalerWithGradNormCount as NativeScaler
from util.amp import autocast
from util.checkpoint import LAST, load_pretrained, save_checkpoint
from util.datasets import train_loader, val_loader
from util.dist import cleanup, setup_logging
from util.errors import NonFiniteLossError, UsageError
from util.fashion_mnist import DEFAULT_DATA_PATH, FashionMNISTImages, prepare_root
from util.files import append_log_line
from util.knn import pooled_features
from util.optim import linprobe_optimizer, scaled_lr
from util.run import begin_epoch, open_outputs, start_run

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """A family's models and the demo's budget for it (epochs are passes over the chosen subsets)."""

    pretrain_model: str
    classifier: str
    input_size: int
    mask_ratio: float
    norm_pix_loss: bool
    pretrain_images: int
    pretrain_epochs: int
    pretrain_warmup_epochs: int
    pretrain_blr: float
    labelled_images: int
    linprobe_epochs: int
    linprobe_warmup_epochs: int
    linprobe_blr: float
    finetune_images: int
    finetune_batch_size: int
    finetune_epochs: int
    finetune_warmup_epochs: int
    finetune_blr: float
    test_images: int


RECIPES = {
    "mae": Recipe(
        pretrain_model="mae_vit_tiny_patch4",
        classifier="vit_tiny_patch4",
        input_size=32,
        mask_ratio=0.75,
        norm_pix_loss=False,
        pretrain_images=12800,
        pretrain_epochs=3,
        pretrain_warmup_epochs=0,
        pretrain_blr=1.5e-4,
        labelled_images=4096,
        linprobe_epochs=50,
        linprobe_warmup_epochs=5,
        linprobe_blr=10.0,
        finetune_images=4096,
        finetune_batch_size=32,
        finetune_epochs=1,
        finetune_warmup_epochs=0,
        finetune_blr=5e-3,
        test_images=2000,
    ),
    "mixmim": Recipe(
        pretrain_model="mixmim_tiny",
        classifier="mixmim_tiny_ft",
        input_size=64,
        mask_ratio=0.5,
        norm_pix_loss=True,
        pretrain_images=4096,
        pretrain_epochs=1,
        pretrain_warmup_epochs=0,
        pretrain_blr=1.5e-4,
        labelled_images=2048,
        linprobe_epochs=50,
        linprobe_warmup_epochs=5,
        linprobe_blr=10.0,
        finetune_images=2048,
        finetune_batch_size=32,
        finetune_epochs=1,
        finetune_warmup_epochs=0,
        finetune_blr=5e-3,
        test_images=1000,
    ),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE / MixMIM demo on Fashion-MNIST", add_help=False)
    parser.add_argument("--family", default="mae", choices=sorted(RECIPES))
    parser.add_argument(
        "--data_path", default=DEFAULT_DATA_PATH, help="folder with the Fashion-MNIST idx files (gzipped or not)"
    )
    parser.add_argument(
        "--cache_dir", default=None, help="where to decompress the idx files (default: ~/.cache/mae-mixmim)"
    )
    parser.add_argument("--output_dir", default="./output_demo", help="checkpoints, logs, results.json, images")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--batch_size", default=128, type=int, help="batch size of pretraining and the linear probe")
    parser.add_argument("--num_workers", default=0, type=int, help="DataLoader workers of every stage")
    budget = parser.add_argument_group("budget (default: the family's recipe in demo.py)")
    budget.add_argument("--pretrain_images", type=int, help="train-split images to pretrain on")
    budget.add_argument("--pretrain_epochs", type=int)
    budget.add_argument("--pretrain_warmup_epochs", type=int)
    budget.add_argument("--pretrain_blr", type=float, help="pretraining base lr (lr = blr * batch / 256)")
    budget.add_argument("--mask_ratio", type=float)
    budget.add_argument("--norm_pix_loss", default=None, action=argparse.BooleanOptionalAction)
    budget.add_argument(
        "--labelled_images", type=int, help="train-split images (with labels) for the linear probe and fine-tuning"
    )
    budget.add_argument("--linprobe_blr", type=float)
    budget.add_argument("--linprobe_epochs", type=int)
    budget.add_argument("--linprobe_warmup_epochs", type=int)
    budget.add_argument("--finetune_blr", type=float)
    budget.add_argument(
        "--finetune_images", type=int, help="train-split images to fine-tune on (a prefix of the same permutation)"
    )
    budget.add_argument("--finetune_epochs", type=int)
    budget.add_argument(
        "--finetune_batch_size", type=int, help="smaller than --batch_size: more updates for the same compute"
    )
    budget.add_argument("--finetune_warmup_epochs", type=int)
    budget.add_argument("--test_images", type=int, help="test-split images to evaluate on (10000: all)")
    extra = parser.add_argument_group(
        "more flags for a stage's script, appended last (they win), e.g. "
        "--finetune_args='--aa rand-m5-mstd0.5 --reprob 0'"
    )
    extra.add_argument("--pretrain_args", default="", help="for main_pretrain.py")
    extra.add_argument("--linprobe_args", default="", help="for main_linprobe.py")
    extra.add_argument("--finetune_args", default="", help="for main_finetune.py")
    parser.add_argument(
        "--pretrained_checkpoint",
        default="",
        help="skip pretraining: probe and fine-tune this pretraining checkpoint instead",
    )
    parser.add_argument("--num_vis", default=8, type=int, help="test images to reconstruct")
    return parser


def resolve_budget(args: argparse.Namespace) -> None:
    """Fill the budget arguments that were not given from the family's recipe."""
    recipe = RECIPES[args.family]
    for name, value in vars(recipe).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


# ----------------------------------------------------------------------------- data


def load_data(args: argparse.Namespace) -> dict[str, FashionMNISTImages]:
    """The demo's three sets: pretraining images, labelled train images (a subset of those), test images.

    Pretraining: the first ``pretrain_images`` of a seeded permutation of the train split (random flips);
    probe: the first ``labelled_images`` of the same permutation; fine-tuning: the first ``finetune_images`` of
    those (random flips); test: ``test_images`` of the test split (a seeded subset, or all 10000).
    """
    root = prepare_root(args.data_path, args.cache_dir)
    size, seed = args.input_size, args.seed
    return {
        "pretrain": FashionMNISTImages(root, True, args.pretrain_images, seed, hflip=True, img_size=size),
        "labelled": FashionMNISTImages(root, True, args.labelled_images, seed, hflip=False, img_size=size),
        "finetune": FashionMNISTImages(root, True, args.finetune_images, seed, hflip=True, img_size=size),
        "test": FashionMNISTImages(root, False, args.test_images, seed, img_size=size),
    }


# ----------------------------------------------------------------------------- stages


def stage_args(script, cli: list[str]) -> argparse.Namespace:
    """The stage's arguments: ``cli`` parsed by the script's own parser (so every other flag has its default)."""
    logger.info("=== %s with %s", Path(script.__file__).name, shlex.join(cli))
    return script.get_args_parser().parse_args(cli)


def common_flags(
    args: argparse.Namespace, output_dir: Path, epochs: int, blr: float, batch_size: int | None = None
) -> list[str]:
    flags = [
        "--data_path",
        "",
        "--output_dir",
        str(output_dir),
        "--log_dir",
        "",
        "--input_size",
        str(args.input_size),
        "--batch_size",
        str(batch_size or args.batch_size),
        "--epochs",
        str(epochs),
        "--blr",
        str(blr),
        "--num_workers",
        str(args.num_workers),
        "--seed",
        str(args.seed),
        "--print_freq",
        "20",
    ]
    if args.device:
        flags += ["--device", args.device]
    return flags


def pretrain(args: argparse.Namespace, dataset: FashionMNISTImages) -> Path:
    """``main_pretrain.py`` on ``dataset``; returns the checkpoint."""
    cli = common_flags(args, Path(args.output_dir) / "pretrain", args.pretrain_epochs, args.pretrain_blr) + [
        "--model",
        args.pretrain_model,
        "--mask_ratio",
        str(args.mask_ratio),
        "--warmup_epochs",
        str(args.pretrain_warmup_epochs),
    ]
    if args.norm_pix_loss:
        cli.append("--norm_pix_loss")
    pargs = stage_args(main_pretrain, cli + shlex.split(args.pretrain_args))
    main_pretrain.main(pargs, dataset_train=dataset)
    return Path(pargs.output_dir) / LAST


@torch.no_grad()
def extract_features(model: torch.nn.Module, dataset, args: argparse.Namespace, device: torch.device):
    """(features (N, D), labels (N,)) of the frozen encoder in eval mode: the head's input (``pooled_features``)."""
    model.eval()
    feats, labels = [], []
    for images, targets in val_loader(dataset, args, device):
        with autocast(device, args.amp):
            feats.append(pooled_features(model, images.to(device)).float())
        labels.append(targets)
    return TensorDataset(torch.cat(feats).cpu(), torch.cat(labels))


def linprobe(args: argparse.Namespace, data: dict, checkpoint: Path | None, tag: str) -> float:
    """``main_linprobe.py``'s probe (cls token, BatchNorm + linear head, LARS) on cached frozen features.

    The encoder is frozen and has no dropout, so its features of an image never change: they are computed once,
    and the probe's epochs (``engine_finetune.train_one_epoch`` on the head) cost next to nothing. Unlike the
    script, the training images are not augmented.
    """
    cli = common_flags(args, Path(args.output_dir) / f"linprobe_{tag}", args.linprobe_epochs, args.linprobe_blr)
    cli += ["--model", args.classifier, "--nb_classes", "10", "--warmup_epochs", str(args.linprobe_warmup_epochs)]
    if checkpoint is not None:
        cli += ["--finetune", str(checkpoint)]
    largs = stage_args(main_linprobe, cli + shlex.split(args.linprobe_args))
    device = start_run(largs, main_linprobe.check_args)
    open_outputs(largs)  # args.json
    model = build_classifier(largs.model_name, largs.input_size, largs.nb_classes, 0.0, largs.global_pool, device)
    if largs.finetune:
        load_pretrained(model, largs.finetune, head_init_std=0.01)  # as main_linprobe.py
    add_probe_head(model)
    model.to(device)
    train_feats = extract_features(model, data["labelled"], largs, device)
    test_feats = extract_features(model, data["test"], largs, device)

    head = model.head  # BatchNorm1d (no affine) + Linear
    largs.lr = scaled_lr(largs)
    optimizer = linprobe_optimizer(head, largs.lr, largs.weight_decay)
    scaler = NativeScaler(device, enabled=largs.amp == "fp16")
    loader = train_loader(train_feats, largs, device)
    criterion = torch.nn.CrossEntropyLoss()
    largs.print_freq = 10**9  # an epoch takes milliseconds: one summary line each is enough
    for epoch in range(largs.epochs):
        begin_epoch(loader, largs, epoch)
        stats = engine_finetune.train_one_epoch(head, criterion, loader, optimizer, device, epoch, scaler, args=largs)
        append_log_line(largs.output_dir, {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch})
    save_checkpoint(largs, largs.epochs - 1, model, optimizer, scaler, numbered=False)
    return evaluate(val_loader(test_feats, largs, device), head, device, largs.amp, largs.print_freq)["acc1"]


def finetune(args: argparse.Namespace, data: dict, checkpoint: Path | None, tag: str) -> float:
    """``main_finetune.py`` on the demo's fine-tuning and test sets; top-1 on the test set."""
    cli = common_flags(
        args,
        Path(args.output_dir) / f"finetune_{tag}",
        args.finetune_epochs,
        args.finetune_blr,
        args.finetune_batch_size,
    )
    cli += ["--model", args.classifier, "--nb_classes", "10", "--warmup_epochs", str(args.finetune_warmup_epochs)]
    if checkpoint is not None:
        cli += ["--finetune", str(checkpoint)]
    fargs = stage_args(main_finetune, cli + shlex.split(args.finetune_args))
    return main_finetune.main(fargs, dataset_train=data["finetune"], dataset_val=data["test"])["acc1"]


def knn(args: argparse.Namespace, data: dict, checkpoint: Path | None, tag: str) -> float:
    """``main_knn.py`` (20-NN, T = 0.07) of the frozen encoder: the labelled images against the test images."""
    cli = ["--model", args.classifier, "--input_size", str(args.input_size), "--batch_size", "256", "--data_path", "",
           "--output_dir", str(Path(args.output_dir) / f"knn_{tag}"), "--seed", str(args.seed),
           "--num_workers", str(args.num_workers)]  # fmt: skip
    if args.device:
        cli += ["--device", args.device]
    if checkpoint is not None:
        cli += ["--finetune", str(checkpoint)]
    kargs = stage_args(main_knn, cli)
    return main_knn.main(kargs, dataset_train=data["labelled"], dataset_val=data["test"])["knn_k20_acc1"]


def save_reconstructions(args: argparse.Namespace, checkpoint: Path, test: FashionMNISTImages) -> None:
    """Reconstructions of ``num_vis`` test images spread over the test set (``visualize.py``)."""
    model = visualize.load_pretrain_checkpoint(str(checkpoint))
    num = min(args.num_vis, len(test))
    if visualize.is_mixmim(model):
        num -= num % 2  # pairs: with an odd count the middle image would be mixed with itself
    imgs = torch.stack([test[i][0] for i in torch.linspace(0, len(test) - 1, num).long().tolist()])
    visualize.save_reconstructions(model, imgs, args.output_dir, seed=args.seed)


def format_table(results: dict, args: argparse.Namespace) -> str:
    rows = [
        f"Fashion-MNIST top-1 (%) on {args.test_images} test images, {args.pretrain_model} pretrained on "
        f"{args.pretrain_images} images x {args.pretrain_epochs} epochs vs random init",
        "",
        "| protocol     | pretrained | scratch |",
        "| ------------ | ---------- | ------- |",
    ]
    for protocol, label in (("knn", "20-NN"), ("linprobe", "linear probe"), ("finetune", "fine-tune")):
        r = results[protocol]
        rows.append(f"| {label:<12} | {r['pretrained']:>10.2f} | {r['scratch']:>7.2f} |")
    return "\n".join(rows)


def main(args: argparse.Namespace) -> dict:
    resolve_budget(args)
    start = time.time()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(args)

    if args.pretrained_checkpoint:
        checkpoint = Path(args.pretrained_checkpoint)
    else:
        checkpoint = pretrain(args, data["pretrain"])
    timings = {"pretrain": time.time() - start}
    results: dict = {"knn": {}, "linprobe": {}, "finetune": {}}
    for protocol, fn in (("knn", knn), ("linprobe", linprobe), ("finetune", finetune)):
        t = time.time()
        results[protocol]["pretrained"] = fn(args, data, checkpoint, "pretrained")
        results[protocol]["scratch"] = fn(args, data, None, "scratch")
        timings[protocol] = time.time() - t
    save_reconstructions(args, checkpoint, data["test"])
    timings["total"] = time.time() - start

    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = format_table(results, args)
    (out / "results.md").write_text(table + "\n")
    logger.info("times (s): %s", ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(table, flush=True)
    print(f"\nresults.json and reconstructions.png are in {out}; total {timings['total'] / 60:.1f} min", flush=True)
    return results


if __name__ == "__main__":
    setup_logging(True)
    cli_args = argparse.ArgumentParser("MAE / MixMIM demo on Fashion-MNIST", parents=[get_args_parser()]).parse_args()
    try:
        main(cli_args)
    except (UsageError, NonFiniteLossError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        cleanup()
        sys.exit(1)
    cleanup()
