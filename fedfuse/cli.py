"""``fedfuse`` command line: the composition root (with ``fedfuse.runners``, the only core code that may
import Flower, ``strategies`` and ``clients`` — lazily, inside functions).

    fedfuse simulate --strategy fedavg --dataset digits --model mlp --num-clients 10 --rounds 5 \\
        --partition dirichlet --alpha 0.3 --local-epochs 1 --seed 0 --out runs/demo
    fedfuse simulate --compare fedavg,wb ...

Bad input exits with code 2 and one line on stderr, before Ray starts and before anything in
``--out`` is touched. A run that cannot write its results (the path named), or in which no round produced
a model, exits with code 1 and one line; results already written stay as they were.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedfuse.errors import ConfigError, RunFailedError
from fedfuse.model_commands import add_lmc_parser, add_merge_parser, run_lmc, run_merge
from fedfuse.runners.compare import run_compare

__all__ = ["main", "build_parser", "config_from_args", "preflight"]


def _schema() -> dict[str, Any]:
    """Every run option: the core ones and each registered strategy's (``strategies.registry``)."""
    from strategies.registry import OPTIONS as ALL

    return ALL


def validate_config(config: dict[str, Any], *, fill_defaults: bool = True, check_owners: bool = True) -> dict[str, Any]:
    from strategies.registry import validate_config as validate

    return validate(config, fill_defaults=fill_defaults, check_owners=check_owners)


