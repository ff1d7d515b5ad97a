"""Attack × strategy matrix with fedfuse's defences, and what they cost on clean runs (inline).

    python benchmarks/attacks.py [--suite mlp|lora|bn|bn-apart|mlp-10|bn-10|lora-15] [--shard i/n] [--out DIR]   # resumable; DIR/attacks.md (+ .json)

Digits MLP, 3 rounds, seeds 0-2 in every cell. Attacks (``fedfuse.attacks``): 1 attacker of 5 clients, 2 of 10
and 3 of 10 (drawn from the seed), Dirichlet α = 0.3, against fedavg, wb and match, with the shipped defaults
(the direction guard against the server's own update on ``trusted-data`` 100 examples, :mod:`fedfuse.trust`) and
with ``trusted-data 0`` (``median``: a server without labelled data; the guard against the round's median).
Two references per setting: ``none`` (every client honest) and ``absent`` — the attackers' replies rejected
(``num-examples:nan``), i.e. what a perfect defence leaves: their data is lost to the federation, which on
non-IID data costs accuracy by itself. Clean runs (no attacker): Dirichlet α = 0.1 and 1 and quantity skew
(α = 0.3), 10 clients, seeds 0-2, with every defence off (``OFF``), the defaults and ``median``. Jobs run in
priority order (fedavg first), so a partial run still fills whole columns.

``--suite lora`` (DIR/attacks-lora.md): the same matrix on federated LoRA fine-tuning — fedavg-lora and fedex-lora,
rank 4 adapters on the digits MLP pretrained centrally on classes 0-4 (``pretrain low-classes``), 5 rounds; the
attackers send adapters (and the head) as honest LoRA clients do.

``--suite bn`` / ``--suite bn-apart`` (DIR/attacks-bn*.md): a subset (12 attacks incl. the references, 1 of 5 and 3
of 10, the defaults) on the digits CNN with BatchNorm — fedavg from a shared init, 3 rounds; and wb on sites trained
apart (``client-init own``) fused with federated REPAIR, then 1 round of FL: running statistics are in every
update, and in REPAIR's statistics round.

``--suite mlp-10`` / ``--suite bn-10`` / ``--suite lora-15`` (DIR/attacks-10rounds.md, attacks-bn-10rounds.md,
attacks-lora-15rounds.md): the defaults over 10 rounds instead of 3 (the MLP's every attack, setting and strategy;
the BN subset, fedavg), and the LoRA matrix over 15 rounds instead of 5. After 3 rounds the models
are early in training (loss ~1.5-2.2) and their accuracy swings by many points at small loss differences.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import load_line, note_load, parse_shard, read_shards, recorded_loads  # noqa: E402

STRATEGIES = ["fedavg", "wb", "match"]
ATTACKS = [
    "none", "absent", "scale:1e6", "signflip:2", "signflip:4", "signflip:8", "alie:1", "ipm:4", "adaptive:0.99",
    "evade:0.05", "evade:0.4", "lowkey:0.2", "freeride:0.99", "labelflip", "labelflip:4", "noise:4",
]  # fmt: skip
ABSENT = "num-examples:nan"  # every reply of the attackers is rejected: the 'attackers absent' reference
SETTINGS = [(5, 1), (10, 2), (10, 3)]  # (clients, attackers)
OFF = {"update-norm-bound": 0.0, "examples-cap": 0.0, "examples-bound": 0.0, "min-update-cosine": -1.0, "influence-z": 0.0,
       "duplicate-cosine": 0.0, "direction-guard": "off", "robust": "none"}  # fmt: skip
MEDIAN = {"trusted-data": 0}  # no server data: the guard's reference is the round's coordinate median
DEFENCES = {"off": OFF, "defaults": {}, "median": MEDIAN}
ATTACK_DEFENCES = ("defaults", "median")
CLEAN = [("dirichlet", 0.1), ("dirichlet", 1.0), ("quantity", 0.3)]
SEEDS = [0, 1, 2]
BASE = {"dataset": "digits", "model": "mlp", "num-rounds": 3}


@dataclass(frozen=True)
class Suite:
    """A matrix: its strategies, the run options every cell shares, the file name of its results, what it runs and
    its ``--suite`` value."""

    strategies: tuple[str, ...]
    base: dict
    name: str
    what: str
    key: str
    attacks: tuple[str, ...] = tuple(ATTACKS)  # the first two are the references, none and absent
    settings: tuple[tuple[int, int], ...] = tuple(SETTINGS)
    defences: tuple[str, ...] = ATTACK_DEFENCES
    clean: bool = True  # the clean-cost runs too


BN = {**BASE, "model": "cnn", "batch-norm": True}
BN_ATTACKS = (
    "none",
    "absent",
    "scale:1e6",
    "signflip:4",
    "alie:1",
    "ipm:4",
    "adaptive:0.99",
    "evade:0.4",
    "lowkey:0.2",
    "freeride:0.99",
    "labelflip:4",
    "noise:4",
)
LORA = {**BASE, "num-rounds": 5, "pretrain": "low-classes", "lora-rank": 4}
LORA_STRATEGIES = ("fedavg-lora", "fedex-lora")
SUITES = {
    "mlp": Suite(tuple(STRATEGIES), BASE, "attacks", "digits MLP, 3 rounds", "mlp"),
    "lora": Suite(LORA_STRATEGIES, LORA, "attacks-lora", "digits MLP pretrained on classes 0-4, LoRA rank 4, 5 rounds",
                  "lora"),
    "bn": Suite(("fedavg",), BN, "attacks-bn", "digits CNN with BatchNorm, 3 rounds", "bn", BN_ATTACKS,
                ((5, 1), (10, 3)), ("defaults",), clean=False),
    "bn-apart": Suite(("wb",), {**BN, "num-rounds": 2, "client-init": "own", "bn-repair": "repair"}, "attacks-bn-apart",
                      "digits CNN with BatchNorm, sites trained apart (client-init own) fused with federated REPAIR in "
                      "round 1, then 1 round of FL", "bn-apart", BN_ATTACKS, ((5, 1), (10, 3)), ("defaults",),
                      clean=False),
    # the 3-round matrices read early training (loss ~1.5-2.2): the same cells with the defaults over 10 rounds
    "mlp-10": Suite(tuple(STRATEGIES), {**BASE, "num-rounds": 10}, "attacks-10rounds", "digits MLP, 10 rounds",
                    "mlp-10", defences=("defaults",), clean=False),
    "lora-15": Suite(LORA_STRATEGIES, {**LORA, "num-rounds": 15}, "attacks-lora-15rounds",
                     "digits MLP pretrained on classes 0-4, LoRA rank 4, 15 rounds", "lora-15", defences=("defaults",),
                     clean=False),
    "bn-10": Suite(("fedavg",), {**BN, "num-rounds": 10}, "attacks-bn-10rounds",
                   "digits CNN with BatchNorm, 10 rounds", "bn-10", BN_ATTACKS, ((5, 1), (10, 3)), ("defaults",),
                   clean=False),
}  # fmt: skip
COUNTS = ("rejected", "clipped", "capped", "projected", "shared", "cut", "skipped", "diverged")
# the letters in a cell
MARKS = {"rejected": "r", "clipped": "c", "capped": "c", "projected": "p", "shared": "s", "cut": "x"}


def run_cell(cfg: dict, base: dict = BASE) -> dict:
    from clients.client_app import app
    from fedfuse.results import load_metrics
    from fedfuse.runners.inline import InlineGrid
    from strategies.registry import validate_config
    from strategies.server_app import run_server

    out = Path(tempfile.mkdtemp(prefix="attacks-"))
    t0 = time.perf_counter()
    try:
        run_server(InlineGrid(app, int(cfg["num-clients"])), validate_config({**base, **cfg, "out": str(out)}))
    except Exception as exc:  # noqa: BLE001 — a crash is a result here
        shutil.rmtree(out, ignore_errors=True)
        return {"crashed": f"{type(exc).__name__}: {exc}"[:200], "seconds": time.perf_counter() - t0}
    rows = load_metrics(out)["rounds"]
    shutil.rmtree(out, ignore_errors=True)
    res = {"accuracy": rows[-1]["central_accuracy"], "seconds": time.perf_counter() - t0}
    return res | {k: int(sum(r.get(k, 0) for r in rows[1:])) for k in COUNTS}


def jobs(suite: Suite = SUITES["mlp"]) -> list[tuple[str, dict]]:
    """(key, config) in priority order: the first strategy's attack matrix and clean runs first, then the next."""
    out = []
    for s in suite.strategies:
        for n, k in suite.settings:
            for a in suite.attacks:
                for d in suite.defences:
                    for seed in SEEDS:
                        cfg = {"strategy": s, "num-clients": n, "seed": seed, "partition": "dirichlet", "alpha": 0.3}
                        if a != "none":
                            cfg |= {"attack": ABSENT if a == "absent" else a, "attackers": k}
                        out.append((f"attack|{s}|{n}|{k}|{a}|{d}|{seed}", cfg | DEFENCES[d]))
        for part, alpha in CLEAN if suite.clean else []:
            for seed in SEEDS:
                for d, defence in DEFENCES.items():
                    cfg = {"strategy": s, "num-clients": 10, "seed": seed, "partition": part, "alpha": alpha}
                    out.append((f"clean|{s}|{part}:{alpha}|{seed}|{d}", cfg | defence))
    return out


