"""Run fedfuse's ServerApp and ClientApp through Flower's simulation engine (Ray backend)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

__all__ = ["run_ray", "EXPECTED_WARNINGS"]

# Known and deliberate: the Python simulation API (deprecated in 1.41) and server-side-only evaluation.
EXPECTED_WARNINGS = ("`run_simulation` function is deprecated", "fraction_evaluate is set to 0.0")


def run_ray(
    cfg: dict[str, Any],
    on_round: Callable[[dict[str, Any]], None] | None = None,
    *,
    resume: bool = False,
    client_cpus: float = 1.0,
    client_gpus: float = 0.0,
    ray_address: str | None = None,
    verbose: bool = False,
) -> None:
    """``cfg['num-clients']`` virtual SuperNodes on Ray, each actor reserving ``client_cpus``/``client_gpus``;
    ``ray_address`` joins an existing cluster instead of starting a local one."""
    from flwr.simulation import run_simulation

    from clients.client_app import app as client_app
    from strategies.server_app import make_server_app

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not verbose:
        flwr_log = logging.getLogger("flwr")
        flwr_log.setLevel(logging.WARNING)
        flwr_log.addFilter(lambda r: not any(s in r.getMessage() for s in EXPECTED_WARNINGS))
    init_args: dict[str, Any] = {"logging_level": "INFO" if verbose else "ERROR", "log_to_driver": verbose}
    if ray_address:
        init_args["address"] = ray_address
    run_simulation(
        server_app=make_server_app(cfg, on_round, resume=resume),
        client_app=client_app,
        num_supernodes=cfg["num-clients"],
        backend_config={"client_resources": {"num_cpus": client_cpus, "num_gpus": client_gpus}, "init_args": init_args},
        verbose_logging=verbose,
    )
