"""Training-step throughput: images/s, peak memory, model FLOPs and MFU of a full step on synthetic data.

A step is what the training scripts do per batch: forward under autocast, backward (through the loss scaler for
fp16), gradient norm, AdamW step (fused on CUDA), ``zero_grad``. Images (and labels for the classifiers) are random
tensors already on the device, so the data loader is out of the picture (``bench_data.py`` measures that). The only
host synchronisations are the two around each timed window. ``--loop engine`` runs the training scripts' own
epoch function instead (``engine_pretrain``/``engine_finetune.train_one_epoch``: lr schedule, metric logging with
the loss read back every ``--print-freq`` steps; pretraining images as uint8, normalised on the device), one epoch
per timed window, so the figure is what the scripts get with an infinitely fast loader.

Model FLOPs are counted once per model with ``torch.utils.flop_counter.FlopCounterMode`` over one eager forward and
backward (matrix products, convolutions and attention; attention is counted through the math SDPA kernel, so the
count is the same on every device). MFU = FLOPs per image x images/s / ``--peak-tflops``; pass the dense peak of your
device for the precision you run (H100 SXM: 989 TFLOP/s bf16/fp16 dense, 495 tf32).

Pretraining models (``mae_vit_*``, ``mixmim_*``) are stepped on their own loss at their default mask ratio (MAE
0.75, MixMIM 0.5); classifiers (``vit_*``, ``mixmim_*_ft``) on cross-entropy against random labels, with
``--drop-path`` (0.1 as in the official fine-tuning recipes).

Examples:
    # H100
    python benchmarks/bench_train.py --models mae_vit_base_patch16 mae_vit_large_patch16 vit_base_patch16 \\
        mixmim_base --batch-size 128 --amp bf16 --compile both --peak-tflops 989 --json bench_h100.json
    # FLOPs per image of every size, and the images/s of 100% MFU on an H100 (meta device: any machine, seconds)
    python benchmarks/bench_train.py --flops-only --peak-tflops 989 --models mae_vit_huge_patch14 mixmim_large
    # CPU, 2 threads
    python benchmarks/bench_train.py --device cpu --threads 2 --models mae_vit_base_patch16 --batch-size 4 \\
        --amp none --warmup 2 --steps 5
"""

from __future__ import annotations

import argparse
import functools
import itertools
import logging
import math
import os
import sys
from collections.abc import Callable

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import device_info, peak_memory_gib, reset_memory, time_windows, write_json  # noqa: E402

import engine_finetune  # noqa: E402
import engine_pretrain  # noqa: E402
import models_mae  # noqa: E402,F401  (registers the models with timm)
import models_mixmim  # noqa: E402,F401
import models_vit  # noqa: E402,F401
from model_table import compile_model, family_defaults, family_of, is_pretrain_model  # noqa: E402
from util.amp import NativeScalerWithGradNormCount, autocast  # noqa: E402
from util.optim import finetune_optimizer, pretrain_optimizer  # noqa: E402

logger = logging.getLogger("bench_train")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mae_vit_base_patch16"], help="timm names of our models")
    p.add_argument("--batch-size", nargs="+", type=int, default=[64], help="per-device batch sizes to try")
    p.add_argument("--amp", nargs="+", default=["bf16"], choices=["bf16", "fp16", "none"])
    p.add_argument("--compile", default="off", choices=["off", "on", "both"], help="torch.compile the model")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: its default)")
    p.add_argument(
        "--loop",
        nargs="+",
        default=["step"],
        choices=["step", "engine"],
        help="step: the bare training step; engine: the scripts' train_one_epoch (see above)",
    )
    p.add_argument("--print-freq", type=int, default=20, help="engine loop: read the loss back every N steps")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens here)")
    p.add_argument("--steps", type=int, default=30, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported")
    p.add_argument("--input-size", type=int, default=None, help="image side (default: the model's)")
    p.add_argument("--mask-ratio", type=float, default=None, help="default: the model's (MAE 0.75, MixMIM 0.5)")
    p.add_argument("--drop-path", type=float, default=0.1, help="classifiers' stochastic depth")
    p.add_argument("--no-fused", action="store_true", help="AdamW without fused=True on CUDA")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU, e.g. 989 (H100 SXM bf16)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--flops-only",
        action="store_true",
        help="only count the FLOPs per image, on the meta device (no weights, no timing; seconds even for ViT-H)",
    )
    return p