def main() -> None:
    import logging

    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="mlp",
                   help="mlp: fedavg/wb/match; lora: LoRA strategies; bn, bn-apart: BatchNorm CNN (a subset); "
                        "mlp-10, bn-10, lora-15: the defaults over 10 (LoRA: 15) rounds")  # fmt: skip
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th job from the i-th (parallel processes)")
    p.add_argument("--table-only", action="store_true", help="only rewrite attacks.md from the JSON files")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results folder")
    args = p.parse_args()
    shard, shards = parse_shard(p, args.shard)
    torch.set_num_threads(1)  # one thread per process: --shard runs one process per core
    logging.disable(logging.WARNING)
    results_dir = args.out
    results_dir.mkdir(parents=True, exist_ok=True)
    suite = SUITES[args.suite]
    json_path = results_dir / f"{suite.name}.shard{shard}.json"
    results = load_results(results_dir, suite)
    start = load_line()
    if not args.table_only:
        print(start, flush=True)
    ran = False
    for i, (key, cfg) in enumerate(jobs(suite)):
        if args.table_only or i % shards != shard or key in results:
            continue
        mine = json.loads(json_path.read_text()) if json_path.exists() else {}
        mine[key] = results[key] = run_cell(cfg, suite.base)
        print(key, _cell([results[key]]), f"{results[key]['seconds']:.1f}s", flush=True)
        json_path.write_text(json.dumps(mine, indent=1))
        ran = True
    if not args.table_only:
        end = load_line()
        print(end, flush=True)
        if ran:  # the machine and its load beside the cells this process measured
            mine = json.loads(json_path.read_text())
            note_load(mine, start, end)
            json_path.write_text(json.dumps(mine, indent=1))
    write_table(results, results_dir / f"{suite.name}.md", load_records(results_dir, suite), suite)


