"""Training-step throughput of the OFFICIAL MAE / MixMIM code: their own ``train_one_epoch``, as shipped.

The counterpart of ``bench_train.py --loop engine`` for "ours x official" on the same device. It runs the official
repositories' engine loop unchanged: ``engine_pretrain.train_one_epoch`` (MAE and MixMIM pretraining) or MAE's
``engine_finetune.train_one_epoch`` (fine-tuning), with what their ``main_pretrain.py`` / ``main_finetune.py`` build
around it: the model from their factory (MAE pretraining ``norm_pix_loss=True`` as PRETRAIN.md, MixMIM as its
exp/base_600ep/pretrain.sh; fine-tuning ``global_pool=True``, drop path 0.1, 1000 classes), their AdamW
(pretraining: timm's ``optim_factory.add_weight_decay`` at 0.05, betas (0.9, 0.95); fine-tuning:
``util.lr_decay.param_groups_lrd`` at layer decay 0.75, weight decay 0.05), their ``NativeScalerWithGradNormCount``
(fp16 ``GradScaler``), fp16 autocast (``torch.cuda.amp.autocast()`` inside their engine), and for fine-tuning
timm's Mixup (mixup 0.8, cutmix 1.0, label smoothing 0.1) with ``SoftTargetCrossEntropy``. The mask ratio is the
official default (MAE 0.75, MixMIM 0.5). The "loader" is a list of one batch of random normal images (B, 3, 224, 224)
and random labels, already on the device, so data loading is out of the picture. One warm-up epoch of ``--warmup``
batches, then ``--repeats`` timed epochs of ``--steps`` batches, synchronised before and after; images/s =
batch x steps / seconds, the median reported. The engines' own progress lines go to stderr.

Nothing of the official code is in this repository: pass a checkout (and the timm it was written for: 0.3.2 for MAE,
0.5.4 for MixMIM) at run time; ``bash benchmarks/gpu_prepare.sh MAE_REPO MIXMIM_REPO`` fills ``.gpu/`` with both.
The checkout and ``--timm-path`` go first on ``sys.path`` and this repository is taken off it (both have a top-level
``util`` package; the official one must win). Compatibility shims, applied in this process before the official code
is imported (the official files are not touched):
  - ``torch._six`` (removed in torch 2.0): a stand-in module with ``inf``, ``container_abcs``, ``string_classes``,
    ``int_classes``; timm 0.3.2 and both ``util/misc.py`` import it.
  - ``np.float`` / ``np.int`` (removed in numpy 1.24): aliases of ``float`` / ``int``; MAE's ``util/pos_embed.py``
    uses ``np.float``.
  - without CUDA (a CPU dry run): ``torch.cuda.synchronize`` becomes a no-op (the engines call it every step);
    ``torch.cuda.amp.autocast`` and ``GradScaler`` then switch themselves off, so the row says amp "none (cpu)".
  - off CUDA, timm's ``mixup_target`` (``device='cuda'`` hard-coded) builds the soft targets on the labels' device.
  - the FutureWarnings of the deprecated ``torch.cuda.amp`` spellings (still working) are silenced.

Examples:
    python benchmarks/bench_official.py --official-path .gpu/official/mae --timm-path .gpu/timm032 \\
        --models mae_vit_base_patch16 mae_vit_large_patch16 vit_base_patch16 --batch-size 64 \\
        --warmup 3 --steps 10 --repeats 3 --device cuda --json out.json
    python benchmarks/bench_official.py --official-path .gpu/official/mixmim --timm-path .gpu/timm054 \\
        --models mixmim_base --batch-size 64 --warmup 3 --steps 10 --repeats 3 --device cuda --json out_mixmim.json
    # CPU dry run (seconds per step for base-size models)
    python benchmarks/bench_official.py --official-path .gpu/official/mae --timm-path .gpu/timm032 \\
        --models mae_vit_base_patch16 --device cpu --batch-size 2 --warmup 1 --steps 1 --repeats 1
"""

from __future__ import annotations

