"""Distributed setup in one place: torchrun / ``env://``, SLURM ``srun``, OpenMPI (``--dist_on_itp``) or one process.

The backend follows the device: NCCL on CUDA, gloo on CPU. Only rank 0 logs at INFO level; other ranks log
warnings and errors only (no ``builtins.print`` replacement).
"""

import argparse
import contextlib
import datetime
import itertools
import logging
import os
import re
import sys
from collections.abc import Mapping

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
    try:
        device = torch.device(requested)
    except RuntimeError as e:  # "gpu", "cuda:x", ...
        raise UsageError(f"--device {requested} is not a device: use cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {requested}: CUDA is not available on this machine; use --device cpu")
    return device


_MAX_RANGE = 64 * 1024  # hosts in one range a-b; SLURM refuses more as well


def expand_nodelist(nodelist: str) -> list[str]:
    """The host names of a SLURM node list, in SLURM's order (what ``scontrol show hostnames`` prints).

    ``node[01-03],gpu7`` -> node01, node02, node03, gpu7. A bracket holds numbers and ranges (``[1,3,5-7]``), each
    written with the width of its first number (``[08-10]``: 08, 09, 10; ``[8-10]``: 8, 9, 10). Several brackets in
    one name give every combination, the first bracket varying slowest (``rack[1-2]-n[1-2]``: rack1-n1, rack1-n2,
    rack2-n1, rack2-n2). A malformed list is a ``UsageError``.
    """
    try:
        return [host for name in _split_names(nodelist) for host in _expand_name(name)]
    except ValueError as e:
        raise UsageError(f"malformed SLURM node list {nodelist!r}: {e}") from None


def _split_names(nodelist: str) -> list[str]:
    """``a[1-2],b3`` -> ``a[1-2]``, ``b3``: split at the commas outside brackets."""
    names, inside, start = [], False, 0
    for i, c in enumerate(nodelist):
        if c == "[":
            if inside:
                raise ValueError("'[' inside brackets")
            inside = True
        elif c == "]":
            if not inside:
                raise ValueError("']' without '['")
            inside = False
        elif c == "," and not inside:
            names.append(nodelist[start:i])
            start = i + 1
    if inside:
        raise ValueError("'[' without ']'")
    return [*names, nodelist[start:]]


def _expand_name(name: str) -> list[str]:
    """``rack[1-2]-n[1,3]`` -> rack1-n1, rack1-n3, rack2-n1, rack2-n3."""
    if not name:
        raise ValueError("an empty host name (a comma at an end, or two in a row)")
    if any(c.isspace() for c in name):
        raise ValueError(f"white space in {name!r}")
    parts = re.split(r"\[([^\]]*)\]", name)  # literal, bracket, literal, ..., bracket, literal
    choices = [[part] if k % 2 == 0 else _expand_ranges(part) for k, part in enumerate(parts)]
    return ["".join(combination) for combination in itertools.product(*choices)]


def _expand_ranges(ranges: str) -> list[str]:
    """A bracket's content, ``1,3,5-7`` -> 1, 3, 5, 6, 7, each as wide as its range's first number."""
    numbers = []
    for r in ranges.split(","):
        m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", r)
        if not m:
            raise ValueError(f"{r!r} in [{ranges}] is neither a number nor a range a-b")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if lo > hi:
            raise ValueError(f"range {r!r} goes down")
        if hi - lo + 1 > _MAX_RANGE:
            raise ValueError(f"range {r!r} has more than {_MAX_RANGE} hosts")
        numbers += [str(n).zfill(len(m[1])) for n in range(lo, hi + 1)]
    return numbers


def slurm_master_addr(env: Mapping[str, str]) -> str:
    """The rendezvous host of ``srun``'s tasks: the first node of the step (where task 0 runs), else of the job;
    127.0.0.1 without a node list."""
    for key in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if env.get(key):
            return expand_nodelist(env[key])[0]
    return "127.0.0.1"


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
        if "MASTER_ADDR" not in env:  # the node list is read only when needed
            env["MASTER_ADDR"] = slurm_master_addr(env)
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
