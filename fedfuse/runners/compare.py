"""``fedfuse simulate --compare A,B,...``: each strategy in its own ``fedfuse simulate`` process (a fresh Ray, one warm
SuperLink for all), same partitions and seeds; one table, one plot, ``compare.json``.

Composition layer (imports ``strategies`` lazily); :mod:`fedfuse.cli` parses the arguments and calls
:func:`run_compare`.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedfuse.errors import ConfigError, RunFailedError

__all__ = ["compare_entries", "drop_flag", "drop_option", "option_flags", "run_compare", "run_dir_name"]


def _schema() -> dict[str, Any]:
    from strategies.registry import OPTIONS

    return OPTIONS


_STRATEGY_TOKEN = re.compile(r"[A-Za-z_][\w-]*(@.*)?|[A-Za-z_][\w.]*:[A-Za-z_]\w*(@.*)?")


def _split_entries(text: str) -> list[str]:
    """``text`` split at commas, except inside an option's value: a piece that cannot start an entry (a strategy
    name or ``package.module:Class``) continues the previous entry's last value (``hetlora@lora-ranks=2,4``)."""
    out: list[str] = []
    for piece in (s.strip() for s in text.split(",")):
        if out and "=" in out[-1].rsplit("@", 1)[-1] and piece and not _STRATEGY_TOKEN.fullmatch(piece):
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out


def compare_entries(text: str) -> list[tuple[str, str, dict[str, Any]]]:
    """``--compare`` entries as (label, strategy, options): ``STRATEGY`` or ``STRATEGY@key=value[@key=value...]``,
    a run with options of its own (schema names, e.g. ``fedavg@client-init=shared``, ``wb@bn-repair=repair``)."""
    entries: list[tuple[str, str, dict[str, Any]]] = []
    for label in _split_entries(text):
        if not label:
            continue
        name, *pairs = label.split("@")
        own: dict[str, Any] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key or key in ("strategy", "out"):
                raise ConfigError(
                    f"compare entry {label!r}: {pair!r} is not allowed; allowed: STRATEGY@key=value with a run "
                    "option other than strategy/out, e.g. fedavg@client-init=shared"
                )
            own[key] = value
        if str(own.get("client-init", "")) == "shared":  # the entry's shared start overrides a global apart one
            own = {"one-shot": "false", "client-init-from": "", **own}
        if "lora-ranks" in own:  # the entry's ranks override a global lora-rank (and the other way round)
            own = {"lora-rank": "0", **own}
        elif "lora-rank" in own:
            own = {"lora-ranks": "", **own}
        entries.append((label, name, own))
    labels = [e[0] for e in entries]
    if len(entries) < 2 or len(set(labels)) < len(labels):
        raise ConfigError(f"compare={text!r} needs at least two different comma-separated strategies")
    folders = [run_dir_name(label) for label in labels]
    if len(set(folders)) < len(folders):
        same = next(f for f in folders if folders.count(f) > 1)
        raise ConfigError(f"compare={text!r}: two entries would share the result folder {same!r}; allowed: entries "
                          "that differ in more than a path separator")  # fmt: skip
    return entries


def drop_option(argv: list[str], key: str) -> list[str]:
    """``argv`` without the flag of option ``key`` (``--key VALUE``, ``--key=VALUE``; ``--key``/``--no-key`` for a
    boolean option)."""
    flag = "--rounds" if key == "num-rounds" else f"--{key}"
    if _schema()[key].type is bool:
        return [a for a in argv if a not in (flag, f"--no-{key}")]
    return drop_flag(argv, flag)


def option_flags(options: dict[str, Any]) -> list[str]:
    """``--key value`` flags (``--key``/``--no-key`` for booleans) that set ``options``."""
    flags: list[str] = []
    for key, value in options.items():
        flag = "rounds" if key == "num-rounds" else key
        if _schema()[key].type is bool:
            flags.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            flags += [f"--{flag}", str(value)]
    return flags


