"""One MixMIM pretraining step (forward, backward, AdamW) per attention path, optionally against the official code.

Times ``--rounds`` x ``--steps`` steps after ``--warmup`` steps of ``--model`` (default ``mixmim_base``, 224x224,
batch 4, fp32, 2 threads, as in BENCHMARKS.md) for each attention path of ``models_mixmim.WindowAttention``:
``plain`` (matmul, additive bias+mask, softmax) and ``sdpa`` (``F.scaled_dot_product_attention`` with the same
additive mask). Reports the median seconds per step, images/s and, on CUDA, peak memory. The contenders take turns,
round by round, so that load from other processes falls on all of them alike.

``--official-path DIR`` also times the official model: DIR must hold a ``models_mixmim.py`` that exposes the
official factory under the same name (e.g. a wrapper that loads Sense-X/MixMIM's file under a compatibility
shim). It runs in a subprocess with only DIR (not this repository) on ``sys.path``, so the two never mix.

Examples:
    python benchmarks/bench_mixmim_attention.py                       # CPU, 2 threads, both paths
    python benchmarks/bench_mixmim_attention.py --official-path ../official_wrapper
    python benchmarks/bench_mixmim_attention.py --device cuda --amp bf16 --batch-size 64 --threads 0
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
logger = logging.getLogger("bench_mixmim_attention")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="mixmim_base", help="pretraining model factory name")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads; 0 leaves the default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast dtype")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed steps per contender and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each times every contender in turn")
    p.add_argument("--paths", nargs="+", choices=["plain", "sdpa"], default=["plain", "sdpa"])
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: perf_counter; cpu: this process's CPU time (steadier on a shared machine with --threads 1)",
    )
    p.add_argument("--official-path", default=None, help="folder with a models_mixmim.py wrapping the official code")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--official-worker", action="store_true", help=argparse.SUPPRESS)
    return p


class Stepper:
    """A model, its AdamW and a fixed random batch; ``run(n)`` times n full training steps."""

    def __init__(self, model: torch.nn.Module, args: argparse.Namespace):
        self.device = torch.device(args.device)
        self.model = model.to(self.device).train()
        self.opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
        self.x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=self.device)
        self.dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
        self.clock = time.process_time if args.clock == "cpu" else time.perf_counter
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def step(self) -> None:
        with torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = self.model(self.x)[0]
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            t0 = self.clock()
            self.step()
            self.sync()
            times.append(self.clock() - t0)
        return times

    def peak_mem_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None


def seed_all() -> None:
    torch.manual_seed(0)
    random.seed(0)


class OfficialStepper:
    """The official model in a subprocess that sees only ``--official-path``; one line on stdin = one round."""

    def __init__(self, args: argparse.Namespace):
        cmd = [sys.executable, os.path.abspath(__file__), "--official-worker"]
        for k in ("model", "img_size", "batch_size", "threads", "device", "amp", "warmup", "clock", "official_path"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=args.official_path
        )
        self._read()  # built and warmed up

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the official worker exited with {self.proc.wait()}")
        return json.loads(line)

    def run(self, n: int) -> list[float]:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return self._read()["times"]

    def peak_mem_gib(self) -> float | None:
        self.proc.stdin.write("peak\n")
        self.proc.stdin.flush()
        return self._read()["peak_mem_gib"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def official_worker(args: argparse.Namespace) -> None:
    sys.path[:] = [os.path.abspath(args.official_path)] + [p for p in sys.path if os.path.abspath(p) != ROOT]
    import models_mixmim as official  # the wrapper in --official-path

    seed_all()
    stepper = Stepper(getattr(official, args.model)(img_size=args.img_size), args)
    stepper.run(args.warmup)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() == "peak":
            print(json.dumps({"peak_mem_gib": stepper.peak_mem_gib()}), flush=True)
        else:
            print(json.dumps({"times": stepper.run(int(line))}), flush=True)


def main(args: argparse.Namespace) -> dict:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.official_worker:
        official_worker(args)
        return {}

    sys.path.insert(0, ROOT)
    import models_mixmim

    steppers: dict = {}
    for path in args.paths:
        seed_all()
        model = getattr(models_mixmim, args.model)(img_size=args.img_size, fused_attn=path == "sdpa")
        steppers[path] = Stepper(model, args)
        steppers[path].run(args.warmup)
    if args.official_path:
        steppers["official"] = OfficialStepper(args)

    # rounds interleave the contenders, so a busy machine slows them alike
    times: dict[str, list[float]] = {k: [] for k in steppers}
    for r in range(args.rounds):
        for name, stepper in steppers.items():
            times[name] += stepper.run(args.steps)
        logger.info(
            "round %d/%d: %s",
            r + 1,
            args.rounds,
            ", ".join(f"{k} {statistics.median(v):.3f} s" for k, v in times.items()),
        )

    results = {"config": {k: v for k, v in vars(args).items() if k != "official_worker"}, "torch": torch.__version__}
    for name, stepper in steppers.items():
        med = statistics.median(times[name])
        results[name] = {"s_per_step": med, "img_per_s": args.batch_size / med, "times": times[name]}
        peak = stepper.peak_mem_gib()
        if peak is not None:
            results[name]["peak_mem_gib"] = peak
        logger.info(
            "%-8s %.3f s/step (median of %d)  %.2f img/s%s",
            name,
            med,
            len(times[name]),
            args.batch_size / med,
            f"  peak {peak:.2f} GiB" if peak is not None else "",
        )
    if "official" in steppers:
        steppers["official"].close()
        for path in args.paths:
            logger.info(
                "%s vs official: %.2fx faster", path, results["official"]["s_per_step"] / results[path]["s_per_step"]
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(get_args_parser().parse_args())
