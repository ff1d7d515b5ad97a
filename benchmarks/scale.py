"""Scale: ``fedfuse simulate`` on FedProx's Synthetic(α, β) with 100 … 100,000 clients, 10–100 per round.

Each configuration is one ``fedfuse simulate`` process (the CLI, as a user runs it); while it runs, the
resident memory of its whole process tree (the CLI and, under Ray, every Ray process it started) is sampled
every 0.2 s and the peak of the sum is reported. ``s/round`` is the median wall time of rounds 2…R from
the run's ``metrics.json`` (round 1 also pays start-up: reported apart, with the total wall time).
Memory flat in the number of clients and s/round independent of it is the goal: compare rows with the same
per-round count. The machine is shared (load recorded per row): compare rows of one run.

    python benchmarks/scale.py --clients 100 10000 100000 --per-round 10 100 --backends inline
    python benchmarks/scale.py --clients 100 10000 --per-round 10 --backends ray --rounds 3
    python benchmarks/scale.py --clients 10000 100000 --per-round 10 --backends ray --client-pool off on

Writes ``<out>/scale.md`` and ``scale.json`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_one(
    n: int, per_round: int, backend: str, rounds: int, dataset: str, timeout: float, pool: bool = False
) -> dict[str, Any]:
    """One ``fedfuse simulate`` run; its peak tree RSS, s/round and wall time. ``pool``: ``--client-pool
    per_round`` (that many SuperNodes serve the N clients)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "fedfuse.cli", "simulate", "--backend", backend, "--dataset", dataset]
        cmd += ["--model", "mlp", "--num-clients", str(n), "--fraction-train", repr(per_round / n)]
        cmd += ["--rounds", str(rounds), "--out", str(out)] + (["--client-pool", str(per_round)] if pool else [])
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        load = os.getloadavg()[0]
        start = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        ps, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None and time.monotonic() - start < timeout:
            peak = max(peak, _tree_rss(ps))
            time.sleep(0.2)
        if proc.poll() is None:
            for p in [*ps.children(recursive=True), ps]:
                p.kill()
        err = proc.communicate()[1]
        wall = time.monotonic() - start
        row: dict[str, Any] = {"clients": n, "per_round": per_round, "backend": backend, "rounds": rounds}
        row["pool"] = per_round if pool else 0
        row |= {"peak_rss_mb": peak / 2**20, "wall_s": wall, "load": load, "rc": proc.returncode}
        metrics = out / "metrics.json"
        if proc.returncode != 0 or not metrics.exists():
            row["error"] = (err.strip().splitlines() or ["timed out" if wall >= timeout else "no metrics"])[-1][:200]
            return row
        rows = json.loads(metrics.read_text())["rounds"]
        t = [r["wall_time"] for r in rows]
        per = [b - a for a, b in zip(t[:-1], t[1:], strict=True)]
        row |= {"round1_s": per[0], "s_per_round": statistics.median(per[1:]) if len(per) > 1 else per[0]}
        # training work differs by which clients are drawn (power-law sizes): local steps a round and the server's
        # own time (validation, screening, aggregation) show what does not depend on that draw
        steps = [r["client_local_steps"] for r in rows[2:] if r.get("client_local_steps") is not None]
        row["steps_per_round"] = statistics.median(steps) if steps else None
        server = [r["server_s"] for r in rows[2:] if r.get("server_s") is not None]
        row["server_s"] = statistics.median(server) if server else None
        row["replies"] = [r.get("replies") for r in rows[1:]]
        row["accuracy"] = rows[-1].get("central_accuracy")
        return row


