"""Helpers for the training-stack tests: a tiny generated ImageFolder, argument building, deterministic masks."""

import argparse
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image


def make_image_folder(root: Path, classes: int = 2, per_class: int = 8, val_per_class: int = 4, size: int = 36) -> Path:
    """``root/{train,val}/class{k}/{i}.png``: random RGB images whose brightness depends on the class."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = (rng.random((size, size, 3)) * 100 + c * 120).clip(0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / f"{i}.png")
    return root


def parse(parser: argparse.ArgumentParser, **overrides) -> argparse.Namespace:
    """Parse ``--key value`` pairs (``True`` for a bare flag) with a script's parser."""
    argv = []
    for k, v in overrides.items():
        if v is False or v is None:
            continue
        argv.append(f"--{k}")
        if v is not True:
            argv.append(str(v))
    return parser.parse_args(argv)


def tiny_run_args(data: Path, out: Path, **overrides) -> dict:
    """Arguments shared by the end-to-end runs: CPU, no workers, 32x32 images, tiny batches (``overrides`` win)."""
    defaults = dict(
        data_path=data,
        output_dir=out,
        log_dir=out,
        device="cpu",
        num_workers=0,
        input_size=32,
        batch_size=4,
        print_freq=100,
    )
    return {**defaults, **overrides}


class LossPerCall(nn.Module):
    """A pretraining 'model' with one weight vector w = (1, 1, 1) whose loss at its k-th call (k = 1, 2, ...) is
    ``loss_fn(k, w, images)``: for engine tests that need a chosen loss at a chosen step."""

    def __init__(self, loss_fn: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.calls = 0
        self.loss_fn = loss_fn

    def forward(self, x: torch.Tensor, mask_ratio: float) -> tuple:
        self.calls += 1
        return self.loss_fn(self.calls, self.w, x), None, None


def nan_at_call(n: int, when: Callable[[], bool] = lambda: True) -> LossPerCall:
    """A ``LossPerCall`` whose loss, (w . mean(x))^2, turns NaN at call ``n`` (if ``when()``)."""
    return LossPerCall(lambda k, w, x: (w * x.mean()).sum() ** 2 * (float("nan") if k == n and when() else 1.0))


class NoiseFromImages(nn.Module):
    """Pretraining model wrapper whose masks depend only on the images (not on the RNG).

    MAE: per-sample noise from the sum of each patch; MixMIM: one noise per batch from its first image. Two
    processes that see the same images then draw the same masks.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def noise(self, imgs: torch.Tensor) -> torch.Tensor:
        patches = self.model.patchify(imgs).sum(-1)  # (N, L)
        return patches if hasattr(self.model, "cls_token") else patches[0]

    def forward(self, imgs: torch.Tensor, mask_ratio: float) -> tuple:
        return self.model(imgs, mask_ratio=mask_ratio, noise=self.noise(imgs))


class PerChunk(NoiseFromImages):
    """The mean loss of ``chunks`` equal parts of the batch, each with its own masks: what DDP computes when each
    rank gets one part (MixMIM mixes images only within a local batch)."""

    def __init__(self, model: nn.Module, chunks: int):
        super().__init__(model)
        self.chunks = chunks

    def forward(self, imgs: torch.Tensor, mask_ratio: float) -> tuple:
        losses = [super(PerChunk, self).forward(part, mask_ratio)[0] for part in imgs.chunk(self.chunks)]
        loss = torch.stack(losses).mean()
        return loss, None, None


def env_without_dist() -> dict:
    """The environment minus any launcher variables, for subprocesses that must start their own group."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(
    script_and_args: list[str], cwd: Path, nproc: int = 2, timeout: float = 240, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=nproc`` on a free port (``env``: more environment variables); the whole process
    group is killed on timeout."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *script_and_args,
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**env_without_dist(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun timed out after {timeout}s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
