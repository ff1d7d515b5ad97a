"""fedfuse ServerApp: build the configured strategy, run it, evaluate centrally, checkpoint, write results.

``app`` is what ``flwr run .`` loads (config from ``[tool.flwr.app.config]`` + ``--run-config``): a relative
``out`` is taken under ``$FEDFUSE_HOME`` (default ``~/.fedfuse``; :func:`fedfuse.results.resolve_out`), never under
the working directory of a SuperLink that may serve other checkouts; it logs the absolute path first, never
overwrites results (a taken ``out`` gets a fresh ``OUT-2``, ``OUT-3``, ...), and turns
a bad config or a failed run into one error line and a failed run. ``simulate_app`` / ``resume_app`` are
what ``fedfuse simulate`` submits through ``flwr run`` (the CLI has checked ``out`` already);
``run_server(grid, cfg)`` runs on any Grid (the inline runner calls it directly).

Everything a row of ``metrics.json`` holds comes from the central evaluation, from what the strategy's
``aggregate_train``/``aggregate_evaluate`` return, or from the composed observers
(:class:`strategies.observed.ObservedStrategy`) — never from a strategy's attributes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedfuse import protocol
from fedfuse.checkpoint import (
    CHECKPOINT,
    check_resumable,
    checkpoint_bytes,
    config_mismatch,
    load_checkpoint,
    restore_rng_states,
    rng_states,
)
from fedfuse.errors import ConfigError, RunFailedError
from fedfuse.experiment import dataset_for, model_for, server_batch
from fedfuse.replies import decode_arrays
from fedfuse.results import RunWriter, divergence_warning, fedfuse_home, remove_stale_temp_files, resolve_out
from fedfuse.train import evaluate
from strategies.monitor import ClientModelDump, LMCMonitor
from strategies.observed import ObservedStrategy, RoundObserver
from strategies.registry import build_strategy, validate_config

__all__ = ["app", "simulate_app", "resume_app", "make_server_app", "run_server", "fresh_out_dir", "FailedRun"]

log = logging.getLogger("flwr")  # Flower's logger: what the ServerApp logs reaches `flwr run --stream`

RoundCallback = Callable[[dict[str, Any]], None]


def wait_for_ray_start(grid: Grid, timeout: float = 120.0) -> None:
    """On Flower's simulation engine (an in-memory grid, the ``vce`` in this process), wait until its ``ray.init``.

    The engine starts Ray in another thread of this process while the ServerApp starts, and Ray launches its head
    processes with a ``preexec_fn`` (Python run in the forked child before ``exec``): a lock another thread holds at
    that fork (numpy/OpenBLAS loading the data set) deadlocks the child, and the run hangs forever before round 1
    (seen with flwr 1.42 / Ray: 4 of 5 pooled runs on synthetic data). Nothing trains before Ray is up, so waiting
    costs only the overlap of data loading with Ray's start. No-op elsewhere (inline, a deployed ServerApp)."""
    import sys

    from flwr.superlink.grid import InMemoryGrid

    if "flwr.server.superlink.fleet.vce.vce_api" not in sys.modules or not isinstance(grid, InMemoryGrid):
        return
    import ray

    deadline = time.monotonic() + timeout
    while not ray.is_initialized() and time.monotonic() < deadline:
        time.sleep(0.05)


