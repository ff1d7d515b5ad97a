"""Helpers shared by the benchmark scripts: the machine line of a results file, mean ± std cells, coverage records."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RESULTS",
    "add_out",
    "fmt_err",
    "load_header",
    "load_line",
    "machine",
    "ms",
    "parse_shard",
    "note_load",
    "records_load",
    "recorded_loads",
    "selfcheck_record",
]

RESULTS = Path(__file__).resolve().parent / "results"
"""The default results folder (in the checkout); ``--out DIR`` sends every file a benchmark writes to DIR instead."""


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


def load_line() -> str:
    """:func:`machine` plus the load right now: ``os.getloadavg()`` (1/5/15 min) against the logical cores, and the
    UTC time. Benchmarks print it before and after their runs: on a shared machine the load is part of a number."""
    one, five, fifteen = os.getloadavg()
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return f"{machine()}; load {one:.2f}/{five:.2f}/{fifteen:.2f} (1/5/15 min) on {os.cpu_count()} cores at {when}"


def load_header(start: str, end: str | None = None) -> str:
    """The markdown line(s) recording the machine and its load at the start and the end of a run (two
    :func:`load_line` results; ``end`` may be missing for a run that recorded only its start)."""
    text = f"Machine and load at start: {start}"
    return text + (f"  \nLoad at end: {end}" if end else "")


def note_load(data: dict[str, Any], start: str, end: str, keep: int = 20) -> None:
    """Append this invocation's :func:`load_header` to ``data["loads"]`` (a resumable, sharded results file: one
    entry per process that ran; the last ``keep`` are kept)."""
    data["loads"] = [*data.get("loads", []), load_header(start, end)][-keep:]


def recorded_loads(data: dict[str, Any], show: int = 4) -> list[str]:
    """Markdown lines of the last ``show`` entries :func:`note_load` stored (one line saying none where none)."""
    loads = data.get("loads", [])
    if not loads:
        return ["Machine and load: not recorded (runs made before load lines were stored)."]
    head = f"Machine and load of the {min(show, len(loads))} latest of {len(loads)} recorded invocations:"
    return [head, "", *(f"- {line}" for line in loads[-show:])]


def records_load(rows: list[dict[str, Any]]) -> str:
    """:func:`load_header` of the earliest and the latest ``"load"`` line stored in ``rows`` (records written by
    :func:`selfcheck_record`), for a report rewritten from stored records; a "not recorded" line where none has one."""
    lines = sorted((r["load"] for r in rows if r.get("load")), key=lambda line: line.rsplit(" at ", 1)[-1])
    return load_header(lines[0], lines[-1]) if lines else "Machine and load: not recorded with these records."


def add_out(p: argparse.ArgumentParser, default: Path | None = None) -> None:
    """Add ``--out DIR`` to ``p``: the folder every result file goes to (created if missing; default
    :data:`RESULTS`), so a read-only checkout can run the benchmark with ``--out`` elsewhere."""
    p.add_argument(
        "--out",
        type=Path,
        default=RESULTS if default is None else default,
        help="folder for every result file, created if missing (default: %(default)s)",
    )


def ms(values: list[float], digits: int = 3) -> str:
    """``mean ± sample std`` of ``values`` (the mean alone for one value, ``–`` for none)."""
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def fmt_err(e: float | None) -> str:
    """An output error for a coverage table (``–`` where it was not measured)."""
    return "–" if e is None else f"{e:.1e}"


def selfcheck_record(name: str, model: torch.nn.Module, side: int, res: Any, t0: float, **extra: Any) -> dict[str, Any]:
    """A JSON-able coverage record of one :func:`fedfuse.align.selfcheck.selfcheck` result (``extra`` keys first)."""
    return {
        "model": name,
        **extra,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "input": side,
        "ok": res.ok,
        "derived": res.derived,
        "reason": res.reason,
        "groups": res.groups,
        "param_share": round(getattr(res, "param_share", 0.0), 4),
        "axis_share": round(getattr(res, "axis_share", 0.0), 4),
        "permuted_err": res.permuted_err,
        "errors": res.errors,
        "failures": res.failures,
        "seconds": {k: round(v, 2) for k, v in res.seconds.items()},
        "total_s": round(time.perf_counter() - t0, 2),
        "load": load_line(),
    }


def read_shards(results_dir: Path, name: str) -> list[dict[str, Any]]:
    """The JSON of every ``<name>.shard<i>.json`` in ``results_dir`` (what ``--shard`` processes wrote), in order."""
    return [json.loads(path.read_text()) for path in sorted(results_dir.glob(f"{name}.shard*.json"))]


def parse_shard(p: argparse.ArgumentParser, text: str) -> tuple[int, int]:
    """``--shard i/n`` (this process runs every n-th cell from the i-th) as ``(i, n)``; a parser error otherwise."""
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        p.error(f"--shard {text!r} is not allowed; allowed: i/n with 0 <= i < n")
    return int(i), int(n)
