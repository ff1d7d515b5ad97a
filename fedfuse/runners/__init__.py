"""Simulation runtimes: where a run's ServerApp and ClientApps execute.

Composition layer, like ``fedfuse/cli.py``: these modules may import Flower, ``strategies`` and
``clients``; nothing in the core imports them.

* :mod:`fedfuse.runners.ray` — Flower's simulation engine on Ray (the default; multi-core, multi-node).
* :mod:`fedfuse.runners.inline` — an in-process ``Grid`` that hands each message to the ClientApp
  directly (no actors): the same apps and strategies, bit-identical results.
* :mod:`fedfuse.runners.compare` — ``fedfuse simulate --compare``: each strategy in its own run, one table and plot.
"""
