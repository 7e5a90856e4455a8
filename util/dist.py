"""Distributed setup in one place: torchrun / ``env://``, SLURM ``srun``, OpenMPI (``--dist_on_itp``) or one process.

The backend follows the device: NCCL on CUDA, gloo on CPU. Only rank 0 logs at INFO level; other ranks log
warnings and errors only (no ``builtins.print`` replacement).
"""

import argparse
import contextlib
import datetime
import logging
import os
import subprocess
import sys

import torch
import torch.distributed as dist
from torch.distributed.rendezvous import rendezvous

from util.errors import UsageError

logger = logging.getLogger(__name__)


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


def setup_logging(is_main: bool) -> None:
    """Timestamped log lines on stderr; INFO on the main process, WARNING elsewhere."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if is_main else logging.WARNING)


def resolve_device(requested: str | None) -> torch.device:
    """``--device``: None picks CUDA when available, else the CPU; an unavailable CUDA device is a usage error."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {requested}: CUDA is not available on this machine; use --device cpu")
    return device


def _slurm_master_addr() -> str:
    """First host of the SLURM job, the rendezvous host for all tasks."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "127.0.0.1")
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
        )
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0]


def init_distributed_mode(args: argparse.Namespace) -> None:
    """Set ``args.distributed``, ``rank``, ``world_size``, ``local_rank``, ``gpu``, ``dist_backend`` and
    ``device`` (a ``torch.device``) and join the process group when there is more than one process.

    Sources, in order: OpenMPI variables with ``--dist_on_itp``; torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
    SLURM's ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` (MASTER_ADDR from the node list, MASTER_PORT from
    ``--port``); otherwise a single process.
    """
    env = os.environ
    if getattr(args, "dist_on_itp", False):
        rank, world_size = int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
        local_rank = int(env["OMPI_COMM_WORLD_LOCAL_RANK"])
        args.dist_url = f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    elif "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world_size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local_rank = int(env.get("SLURM_LOCALID", 0))
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        env.setdefault("MASTER_PORT", str(getattr(args, "port", 29500)))
        for k, v in (("RANK", rank), ("WORLD_SIZE", world_size), ("LOCAL_RANK", local_rank)):
            env[k] = str(v)
    else:
        rank, world_size, local_rank = 0, 1, 0

    args.rank, args.world_size, args.local_rank = rank, world_size, local_rank
    args.distributed = world_size > 1
    setup_logging(rank == 0)

    device = resolve_device(getattr(args, "device", None))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    args.device = str(device)
    args.gpu = device.index if device.type == "cuda" else None
    args.dist_backend = "nccl" if device.type == "cuda" else "gloo"

    if not args.distributed:
        logger.info("Not using distributed mode (device %s)", device)
        return
    if not is_dist_avail_and_initialized():
        logger.info("distributed init (rank %d/%d, %s): %s", rank, world_size, args.dist_backend, args.dist_url)
        minutes = getattr(args, "dist_timeout", None)
        timeout = datetime.timedelta(minutes=minutes) if minutes else None  # None: the backend's default
        if "TORCHELASTIC_RESTART_COUNT" in env and args.dist_url == "env://":
            # torchrun's store outlives a restart of the workers (static rendezvous: --master_addr/--master_port),
            # so restarted workers could read the dead workers' addresses. Each generation of workers gets its own
            # key space, numbered by joining: every worker of a generation adds 1 once. (The restart count cannot
            # serve: a node that restarts only because another node's worker failed does not count it.)
            store, _, _ = next(rendezvous("env://", rank, world_size, **({"timeout": timeout} if timeout else {})))
            generation = (store.add("mae_mixmim_workers_joined", 1) - 1) // world_size
            store = dist.PrefixStore(f"generation_{generation}", store)
            dist.init_process_group(
                backend=args.dist_backend, store=store, world_size=world_size, rank=rank, timeout=timeout
            )
        else:
            dist.init_process_group(
                backend=args.dist_backend,
                init_method=args.dist_url,
                world_size=world_size,
                rank=rank,
                timeout=timeout,
            )
    barrier()


def cleanup() -> None:
    """Leave the process group (if any), so that the process exits cleanly."""
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


def all_reduce_mean(x: float, device: torch.device | str = "cpu") -> float:
    """Mean of a Python number over all processes (the number itself with one process)."""
    world_size = get_world_size()
    if world_size == 1:
        return x
    t = torch.tensor(x, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world_size).item()


def maybe_no_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` when ``sync`` is False: accumulate gradients locally and all-reduce only on the step
    that updates the weights (gradient accumulation needs the sum, not one all-reduce per micro-batch)."""
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def wrap_ddp(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """``DistributedDataParallel`` over the model when running distributed (device_ids only on CUDA).

    Gradients are views into DDP's communication buckets (no copy in and out of the buckets). Every model here
    uses the same parameters in every step, so the graph is static: DDP then skips its per-step search for unused
    parameters and can reorder buckets after the first step. static_graph is left off with gradient accumulation
    (``no_sync`` on the first step fails an internal DDP assertion, seen with torch 2.14) and under ``--compile``
    (the compiler's DDP optimiser splits the graph at bucket boundaries itself; the combination is untested here).
    """
    if not args.distributed:
        return model
    device_ids = [args.gpu] if args.gpu is not None else None
    return torch.nn.parallel.DistributedDataParallel(
        model,
        device_ids=device_ids,
        gradient_as_bucket_view=True,
        static_graph=getattr(args, "accum_iter", 1) == 1 and not getattr(args, "compile", False),
    )
