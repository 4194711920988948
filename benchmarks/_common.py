"""Shared helpers for the benchmarks: environment record, real data batches, timing.

Benchmarks report *ratios taken in one run* (arms interleaved), because the machines are
shared and absolute times drift by tens of percent between runs.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_name() -> str:
    """CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def git(*args: str) -> str:
    """Output of ``git -C <repo> ARGS`` ("unknown" where git or the repository is missing)."""
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def env_info(device: torch.device) -> dict:
    """Device name, torch version, git commit (+dirty flag), threads: recorded with every result."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "src", "benchmarks"],
                                    cwd=ROOT, capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    dev = (torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"{cpu_name()} ({torch.get_num_threads()} threads)")
    return {"device": dev, "torch": torch.__version__, "commit": commit, "dirty": dirty,
            "python": platform.python_version()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``fn()``, with the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def summary(xs: list[float]) -> dict:
    """Median and inter-quartile range of a sample."""
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "iqr": q[2] - q[0],
            "n": len(xs)}


def image_batches(dataset: str, batch: int, count: int, device: torch.device, seed: int = 0
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` real, normalised (x, y) batches from ``dsbp.data.load_dataset(dataset)``.

    ``dataset``: ``"bundled"`` (Fashion-MNIST subset shipped in the package, 1x28x28) or
    ``"cifar10"`` (3x32x32, from the shared data directory).
    """
    from dsbp.data import load_dataset

    ds = load_dataset(dataset)
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor(ds.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds.std).view(1, -1, 1, 1)
    out = []
    for _ in range(count):
        idx = torch.randint(0, ds.x_train.shape[0], (batch,), generator=g)
        x = (ds.x_train[idx].float() / 255.0 - mean) / std
        out.append((x.to(device), ds.y_train[idx].to(device)))
    return out


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
