"""Run outputs: metrics.json / metrics.csv per round, the final model, accuracy plots.

Every file is written to a temp file and renamed, so a crash never leaves a half-written result.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedfuse.errors import ConfigError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_many",
    "RunWriter",
    "check_out_dir",
    "load_metrics",
    "plot_accuracy",
    "RESULT_FILES",
    "set_aside",
    "drop_aside",
    "restore_aside",
    "remove_stale_temp_files",
    "check_writable",
    "fedfuse_home",
    "resolve_out",
    "divergence_warning",
]

RESULT_FILES = ("metrics.json", "metrics.csv", "model.pt", "accuracy.png")


def fedfuse_home(environ: Mapping[str, str] = os.environ) -> Path:
    """``$FEDFUSE_HOME`` if set, else ``~/.fedfuse``: where a ServerApp run by ``flwr run`` puts a relative
    ``out`` (Flower's own convention: ``$FLWR_HOME`` or ``~/.flwr``)."""
    home = environ.get("FEDFUSE_HOME", "").strip()
    return Path(home).expanduser() if home else Path.home() / ".fedfuse"


def resolve_out(out: str | Path, environ: Mapping[str, str] = os.environ) -> Path:
    """The absolute results directory of run-config ``out`` for a ServerApp: an absolute ``out`` as given, a
    relative one under :func:`fedfuse_home` — never under the working directory, which for ``flwr run`` is
    wherever the (possibly shared) SuperLink happened to start."""
    path = Path(out).expanduser()
    return path if path.is_absolute() else (fedfuse_home(environ) / path).resolve()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory + ``os.replace`` (atomic on POSIX).

    An OSError (read-only directory, disk full, ``path`` a directory) is re-raised naming ``path`` (as
    ``filename``); the previous ``path`` is left as it was.
    """
    atomic_write_many({Path(path): data})


def atomic_write_many(files: Mapping[Path, bytes]) -> None:
    """Write several files as one commit: every temp file is written and fsynced first, and only when all of them
    are on disk are they renamed into place (in the mapping's order; put the file that marks the commit last).

    A failure while writing (disk full, read-only directory) therefore changes none of the files: a round's
    metrics and its checkpoint never disagree because one of them could not be written. (Only a kill between
    two renames can separate them; the checkpoint, renamed last, is then the older one; ``--resume``
    continues from it and rewrites the metrics when it commits the next round.) OSErrors name the failed file.
    """
    staged: list[tuple[str, Path]] = []
    path = Path()
    try:
        for path, data in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            staged.append((tmp, path))
            _write_synced(fd, data)
        for _, path in staged:  # what a rename would fail on, before any rename
            if path.is_dir():
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        while staged:
            tmp, path = staged[0]
            os.replace(tmp, path)
            staged.pop(0)
    except BaseException as exc:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename != str(path):
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


def _write_synced(fd: int, data: bytes) -> None:
    """``data`` into the open file ``fd`` (closed after), flushed to disk: where a full disk shows up."""
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def remove_stale_temp_files(out: Path) -> list[Path]:
    """Delete the ``.*.tmp`` files an interrupted :func:`atomic_write_bytes` left under ``out``; return them."""
    out = Path(out)
    stale = [p for p in out.rglob(".*.tmp") if p.is_file()] if out.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def check_writable(out: Path) -> None:
    """OSError naming ``out`` when a file cannot be created in it (read-only directory, no space, ...)."""
    out = Path(out)
    if not out.is_dir():  # created later; a failure then is reported the same way
        return
    try:
        fd, tmp = tempfile.mkstemp(dir=out, prefix=".write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(out)) from exc


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output directory that already holds results unless ``overwrite``."""
    existing = [name for name in RESULT_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"out={str(out)!r} already holds results ({', '.join(existing)}); pass --overwrite or another --out"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={str(out)!r} exists and is not a directory")


def check_replaceable(out: Path, overwrite: bool, files: Sequence[str], what: str) -> None:
    """Refuse a file, a non-empty directory without ``overwrite``, and with it one holding anything but a previous
    ``what``'s ``files`` (``--overwrite`` replaces those, never a folder of other things); the nearest existing
    folder must be writable."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"out={str(out)!r} is not empty; pass --overwrite or another --out")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in files)
        if foreign:
            raise ConfigError(
                f"out={str(out)!r} holds {foreign[0]!r}, not only a previous {what}'s {', '.join(files)}; "
                "--overwrite replaces only those: pass another --out"
            )
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    check_writable(parent)


def set_aside(out: Path) -> Path | None:
    """For ``--overwrite``: atomically rename a result directory ``out`` to a sibling ``.<name>.replaced-<time>``
    and create an empty ``out``, so a new run never writes beside the old run's files (a run killed midway
    leaves only its own files in ``out``; the old ones wait in the sibling). None when ``out`` holds no results.
    Finish with :func:`drop_aside` (the new run has results) or :func:`restore_aside` (it has none)."""
    out = Path(out)
    if not out.is_dir() or not any((out / name).exists() for name in (*RESULT_FILES, "checkpoint.pt")):
        return None
    aside = out.with_name(f".{out.name}.replaced-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.rename(out, aside)
    out.mkdir()
    return aside


def stale_asides(out: Path) -> list[Path]:
    """Folders :func:`set_aside` made for ``out`` whose run is gone (killed before it could drop or restore
    them): ``.<name>.replaced-<time>-<pid>`` siblings whose pid is no longer alive."""
    out = Path(out)
    stale = []
    for path in sorted(out.parent.glob(f".{out.name}.replaced-*-*")):
        pid = path.name.rsplit("-", 1)[-1]
        if path.is_dir() and pid.isdigit() and not _alive(int(pid)):
            stale.append(path)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def drop_aside(aside: Path | None) -> None:
    """Delete the previous results :func:`set_aside` kept (the new run has replaced them)."""
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def restore_aside(out: Path, aside: Path | None) -> None:
    """Put the previous results back in ``out`` (the new run produced nothing to show); the new run's partial
    files are deleted."""
    if aside is None:
        return
    shutil.rmtree(out, ignore_errors=True)
    os.rename(aside, out)


def load_metrics(out: Path) -> dict[str, Any]:
    """The ``metrics.json`` of a finished (or running) run."""
    return json.loads((Path(out) / "metrics.json").read_text())


class RunWriter:
    """Appends one row per round and rewrites metrics.json/csv atomically after each."""

    def __init__(self, out: Path, config: Mapping[str, Any]) -> None:
        self.out = Path(out)
        self.config = dict(config)
        self.rows: list[dict[str, Any]] = []

    def append(self, row: Mapping[str, Any], commit: Mapping[Path, bytes] | None = None) -> None:
        """Add ``row`` and rewrite metrics.json/csv — in one :func:`atomic_write_many` with ``commit`` (the
        round's checkpoint), renamed last: either all of them show the new round or none does."""
        rows = [*self.rows, dict(row)]
        payload = {"config": self.config, "rounds": rows}
        buf = io.StringIO()
        fields = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_many(
            {
                self.out / "metrics.json": json.dumps(payload, indent=2).encode(),
                self.out / "metrics.csv": buf.getvalue().encode(),
                **(commit or {}),
            }
        )
        self.rows = rows

    def finish(self, state_dict: Mapping[str, torch.Tensor], label: str, *, plot: bool = True) -> None:
        """model.pt, and with ``plot`` accuracy.png."""
        buf = io.BytesIO()
        torch.save(dict(state_dict), buf)
        atomic_write_bytes(self.out / "model.pt", buf.getvalue())
        if plot:
            plot_accuracy({label: self.rows}, self.out / "accuracy.png")


def plot_accuracy(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, title: str = "") -> Any:
    """Central test accuracy vs round, one line per run, rounds as integer ticks; returns the saved Figure.

    A bare ``Figure`` (rendered by Agg on save): no pyplot import (0.4 s+ at the end of every run), no global
    backend switch, nothing for pyplot to hold on to."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for label, rows in runs.items():
        ax.plot([r["round"] for r in rows], [r["central_accuracy"] for r in rows], marker="o", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no half rounds
    ax.set_xlabel("round")
    ax.set_ylabel("central test accuracy")
    ax.set_title(title or "accuracy vs round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(Path(path), buf.getvalue())
    return fig


def _remedy(cfg: Mapping[str, Any]) -> str:
    """What to try against diverging local training: gradient clipping (where off) and a lower lr."""
    clip = "" if float(cfg.get("max-grad-norm", 0.0)) > 0 else "--max-grad-norm 1 or "
    return f"try {clip}a lower --lr (now {float(cfg['lr']):g})"


def divergence_warning(row: Mapping[str, Any], cfg: Mapping[str, Any]) -> str | None:
    """The warning for a metrics row that shows training diverging, else None: its central test loss is inf/NaN
    although the round was evaluated (its accuracy is a number; --eval-every leaves both NaN), i.e. the global
    model's weights passed the aggregate's finiteness check but its outputs overflow on the test set; or, in a run
    with no simulated attack, some clients' updates were non-finite (``nonfinite``: refused, so the round went
    on without them)."""
    loss, acc = float(row.get("central_loss", 0.0)), float(row.get("central_accuracy", math.nan))
    if not math.isfinite(loss) and not math.isnan(acc):
        return (
            f"round {row['round']}: the global model's central test loss is {loss} (accuracy {acc:.4f}): its weights "
            f"are finite but its outputs on the test set are not; training is diverging, {_remedy(cfg)}"
        )
    bad = int(row.get("nonfinite", 0))
    if bad and str(cfg.get("attack", "none") or "none") == "none":
        return (
            f"round {row['round']}: {bad} client update(s) had non-finite values and were left out (no attack is "
            f"simulated in this run): local training is diverging, {_remedy(cfg)}"
        )
    return None