def build_model(name: str, args: argparse.Namespace, device: torch.device) -> nn.Module:
    kwargs = {}
    if args.input_size is not None:
        kwargs["img_size"] = args.input_size
    if family_of(name) == "mixmim":  # the attention path the scripts build for this device (model_table.py)
        kwargs["fused_attn"] = device.type == "cuda"
    model = timm.create_model(name, **kwargs)
    if not is_pretrain_model(model):
        model = timm.create_model(name, num_classes=1000, drop_path_rate=args.drop_path, **kwargs)
    return model.to(device).train()


def param_count(model: nn.Module) -> int:
    """Parameters, and the fixed position tables the official models count as (frozen) parameters: MixMIM's is a
    buffer here."""
    tables = sum(b.numel() for n, b in model.named_buffers() if n.endswith("absolute_pos_embed"))
    return sum(p.numel() for p in model.parameters()) + tables


def input_size(model: nn.Module) -> int:
    size = getattr(model, "img_size", None) or model.patch_embed.img_size
    return int(size[0] if isinstance(size, tuple | list) else size)


def make_optimizer(model: nn.Module, device: torch.device, fused: bool) -> torch.optim.Optimizer:
    """The training scripts' AdamW (util/optim.py): pretraining's two weight-decay groups, or fine-tuning's
    layer-decay groups (0.75); fused kernels on CUDA unless ``--no-fused``."""
    if is_pretrain_model(model):
        return pretrain_optimizer(model, 1e-4, 0.05, device, fused=fused)
    return finetune_optimizer(model, 1e-4, 0.05, 0.75, device, fused=fused)


def make_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    amp: str,
    device: torch.device,
    mask_ratio: float | None,
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One training step; returns nothing, so nothing forces a host synchronisation."""
    pretrain = is_pretrain_model(model)
    scaler = NativeScalerWithGradNormCount(device, enabled=amp == "fp16")
    params = [p for p in model.parameters() if p.requires_grad]
    fwd_kwargs = {} if mask_ratio is None else {"mask_ratio": mask_ratio}

    def step(images: torch.Tensor, targets: torch.Tensor) -> None:
        with autocast(device, amp):
            if pretrain:
                loss = model(images, **fwd_kwargs)[0]
            else:
                loss = F.cross_entropy(model(images), targets)
        scaler(loss, optimizer, parameters=params)  # backward, unscale, grad norm, optimizer step
        optimizer.zero_grad(set_to_none=True)

    return step


def default_mask_ratio(model: nn.Module) -> float:
    """The family's official mask ratio (MAE 0.75, MixMIM 0.5), as main_pretrain.py's default; compiled or not."""
    return family_defaults(model).mask_ratio


def mask_ratio_for(model: nn.Module, mask_ratio: float | None) -> float | None:
    """The ratio a pretraining model is stepped at: ``--mask-ratio`` if given, else its own default; None for
    classifiers."""
    if mask_ratio is None and is_pretrain_model(model):
        return default_mask_ratio(model)
    return mask_ratio


def make_engine_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    amp: str,
    device: torch.device,
    mask_ratio: float | None,
    batch: int,
    print_freq: int,
) -> Callable[[torch.Tensor, torch.Tensor, int], None]:
    """``steps`` steps of the training scripts' ``train_one_epoch`` on one batch, at a constant lr."""
    pretrain = is_pretrain_model(model)
    mask_ratio = mask_ratio_for(model, mask_ratio)
    scaler = NativeScalerWithGradNormCount(device, enabled=amp == "fp16")
    args = argparse.Namespace(
        accum_iter=1,
        lr=1e-4,
        min_lr=1e-4,
        warmup_epochs=0,
        epochs=1,
        mask_ratio=mask_ratio,
        amp=amp,
        clip_grad=None,
        print_freq=print_freq,
        batch_size=batch,
    )
    criterion = nn.CrossEntropyLoss()

    def epoch(images: torch.Tensor, targets: torch.Tensor, steps: int) -> None:
        data = [(images, targets)] * steps
        if pretrain:
            engine_pretrain.train_one_epoch(model, data, optimizer, device, 0, scaler, args=args)
        else:
            engine_finetune.train_one_epoch(model, criterion, data, optimizer, device, 0, scaler, args=args)

    return epoch


