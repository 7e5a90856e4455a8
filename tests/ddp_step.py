"""One training update under ``torchrun --nproc_per_node=2`` (gloo, CPU), for tests/test_distributed.py.

    torchrun --nproc_per_node=2 tests/ddp_step.py {mae|mixmim} OUT_DIR
    torchrun --nproc_per_node=2 tests/ddp_step.py nan OUT_DIR

Each rank takes its half of a fixed batch, runs ``engine_pretrain.train_one_epoch`` on the DDP model (MAE with
``accum_iter=2``: two micro-batches per rank), and rank 0 saves the weights to OUT_DIR/weights.pt. A DDP comm hook
records how many forward passes had run at each gradient all-reduce, so the test can check that accumulation
all-reduces only on the update step (``no_sync``).

``nan``: four steps in which only rank 1's loss turns NaN, at step 2; each rank writes the error it stopped with
to OUT_DIR/rank{R}.txt, so the test can check that both stop at the same step.

``finetune``: one fine-tuning update (``engine_finetune.train_one_epoch``: label smoothing, layer decay, gradient
clipping) of a tiny ViT classifier on each rank's half of a fixed batch; rank 0 saves the weights.

    torchrun --nproc_per_node=2 tests/ddp_step.py eval OUT_DIR DATA CHECKPOINT [--dist_eval]

``eval``: ``main_finetune.main`` with ``--eval`` on DATA/val; each rank writes the returned stats to
OUT_DIR/stats{R}.json.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from timm.loss import LabelSmoothingCrossEntropy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_utils import NoiseFromImages, nan_at_call  # noqa: E402

import engine_finetune  # noqa: E402
import engine_pretrain  # noqa: E402
from model_table import build_classifier, build_pretrain_model  # noqa: E402
from util.amp import NativeScalerWithGradNormCount  # noqa: E402
from util.dist import cleanup, get_rank, get_world_size, init_distributed_mode, wrap_ddp  # noqa: E402
from util.errors import NonFiniteLossError  # noqa: E402
from util.optim import finetune_optimizer, pretrain_optimizer  # noqa: E402

MODELS = {"mae": "mae_vit_tiny_patch4", "mixmim": "mixmim_tiny"}
GLOBAL_BATCH = 8


def setup(family: str) -> tuple[torch.nn.Module, torch.Tensor, argparse.Namespace]:
    """The same initial model and the same global batch (8, 3, 32, 32) on every process.

    float64: Adam divides each gradient by its own magnitude, so on elements whose gradient is only rounding
    noise (attention key biases) float32 rounding differences would become visible in the weights.
    """
    torch.manual_seed(0)
    model = build_pretrain_model(MODELS[family], 32, norm_pix_loss=True).double()
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    args = argparse.Namespace(
        accum_iter=2 if family == "mae" else 1,
        lr=1e-3,
        min_lr=0.0,
        warmup_epochs=0,
        epochs=1,
        mask_ratio=0.75 if family == "mae" else 0.5,
        amp="none",
        clip_grad=None,
        print_freq=10,
    )
    return model, images, args


def train_step(wrapped: torch.nn.Module, inner: torch.nn.Module, images: torch.Tensor, args) -> None:
    """One epoch of ``accum_iter`` micro-batches (one update) over ``images``."""
    micro = images.chunk(args.accum_iter)
    args.batch_size = micro[0].shape[0]
    loader = [(m, torch.zeros(len(m), dtype=torch.long)) for m in micro]
    optimizer = pretrain_optimizer(inner, args.lr, 0.05, "cpu")
    scaler = NativeScalerWithGradNormCount("cpu", enabled=False)
    engine_pretrain.train_one_epoch(wrapped, loader, optimizer, torch.device("cpu"), 0, scaler, args=args)


def nan_on_one_rank(out: Path) -> None:
    model = nan_at_call(3, when=lambda: get_rank() == 1)
    args = argparse.Namespace(
        accum_iter=1,
        lr=1e-3,
        min_lr=0.0,
        warmup_epochs=0,
        epochs=1,
        mask_ratio=0.75,
        amp="none",
        clip_grad=None,
        print_freq=10,
        batch_size=2,
    )
    loader = [(torch.randn(2, 3, 4, 4), torch.zeros(2)) for _ in range(4)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = NativeScalerWithGradNormCount("cpu", enabled=False)
    try:
        engine_pretrain.train_one_epoch(model, loader, optimizer, torch.device("cpu"), 0, scaler, args=args)
        result = "finished"
    except NonFiniteLossError as e:
        result = str(e)
    (out / f"rank{get_rank()}.txt").write_text(result)


FINETUNE_CLASSES = 3


def finetune_setup() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, argparse.Namespace]:
    """The same initial classifier (float64, see ``setup``), global batch and labels on every process."""
    torch.manual_seed(0)
    model = build_classifier("vit_tiny_patch4", 32, FINETUNE_CLASSES, drop_path_rate=0.0, global_pool=True).double()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g, dtype=torch.float64)
    labels = torch.randint(0, FINETUNE_CLASSES, (GLOBAL_BATCH,), generator=g)
    args = argparse.Namespace(
        accum_iter=1,
        lr=1e-3,
        min_lr=0.0,
        warmup_epochs=0,
        epochs=1,
        amp="none",
        print_freq=10,
        smoothing=0.1,
        weight_decay=0.05,
        layer_decay=0.75,
        clip_grad=0.5,
    )
    return model, images, labels, args


def finetune_step(model: torch.nn.Module, inner: torch.nn.Module, images, labels, args) -> None:
    args.batch_size = images.shape[0]
    optimizer = finetune_optimizer(inner, args.lr, args.weight_decay, args.layer_decay, "cpu")
    scaler = NativeScalerWithGradNormCount("cpu", enabled=False)
    engine_finetune.train_one_epoch(
        model,
        LabelSmoothingCrossEntropy(args.smoothing),
        [(images, labels)],
        optimizer,
        torch.device("cpu"),
        0,
        scaler,
        max_norm=args.clip_grad,
        args=args,
    )


def evaluate_checkpoint(out: Path, data: str, checkpoint: str, extra: list[str]) -> None:
    import main_finetune

    args = main_finetune.get_args_parser().parse_args(
        [
            "--eval",
            "--resume",
            checkpoint,
            "--model",
            "vit_tiny_patch4",
            "--input_size",
            "32",
            "--nb_classes",
            "2",
            "--batch_size",
            "2",
            "--data_path",
            data,
            "--device",
            "cpu",
            "--num_workers",
            "0",
            *extra,
        ]
    )
    stats = main_finetune.main(args)
    (out / f"stats{get_rank()}.json").write_text(json.dumps(stats))
    cleanup()  # leave the process group before exiting, as run_cli does (else gloo may abort at exit)


def main() -> None:
    family, out = sys.argv[1], Path(sys.argv[2])
    if family == "eval":
        evaluate_checkpoint(out, sys.argv[3], sys.argv[4], sys.argv[5:])
        return
    dist_args = argparse.Namespace(device="cpu", dist_url="env://", dist_on_itp=False)
    init_distributed_mode(dist_args)
    if family == "nan":
        nan_on_one_rank(out)
        torch.distributed.destroy_process_group()
        return
    if family == "finetune":
        model, images, labels, args = finetune_setup()
        rank, world = get_rank(), get_world_size()
        dist_args.accum_iter = 1
        ddp = wrap_ddp(model, dist_args)
        finetune_step(ddp, model, images.chunk(world)[rank], labels.chunk(world)[rank], args)
        if rank == 0:
            torch.save(model.state_dict(), out / "weights.pt")
        torch.distributed.destroy_process_group()
        return
    model, images, args = setup(family)
    rank, world = get_rank(), get_world_size()
    local = images.chunk(world)[rank]

    wrapped = NoiseFromImages(model)
    forwards = [0]
    wrapped.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    dist_args.accum_iter = args.accum_iter  # as in the scripts, whose args carry --accum_iter
    ddp = wrap_ddp(wrapped, dist_args)
    at_allreduce: list[int] = []

    def counting_allreduce(state, bucket):
        at_allreduce.append(forwards[0])
        tensor = bucket.buffer().div_(world)
        fut = torch.distributed.all_reduce(tensor, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    ddp.register_comm_hook(None, counting_allreduce)
    train_step(ddp, model, local, args)
    if rank == 0:
        torch.save(model.state_dict(), out / "weights.pt")
        (out / "allreduce.json").write_text(json.dumps(at_allreduce))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
