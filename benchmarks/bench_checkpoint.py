"""Time the training checkpoint write (``util.checkpoint.save_checkpoint``: model, AdamW state, args; atomic rename)
for the large models, on this machine's disk.

    python benchmarks/bench_checkpoint.py --models mae_vit_large_patch16 mixmim_large --out /tmp/ckpt_bench

Only rank 0 writes; the other ranks go on to the next step and wait at its first gradient all-reduce for as long as
the write takes, no longer (there is no barrier around it). The AdamW state (exp_avg, exp_avg_sq) is filled as
after a first step, so the file has its real size. Prints one line per model: parameters, file size, seconds,
MB/s (the median of ``--repeats`` writes).
"""

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model_table import build_pretrain_model  # noqa: E402
from util.amp import NativeScalerWithGradNormCount  # noqa: E402
from util.checkpoint import LAST, save_checkpoint  # noqa: E402
from util.optim import pretrain_optimizer  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("checkpoint write time", add_help=True)
    p.add_argument("--models", nargs="+", default=["mae_vit_large_patch16", "mixmim_large"])
    p.add_argument("--out", default="/tmp/ckpt_bench", help="a folder on the disk to measure (emptied)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default="", help="also write the rows here")
    return p


def time_model(name: str, out: Path, repeats: int) -> dict:
    model = build_pretrain_model(name, 224)
    optimizer = pretrain_optimizer(model, 1e-4, 0.05, "cpu")
    for group in optimizer.param_groups:  # the state a first step leaves, without the cost of a step
        for p in group["params"]:
            optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}  # fmt: skip
    args = argparse.Namespace(output_dir=str(out), model=name, model_name=name)
    scaler = NativeScalerWithGradNormCount("cpu", enabled=False)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        save_checkpoint(args, 0, model, optimizer, scaler, numbered=False)
        seconds.append(time.perf_counter() - start)
    size = (out / LAST).stat().st_size
    median = statistics.median(seconds)
    return {
        "model": name,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "file_gb": size / 1e9,
        "seconds": median,
        "seconds_all": seconds,
        "mb_per_s": size / 1e6 / median,
    }


def main(args: argparse.Namespace) -> list[dict]:
    out = Path(args.out)
    rows = []
    for name in args.models:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        row = time_model(name, out, args.repeats)
        rows.append(row)
        print(f"{row['model']:<24} {row['params_m']:8.1f} M params  {row['file_gb']:6.2f} GB  "
              f"{row['seconds']:6.2f} s  {row['mb_per_s']:7.0f} MB/s", flush=True)  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