def load_results(results_dir: Path, suite: Suite = SUITES["mlp"]) -> dict[str, dict]:
    """Every measured cell of the suite's per-shard files (keys with a seed: the 3-seed matrix)."""
    results: dict[str, dict] = {}
    for data in read_shards(results_dir, suite.name):
        results |= {k: v for k, v in data.items() if k.count("|") == {"attack": 6, "clean": 4}.get(k.split("|")[0])}
    return results


def load_records(results_dir: Path, suite: Suite = SUITES["mlp"]) -> dict[str, list[str]]:
    """The load lines every shard file of the suite recorded (:func:`benchmarks.common.note_load`), merged."""
    return {"loads": [line for data in read_shards(results_dir, suite.name) for line in data.get("loads", [])]}


def _mean(rs: list[dict]) -> float | None:
    accs = [r["accuracy"] for r in rs if r and "accuracy" in r]
    return statistics.mean(accs) if len(accs) == len(rs) and accs else None


def _cell(rs: list[dict | None], *refs: list[dict | None]) -> str:
    """Mean accuracy over the seeds (its range), the gap to each reference's mean (points), summed marks."""
    if not rs or any(r is None for r in rs):
        return "–"
    if any("crashed" in r for r in rs):  # type: ignore[operator]
        return "server crashed"
    accs = [r["accuracy"] for r in rs]  # type: ignore[index]
    out = f"{statistics.mean(accs):.3f}" + (f" ±{(max(accs) - min(accs)) / 2:.3f}" if len(accs) > 1 else "")
    gaps = [m for ref in refs if ref and None not in ref and (m := _mean(ref)) is not None]  # type: ignore[arg-type]
    if gaps and len(gaps) == len(refs):
        out += " (" + " / ".join(f"{100 * (statistics.mean(accs) - g):+.1f}" for g in gaps) + ")"
    marks = "".join(f" {sum(r.get(k, 0) for r in rs)}{m}" for k, m in MARKS.items()
                    if any(r.get(k) for r in rs))  # type: ignore[union-attr]  # fmt: skip
    return out + marks