def _add_options(p: argparse.ArgumentParser) -> None:
    for name, opt in _schema().items():
        flag = "rounds" if name == "num-rounds" else name
        allowed = f"; one of: {', '.join(opt.choices)}" if opt.choices else ""
        if name == "strategy":
            allowed += " or package.module:Class"
        text = f"{opt.help}{allowed} (default: {opt.default!r})".replace("%", "%%")  # argparse formats help with %
        kwargs: dict[str, Any] = {"default": None, "help": text}
        if opt.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = str  # validated by the schema, so errors read the same everywhere
            kwargs["metavar"] = "NAME" if opt.choices else opt.type.__name__.upper()
        p.add_argument(f"--{flag}", dest=name, **kwargs)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2; no abbreviated flags (``--strateg`` is
    not ``--strategy``), and an unknown flag is named with the nearest valid one (:func:`difflib.get_close_matches`
    over the flags and the run-config keys they set: ``--num-round`` → ``--rounds``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False  # also for every subparser (parser_class=_Parser)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self._chosen(ns).unknown(extras))
        return ns

    def _chosen(self, ns: argparse.Namespace) -> _Parser:
        """The subcommand's parser the unknown arguments were given to (else this one)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(ns, action.dest, None) or "")
                if isinstance(chosen, _Parser):
                    return chosen
        return self

    def unknown(self, extras: Sequence[str]) -> str:
        """``unrecognized argument --num-round; did you mean --rounds?`` for the first unknown flag."""
        flag = next((a for a in extras if a.startswith("-")), None)
        if flag is None:
            return f"unrecognized argument {extras[0]!r}"
        flag = flag.split("=", 1)[0]
        names: dict[str, str] = {}  # spelling → the flag to suggest
        for action in self._actions:
            for opt in action.option_strings:
                if opt.startswith("--"):
                    names[opt] = opt
                    if isinstance(action.dest, str) and action.dest != opt[2:].replace("-", "_"):
                        names.setdefault("--" + action.dest.replace("_", "-"), opt)  # --num-rounds → --rounds
        close = difflib.get_close_matches(flag, list(names), n=1, cutoff=0.75)
        hint = f"; did you mean {names[close[0]]}?" if close else f"; see {self.prog} --help"
        return f"unrecognized argument {flag}{hint}"


SIMULATE_EXAMPLES = """examples:
  fedfuse simulate --strategy wb --dataset digits --model mlp --num-clients 10 \\
      --rounds 10 --partition dirichlet --alpha 0.3 --seed 0 --out runs/wb
  fedfuse simulate --backend inline --strategy fedpfn --out runs/pfn
  fedfuse simulate --compare fedavg,wb,match --rounds 5 --out runs/cmp
  fedfuse simulate --compare fedavg,wb --client-init own --out runs/apart
  fedfuse simulate --client-init-from runs/pre/clients/round1 --out runs/sites
  fedfuse simulate --strategy my_pkg.my_mod:MyStrategy --out runs/mine  # from .
  fedfuse simulate --resume runs/wb     # continue after the last complete round
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fedfuse",
        description="Alignment-aware federated learning on Flower.",
        epilog="examples:\n  fedfuse simulate --strategy wb --out runs/wb\n"
        "  fedfuse lmc runs/a/model.pt runs/b/model.pt --align --out runs/lmc\n"
        "  fedfuse merge a.pt b.pt --model mlp --method all --repair --test-data digits --out runs/merge\n\n"
        "fedfuse simulate --help lists every option.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version="fedfuse 0.1.0")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sim = sub.add_parser(
        "simulate",
        help="run a federated simulation through Flower's simulation engine (Ray) or inline",
        epilog=SIMULATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_options(sim)
    sim.add_argument(
        "--compare",
        default=None,
        metavar="A,B,...",
        help="comma-separated strategies run on identical partitions/seeds; STRATEGY@key=value gives one run its "
        "own option, e.g. fedavg,wb,fedavg@client-init=shared",
    )
    sim.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    sim.add_argument(
        "--resume", default=None, metavar="OUT_DIR", help="continue the run in OUT_DIR after its last complete round"
    )
    sim.add_argument(
        "--backend",
        choices=("ray", "inline"),
        default=None,
        help="ray: Flower's simulation engine via `flwr run` on a local SuperLink (default); inline: same apps, "
        "sequentially in this process. --resume reuses the run's backend unless given",
    )
    sim.add_argument("--client-cpus", type=float, default=1.0, help="CPUs reserved per client actor (default 1)")
    sim.add_argument("--client-gpus", type=float, default=0.0, help="GPUs per client actor (default 0)")
    sim.add_argument(
        "--ray-address",
        default=None,
        metavar="HOST:PORT",
        help="run on an existing Ray cluster (`ray start --head`), e.g. 127.0.0.1:6379; default: a local Ray",
    )
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    sim.add_argument("--no-progress", action="store_true", help="no live progress display")
    add_lmc_parser(sub)
    add_merge_parser(sub)
    return parser


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The validated run config from parsed flags (unset flags take the schema defaults); with ``--compare``
    a strategy's own options may be given (each compared strategy gets the ones it reads)."""
    given = {name: getattr(args, name) for name in _schema() if getattr(args, name, None) is not None}
    if given.get("client-init") == "shared":  # the other two start clients from their own models
        other = "--one-shot" if given.get("one-shot") else "--client-init-from" if given.get("client-init-from") else ""
        if other:
            raise ConfigError(
                f"client-init='shared' contradicts {other}, which starts each client from its own model; "
                "allowed: one of them (--client-init own, --one-shot, or --client-init-from DIR)"
            )
    return validate_config(given, check_owners=not getattr(args, "compare", None))


def resume_config(args: argparse.Namespace) -> tuple[dict[str, Any], int, dict[str, Any]]:
    """The config of the checkpoint in ``--resume DIR``, its round and its model; flags given explicitly must
    agree. Resume imports no code on its own: a ``module:Class`` strategy must be named again with --strategy."""
    from fedfuse.checkpoint import CHECKPOINT, check_resumable, config_mismatch, load_checkpoint
    from strategies.registry import STRATEGIES

    if args.out is not None and Path(args.out).resolve() != Path(args.resume).resolve():
        raise ConfigError(f"out={args.out!r} differs from resume={args.resume!r}: a resumed run continues in its own "
                          "directory; leave --out out (or copy the run directory first)")  # fmt: skip
    ckpt = load_checkpoint(Path(args.resume))
    saved = ckpt["config"].get("strategy")
    if isinstance(saved, str) and saved not in STRATEGIES and args.strategy != saved:
        raise ConfigError(
            f"resume={args.resume!r}: the checkpoint's strategy {saved!r} is not a registered one and resume imports "
            f"no code on its own; to run it, name it again: --strategy {saved}"
        )
    given = {name: getattr(args, name) for name in _schema() if getattr(args, name, None) is not None}
    mismatch = config_mismatch(ckpt["config"], validate_config(given, fill_defaults=False))
    if mismatch:
        raise ConfigError(f"resume={args.resume!r}: {mismatch}; a resumed run keeps its checkpoint's config")
    cfg = validate_config({**ckpt["config"], "out": args.resume})
    check_resumable(ckpt, Path(args.resume) / CHECKPOINT)
    return cfg, int(ckpt["round"]), ckpt["model"]


def preflight(
    cfg: dict[str, Any],
    overwrite: bool | None,
    resumed_model: dict[str, Any] | None = None,
    partition_cache: str | None = None,
    resumed_round: int = 0,
) -> None:
    """Every check that can fail, before Ray starts: strategy, data, partition sizes, output dir; on resume, that
    the checkpoint's model (``resumed_model``, of round ``resumed_round``) has the names and shapes the config
    builds. ``partition_cache``: the run's shared partition cache (the partitions computed here are written there
    for the run's processes)."""
    from fedfuse.data.partition import partition_indices
    from fedfuse.experiment import dataset_for
    from fedfuse.results import check_out_dir, check_writable
    from strategies.registry import STRATEGIES, resolve_strategy  # composition root: lazy import

    if cfg["strategy"] not in STRATEGIES:  # a registered one imports (the run does that); a user's may not
        resolve_strategy(str(cfg["strategy"]))
    ds = dataset_for(cfg)
    from fedfuse.models import library_of

    if resumed_model is not None:
        from fedfuse.checkpoint import CHECKPOINT, check_model_fits
        from fedfuse.experiment import model_for

        check_model_fits(resumed_model, model_for(cfg, ds).state_dict(), Path(cfg["out"]) / CHECKPOINT)
    from fedfuse.align.fusion import DATA_METHODS
    from fedfuse.experiment import client_widths

    # the model at the global width and every client's: a width, depth or group count it cannot take fails before
    # any write (a library's model is built once, below)
    arch = None if library_of(str(cfg["model"])) else _built_model(cfg, ds)  # the architecture, checked below too
    if arch is not None:
        for width in sorted(set(client_widths(cfg))):
            try:
                _built_model({**cfg, "width": width}, ds)
            except ConfigError as exc:
                raise ConfigError(f"client-widths={cfg['client-widths']!r}: {exc}") from None
    method = getattr(resolve_strategy(str(cfg["strategy"])), "method", None)
    if method in DATA_METHODS:  # cca/zip: a unit no linear map carries (e.g. GroupNorm's) fails before any write
        from fedfuse.align.solvers import resolve_spec
        from fedfuse.merge.linear import linear_units

        arch, example = arch if arch is not None else _built_model(cfg, ds), ds.x_test[:2]
        linear_units(str(method), resolve_spec(None, arch, example), arch, example)
    if cfg["strategy"] == "layerwise" or library_of(str(cfg["model"])):
        # a preset that fits no parameter, or a library's model too deep for the inputs: fails before any write
        from fedfuse.experiment import model_for
        from fedfuse.models import MODELS
        from fedfuse.selection import shared_keys

        model = model_for(cfg, ds)
        if library_of(str(cfg["model"])):
            from fedfuse.experiment import is_adapted
            from fedfuse.models.external import degenerate_input

            plain = _built_model(cfg, ds) if is_adapted(cfg) else model  # LoRA's convolutions hide their kernels
            warning = degenerate_input(plain, str(cfg["model"]), ds.input_shape)
            if warning:  # a warning, not a refusal: such a model may still learn easy data (see degenerate_input)
                print(f"fedfuse: warning: {warning}", file=sys.stderr)
        if library_of(str(cfg["model"])) and client_widths(cfg):
            raise ConfigError(
                f"client-widths={cfg['client-widths']!r} needs a model with a hidden width ({', '.join(MODELS)}); "
                f"model={cfg['model']!r} fixes its own architecture"
            )
        if cfg["strategy"] == "layerwise":
            shared_keys(model, str(cfg["layerwise-preset"]))
    from strategies.lora import LoRAStrategy

    lora_strategy = issubclass(resolve_strategy(str(cfg["strategy"])), LoRAStrategy)
    if cfg.get("base") or cfg.get("lora-rank") or cfg.get("lora-ranks") or lora_strategy:
        from fedfuse.lora.run import check_lora  # a base that does not fit, bad ranks/targets: before any write

        if lora_strategy:  # lora-rank or lora-ranks given, ranks usable by the strategy
            resolve_strategy(str(cfg["strategy"])).config_kwargs(cfg, model=None, example_input=None)
        check_lora(cfg, ds, arch if arch is not None else _built_model(cfg, ds))
    if cfg["client-init-from"] and resumed_round == 0:  # every client's round-1 file exists, loads and fits
        from fedfuse.experiment import check_init_files

        check_init_files(cfg, ds)
    from fedfuse.experiment import server_batch

    server_batch(cfg, ds)  # server-data fits the training split
    from fedfuse.trust import trusted_examples

    trusted_examples(cfg, ds)  # trusted-data fits the training split
    n = len(ds.y_train)
    if ds.federation is None and cfg["num-clients"] > n:  # a federated data set has data for any client id
        raise ConfigError(f"num-clients={cfg['num-clients']} exceeds the {n} training samples of {cfg['dataset']!r}")
    if ds.federation is None:
        partition_indices(
            ds.y_train.numpy(),
            cfg["partition"],
            cfg["num-clients"],
            alpha=cfg["alpha"],
            classes_per_client=cfg["classes-per-client"],
            seed=cfg["seed"],
            cache_dir=partition_cache or "",
        )
    if overwrite is not None:
        check_out_dir(Path(cfg["out"]), overwrite)
    check_writable(Path(cfg["out"]))
    from fedfuse.lora.run import base_warning

    warning = base_warning(cfg)
    if warning:  # every check passed: a warning, not a refusal (a toy run may want a random base)
        print(f"fedfuse: warning: {warning}", file=sys.stderr)


def _built_model(cfg: dict[str, Any], ds: Any) -> Any:
    """The run's architecture, freshly initialised (no base, no adapters): what LoRA options are checked on."""
    from fedfuse.experiment import ADAPTING_OPTIONS, model_for

    return model_for({k: v for k, v in cfg.items() if k not in ADAPTING_OPTIONS}, ds)


def _format_row(row: dict[str, Any]) -> list[str]:
    return [
        str(row["round"]),
        f"{row['central_accuracy']:.4f}",
        f"{row['central_loss']:.4f}",
        f"{row.get('client_train_loss', float('nan')):.4f}",
        "/".join(str(int(row.get(k, 0))) for k in ("replies", "failures", "timeouts", "rejected")),
        f"{row['wall_time']:.1f}",
    ]


def round_line(row: dict[str, Any]) -> str:
    """One progress line per round, within 80 columns for up to 999 rounds, 99 clients and 9999 s."""
    r = _format_row(row)
    return f"round {r[0]}: acc {r[1]} loss {r[2]} train {r[3]} ok/err/late/bad {r[4]} {r[5]}s"


_COLUMNS = ["round", "accuracy", "loss", "client train loss", "ok/err/late/bad", "wall s"]
_SCREENED = {"clipped": "clipped (norm bound)", "capped": "claims capped", "projected": "projected (direction guard)",
             "shared": "sharing a weight (near-identical)", "cut": "cut (influence test)"}  # fmt: skip


def screening_line(row: dict[str, Any]) -> str | None:
    """What the round's screening did to updates it kept (rejections are in the round line), or None."""
    acts = [f"{int(row[k])} {what}" for k, what in _SCREENED.items() if row.get(k)]
    return f"  screening: {', '.join(acts)}" if acts else None


def _simulate(cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Run one simulation (Ray or inline) with a live rich progress display; return the last metrics row.
    ``args.superlink``: the SuperLink :func:`main` started for a Ray run before its preflight (or None)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=False)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=args.no_progress,
    )
    label = f"{cfg['strategy']} on {cfg['dataset']}/{cfg['model']}"
    starting = "starting Flower's simulation engine (Ray)" if args.backend == "ray" else "starting (inline)"
    task = progress.add_task(f"{label}: {starting}", total=cfg["num-rounds"])

    from fedfuse.results import divergence_warning

    warned: list[str] = []

    def on_round(row: dict[str, Any]) -> None:
        progress.update(
            task,
            completed=row["round"],
            description=f"{label}: round {row['round']} acc {row['central_accuracy']:.3f}",
        )
        console.print(round_line(row), soft_wrap=True)
        if screened := screening_line(row):
            console.print(screened, soft_wrap=True, highlight=False)
        diverged = None if warned else divergence_warning(row, cfg)
        if diverged:  # once per run: the table shows the later rounds' losses
            warned.append(diverged)
            print(f"fedfuse: warning: {diverged}", file=sys.stderr, flush=True)

    with progress:
        if args.backend == "inline":
            from fedfuse.runners.inline import run_inline

            run_inline(cfg, on_round, resume=bool(args.resume), verbose=args.verbose)
        else:
            from fedfuse.runners.ray import run_ray

            run_ray(
                cfg,
                on_round,
                resume=bool(args.resume),
                client_cpus=args.client_cpus,
                client_gpus=args.client_gpus,
                ray_address=args.ray_address,
                verbose=args.verbose,
                superlink=getattr(args, "superlink", None),
            )
    from fedfuse.results import load_metrics

    rows = load_metrics(Path(cfg["out"]))["rounds"]  # the whole history, resumed rounds included
    if not rows or rows[-1]["round"] != cfg["num-rounds"]:
        raise RunFailedError(f"simulation ended before round {cfg['num-rounds']}; see the log above")
    _print_table(console, {str(cfg["strategy"]): rows})
    trained = [r for r in rows if r["round"] >= 1]
    if trained and all(r.get("skipped", 0) == 1 or r.get("replies", 0) == 0 for r in trained):
        raise RunFailedError(
            f"no round produced a model (all {len(trained)} skipped: no or too few valid client updates); "
            f"results in {cfg['out']}/ hold the initial model"
        )
    plot = ", accuracy.png" if cfg.get("plot", True) else ""
    console.print(f"results in {cfg['out']}/ (metrics.json, metrics.csv, model.pt{plot})")
    return rows[-1]


