"""Training metrics: smoothed values, the progress lines (ETA, images/s, memory), and the per-step loss and grad
norm read back from the device only at the steps that log."""

import datetime
import logging
import math
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from util.dist import get_world_size, is_dist_avail_and_initialized
from util.errors import NonFiniteLossError

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

logger = logging.getLogger(__name__)


def check_finite_loss(loss_value: float, epoch: int, step: int, steps_per_epoch: int, lr: float, amp: str) -> None:
    """Stop with the step number and a hint when the loss is NaN or infinite."""
    if math.isfinite(loss_value):
        return
    hint = "lower --blr/--lr or set --clip_grad"
    if amp == "fp16":
        hint += ", or use --amp bf16 (or none)"
    raise NonFiniteLossError(
        f"loss is {loss_value} at epoch {epoch}, step {step}/{steps_per_epoch} "
        f"(global step {epoch * steps_per_epoch + step}), lr {lr:.3g}, amp {amp}; stopping training "
        f"without saving. Hint: {hint}; the last checkpoint is left as it was"
    )


class SmoothedValue:
    """A series of values: the median/average over a window, and the global average."""

    def __init__(self, window_size: int = 20, fmt: str | None = None):
        self.deque: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self, device: torch.device | str = "cpu") -> None:
        """Sum count and total over processes (the window is not synchronised)."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), t[1].item()

    @property
    def median(self) -> float:
        return float(np.median(self.deque)) if self.deque else 0.0

    @property
    def avg(self) -> float:
        return float(np.mean(self.deque)) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def max(self) -> float:
        return max(self.deque) if self.deque else 0.0

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(
            median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max, value=self.value
        )


class MetricLogger:
    """Named ``SmoothedValue`` meters and a progress iterator that logs ETA, images/s and peak memory."""

    def __init__(self, delimiter: str = "  "):
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs: float) -> None:
        for k, v in kwargs.items():
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                v = v.item()
            self.meters[k].update(float(v))

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def __getattr__(self, attr: str) -> SmoothedValue:
        meters = self.__dict__.get("meters", {})
        if attr in meters:
            return meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self, device: torch.device | str = "cpu") -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes(device)

    def global_averages(self) -> dict[str, float]:
        return {k: meter.global_avg for k, meter in self.meters.items()}

    def log_every(
        self, iterable: Iterable, print_freq: int, header: str = "", images_per_step: int = 0, first_step: int = 0
    ) -> Iterator:
        """Yield from ``iterable``, logging every ``print_freq`` steps and at the last one.

        ``images_per_step``: images processed per step over all processes, for the images/s figure. ``first_step``:
        the step the iterable begins at (an epoch resumed inside), for the step numbers in the lines.
        """
        total = first_step + len(iterable)
        width = len(str(total))
        start = end = time.time()
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        for i, obj in enumerate(iterable, start=first_step):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                parts = [f"{header} [{i:{width}d}/{total}]", f"eta: {eta}", str(self)]
                parts.append(f"time: {iter_time}  data: {data_time}")
                if images_per_step and iter_time.avg > 0:
                    parts.append(f"img/s: {images_per_step / iter_time.avg:.1f}")
                if cuda:
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
                logger.info(self.delimiter.join(p for p in parts if p))
            end = time.time()
        total_time = time.time() - start
        logger.info(
            "%s Total time: %s (%.4f s / it)",
            header,
            datetime.timedelta(seconds=int(total_time)),
            total_time / max(total - first_step, 1),
        )


class StepMetrics:
    """The per-step loss, grad norm and lr of an epoch, read back to the host only at the steps that log.

    Reading a GPU scalar (``loss.item()``) makes the host wait for the step's kernels to finish, so it cannot queue
    the next step's kernels while the GPU works. The engines ``push`` each step's loss and grad norm as device
    tensors; at every ``print_freq``-th step, at the last one, and after ``MAX_PENDING`` steps without either,
    ``push`` flushes: one all-reduce of the loss over processes and one copy to the host for all steps since the
    last flush. The flush feeds the metric logger and TensorBoard exactly the per-step values that a sync every
    step would, and stops the run on a non-finite loss with the number of the first step where it appeared
    (``check_finite_loss``), on every rank at the same step (every rank flushes at the same steps).
    """

    MAX_PENDING = 100  # bounds the steps run after a non-finite loss when --print_freq is large

    def __init__(
        self,
        metric_logger: MetricLogger,
        device: torch.device,
        epoch: int,
        steps: int,
        print_freq: int,
        amp: str,
        log_writer: "SummaryWriter | None" = None,
        loss_tag: str = "train_loss",
        control=None,
        x_axis: Callable[[int], int] | None = None,
    ):
        """``control``: an ``util.preemption.EpochControl`` whose flags (stop, save) ride on the loss all-reduce.
        ``x_axis``: a step's x value in TensorBoard (default: epoch * 1000, which lines up curves of runs with
        different batch sizes; segmentation counts iterations)."""
        self.metric_logger, self.device, self.log_writer, self.loss_tag = metric_logger, device, log_writer, loss_tag
        self.x_axis = x_axis or (lambda step: int((step / self.steps + self.epoch) * 1000))
        self.epoch, self.steps, self.print_freq, self.amp = epoch, steps, print_freq, amp
        self.control = control
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor | None, float, bool]] = []

    def push(self, step: int, loss: torch.Tensor, norm: torch.Tensor | None, lr: float, update: bool) -> None:
        """Record a step; ``norm`` is None on the micro-batches of gradient accumulation that do not update."""
        # a copy (a device op, no sync): a compiled model's output may live in CUDA-graph memory that the next step
        # overwrites
        loss = loss.detach().reshape(()).clone()
        self.pending.append((step, loss, None if norm is None else norm.detach(), lr, update))
        if step % self.print_freq == 0 or step == self.steps - 1 or len(self.pending) >= self.MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        """Read the pending steps back (one all-reduce, one host copy), check them, and log them in order.

        The engines also call this after their loop, so nothing pushed is left unchecked if the loader ended early.
        """
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        n = len(pending)
        local = torch.stack([loss.to(self.device, torch.float64) for _, loss, _, _, _ in pending])  # (n,)
        flags = torch.tensor(self.control.local_flags() if self.control is not None else [], dtype=torch.float64)
        flags = flags.to(self.device)  # (k,) summed over ranks: any rank's request holds for all
        k = len(flags)
        world_size = get_world_size()
        reduced = local
        if world_size > 1:
            both = torch.cat([local, flags])
            dist.all_reduce(both)
            reduced, flags = both[:n] / world_size, both[n:]
        norms = [norm.to(self.device, torch.float64).reshape(1) for _, _, norm, _, _ in pending if norm is not None]
        values = torch.cat([local, reduced, flags, *norms]).tolist()  # the one host sync
        local_v, reduced_v = values[:n], values[n : 2 * n]
        flag_v, norm_iter = values[2 * n : 2 * n + k], iter(values[2 * n + k :])
        for i, (step, _, norm, lr, update) in enumerate(pending):
            check_finite_loss(reduced_v[i], self.epoch, step, self.steps, lr, self.amp)
            norm_value = next(norm_iter) if norm is not None else None
            self.metric_logger.update(loss=local_v[i], lr=lr)
            if norm_value is not None and math.isfinite(norm_value):
                self.metric_logger.update(grad_norm=norm_value)
            if self.log_writer is not None and update:
                x = self.x_axis(step)
                self.log_writer.add_scalar(self.loss_tag, reduced_v[i], x)
                self.log_writer.add_scalar("lr", lr, x)
                if norm_value is not None:
                    self.log_writer.add_scalar("grad_norm", norm_value, x)
        if self.control is not None:
            self.control.agree(flag_v)