import argparse
import collections.abc
import contextlib
import importlib
import importlib.util
import math
import os
import random
import subprocess
import sys
import types
import warnings

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_common, before the official path is set
from bench_common import device_info, peak_memory_gib, reset_memory, time_windows, write_json  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# which official repository a checkout is: a file only it has, and its pretraining mask ratio (main_pretrain default)
REPOS = {"mixmim": ("models_mixmim.py", 0.5), "mae": ("models_mae.py", 0.75)}
# base lr (lr = blr x batch / 256): MAE PRETRAIN.md and MixMIM's pretrain.sh 1.5e-4, MAE FINETUNE.md (ViT-B) 5e-4
BLR = {"pretrain": 1.5e-4, "finetune": 5e-4}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Examples:" + __doc__.split("Examples:")[1],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--official-path", required=True, help="checkout of facebookresearch/mae or Sense-X/MixMIM")
    p.add_argument(
        "--timm-path", required=True, help="folder holding the timm package to import (.gpu/timm032, .gpu/timm054)"
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="official factory names (MAE: mae_vit_*, vit_*; MixMIM: mixmim_*); default: the checkout's base model",
    )
    p.add_argument("--batch-size", nargs="+", type=int, default=[64], help="per-device batch sizes to try")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--warmup", type=int, default=3, help="batches of the untimed warm-up epoch")
    p.add_argument("--steps", type=int, default=10, help="batches per timed epoch")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs; the median is reported")
    p.add_argument("--json", default=None, help="write the results here (after every row)")
    p.add_argument("--seed", type=int, default=0)
    return p


def detect_repo(path: str) -> str:
    """``"mae"`` or ``"mixmim"``, from the files of the checkout; SystemExit with one line otherwise."""
    if not os.path.isdir(path):
        raise SystemExit(f"error: --official-path {path}: no such directory")
    for repo, (marker, _) in REPOS.items():
        if os.path.isfile(os.path.join(path, marker)):
            return repo
    raise SystemExit(
        f"error: --official-path {path}: not an MAE or MixMIM checkout (no models_mae.py or models_mixmim.py)"
    )


def official_commit(path: str) -> str | None:
    """The checkout's commit: its COMMIT file (gpu_prepare.sh writes one), else git's HEAD if ``path`` is the top of
    its own work tree (an export inside another repository would otherwise report that repository's commit)."""
    commit_file = os.path.join(path, "COMMIT")
    if os.path.isfile(commit_file):
        with open(commit_file) as f:
            return f.read().strip() or None
    try:
        top = subprocess.run(["git", "-C", path, "rev-parse", "--show-toplevel"], capture_output=True, text=True)
        if top.returncode != 0 or os.path.realpath(top.stdout.strip()) != os.path.realpath(path):
            return None
        head = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True)
        return (head.stdout.strip() or None) if head.returncode == 0 else None
    except OSError:  # no git
        return None


def install_shims() -> None:
    """What today's torch and numpy removed and the official code (or the timm it pins) still uses."""
    # torch._six went away in torch 2.0; timm 0.3.2 (container_abcs) and both util/misc.py (inf) import it
    if importlib.util.find_spec("torch._six") is None:
        six = types.ModuleType("torch._six")
        six.inf, six.container_abcs, six.string_classes, six.int_classes = math.inf, collections.abc, (str, bytes), int
        sys.modules["torch._six"] = torch._six = six
    # numpy 1.24 removed the np.float / np.int aliases; MAE's util/pos_embed.py uses np.float
    for name, alias in (("float", float), ("int", int)):
        if name not in np.__dict__:
            setattr(np, name, alias)
    # the engines call torch.cuda.synchronize() every step; without CUDA (CPU dry run) there is nothing to wait for
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda device=None: None
    # torch.cuda.amp.autocast / GradScaler are deprecated but work; one FutureWarning per call site is only noise
    warnings.filterwarnings("ignore", message=r"`torch\.cuda\.amp\.", category=FutureWarning)


def set_import_path(official: str, timm_path: str) -> None:
    """The checkout first, then ``timm_path``; this repository's root and benchmarks/ off ``sys.path`` (an empty
    entry is the working directory, as the import system reads it)."""
    ours = {os.path.realpath(REPO_ROOT), os.path.realpath(os.path.join(REPO_ROOT, "benchmarks"))}
    kept = [e for e in sys.path if os.path.realpath(e or os.getcwd()) not in ours]
    sys.path[:] = [os.path.abspath(official), os.path.abspath(timm_path)] + kept


