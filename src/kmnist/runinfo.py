"""What a run ran on: code version, library versions and hardware, recorded beside every result."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from kmnist import __version__
from kmnist.cpu import cpu_flags, cpuinfo


def cpu_model() -> str:
    return cpuinfo("model name") or platform.processor() or platform.machine()


# The instruction sets that decide how fast (and in which precision) training runs on a CPU: one model name
# ("AMD EPYC") covers CPUs with and without bf16 matrix units, several times apart in speed.
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
FEATURE_NAMES = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16", "avx512f": "AVX-512", "avx2": "AVX2"}


def cpu_features() -> list[str]:
    """Which of CPU_FEATURES this CPU has."""
    flags = cpu_flags()
    return [name for name in CPU_FEATURES if name in flags]


@functools.cache
def git_revision() -> str | None:
    """The commit of the kmnist source tree this process runs (with '-dirty' for uncommitted changes), if it is a
    checkout: read once, at the first call, so a long-lived process (a sweep's worker, which asks when it
    starts) records the code it loaded, not a commit made in the checkout since."""
    here = Path(__file__).resolve().parent
    try:
        revision = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return revision + ("-dirty" if dirty else "")


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "kmnist": __version__,
        "git_revision": git_revision(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": package_version("numpy"),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpus": gpus,
        "command": " ".join(sys.argv),
    }


def hardware_summary(env: dict[str, Any]) -> str:
    """One line naming the hardware, for tables and logs."""
    if env.get("gpus"):
        return f"{env['gpus'][0]} (CUDA {env['cuda']})"
    features = env.get("cpu_features")  # absent from runs saved before it was recorded
    features = features if isinstance(features, list) else []
    best = next((FEATURE_NAMES[name] for name in reversed(CPU_FEATURES) if name in features), None)
    threads = env.get("torch_threads")
    count = f", {threads} thread{'' if threads == 1 else 's'}" if threads else ""
    return f"{env.get('cpu', 'unknown CPU')}{f' ({best})' if best else ''}{count}"
