"""fedfuse ServerApp: build the configured strategy, run it, evaluate centrally, write results.

``app`` is what ``flwr run .`` loads (config from ``[tool.flwr.app.config]`` + ``--run-config``);
``make_server_app(cfg, on_round)`` is what ``fedfuse simulate`` hands to the simulation engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedfuse.config import validate_config
from fedfuse.experiment import dataset_for, model_for
from fedfuse.results import RunWriter
from fedfuse.train import evaluate
from strategies.registry import build_strategy

__all__ = ["app", "make_server_app", "run_server"]

RoundCallback = Callable[[dict[str, Any]], None]


def run_server(grid: Grid, config: Mapping[str, Any], on_round: RoundCallback | None = None) -> dict[str, Any]:
    """Run ``num-rounds`` of the configured strategy on ``grid``; return the last metrics row."""
    cfg = validate_config(config)
    ds = dataset_for(cfg)
    model = model_for(cfg, ds)
    strategy = build_strategy(cfg, template=model_for(cfg, ds))
    writer = RunWriter(Path(cfg["out"]), cfg)
    t0 = time.perf_counter()

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(model, ds.x_test, ds.y_test)
        train_metrics = getattr(strategy, "last_train_metrics", {}) if server_round > 0 else {}
        stats = dict(getattr(strategy, "round_stats", {})) if server_round > 0 else {}
        row = {
            "round": server_round,
            "central_accuracy": acc,
            "central_loss": loss,
            "client_train_loss": train_metrics.get("train-loss", float("nan")),
            "client_train_accuracy": train_metrics.get("train-accuracy", float("nan")),
            "replies": stats.get("replies", 0.0),
            "failures": stats.get("failures", 0.0),
            "wall_time": time.perf_counter() - t0,
            **{k: v for k, v in stats.items() if k not in ("replies", "failures")},
        }
        writer.append(row)
        if on_round is not None:
            on_round(row)
        return MetricRecord({"accuracy": acc, "loss": loss})

    train_config = ConfigRecord({k: v for k, v in cfg.items() if isinstance(v, (str, int, float, bool))})
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(cfg["num-rounds"]),
        train_config=train_config,
        evaluate_fn=central_evaluate,
    )
    writer.finish(result.arrays.to_torch_state_dict(), str(cfg["strategy"]))
    return writer.rows[-1]


def make_server_app(config: Mapping[str, Any], on_round: RoundCallback | None = None) -> ServerApp:
    """A ServerApp bound to ``config`` (the simulation API passes no run config of its own)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, {**config, **dict(context.run_config)}, on_round)

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: the run config comes from pyproject + ``--run-config``."""
    run_server(grid, dict(context.run_config))