def _gaps(results: dict[str, dict], s: str, n: int, k: int, a: str, d: str) -> tuple[float, float] | None:
    """(gap to `none`, gap to `absent`) in points of one attack cell, or None where not every seed ran."""
    runs = {x: [results.get(f"attack|{s}|{n}|{k}|{x}|{d}|{seed}") for seed in SEEDS] for x in (a, "none", "absent")}
    means = {x: _mean(rs) if None not in rs else None for x, rs in runs.items()}  # type: ignore[arg-type]
    if any(m is None for m in means.values()):
        return None
    return 100 * (means[a] - means["none"]), 100 * (means[a] - means["absent"])  # type: ignore[operator]


def holds(results: dict[str, dict], s: str = "fedavg", limit: float = 3.0, suite: Suite | None = None) -> list[str]:
    """Markdown lines: per defence, the attack cells of strategy ``s`` more than ``limit`` points below `absent`
    (what a perfect defence leaves), worst first, and how many cells are within 5 points of `none`."""
    lines, suite = [], suite or SUITES["mlp"]
    for d in suite.defences:
        gaps = {
            (n, k, a): g for n, k in suite.settings for a in suite.attacks[2:] if (g := _gaps(results, s, n, k, a, d))
        }
        if not gaps:
            continue
        bad = sorted((g[1], f"`{a}` at {k} of {n} ({g[1]:+.1f})") for (n, k, a), g in gaps.items() if g[1] < -limit)
        near = sum(g[0] >= -5.0 for g in gaps.values())
        (wn, wk, wa), worst = min(gaps.items(), key=lambda item: item[1][1])
        lines.append(f"- **{d}** ({s}): {len(gaps) - len(bad)} of {len(gaps)} attack cells within {limit:g} points of "
                     f"`absent`; " + ("below it: " + ", ".join(t for _, t in bad) if bad else
                                      f"none below it (closest: `{wa}` at {wk} of {wn}, {worst[1]:+.1f})")
                     + f". Within 5 points of `none`: {near} of {len(gaps)}.")  # fmt: skip
    return lines