def sampling_cost(n: int, per_round: int, rounds: int = 20) -> dict[str, Any]:
    """Server-side cost of choosing a round's clients on an :class:`InlineGrid` of ``n`` nodes (no training): the
    part of a round that could grow with N (node list, partition order, seeded draw). Median ms over ``rounds``."""
    from fedfuse.runners.inline import InlineGrid
    from strategies.sampling import NodeOrder, seeded_sample

    grid, order, times = InlineGrid(None, n), NodeOrder(), []  # type: ignore[arg-type]
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        picked = seeded_sample(grid, order, 0, r, per_round / n, per_round, n)
        times.append(1e3 * (time.perf_counter() - t0))
        assert len(picked) == per_round
    return {"clients": n, "per_round": per_round, "first_ms": times[0], "median_ms": statistics.median(times[1:])}


def _md(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Scale: FedProx Synthetic, clients generated on demand",
        "",
        f"`{meta['command']}`",
        "",
        *([meta["load_lines"], ""] if meta.get("load_lines") else []),
        f"{meta['machine']}; dataset `{meta['dataset']}`, model mlp, {meta['rounds']} rounds. Peak RSS is the sum over "
        "the run's process tree (CLI + Ray processes); s/round is the median of rounds 2…R; round 1 includes "
        "start-up (under Ray: SuperLink/ServerApp start and actor start; each sampled node not seen before is asked "
        "its partition id, no other node is).",
        "",
        "| clients | per round | backend | SuperNodes | peak RSS MB | s/round | client steps (mean) | server s/round | "
        "round 1 s | total s | load | note |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:

        def f(k: str, fmt: str = "{:.2f}", r: dict[str, Any] = r) -> str:
            return fmt.format(r[k]) if r.get(k) is not None else "—"

        lines.append(
            f"| {r['clients']:,} | {r['per_round']} | {r['backend']} | {r.get('pool') or r['clients']:,} | "
            f"{f('peak_rss_mb', '{:.0f}')} | "
            f"{f('s_per_round')} | {f('steps_per_round', '{:.0f}')} | {f('server_s', '{:.3f}')} | {f('round1_s')} | {f('wall_s', '{:.0f}')} | {r['load']:.1f} | {r.get('error', '')} |"
        )
    if meta.get("sampling"):
        lines += [
            "",
            "Server-side sampling per round on the inline grid (`seeded_sample`: node list, partition order, seeded "
            "draw; no training), in process:",
            "",
            "| clients | per round | first round ms | later rounds ms (median) |",
            "|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['clients']:,} | {r['per_round']} | {r['first_ms']:.1f} | {r['median_ms']:.2f} |"
            for r in meta["sampling"]
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[100, 10_000, 100_000])
    p.add_argument("--per-round", type=int, nargs="+", default=[10, 100])
    p.add_argument("--backends", nargs="+", default=["inline"], choices=["inline", "ray"])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--dataset", default="synthetic:0.5,0.5")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--tag", default="", help="suffix of the result files (scale-<tag>.*)")
    p.add_argument("--sampling-only", action="store_true", help="only the in-process sampling table")
    p.add_argument("--client-pool", nargs="+", choices=["off", "on"], default=["off"],
                   help="on: --client-pool PER_ROUND (that many SuperNodes serve the N clients); both: off and on")  # fmt: skip
    sys.path.insert(0, str(ROOT))  # benchmarks.common when run as a script
    from benchmarks.common import add_out, load_header, load_line

    add_out(p)
    a = p.parse_args()
    start = load_line()
    print(start, flush=True)
    sampling = [sampling_cost(n, k) for n in a.clients for k in a.per_round if k <= n]
    rows = []
    for backend in [] if a.sampling_only else a.backends:
        for n in a.clients:
            for k in a.per_round:
                if k > n:
                    continue
                for pool in a.client_pool:
                    row = run_one(n, k, backend, a.rounds, a.dataset, a.timeout, pool=pool == "on")
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    end = load_line()
    print(end, flush=True)
    meta = {
        "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
        "load_lines": load_header(start, end),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "dataset": a.dataset,
        "rounds": a.rounds,
        "sampling": sampling,
    }
    stem = "scale" + (f"-{a.tag}" if a.tag else "")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (a.out / f"{stem}.md").write_text(_md(meta, rows))


if __name__ == "__main__":
    main()
