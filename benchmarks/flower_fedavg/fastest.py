"""Flower's FedAvg app (fedavg_app.py) on Flower's fastest simulation path: ``flwr.simulation.run_simulation``
in this one process (no SuperLink, no ``flwr run``, no ServerApp subprocess), on Ray like ``flwr run``'s
simulation runtime. Deprecated by Flower 1.41 in favour of ``flwr run``, hence only an anchor of
benchmarks/ray_overhead.py: ``python fastest.py --clients 10 --rounds 15 --out DIR``.

``run_simulation`` passes no run config, so the app's ``[tool.flwr.app.config]`` is read from its pyproject.toml
here and handed to the unchanged ServerApp ``main``."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import tomllib

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import fedavg_app
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    config = tomllib.loads((HERE / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    config |= {"num-rounds": args.rounds, "out": args.out}
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        context.run_config = dict(config)
        fedavg_app.main(grid, context)

    with warnings.catch_warnings():  # its deprecation notice: this is the anchor, on purpose
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=server,
            client_app=fedavg_app.client,
            num_supernodes=args.clients,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0},
                "init_args": {"logging_level": logging.ERROR, "log_to_driver": False},
            },
        )


if __name__ == "__main__":
    main()