def write_table(results: dict[str, dict], path: Path, loads: dict | None = None, suite: Suite = SUITES["mlp"]) -> None:
    command = "python benchmarks/attacks.py" + ("" if suite.key == "mlp" else f" --suite {suite.key}")
    lines = [
        "# Attacks × strategies with fedfuse's defences" + (", and their cost on clean runs" if suite.clean else ""),
        "",
        f"Command: `{command}` (inline; {suite.what}, seeds 0-2; attacks with Dirichlet",
        "α = 0.3). Cell: mean final central accuracy over the 3 seeds ± half its range, (gap to `none` / gap to",
        "`absent`, in points), then the updates over the runs that were **r**ejected, **c**lipped (norm bound),",
        "had their claim **c**apped, **p**rojected (direction guard), **s**hared one client's weight (near-identical",
        "updates, `duplicate-cosine` 0.99), and cut to the round's median influence",
        "or below (**x**, the influence test). `none`: every client honest. `absent`:",
        "the attackers' replies rejected (what a perfect defence leaves; their non-IID data is lost).",
        "Defaults: update-norm-bound 3 × the median norm per local step (clip), examples-cap 10 (claimed",
        "num-examples capped at 10 × the round's median, claimed local steps at 10 × its 70th percentile),",
        "direction-guard median with trusted-data 100 (the guard's reference is the server's own update g₀ on 100",
        "labelled training examples, `fedfuse/trust.py`; the norm bound's 3 × shrinks to 1 × for an update at",
        "cosine ≤ 0 with g₀; an update keeps its whole weight, and each tensor everything of it, down to cosine",
        "−0.4 with g₀, only what points further against it projected away, no weight left at −0.65; a clipped",
        "update gets no band), influence-z 2 (an update whose weight × norm exceeds 2 × the round's median is cut to",
        "the median's where that lowers the loss on the 100 examples significantly, and kept at a tenth of it if its",
        "full size raises that loss significantly; any update whose own step raises that loss significantly kept at",
        "a tenth too, `fedfuse/influence.py`), duplicate-cosine 0.99 (updates at cosine ≥ 0.99 with each other share",
        "one client's weight, unless they are half the round), robust none. `evade:c`: at the claim caps, coherent junk at cosine −c",
        "per tensor with the honest mean (`fedfuse.attacks`); `lowkey:0.2`: `evade:0.4` claiming 0.2 × the caps,",
        "under the influence test's outsized line. `noise:4`: each attacker replaces its update by its own Gaussian",
        "noise at 4 × the update's norm (no collusion: near-duplicate detection cannot group them).",
        *(
            [
                "`median`: the defaults with `--trusted-data 0` (a server without labelled data: the guard's reference is",
                "the round's coordinate median of the updates).",
            ]
            if "median" in suite.defences
            else []
        ),
        "`–`: not measured.",
        "",
        *recorded_loads(loads or {}),
        "",
        "## What holds",
        "",
        *(line for s in suite.strategies for line in holds(results, s, suite=suite)),
        "",
    ]
    cols = [(s, d) for s in suite.strategies for d in suite.defences]
    for n, k in suite.settings:
        lines += [f"## {k} attacker(s) of {n} clients", "",
                  "| attack | " + " | ".join(f"{s} {d}" for s, d in cols) + " |", "|---|" + "---|" * len(cols)]  # fmt: skip

        def cells(s: str, a: str, d: str, n: int = n, k: int = k) -> list[dict | None]:
            return [results.get(f"attack|{s}|{n}|{k}|{a}|{d}|{seed}") for seed in SEEDS]

        for a in suite.attacks:
            row = [_cell(cells(s, a, d)) if a == "none" else _cell(cells(s, a, d), cells(s, "none", d),
                   cells(s, "absent", d)) for s, d in cols]  # fmt: skip
            lines.append(f"| {a} | " + " | ".join(row) + " |")
        lines.append("")
    if suite.clean:
        lines += _clean_lines(results, suite)
    path.write_text("\n".join(lines) + "\n")


def _clean_lines(results: dict[str, dict], suite: Suite) -> list[str]:
    """The clean-run table: each strategy's mean accuracy off / defaults / median and what the defences did."""
    lines = [
        "## Clean runs: what the defences cost (10 clients, no attacker)",
        "",
        "Mean final accuracy over the seeds with every defence off, the defaults and `median`, and the",
        "difference to off (points); honest updates rejected / clipped / capped / projected / cut by the defaults",
        "(median), summed over seeds and rounds.",
        "",
        "| partition | strategy | seeds | off | defaults | cost | median | cost | rejected | clipped | capped | "
        "projected | cut |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for part, alpha in CLEAN:
        for s in suite.strategies:
            runs = {d: [results.get(f"clean|{s}|{part}:{alpha}|{seed}|{d}") for seed in SEEDS] for d in DEFENCES}
            means = {d: _mean(rs) if None not in rs else None for d, rs in runs.items()}  # type: ignore[arg-type]
            if means["off"] is None or means["defaults"] is None:
                lines.append(f"| {part} {alpha} | {s} | 0 |" + " – |" * 10)
                continue
            off, on, tr = means["off"], means["defaults"], means["median"]
            counts = [f"{sum(r.get(c, 0) for r in runs['defaults'])}"  # type: ignore[union-attr]
                      + (f" ({sum(r.get(c, 0) for r in runs['median'])})" if tr is not None else "")  # type: ignore[union-attr]
                      for c in ("rejected", "clipped", "capped", "projected", "cut")]  # fmt: skip
            median = f"{tr:.3f} | {100 * (tr - off):+.1f}" if tr is not None else "– | –"
            lines.append(f"| {part} {alpha} | {s} | {len(SEEDS)} | {off:.3f} | {on:.3f} | {100 * (on - off):+.1f} | "
                         f"{median} | " + " | ".join(counts) + " |")  # fmt: skip
    return lines


if __name__ == "__main__":
    main()