def import_official(repo: str, official: str, timm_path: str) -> types.SimpleNamespace:
    """Import the official modules (and the pinned timm) the main scripts use; SystemExit with one line if the
    modules found are not the ones asked for."""
    stale = [m for m in ("timm", "util", "models_mae", "models_vit", "models_mixmim") if m in sys.modules]
    if stale:  # nothing may have imported them from elsewhere before the path was set
        raise SystemExit(f"error: already imported before the official path was set: {', '.join(stale)}")
    set_import_path(official, timm_path)
    import timm

    if not _under(timm.__file__, timm_path):
        raise SystemExit(f"error: imported timm from {timm.__file__}, not from --timm-path {timm_path}")
    mods = types.SimpleNamespace(repo=repo, timm=timm)
    mods.optim_factory = importlib.import_module("timm.optim.optim_factory")
    mods.misc = importlib.import_module("util.misc")
    mods.engine_pretrain = importlib.import_module("engine_pretrain")
    if repo == "mae":
        mods.models_mae = importlib.import_module("models_mae")
        mods.models_vit = importlib.import_module("models_vit")
        mods.engine_finetune = importlib.import_module("engine_finetune")
        mods.lr_decay = importlib.import_module("util.lr_decay")
        mods.Mixup = importlib.import_module("timm.data.mixup").Mixup
        mods.SoftTargetCrossEntropy = importlib.import_module("timm.loss").SoftTargetCrossEntropy
    else:
        mods.models_mixmim = importlib.import_module("models_mixmim")  # registers mixmim_* with timm
        mods.create_model = importlib.import_module("timm.models").create_model
    for m in (mods.misc, mods.engine_pretrain):
        if not _under(m.__file__, official):
            raise SystemExit(f"error: imported {m.__name__} from {m.__file__}, not from --official-path {official}")
    return mods


def shim_mixup_device(mixup_module: types.ModuleType) -> None:
    """timm's Mixup builds its soft targets with ``device='cuda'`` hard-coded; off CUDA (a CPU dry run) build them
    where the labels are."""
    mixup_target = mixup_module.mixup_target

    def mixup_target_here(target, num_classes, lam=1.0, smoothing=0.0, device=None):
        return mixup_target(target, num_classes, lam, smoothing, device=target.device)

    mixup_module.mixup_target = mixup_target_here


def _under(file: str | None, folder: str) -> bool:
    return file is not None and os.path.realpath(file).startswith(os.path.realpath(folder) + os.sep)


def factories(module: types.ModuleType) -> set[str]:
    """The model factories a models_*.py defines: its own top-level functions (aliases included)."""
    return {
        name
        for name, obj in vars(module).items()
        if isinstance(obj, types.FunctionType) and obj.__module__ == module.__name__
    }


def kind_of(name: str, mods: types.SimpleNamespace) -> str:
    if mods.repo == "mae":
        if name in factories(mods.models_mae):
            return "pretrain"
        if name in factories(mods.models_vit):
            return "finetune"
        raise ValueError(f"{name}: not a factory of the official models_mae.py or models_vit.py")
    if name in factories(mods.models_mixmim):
        return "pretrain"
    raise ValueError(f"{name}: not a factory of the official models_mixmim.py (MixMIM: pretraining models only)")


def build(name: str, batch: int, mods: types.SimpleNamespace, device: torch.device):
    """What the official main script builds for ``name``; returns the model and ``epoch(loader)``, one call of
    their ``train_one_epoch``."""
    kind = kind_of(name, mods)
    mask_ratio = REPOS[mods.repo][1]
    # what the engines and lr_sched.adjust_learning_rate read; no warm-up, so the lr is not 0 in the first steps
    args = argparse.Namespace(
        accum_iter=1,
        batch_size=batch,
        lr=BLR[kind] * batch / 256,
        min_lr=0.0 if kind == "pretrain" else 1e-6,
        warmup_epochs=0,
        epochs=1,
        mask_ratio=mask_ratio,
        clip_grad=None,
        weight_decay=0.05,
    )
    if kind == "pretrain":
        if mods.repo == "mae":
            model = mods.models_mae.__dict__[name](norm_pix_loss=True)
        else:
            model = mods.create_model(name, norm_pix_loss=True)
        model.to(device)
        param_groups = mods.optim_factory.add_weight_decay(model, args.weight_decay)
        optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95))
        loss_scaler = mods.misc.NativeScalerWithGradNormCount()

        def epoch(loader: list) -> None:
            mods.engine_pretrain.train_one_epoch(model, loader, optimizer, device, 0, loss_scaler, None, args=args)

    else:
        args.layer_decay, args.drop_path, args.nb_classes, args.smoothing = 0.75, 0.1, 1000, 0.1
        mixup_fn = mods.Mixup(
            mixup_alpha=0.8,
            cutmix_alpha=1.0,
            cutmix_minmax=None,
            prob=1.0,
            switch_prob=0.5,
            mode="batch",
            label_smoothing=args.smoothing,
            num_classes=args.nb_classes,
        )
        model = mods.models_vit.__dict__[name](
            num_classes=args.nb_classes, drop_path_rate=args.drop_path, global_pool=True
        )
        model.to(device)
        param_groups = mods.lr_decay.param_groups_lrd(
            model, args.weight_decay, no_weight_decay_list=model.no_weight_decay(), layer_decay=args.layer_decay
        )
        optimizer = torch.optim.AdamW(param_groups, lr=args.lr)
        loss_scaler = mods.misc.NativeScalerWithGradNormCount()
        criterion = mods.SoftTargetCrossEntropy()

        def epoch(loader: list) -> None:
            mods.engine_finetune.train_one_epoch(
                model, criterion, loader, optimizer, device, 0, loss_scaler, None, mixup_fn, log_writer=None, args=args
            )

    return kind, mask_ratio, model, epoch