def run_compare(
    cfg: dict[str, Any],
    args: argparse.Namespace,
    argv: Sequence[str],
    preflight: Callable[..., Any],
    print_table: Callable[[Any, dict[str, list[dict[str, Any]]]], None],
) -> None:
    """Run each strategy in its own process (a fresh Ray; one warm SuperLink for all), same partitions and seeds;
    one table, one plot.
    An entry ``STRATEGY@key=value`` runs with its own value of ``key`` (:func:`compare_entries`). ``preflight`` and
    ``print_table``: the CLI's own (each entry checked as ``fedfuse simulate`` checks a run; its results table)."""
    from rich.console import Console

    from fedfuse.results import atomic_write_bytes, load_metrics, plot_accuracy
    from strategies.registry import options_for, validate_config

    entries = compare_entries(args.compare)
    out = Path(cfg["out"])
    checked: dict[str, dict[str, Any]] = {}
    for label, name, own in entries:  # every entry's options before anything starts
        checked[label] = {k: v for k, v in validate_config({**options_for(cfg, name), **own}).items() if k in own}
    with _warm_superlink(args) as child_env:  # one SuperLink for every run, started while the preflights run
        for label, name, own in entries:
            given = validate_config({**options_for(cfg, name), **own})
            preflight({**given, "out": str(out / run_dir_name(label))}, args.overwrite)
        _compare_runs(cfg, args, argv, entries, checked, child_env() if child_env else None)
    runs = {label: load_metrics(out / run_dir_name(label))["rounds"] for label, _, _ in entries}
    console = Console(width=max(Console().width, 76 + max(map(len, runs))))  # every label whole
    print_table(console, runs)
    from fedfuse.experiment import init_mode

    start = {"shared": "", "own": ", client-init own", "files": f", client-init-from {cfg['client-init-from']}"}
    title = f"{cfg['dataset']} / {cfg['model']}, {cfg['partition']}{start[init_mode(cfg)]}"  # entries may override
    if cfg.get("plot", True):  # --no-plot: no accuracy.png per run, no compare.png
        plot_accuracy(runs, out / "compare.png", title=title)
    summary = {name: rows[-1] for name, rows in runs.items()}
    atomic_write_bytes(out / "compare.json", json.dumps(summary, indent=2).encode())
    console.print(f"comparison in {out}/{'compare.png and ' if cfg.get('plot', True) else ''}compare.json")


def _warm_superlink(args: argparse.Namespace) -> Any:
    """For a Ray ``--compare``: a SuperLink started now and shared by every compared run (each run's process finds
    it through ``$FEDFUSE_SUPERLINK_HOME``); yields a function giving the runs' environment once it answers.
    Inline comparisons yield None."""
    import contextlib

    if (args.backend or "ray") != "ray":
        return contextlib.nullcontext(None)

    @contextlib.contextmanager
    def warm() -> Any:
        import os

        from fedfuse.runners.ray import WARM_SUPERLINK, started_superlink

        with started_superlink({"RAY_ADDRESS": args.ray_address} if args.ray_address else None) as link:

            def env() -> dict[str, str]:
                link.ready()
                return {**os.environ, WARM_SUPERLINK: str(link.home)}

            yield env

    return warm()


def _compare_runs(
    cfg: dict[str, Any],
    args: argparse.Namespace,
    argv: Sequence[str],
    entries: list[tuple[str, str, dict[str, Any]]],
    checked: dict[str, dict[str, Any]],
    env: dict[str, str] | None,
) -> None:
    """Each compared strategy in its own process (``env``: the warm SuperLink's for Ray runs)."""
    from strategies.registry import options_for

    out = Path(cfg["out"])
    base = list(argv)
    for flag in ("--compare", "--strategy", "--out"):
        base = drop_flag(base, flag)
    for label, name, own in entries:
        args_of = base
        for key in set(cfg) - set(k for k, v in options_for(cfg, name).items() if v == cfg[k]):
            args_of = drop_option(args_of, key)  # options only other compared strategies read
        for key in own:
            args_of = drop_option(args_of, key)
        cmd = [sys.executable, "-m", "fedfuse.cli", "simulate", *args_of, *option_flags(checked[label])]
        cmd += ["--strategy", name, "--out", str(out / run_dir_name(label))]
        if subprocess.run(cmd, check=False, env=env).returncode != 0:
            raise RunFailedError(f"strategy {label!r} failed; see its output above")


def run_dir_name(strategy: str) -> str:
    """A compared entry's result folder, one level below ``--out``: ``pkg.mod:Class`` as ``pkg.mod.Class`` (no
    colon), a path separator in an option's value as ``_`` (``wb@client-init-from=a/b`` → ``…=a_b``)."""
    return strategy.replace(":", ".").replace("/", "_").replace("\\", "_")


def drop_flag(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag VALUE`` / ``flag=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out
