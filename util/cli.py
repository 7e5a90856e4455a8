"""The entry scripts' command lines: the shared flags, their checks, args.json, and one-line errors at exit."""

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from util.dist import barrier, cleanup, is_dist_avail_and_initialized
from util.errors import NonFiniteLossError, Preempted, UsageError
from util.files import write_text_atomic

logger = logging.getLogger(__name__)


def args_to_dict(args: argparse.Namespace) -> dict:
    """The resolved arguments as plain JSON data (paths and devices become strings)."""
    return json.loads(json.dumps(vars(args), default=str))


def save_args_json(args: argparse.Namespace, output_dir: str) -> None:
    write_text_atomic(Path(output_dir) / "args.json", json.dumps(args_to_dict(args), indent=2, sort_keys=True) + "\n")


def add_runtime_args(parser: argparse.ArgumentParser, port: int, training: bool = True) -> None:
    """The distributed flags of the official scripts (same names and defaults), then this project's new flags;
    without ``training`` (an evaluation that trains nothing), not the training-only ones: ``--compile``,
    ``--compile_mode`` and the checkpoints inside an epoch (``--save_every_min``, ``--save_every_steps``)."""
    parser.add_argument("--world_size", default=1, type=int, help="number of distributed processes")
    parser.add_argument("--local_rank", "--local-rank", default=-1, type=int)
    parser.add_argument("--dist_on_itp", action="store_true")
    parser.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    parser.add_argument("--port", default=port, type=int, help="MASTER_PORT for SLURM launches (MixMIM)")

    new = parser.add_argument_group("not in the official scripts")
    new.add_argument(
        "--amp",
        default=None,
        choices=["bf16", "fp16", "none"],
        help="mixed precision; default bf16 on CUDA devices that support it, fp16 on older GPUs, none on CPU",
    )
    if training:
        new.add_argument("--compile", action="store_true", help="torch.compile the model")
        new.add_argument(
            "--compile_mode",
            default=None,
            choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
            help="torch.compile's mode with --compile (default: its default); reduce-overhead and max-autotune "
            "replay CUDA graphs",
        )
    new.add_argument(
        "--print_freq",
        default=20,
        type=int,
        help="log a progress line, and read the losses back from the device, every N steps",
    )
    new.add_argument(
        "--skip_bad_images",
        action="store_true",
        help="skip unreadable image files (corrupt, truncated, not images), logging and counting them, instead of "
        "stopping at the first one (with main_pretrain.py's --decode_on_device: files whose header PIL cannot read; "
        "a JPEG whose data does not decode on the device still stops the run, naming it)",
    )
    new.add_argument(
        "--dist_timeout",
        default=None,
        type=float,
        help="minutes a collective waits for the other processes before the run stops with an error naming the "
        "timeout (a rank that hangs; default: torch's, 10 for NCCL, 30 for gloo); a rank that dies stops the "
        "others at once",
    )
    if not training:
        return
    new.add_argument(
        "--save_every_min",
        default=0.0,
        type=float,
        help="also write checkpoint-last.pth inside an epoch once M minutes have passed since the last one (checked "
        "at the progress lines); resume continues at that step. 0: only at epoch ends",
    )
    new.add_argument(
        "--save_every_steps",
        default=0,
        type=int,
        help="also write checkpoint-last.pth inside an epoch every N update steps. 0: only at epoch ends",
    )


def add_input_size_arg(parser: argparse.ArgumentParser, default: int = 224, help: str = "images input size") -> None:
    """``--input_size S`` (the official flag: a square side) or ``--input_size H W`` (MAE / ViT only)."""
    parser.add_argument("--input_size", default=default, type=int, nargs="+", metavar="SIZE",
                        help=f"{help}: a side S, or H W for non-square images (MAE / ViT)")  # fmt: skip


def add_nb_classes_arg(parser: argparse.ArgumentParser) -> None:
    """``--nb_classes`` of the classifier scripts; official default 1000, here the folder's class count (None until
    ``util.datasets.resolve_num_classes`` counts it)."""
    parser.add_argument("--nb_classes", default=None, type=int, help="number of the classification types (default: "
                        "the head of the --resume checkpoint, else the training folder's class count; with --eval "
                        "the validation folder's)")  # fmt: skip


def input_size_value(size: int | Sequence[int]) -> int | list[int]:
    """An input size as the models and transforms take it: an int for a square (S, [S] or [S, S]), else [H, W];
    one-line errors for another number of values or a side below 1."""
    sizes = [int(size)] if isinstance(size, int) else [int(v) for v in size]
    if len(sizes) not in (1, 2):
        raise UsageError(f"--input_size takes one side or H W, got {len(sizes)} values")
    if min(sizes) < 1:
        raise UsageError(f"--input_size must be positive, got {' '.join(map(str, sizes))}")
    return sizes[0] if len(set(sizes)) == 1 else sizes


def resolve_input_size(args: argparse.Namespace) -> None:
    """``args.input_size`` as ``input_size_value`` gives it (``--input_size S``, ``S S`` or ``H W``)."""
    args.input_size = input_size_value(args.input_size)


