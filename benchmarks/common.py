"""Helpers shared by the benchmark scripts: the machine line of a results file and mean ± std cells."""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

import torch

__all__ = ["machine", "ms"]


def machine() -> str:
    """One line: host, CPU model, logical cores, torch version and threads, Python version."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{platform.node() or 'host'}: {cpu}, {os.cpu_count()} logical cores (shared), torch {torch.__version__} "
        f"CPU, {torch.get_num_threads()} torch thread(s), Python {platform.python_version()}"
    )


def ms(values: list[float], digits: int = 3) -> str:
    """``mean ± sample std`` of ``values`` (the mean alone for one value, ``–`` for none)."""
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"