RUNTIME_FILE = "runtime.json"  # how a run was executed (not what it computes): the backend --resume reuses


def _save_backend(out: Path, backend: str) -> None:
    from fedfuse.results import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / RUNTIME_FILE, json.dumps({"backend": backend}).encode())


def _saved_backend(out: Path) -> str:
    """The backend the run in ``out`` ran on (``ray`` for runs older than ``runtime.json``)."""
    try:
        backend = json.loads((out / RUNTIME_FILE).read_text()).get("backend", "ray")
    except (OSError, ValueError, AttributeError):
        return "ray"
    return backend if backend in ("ray", "inline") else "ray"


def _simulate_replacing(cfg: dict[str, Any], args: argparse.Namespace) -> None:
    """``--overwrite``: the previous results are renamed aside first (never mixed with the new run's files, even
    if it is killed), dropped once the new run has a model, and put back if it fails."""
    from fedfuse.results import drop_aside, restore_aside, set_aside, stale_asides

    out = Path(cfg["out"])
    for stale in stale_asides(out):  # set aside by an --overwrite run that was killed before it could finish
        if args.overwrite and not args.resume:  # older results the user asks to replace anyway
            drop_aside(stale)
        else:
            print(
                f"fedfuse: note: {stale} holds the results a killed --overwrite run set aside; put them back with "
                f"`mv {stale} {out}` (after moving {out} away) or delete the folder",
                file=sys.stderr,
            )
    aside = set_aside(out) if args.overwrite and not args.resume else None
    try:
        _save_backend(out, args.backend)
        _simulate(cfg, args)
    except RunFailedError as exc:
        restore_aside(out, aside)
        if aside is None:
            raise
        why = re.split(r";? ?\(?results (?:up to it )?in ", str(exc))[0].rstrip(" (;")  # where new results were
        raise RunFailedError(f"{why}; the previous results in {out}/ are kept") from None
    except BaseException:
        restore_aside(out, aside)
        raise
    drop_aside(aside)