# the numeric recipe flags a script may have: (lowest, whether it is allowed, highest or None, whether allowed);
# a flag left at None (--lr: from --blr; --clip_grad: off) is not checked
VALUE_RANGES = {
    "seed": (0, True, None, False),
    "lr": (0, False, None, False),
    "blr": (0, False, None, False),
    "min_lr": (0, True, None, False),
    "weight_decay": (0, True, None, False),
    "warmup_epochs": (0, True, None, False),
    "clip_grad": (0, False, None, False),
    "drop_path": (0, True, 1, False),
    "layer_decay": (0, False, None, False),
    "smoothing": (0, True, 1, False),
    "mixup": (0, True, None, False),
    "cutmix": (0, True, None, False),
    "mixup_prob": (0, True, 1, True),
    "mixup_switch_prob": (0, True, 1, True),
    "reprob": (0, True, 1, True),
}


def check_value_ranges(args: argparse.Namespace) -> None:
    """One line for a recipe flag of ``VALUE_RANGES`` outside its range (a negative lr or seed would otherwise end
    in a traceback from the optimizer or numpy, a negative weight decay or clip would train silently wrong)."""
    for name, (low, low_ok, high, high_ok) in VALUE_RANGES.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        too_low = value < low if low_ok else value <= low
        too_high = high is not None and (value > high if high_ok else value >= high)
        if too_low or too_high:
            lo, hi = "[" if low_ok else "(", "]" if high_ok else ")"
            interval = f"in {lo}{low}, {high}{hi}" if high is not None else (f">= {low}" if low_ok else f"> {low}")
            raise UsageError(f"--{name} must be {interval}, got {value}")


def validate_common_args(args: argparse.Namespace, data_list_file: bool = False) -> None:
    """One-line errors for arguments that cannot work, before any work is done. ``data_list_file``: ``--data_path``
    may also be a file (pretraining's list of image paths)."""
    check_value_ranges(args)
    for name in ("batch_size", "accum_iter", "epochs"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if hasattr(args, "input_size"):
        resolve_input_size(args)
    if getattr(args, "save_freq", 1) < 1:
        raise UsageError(f"--save_freq must be at least 1, got {args.save_freq}")
    if getattr(args, "dist_timeout", None) is not None and args.dist_timeout <= 0:
        raise UsageError(f"--dist_timeout must be positive, got {args.dist_timeout}")
    for name in ("save_every_min", "save_every_steps"):
        if getattr(args, name, 0) < 0:
            raise UsageError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if getattr(args, "compile_mode", None) and not args.compile:
        raise UsageError(f"--compile_mode {args.compile_mode} needs --compile")
    if args.print_freq < 1:
        raise UsageError(f"--print_freq must be at least 1, got {args.print_freq}")
    if args.start_epoch < 0:
        raise UsageError(f"--start_epoch must be >= 0, got {args.start_epoch}")
    if getattr(args, "num_workers", 0) < 0:
        raise UsageError(f"--num_workers must be >= 0, got {args.num_workers}")
    if getattr(args, "nb_classes", None) is not None and args.nb_classes < 1:  # None: the folder's class count
        raise UsageError(f"--nb_classes must be at least 1, got {args.nb_classes}")
    check_input_paths(args, data_list_file)


def check_input_paths(args: argparse.Namespace, data_list_file: bool = False) -> None:
    """``--data_path`` is a folder (or, where ``data_list_file``, a list file) and ``--finetune`` exists (a file,
    or a Hugging Face / timm model folder)."""
    if args.data_path and not os.path.exists(args.data_path):
        raise UsageError(f"--data_path {args.data_path} does not exist")
    if args.data_path and not (os.path.isdir(args.data_path) or data_list_file):
        raise UsageError(f"--data_path {args.data_path} is a file, not a folder (an ImageFolder with train/ and val/)")
    if getattr(args, "finetune", "") and not os.path.exists(args.finetune):
        raise UsageError(f"--finetune {args.finetune} does not exist")


def log_args(args: argparse.Namespace) -> None:
    logger.info("job dir: %s", Path(__file__).resolve().parent.parent)
    logger.info("arguments:\n%s", "\n".join(f"  {k}: {v}" for k, v in sorted(vars(args).items())))


def run_cli(parser: argparse.ArgumentParser, main: Callable[[argparse.Namespace], object]) -> None:
    """Parse the command line and run ``main``; usage errors and non-finite losses end with one line, exit 1; a
    preemption (checkpoint written) with one line and ``REQUEUE_EXIT_CODE``."""
    from util.preemption import REQUEUE_EXIT_CODE

    args = parser.parse_args()
    try:
        main(args)
    except (UsageError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        cleanup()
        sys.exit(1)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr, flush=True)
        cleanup()
        sys.exit(REQUEUE_EXIT_CODE)
    except RuntimeError as e:
        if not (is_dist_avail_and_initialized() and is_peer_failure(e)):
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        print(
            f"error: a collective with the other processes failed ({first}); another rank died or hung: see its "
            f"log. Checkpoints up to the last complete one are intact: rerun with --resume auto (torchrun "
            f"--max-restarts does that by itself)",
            file=sys.stderr,
            flush=True,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(1)  # at once: leaving the group, or its destructor at exit, would wait for (or abort on) the lost peer
    barrier()  # every rank is done with its collectives before any leaves the group
    cleanup()


def is_peer_failure(e: BaseException) -> bool:
    """An error of a collective that another process caused: it died (connection reset or closed) or hung (the
    ``--dist_timeout`` ran out)."""
    if isinstance(e, torch.distributed.DistError):
        return True
    text = str(e)
    peer = ("Connection reset by peer", "Connection closed by peer", "Timed out waiting", "timed out connecting")
    return any(s in text for s in peer) or ("Timed out" in text and "gloo" in text)
