"""The steps every entry script takes around its model and data: start a run, open its outputs, and the
bookkeeping of each epoch (reshuffle and reseed before, checkpoint and log line after)."""

import argparse
import datetime
import logging
import time
from collections.abc import Callable

import torch
from torch.utils.tensorboard import SummaryWriter

from util.amp import resolve_amp
from util.checkpoint import resolve_resume, run_layout, save_checkpoint, saved_norm_eps
from util.cli import log_args, save_args_json
from util.datasets import skipped_images
from util.dist import barrier, get_rank, init_distributed_mode, is_main_process
from util.errors import Preempted
from util.files import append_log_line, check_output_dir
from util.preemption import SIGNALS, EpochControl
from util.seeding import epoch_seed, seed_everything

logger = logging.getLogger(__name__)


def start_run(
    args: argparse.Namespace, check: Callable[[argparse.Namespace], None], writes: bool = True
) -> torch.device:
    """Everything before the data is read: the process group and device, the precision, ``--log_dir`` (default:
    ``--output_dir``), ``check(args)`` (the script's resolution of defaults and its one-line errors), writable
    output folders (when the run ``writes``), the checkpoint to resume from (and the LayerNorm eps its or
    ``--finetune``'s weights state), the arguments in the log, and the
    seeds. Returns the device."""
    init_distributed_mode(args)
    device = torch.device(args.device)
    args.amp = resolve_amp(args.amp, device)
    if args.log_dir is None:  # TensorBoard next to the checkpoints (official: ./output_dir whatever --output_dir)
        args.log_dir = args.output_dir
    check(args)
    if writes:
        check_output_dir(args.output_dir)
        check_output_dir(args.log_dir, "--log_dir")
    resolve_resume(args)
    # weights from Hugging Face need their LayerNorm eps: the model is built with it, and it is saved with the args
    args.layer_norm_eps = saved_norm_eps(args.resume, getattr(args, "finetune", ""))
    if writes:  # a training run: a preemption signal checkpoints and stops (util/preemption.py)
        SIGNALS.install()
    log_args(args)
    seed_everything(args.seed + get_rank())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def open_outputs(args: argparse.Namespace) -> SummaryWriter | None:
    """On the main process: ``args.json`` in ``--output_dir`` and a TensorBoard writer on ``--log_dir``."""
    if not is_main_process():
        return None
    if args.output_dir:
        save_args_json(args, args.output_dir)
    return SummaryWriter(log_dir=args.log_dir) if args.log_dir else None


def begin_epoch(loader, args: argparse.Namespace, epoch: int, start_step: int = 0) -> None:
    """Reshuffle the training sampler and reseed every RNG from (seed, rank, epoch): an epoch's draws do not depend
    on what ran before, so a resumed run repeats the uninterrupted one. ``start_step``: the sampler skips the
    batches before it (an epoch resumed inside)."""
    loader.sampler.set_epoch(epoch)
    if hasattr(loader.sampler, "set_start"):
        loader.sampler.set_start(start_step * args.batch_size)
    if hasattr(loader.dataset, "set_epoch"):  # per-image augmentation seeds
        loader.dataset.set_epoch(epoch)
    seed_everything(epoch_seed(args.seed, get_rank(), epoch))


def epoch_control(args: argparse.Namespace, epoch: int, model, optimizer, loss_scaler, position: dict | None):
    """The epoch's ``EpochControl``: its checkpoints inside it, and (``position``, from ``load_resume``) the step it
    resumes at with the ranks' RNG states."""

    def save(step: int, rng: list[dict]) -> None:
        position = {"step": step, "rng": rng, "layout": run_layout(args)}
        save_checkpoint(args, epoch, model, optimizer, loss_scaler, numbered=False, position=position)

    if position is None:
        return EpochControl(args, save)
    return EpochControl(args, save, start_step=position["step"], rng=position.get("rng"))


def start_epoch(
    args: argparse.Namespace, loader, epoch: int, model, optimizer, loss_scaler, position: dict | None
) -> EpochControl:
    """``begin_epoch`` with the epoch's ``EpochControl`` (``position`` applies to ``--start_epoch`` only)."""
    control = epoch_control(args, epoch, model, optimizer, loss_scaler, position if epoch == args.start_epoch else None)
    begin_epoch(loader, args, epoch, control.start_step)
    return control


def finish_training(log_writer: SummaryWriter | None, start_time: float) -> None:
    SIGNALS.uninstall()  # a signal from now on does what it always does
    if log_writer is not None:
        log_writer.close()
    logger.info("Training time %s", datetime.timedelta(seconds=int(time.time() - start_time)))


def save_epoch_checkpoint(args: argparse.Namespace, epoch: int, model, optimizer, loss_scaler) -> None:
    """``checkpoint-last.pth``, and ``checkpoint-{epoch}.pth`` every ``--save_freq`` epochs and at the last one."""
    numbered = epoch % args.save_freq == 0 or epoch + 1 == args.epochs
    save_checkpoint(args, epoch, model, optimizer, loss_scaler, numbered=numbered)


def stop_if_preempted(args: argparse.Namespace, epoch: int, control: EpochControl) -> None:
    """After an epoch's checkpoint, evaluation and log line: stop if the ranks agreed on a preemption at its last
    progress line (not after the last epoch: the run is done)."""
    if control.stop_agreed and epoch + 1 < args.epochs:
        barrier()  # rank 0's checkpoint is complete before any rank exits
        raise Preempted(f"stopped on a signal at the end of epoch {epoch}; resume with --resume auto")


def log_epoch(
    args: argparse.Namespace, log_writer: SummaryWriter | None, log_stats: dict, loaders: dict, device: torch.device
) -> None:
    """The epoch's line in ``log.txt``. ``loaders``: {prefix: (loader, sharded)}, whose unreadable images are
    counted into the line with ``--skip_bad_images`` (call on every rank: the counts are summed over ranks)."""
    if args.skip_bad_images:
        for prefix, (loader, sharded) in loaders.items():
            log_stats[f"{prefix}_skipped_images"] = skipped_images(loader, device, sharded=sharded)
    if args.output_dir and is_main_process():
        if log_writer is not None:
            log_writer.flush()
        append_log_line(args.output_dir, log_stats)