def _print_table(console: Any, runs: dict[str, list[dict[str, Any]]]) -> None:
    from rich.table import Table

    table = Table(title="per-round results")
    multi = len(runs) > 1
    if multi:  # a label (``fedavg@client-init=shared``) is shown whole
        table.add_column("strategy", justify="right", no_wrap=True, min_width=max(map(len, runs)))
    for col in _COLUMNS:
        table.add_column(col, justify="right")
    for name, rows in runs.items():
        for row in rows:
            table.add_row(*([name] if multi else []), *_format_row(row))
    console.print(table)


def _check_ray_address(address: str) -> None:
    """Fail fast (instead of Ray's long connection retries) when the cluster head does not answer."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"ray-address={address!r} is not HOST:PORT (e.g. 127.0.0.1:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise ConfigError(
            f"ray-address={address!r} is not reachable ({exc.strerror or exc}); start it with "
            "`ray start --head --port PORT`"
        ) from None


def _early_superlink(args: argparse.Namespace) -> Any:
    """For ``--backend ray``: the run's SuperLink, started now so that its start-up overlaps the preflight (stopped
    on exit, also when the preflight refuses the run; it writes nothing in ``--out``). None (a null context) for
    inline runs and under ``--compare``, whose runs share the comparison's warm SuperLink."""
    import contextlib
    import os

    from fedfuse.runners.ray import WARM_SUPERLINK, started_superlink

    if args.backend != "ray" or os.environ.get(WARM_SUPERLINK):
        return contextlib.nullcontext(None)
    return started_superlink({"RAY_ADDRESS": args.ray_address} if args.ray_address else None)