def run_server(
    grid: Grid, config: Mapping[str, Any], on_round: RoundCallback | None = None, *, resume: bool = False
) -> dict[str, Any]:
    """Run the configured strategy on ``grid`` up to ``num-rounds``; return the last metrics row.

    Every round ends with an atomic checkpoint in ``out``; with ``resume`` the run continues after
    the checkpoint's round, with the same model, strategy state, RNG states and metrics history.
    """
    wait_for_ray_start(grid)
    cfg = validate_config(config)
    out = Path(cfg["out"])
    ds = dataset_for(cfg)
    model = model_for(cfg, ds)
    strategy = build_strategy(
        cfg, model=model_for(cfg, ds), example_input=ds.x_test[:2], server_data=server_batch(cfg, ds)
    )
    observers: list[RoundObserver] = []
    if cfg["lmc-monitor"]:  # barriers on the first 256 test samples
        observers.append(LMCMonitor(model_for(cfg, ds), ds.x_test[:256], ds.y_test[:256]))
    if cfg["save-client-models"]:
        observers.append(ClientModelDump(cfg["save-client-models"], out))
    writer = RunWriter(out, cfg)
    remove_stale_temp_files(out)  # left by an interrupted atomic write; never results
    initial = ArrayRecord(model.state_dict())
    start_round, elapsed = 1, 0.0
    if resume:
        ckpt = load_checkpoint(out)
        mismatch = config_mismatch(ckpt["config"], cfg)
        if mismatch:
            raise ConfigError(f"resume={str(out)!r}: {mismatch}")
        check_resumable(ckpt, out / CHECKPOINT)
        initial = ArrayRecord(ckpt["model"])
        writer.rows = list(ckpt["metrics"])
        if hasattr(strategy, "load_state_dict"):  # fedfuse strategies' checkpoint protocol (state_dict/load)
            strategy.load_state_dict(ckpt.get("strategy", {}))
        restore_rng_states(ckpt["rng"])
        start_round = int(ckpt["round"]) + 1
        elapsed = float(writer.rows[-1]["wall_time"]) if writer.rows else 0.0
        if start_round > int(cfg["num-rounds"]):  # already complete: change nothing
            return writer.rows[-1] if writer.rows else {}
    observed = ObservedStrategy(strategy, observers, first_round=start_round)
    t0 = time.perf_counter() - elapsed

    warned: list[str] = []

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Row of round ``server_round`` (central test metrics + the round's record), then the checkpoint."""
        last = server_round == int(cfg["num-rounds"])
        state = decode_arrays(arrays)
        nan = float("nan")
        if server_round == 0 or last or server_round % int(cfg["eval-every"]) == 0:
            model.load_state_dict(state)
            loss, acc = evaluate(model, ds.x_test, ds.y_test)
        else:  # --eval-every: not evaluated this round
            loss, acc = nan, nan
        if writer.rows and server_round <= writer.rows[-1]["round"]:  # resumed from round 0: already recorded
            return MetricRecord({"accuracy": acc, "loss": loss})
        row = {"round": server_round, "central_accuracy": acc, "central_loss": loss, "client_train_loss": nan,
               "client_train_accuracy": nan, "replies": 0.0, "failures": 0.0}  # fmt: skip
        if server_round > 0:
            row |= observed.round_metrics()
        diverged = None if warned else divergence_warning(row, cfg)
        if diverged:  # once per run, in Flower's log (`flwr run --stream`, the inline backend's flower.log)
            warned.append(diverged)
            log.warning("%s", diverged)
        row["wall_time"] = time.perf_counter() - t0
        if server_round == 0 or last or server_round % int(cfg["checkpoint-every"]) == 0:
            ckpt = {
                "round": server_round,
                "config": cfg,
                "model": state,
                "strategy": strategy.state_dict() if hasattr(strategy, "state_dict") else {},
                "rng": rng_states(),
                "metrics": [*writer.rows, row],
            }
            writer.append(row, commit={out / CHECKPOINT: checkpoint_bytes(ckpt)})  # one commit: never a round apart
        else:  # --checkpoint-every: the row alone; a resume continues after the last checkpoint
            writer.append(row)
        if on_round is not None:
            on_round(row)
        failed = observed.all_failed() if server_round > 0 else None
        if failed:  # nothing to aggregate and nothing will change by itself: stop, keep what was written
            raise RunFailedError(f"round {server_round}: {failed}; the run stops (results up to it in {out}/)")
        return MetricRecord({"accuracy": acc, "loss": loss})

    # the run config goes to the clients, except ``proximal-mu``: a client reads that key as FedProx's μ, and only a
    # FedProx strategy sets it (its configure_train); sent always, every strategy's clients trained with μ = 0.01
    train_config = ConfigRecord(
        {k: v for k, v in cfg.items() if isinstance(v, (str, int, float, bool)) and k != protocol.PROXIMAL_MU}
    )
    result = observed.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=int(cfg["num-rounds"]),
        timeout=float(cfg["round-timeout"]),
        train_config=train_config,
        evaluate_config=ConfigRecord(dict(train_config)),  # clients evaluate under the same run config
        evaluate_fn=central_evaluate,
    )
    final = decode_arrays(result.arrays) if len(result.arrays) else model.state_dict()
    writer.finish(final, cfg["strategy"], plot=bool(cfg.get("plot", True)))
    if cfg["lmc-monitor"]:
        from fedfuse.lmc.monitor import plot_lmc_monitor

        plot_lmc_monitor(writer.rows, out / "lmc.png")
    return writer.rows[-1]