def count_flops_per_image(model: nn.Module, size: int, device: torch.device, mask_ratio: float | None) -> float:
    """FLOPs of one forward + backward per image (eager, fp32, math attention so every device counts alike)."""
    batch = 4  # the count is linear in the batch size; MixMIM needs pairs
    images = torch.randn(batch, 3, size, size, device=device)
    targets = torch.randint(0, 1000, (batch,), device=device)
    fwd_kwargs = {} if mask_ratio is None else {"mask_ratio": mask_ratio}
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        if is_pretrain_model(model):
            loss = model(images, **fwd_kwargs)[0]
        else:
            loss = F.cross_entropy(model(images), targets)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def flops_row(name: str, args: argparse.Namespace) -> dict:
    """FLOPs per image of one model counted on the meta device: shapes only, so any size fits on any machine.

    With ``--peak-tflops``, ``images_per_s_at_peak`` is the throughput at which the step would run at 100% MFU.
    """
    meta = torch.device("meta")
    with meta:
        model = build_model(name, args, meta)
    mask_ratio = mask_ratio_for(model, args.mask_ratio)
    size = input_size(model)
    flops = count_flops_per_image(model, size, meta, mask_ratio)
    return {
        "model": name,
        "kind": "pretrain" if is_pretrain_model(model) else "finetune",
        "input_size": size,
        "mask_ratio": mask_ratio,
        "params_m": param_count(model) / 1e6,
        "gflops_per_image": flops / 1e9,
        "images_per_s_at_peak": args.peak_tflops * 1e12 / flops if args.peak_tflops else None,
    }


def format_flops_table(rows: list[dict]) -> str:
    head = f"{'model':<28} {'kind':<8} {'size':>4} {'mask':>4} {'params M':>9} {'GFLOP/img':>10} {'img/s at peak':>13}"
    lines = [head, "-" * len(head)]
    for r in rows:
        mask = f"{r['mask_ratio']:.2f}" if r["mask_ratio"] is not None else "-"
        peak = f"{r['images_per_s_at_peak']:13.0f}" if r["images_per_s_at_peak"] else f"{'-':>13}"
        lines.append(
            f"{r['model']:<28} {r['kind']:<8} {r['input_size']:>4} {mask:>4} {r['params_m']:9.1f} "
            f"{r['gflops_per_image']:10.1f} {peak}"
        )
    return "\n".join(lines)