def _partition_cache(args: argparse.Namespace) -> str | None:
    """The partition cache the Ray run's processes share (its SuperLink's, or the warm one's under ``--compare``)."""
    import os

    if args.backend != "ray":
        return None
    from fedfuse.runners.ray import WARM_SUPERLINK, partition_cache

    if args.superlink is not None:
        return str(partition_cache(args.superlink.home))
    warm = os.environ.get(WARM_SUPERLINK)
    return str(partition_cache(Path(warm))) if warm else None


POOL_HINT_CLIENTS = 10_000  # from here on, a SuperNode per client costs Flower's runtime seconds a round


def _pool_hint(cfg: dict[str, Any], backend: str) -> str | None:
    """A note for a Ray run of many clients without a pool: Flower's simulation runtime polls every SuperNode every
    0.1 s (benchmarks/results/scale.md: 4.1 vs 0.33 s a round at 100,000 clients, 10 a round)."""
    n = int(cfg["num-clients"])
    if backend != "ray" or int(cfg.get("client-pool", 0)) or n < POOL_HINT_CLIENTS:
        return None
    from fedfuse.config import round_sample_size

    k = round_sample_size(n, float(cfg["fraction-train"]))
    if k > n // 2:  # most clients train every round: a pool would hold nearly as many SuperNodes
        return None
    return (f"fedfuse: note: {n:,} SuperNodes, one per client: Flower's runtime polls each every 0.1 s; "
            f"--client-pool {k} serves the {k} clients a round samples from {k} SuperNodes (same results)")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("lmc", "merge"):
        try:
            run_lmc(args) if args.command == "lmc" else run_merge(args)
        except ConfigError as exc:
            print(f"fedfuse: error: {exc}", file=sys.stderr)
            return 2
        except RunFailedError as exc:
            print(f"fedfuse: error: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"fedfuse: error: cannot write {exc.filename or args.out}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        return 0
    try:
        cfg = config_from_args(args)
        if args.compare:
            run_compare(cfg, args, argv[1:], preflight, _print_table)
            return 0
        if getattr(args, "ray_address", None):
            _check_ray_address(args.ray_address)
        resumed_model, done = None, 0
        if args.resume:
            cfg, done, resumed_model = resume_config(args)
            if done >= cfg["num-rounds"]:
                print(f"run in {args.resume} is already complete ({done} rounds); nothing to do")
                return 0
            args.backend = args.backend or _saved_backend(Path(args.resume))
        args.backend = args.backend or "ray"
        with _early_superlink(args) as args.superlink:  # starts while the preflight runs (and may fail)
            preflight(cfg, None if args.resume else args.overwrite, resumed_model, _partition_cache(args), done)
            if hint := _pool_hint(cfg, args.backend):  # after the checks: bad input stays one line
                print(hint, file=sys.stderr)
            _simulate_replacing(cfg, args)
    except ConfigError as exc:
        print(f"fedfuse: error: {exc}", file=sys.stderr)
        return 2
    except RunFailedError as exc:
        print(f"fedfuse: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # writing results: read-only directory, disk full, a path that is a directory
        where = exc.filename if exc.filename is not None else "results"
        print(f"fedfuse: error: cannot write {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def entry() -> None:
    """The ``fedfuse`` console script: :func:`main`, then exit without the interpreter's final collection of every
    object the run made (``gc.freeze``; ~1 s at exit once torch and flwr-datasets are imported). Atexit handlers
    still run; tests call :func:`main`, which freezes nothing."""
    code = main()
    import gc

    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