def make_server_app(
    config: Mapping[str, Any], on_round: RoundCallback | None = None, *, resume: bool = False
) -> ServerApp:
    """A ServerApp bound to ``config`` (for Flower's Python simulation API, which passes no run config)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, {**config, **dict(context.run_config)}, on_round, resume=resume)

    return server


def fresh_out_dir(out: Path) -> Path:
    """``out`` if it holds no results, else the first of ``OUT-2``, ``OUT-3``, ... that holds none."""
    from fedfuse.results import RESULT_FILES

    def taken(p: Path) -> bool:
        return p.exists() and (not p.is_dir() or any((p / name).exists() for name in RESULT_FILES))

    candidate, n = out, 1
    while taken(candidate):
        n += 1
        candidate = out.with_name(f"{out.name}-{n}")
    return candidate


def wait_for_nodes(grid: Grid, wanted: int, timeout: float = 60.0, *, pooled: bool = False) -> None:
    """Fail with a line naming both numbers when fewer than ``wanted`` SuperNodes connect within ``timeout``
    (Flower's strategies would otherwise wait for them forever)."""
    deadline = time.monotonic() + timeout
    key = "client-pool" if pooled else "num-clients"
    while (have := len(list(grid.get_node_ids()))) < wanted:
        if time.monotonic() > deadline:
            raise ConfigError(
                f"{key}={wanted} but the federation has {have} SuperNodes; pass --run-config "
                f"'{key}={have}' or --federation-config 'num-supernodes={wanted}' to `flwr run`"
            )
        time.sleep(1.0)


class FailedRun(Exception):
    """Raised out of a ServerApp after its one error line: Flower then marks the run ``finished:failed``.

    Flower logs a ServerApp's exception with its traceback; this one's message already says everything,
    so its traceback reads as None (Python still keeps it internally; only the log line is short)."""

    @property  # type: ignore[override]
    def __traceback__(self) -> None:  # noqa: D105
        return None

    @__traceback__.setter
    def __traceback__(self, value: object) -> None:
        pass


def _fail(exc: Exception) -> None:
    """One error line in the run's log, then a failed run (``finished:failed`` in `flwr list`)."""
    log.error("fedfuse: error: %s", exc)
    raise FailedRun(str(exc)) from None


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: the run config comes from pyproject + ``--run-config``."""
    try:
        cfg = validate_config(dict(context.run_config))
        wanted = resolve_out(cfg["out"])  # a relative out: under $FEDFUSE_HOME or ~/.fedfuse, never the cwd
        out = fresh_out_dir(wanted)
        relative = (
            "" if Path(cfg["out"]).expanduser().is_absolute() else f" (out={cfg['out']!r} under {fedfuse_home()})"
        )
        log.info("fedfuse: results go to %s/%s", out, relative)
        if out != wanted:
            log.info("fedfuse: %s already holds results; this run writes to %s", wanted, out)
        cfg["out"] = str(out)
        wait_for_nodes(grid, int(cfg["client-pool"]) or int(cfg["num-clients"]), pooled=bool(cfg["client-pool"]))
        run_server(grid, cfg)
        log.info("fedfuse: results in %s/ (metrics.json, metrics.csv, model.pt, accuracy.png)", out)
    except (ConfigError, RunFailedError, OSError) as exc:
        _fail(exc)


def _submitted(resume: bool) -> ServerApp:
    """What ``fedfuse simulate`` submits: the CLI has validated the config and checked ``out``."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_server(grid, dict(context.run_config), resume=resume)
        except (ConfigError, RunFailedError, OSError) as exc:
            _fail(exc)
        if done_dir := os.environ.get(protocol.RUN_DONE_DIR):  # every result is written: the CLI may stop now
            Path(protocol.run_done_marker(done_dir, context.run_id)).touch()

    return server


simulate_app = _submitted(resume=False)
resume_app = _submitted(resume=True)
