"""End-to-end pretraining throughput: ``main_pretrain.py`` itself (loader, engine, model) on generated JPEGs.

``bench_train.py`` times the step on images already on the device; this times what a user gets, loader included,
to show whether the loader keeps up: with the CPU decode (PIL in ``--num_workers`` workers) and with
``--decode_on_device``. The JPEGs are ImageNet-sized (``bench_data.write_jpegs``); a list file names each of them
``--repeat`` times, so a few hundred files make an epoch of many steps (they stay in the page cache, as a warm
ImageNet does not). The figure is the scripts' own: the ``img/s`` of the last progress line (the mean over the
last 20 steps), so the first steps (workers starting, cuDNN / compile warm-up) are not in it.

Examples:
    python benchmarks/bench_e2e.py --model mae_vit_base_patch16 --batch-size 128 --workers 16 --steps 60
    python benchmarks/bench_e2e.py --device cpu --model mae_vit_tiny_patch4 --input-size 32 --batch-size 8 \\
        --workers 2 --steps 4 --images 16          # the wiring, on a CPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from bench_data import write_jpegs  # noqa: E402

import main_pretrain  # noqa: E402

RATE = re.compile(r"img/s: ([0-9.]+)")


class Rates(logging.Handler):
    """Collects the ``img/s`` figure of each progress line."""

    def __init__(self):
        super().__init__()
        self.rates: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = RATE.search(record.getMessage())
        if match:
            self.rates.append(float(match.group(1)))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mae_vit_base_patch16")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, nargs="+", default=[16], help="DataLoader num_workers to try")
    p.add_argument("--steps", type=int, default=60, help="steps of the one epoch (the last 20 are the figure)")
    p.add_argument("--images", type=int, default=512, help="JPEG files to write; the list file repeats them")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--amp", default="bf16")
    p.add_argument("--device", default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default=None, help="torch.compile's mode (main_pretrain.py --compile_mode)")
    p.add_argument("--decode", nargs="+", default=["cpu", "device"], choices=["cpu", "device"])
    p.add_argument("--json", default=None)
    return p


def run_once(list_file: str, out: str, workers: int, on_device: bool, args: argparse.Namespace) -> dict:
    argv = ["--model", args.model, "--data_path", list_file, "--output_dir", out, "--log_dir", out,
            "--batch_size", str(args.batch_size), "--num_workers", str(workers), "--epochs", "1",
            "--warmup_epochs", "0", "--input_size", str(args.input_size), "--amp", args.amp, "--print_freq", "20",
            "--save_freq", "1000"]  # fmt: skip
    if args.device:
        argv += ["--device", args.device]
    if on_device:
        argv.append("--decode_on_device")
    if args.compile:
        argv.append("--compile")
    if args.compile_mode:
        argv += ["--compile_mode", args.compile_mode]
    handler = Rates()
    logging.getLogger().addHandler(handler)
    start = time.perf_counter()
    try:
        main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))
    finally:
        logging.getLogger().removeHandler(handler)
    return {
        "model": args.model,
        "decode": "device" if on_device else "cpu",
        "workers": workers,
        "batch": args.batch_size,
        "amp": args.amp,
        "compile": args.compile,
        "steps": args.steps,
        "images_per_s": handler.rates[-1] if handler.rates else None,
        "progress_rates": handler.rates,
        "wall_s": time.perf_counter() - start,
    }


def main(args: argparse.Namespace) -> list[dict]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("main_pretrain").setLevel(logging.WARNING)  # the model's repr and the arguments
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(os.path.join(tmp, "jpegs"), args.images)
        files = sorted(os.listdir(os.path.join(tmp, "jpegs", "0")))
        needed = args.steps * args.batch_size
        lines = [os.path.join("jpegs", "0", files[i % len(files)]) for i in range(needed)]
        list_file = os.path.join(tmp, "list.txt")
        with open(list_file, "w") as f:
            f.write("\n".join(lines) + "\n")
        for workers in args.workers:
            for decode in args.decode:
                try:
                    row = run_once(list_file, os.path.join(tmp, f"out_{workers}_{decode}"), workers,
                                   decode == "device", args)  # fmt: skip
                except Exception as e:  # a configuration that fails is a row, the others still run
                    row = {"model": args.model, "decode": decode, "workers": workers, "error": str(e)[:200]}
                rows.append(row)
                logging.info("e2e %s, %d workers, decode on %s: %s img/s", args.model, workers, decode,
                             row.get("images_per_s"))  # fmt: skip
                if args.json:
                    with open(args.json, "w") as f:
                        info = {"torch": torch.__version__, "gpu": torch.cuda.is_available()
                                and torch.cuda.get_device_name()}  # fmt: skip
                        json.dump({"info": info, "args": vars(args), "results": rows}, f, indent=1)
    print(f"{'model':28s} {'decode':>7s} {'workers':>8s} {'img/s':>9s}")
    for r in rows:
        print(f"{r['model']:28s} {r['decode']:>7s} {r['workers']:8d} {r.get('images_per_s') or 0:9.1f}"
              f"{'  ERROR ' + r['error'] if 'error' in r else ''}")  # fmt: skip
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