def seed_everything(seed: int) -> None:
    """The main scripts seed torch and numpy (timm's Mixup draws from numpy); MixMIM's masking also draws from
    Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def input_size(model: nn.Module) -> int:
    size = model.patch_embed.img_size
    return int(size[0] if isinstance(size, tuple | list) else size)


def bench_one(
    name: str, batch: int, args: argparse.Namespace, mods: types.SimpleNamespace, device: torch.device
) -> dict:
    """Build, warm up and time one model with the official loop; returns its row."""
    seed_everything(args.seed)
    reset_memory(device)
    kind, mask_ratio, model, epoch = build(name, batch, mods, device)
    size = input_size(model)
    # images around the ImageNet-normalised range; never zeros, which can run faster than real data
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)

    with contextlib.redirect_stdout(sys.stderr):  # the engines' MetricLogger lines; stdout keeps only the table
        batches = [(images, labels)]
        timing = time_windows(lambda n, run=epoch, b=batches: run(b * n), batch, args.warmup, args.steps,
                              args.repeats, device)  # fmt: skip
    row = {
        "model": name,
        "kind": kind,
        "batch": batch,
        "amp": "fp16" if device.type == "cuda" else "none (cpu)",  # the engines' torch.cuda.amp.autocast()
        "compile": False,
        "loop": "official",
        "input_size": size,
        "mask_ratio": mask_ratio if kind == "pretrain" else None,
        **timing,
        "peak_mem_gib": peak_memory_gib(device),
        # all parameters, the frozen sin-cos position tables included (111.9 M for MAE ViT-B with its decoder)
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "official_repo": mods.repo,
        "official_commit": args.official_commit,
        "timm": mods.timm.__version__,
    }
    del epoch, model, images, labels
    reset_memory(device)
    return row


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'model':<28} {'kind':<8} {'batch':>5} {'amp':>10} {'loop':>8} {'img/s':>9} {'ms/step':>8} "
        f"{'params M':>8} {'mem GiB':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:<28} {'':<8} {r['batch']:>5}  ERROR {r['error']}")
            continue
        mem = f"{r['peak_mem_gib']:7.2f}" if r["peak_mem_gib"] is not None else "      -"
        lines.append(
            f"{r['model']:<28} {r['kind']:<8} {r['batch']:>5} {r['amp']:>10} {r['loop']:>8} "
            f"{r['images_per_s']:9.1f} {r['step_ms']:8.1f} {r['params_m']:8.1f} {mem}"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> list[dict]:
    repo = detect_repo(args.official_path)
    if not os.path.isfile(os.path.join(args.timm_path, "timm", "__init__.py")):
        raise SystemExit(f"error: --timm-path {args.timm_path}: no timm package in it (timm/__init__.py)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    install_shims()
    mods = import_official(repo, args.official_path, args.timm_path)
    if repo == "mae" and device.type != "cuda":
        shim_mixup_device(sys.modules["timm.data.mixup"])
    args.official_commit = official_commit(args.official_path)
    args.models = args.models or [{"mae": "mae_vit_base_patch16", "mixmim": "mixmim_base"}[repo]]

    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        if device.index is None:  # set_device needs an index ("cuda" alone raises)
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)  # the engines' torch.cuda.synchronize() waits on the current device
        torch.backends.cudnn.benchmark = True  # as both main scripts
    info = device_info(device, mods.timm, timm_path=os.path.dirname(mods.timm.__file__), numpy=np.__version__)
    print(f"official {repo} {args.official_commit} from {args.official_path}; {info}", file=sys.stderr)

    rows = []
    for name in args.models:
        for batch in args.batch_size:
            try:
                row = bench_one(name, batch, args, mods, device)
                msg = f"{row['images_per_s']:.1f} img/s (warmup {row['warmup_s']:.1f} s)"
            except (Exception, SystemExit) as e:  # foreign code: any failure (even its sys.exit on a NaN loss) is a row
                row = {"model": name, "batch": batch, "error": f"{type(e).__name__}: {e}"[:200]}
                msg = row["error"]
                reset_memory(device)
            print(f"{name} batch {batch}: {msg}", file=sys.stderr, flush=True)
            rows.append(row)
            if args.json:  # after every row, so a run cut short keeps what it measured
                write_json(args.json, info, args, rows)
    print(format_table(rows), flush=True)
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