def bench_one(
    name: str,
    batch: int,
    amp: str,
    compiled: bool,
    loop: str,
    args: argparse.Namespace,
    device: torch.device,
    flops: dict,
) -> dict:
    """Build, warm up and time one configuration; returns its row."""
    torch.manual_seed(args.seed)
    reset_memory(device)
    model = build_model(name, args, device)
    size = input_size(model)
    if name not in flops:
        flops[name] = count_flops_per_image(model, size, device, args.mask_ratio)
    optimizer = make_optimizer(model, device, fused=not args.no_fused)
    runner = compile_model(model, mode=args.compile_mode) if compiled else model

    # images around the ImageNet-normalised range; never zeros, which can run faster than real data
    images = torch.randn(batch, 3, size, size, device=device)
    targets = torch.randint(0, 1000, (batch,), device=device)
    if loop == "engine":
        if is_pretrain_model(model):  # what main_pretrain's loader hands over
            images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
        epoch = make_engine_epoch(runner, optimizer, amp, device, args.mask_ratio, batch, args.print_freq)
    else:
        step = make_step(runner, optimizer, amp, device, args.mask_ratio)

        def epoch(images: torch.Tensor, targets: torch.Tensor, steps: int) -> None:
            for _ in range(steps):
                step(images, targets)

    timing = time_windows(functools.partial(epoch, images, targets), batch, args.warmup, args.steps, args.repeats,
                          device)  # fmt: skip
    ips = timing["images_per_s"]
    row = {
        "model": name,
        "kind": "pretrain" if is_pretrain_model(model) else "finetune",
        "batch": batch,
        "amp": amp,
        "compile": compiled,
        "loop": loop,
        "input_size": size,
        **timing,
        "peak_mem_gib": peak_memory_gib(device),
        "gflops_per_image": flops[name] / 1e9,
        "tflops": flops[name] * ips / 1e12,
        "mfu": flops[name] * ips / (args.peak_tflops * 1e12) if args.peak_tflops else None,
        "params_m": param_count(model) / 1e6,
    }
    del epoch, runner, optimizer, model, images, targets
    if compiled:
        torch._dynamo.reset()
    reset_memory(device)
    return row


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'model':<28} {'kind':<8} {'batch':>5} {'amp':>4} {'compile':>7} {'loop':>6} {'img/s':>9} {'ms/step':>8} "
        f"{'GFLOP/img':>9} {'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(
                f"{r['model']:<28} {r['batch']:>14} {r['amp']:>4} {r['compile']!s:>7} {r['loop']:>6}  "
                f"ERROR {r['error']}"
            )
            continue
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "   -  "
        mem = f"{r['peak_mem_gib']:7.2f}" if r["peak_mem_gib"] is not None else "      -"
        lines.append(
            f"{r['model']:<28} {r['kind']:<8} {r['batch']:>5} {r['amp']:>4} {r['compile']!s:>7} {r['loop']:>6} "
            f"{r['images_per_s']:9.1f} {r['step_ms']:8.1f} {r['gflops_per_image']:9.2f} {r['tflops']:8.1f} "
            f"{mfu:>6} {mem}"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> list[dict]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("engine_pretrain", "engine_finetune", "util.metrics"):  # the engine loop's progress lines
        logging.getLogger(name).setLevel(logging.WARNING)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (--amp none) on tensor cores, as training
        torch.backends.cudnn.allow_tf32 = True
    compile_opts = {"off": [False], "on": [True], "both": [False, True]}[args.compile]

    if args.flops_only:
        rows = []
        for name in args.models:
            try:
                rows.append(flops_row(name, args))
            except (RuntimeError, ValueError) as e:  # unknown name, an input size the model cannot take
                raise SystemExit(f"--flops-only: cannot count {name}: {e}") from None
        if args.json:
            write_json(args.json, device_info(torch.device("meta"), timm), args, rows)
        print(format_flops_table(rows), flush=True)
        return rows

    info = device_info(device, timm)
    logger.info("%s", info)
    flops: dict[str, float] = {}
    rows = []
    configs = itertools.product(args.models, args.batch_size, args.amp, compile_opts, args.loop)
    for name, batch, amp, compiled, loop in configs:
        try:
            row = bench_one(name, batch, amp, compiled, loop, args, device, flops)
            msg = f"{row['images_per_s']:.1f} img/s (warmup {row['warmup_s']:.1f} s)"
        except (RuntimeError, ValueError) as e:  # e.g. out of memory: report and go on
            row = {"model": name, "batch": batch, "amp": amp, "compile": compiled, "loop": loop, "error": str(e)[:200]}
            msg = row["error"]
            reset_memory(device)
        logger.info("%s batch %d %s compile=%s loop=%s: %s", name, batch, amp, compiled, loop, msg)
        rows.append(row)
        if args.json:  # after every row, so a run cut short keeps what it measured
            write_json(args.json, info, args, rows)
    print(format_table(rows), flush=True)
    return rows


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    if args.peak_tflops is not None and not (args.peak_tflops > 0 and math.isfinite(args.peak_tflops)):
        raise SystemExit("--peak-tflops must be a positive number")
    main(args)
