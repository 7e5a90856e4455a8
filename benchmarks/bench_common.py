"""What the benchmarks share: device synchronisation and memory, the environment block and the JSON file.

Imports torch only, so that ``bench_official.py`` can load it before it puts the official checkout (whose ``util``
package shadows this repository's) on the import path.
"""

import argparse
import gc
import json
import platform
import statistics
import time
import types

import torch


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def device_info(device: torch.device, timm: types.ModuleType, **extra) -> dict:
    """The environment of a run: device, torch, the timm imported, Python, threads, CPU (and GPU name)."""
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "timm": timm.__version__,
        **extra,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    return info


def write_json(path: str, info: dict, args: argparse.Namespace, rows: list[dict]) -> None:
    """``{"info", "args", "results"}``, rewritten after every row, so a run cut short keeps what it measured."""
    with open(path, "w") as f:
        json.dump({"info": info, "args": vars(args), "results": rows}, f, indent=1)


def time_windows(run, batch: int, warmup: int, steps: int, repeats: int, device: torch.device) -> dict:
    """``run(n)`` does n training steps of ``batch`` images: one untimed call of ``warmup`` steps, then ``repeats``
    timed calls of ``steps``, synchronised around each. Returns the median images/s, every window's, the step time,
    this process's CPU seconds per step (steadier than wall time on a busy host) and the warm-up's seconds."""
    t0 = time.perf_counter()
    run(warmup)
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    rates = []
    cpu0 = time.process_time()
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        run(steps)
        synchronize(device)
        rates.append(batch * steps / (time.perf_counter() - t0))
    ips = statistics.median(rates)
    return {
        "images_per_s": ips,
        "images_per_s_all": rates,
        "step_ms": 1000 * batch / ips,
        "cpu_s_per_step": (time.process_time() - cpu0) / (repeats * steps),
        "warmup_s": warmup_s,
    }
