"""Federated LoRA fine-tuning: accuracy, bytes and aggregation error per round (issue 25).

A plain loop (no Flower, so it runs in minutes) over the same pieces the Flower path uses: the base from
:func:`fedfuse.lora.run.adapt_model` (pretrained centrally on the lower half of the classes, ``pretrain=low-classes``),
the ClientApp's local training (:func:`fedfuse.experiment.local_train`, adapters only on the frozen base) and each
strategy's own ``aggregate_arrays`` (:mod:`strategies.lora`, called with the global model it would have sent).
The federated task is all classes, Dirichlet(α) non-IID over the clients. Full fine-tuning = FedAvg on the whole
model from the same base (every parameter trained, the whole model both ways).

    python -m benchmarks.lora --dataset mnist10k --data-root /work/shared/data --rounds 10 --seeds 0,1,2

Bytes per round = array bytes sent to the sampled clients + received from them (all clients every round).
``--screening default`` screens every round's replies as the Flower path does (:func:`fedfuse.screening.screen_round`
with the strategy's default :class:`~fedfuse.screening.ScreeningConfig`: norm bound with clipping, claim caps, the
direction guard from round 2 of a run that starts apart, against the server's own update g₀ on ``--trusted-data``
examples, 100 by default, as the LoRA strategies since 2026-12-07; 0: the round's median); ``off`` (the default, as every report before 2026-12-06)
aggregates every finite reply.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.common when run as a script

from benchmarks.common import add_out, load_header, load_line  # noqa: E402
from fedfuse.data.partition import partition_indices  # noqa: E402
from fedfuse.experiment import apart_model, dataset_for, init_mode, local_plan, local_train, model_for  # noqa: E402
from fedfuse.lora import (  # noqa: E402
    adapter_keys,
    adapter_pairs,
    base_weight_key,
    complete_rank,
    mean_products,
    mean_update,
    truncate_rank,
)
from fedfuse.lora.layers import SCALES  # noqa: E402
from fedfuse.lora.run import adapter_state, load_received  # noqa: E402
from fedfuse.replies import Reply  # noqa: E402
from fedfuse.screening import ScreeningConfig, screen_round  # noqa: E402
from fedfuse.state import state_bytes, torch_threads, weighted_average  # noqa: E402
from fedfuse.train import evaluate  # noqa: E402
from fedfuse.trust import OnWhole, trusted_reference  # noqa: E402
from strategies.registry import OWNERS, resolve_strategy, validate_config  # noqa: E402

# (label, strategy, ranks): equal ranks vs mixed ranks (cycled over clients)
SETTINGS = {
    "equal": [("full FedAvg", "fedavg", ""), ("FedAvg-LoRA", "fedavg-lora", "4"), ("FedEx-LoRA", "fedex-lora", "4"),
              ("aligned-LoRA", "aligned-lora", "4"), ("SVD-LoRA", "svd-lora", "4"), ("FLoRA", "flora", "4")],
    "mixed": [("HetLoRA (pad)", "hetlora", "2,4,8"), ("FedEx-LoRA", "fedex-lora", "2,4,8"),
              ("aligned-LoRA", "aligned-lora", "2,4,8"), ("SVD-LoRA", "svd-lora", "2,4,8"), ("FLoRA", "flora", "2,4,8")],
}  # fmt: skip


def _round_update(
    states: list[dict[str, torch.Tensor]],
    weights: list[float],
    start: dict[str, torch.Tensor],
    alpha: float,
    scale: str = "standard",
) -> float:
    """‖U − s·B₀·A₀‖_F = ‖Σ λ_i (s_i·B_i·A_i − T_i)‖_F over the adapted layers: the clients' mean change this round
    from the global adapters (B₀, A₀) each was sent at its rank (T_i; FLoRA's fresh adapters: B₀ = 0, the whole
    mean product M)."""
    moved = mean_update(states, weights, start, alpha, scale)
    before = mean_products([start], [1.0], alpha, scale)
    return math.sqrt(sum(float((moved[p] - before[p]).norm()) ** 2 for p in moved))


def run(cfg: dict[str, Any], rounds: int, screening: bool = False) -> list[dict[str, float]]:
    """One federated fine-tuning run; a row per round (round 0 = the base). ``screening``: every round's replies
    screened as the Flower path screens them (clipped, rejected: the row's ``clipped``/``rejected``)."""
    ds = dataset_for(cfg)
    n = int(cfg["num-clients"])
    parts = partition_indices(ds.y_train.numpy(), "dirichlet", n, alpha=float(cfg["alpha"]), seed=int(cfg["seed"]))
    lora_run = cfg["strategy"] != "fedavg"
    global_model = model_for(cfg, ds)
    state = {k: v.clone() for k, v in global_model.state_dict().items()}
    strategy = None
    if lora_run:
        cls = resolve_strategy(cfg["strategy"])
        strategy = cls(**cls.config_kwargs(cfg, model=global_model, example_input=None), seed=int(cfg["seed"]))
        ranks = [int(r) for r in str(cfg["lora-ranks"]).split(",")]
    _, acc = evaluate(global_model, ds.x_test, ds.y_test)
    rows = [{"round": 0, "accuracy": acc, "bytes": 0.0, "agg_error": 0.0, "rel_error": 0.0, "step_error": 0.0,
             "dropped": 0.0, "clipped": 0.0, "rejected": 0.0, "cut": 0.0}]  # fmt: skip
    screen_config = ScreeningConfig.from_config(cfg)  # the run's screening options (defaults: the Flower path's)
    trusted = trusted_reference(cfg, global_model) if screening else None  # g₀ (trusted-data), as the strategies'
    for rnd in range(1, rounds + 1):
        states, weights, down, up, dropped, steps, sents = [], [], 0, 0, 0, [], []
        adapters = {k: state[k] for k in adapter_keys(state)} if lora_run else {}
        dense = {k: state[k] for k in strategy.train_keys} if lora_run else {}  # head / biases trained fully
        pairs = adapter_pairs(state) if lora_run else {}
        base = {base_weight_key(p, state): state[base_weight_key(p, state)] for p in pairs}
        for pid in range(n):
            idx = torch.as_tensor(parts[pid])
            x, y = ds.x_train[idx], ds.y_train[idx]
            apart = apart_model(cfg, ds, pid) if rnd == 1 else None  # client-init own: its own adapter init
            if lora_run:
                rank = ranks[pid % len(ranks)]
                model = model_for(cfg, ds, lora_rank=rank) if apart is None else apart
                global_rank = max(ranks)
                payload = (
                    adapters if rank == global_rank else truncate_rank(adapters, rank, strategy.alpha, strategy.scale)
                )
                sent = {**payload, **dense, **(base if strategy.base_folded else {})}
                if apart is None:  # as the ClientApp: a client that starts apart leaves round 1's arrays unused
                    load_received(model, sent)
            else:
                model = model_for(cfg, ds)
                model.load_state_dict(state if apart is None else apart.state_dict())
                sent = state
            down += state_bytes(sent)
            result = local_train(cfg, model, x, y, local_plan(cfg, pid, rnd, len(x)))
            reply = adapter_state(model) if lora_run else model.state_dict()
            up += state_bytes(reply)
            if not all(bool(torch.isfinite(v).all()) for v in reply.values() if v.is_floating_point()):
                dropped += 1  # as the Flower path's reply validation rejects a non-finite update
                continue
            states.append(reply)
            weights.append(float(len(x)))
            steps.append(float(result.steps))
            sents.append({k: sent[k] for k in reply})  # what the node was sent, as the strategy screens against
        screened = {"clipped": 0.0, "rejected": 0.0, "cut": 0.0}
        if screening and states:
            replies = [Reply(st, w, n) for st, w, n in zip(states, weights, steps, strict=True)]
            mixed = lora_run and len(set(ranks)) > 1
            if mixed:  # as LoRAStrategy.screen_view: completed to the global rank, measured against one model
                own = [{p: st[a].shape[0] for p, (a, _) in adapter_pairs(st).items()} for st in states]
                full = {k: state[k] for k in sents[0]}
                replies = [r._replace(state=complete_rank(r.state, full, strategy.alpha, strategy.scale))
                           for r in replies]  # fmt: skip
                sents = [full] * len(replies)
            guard = not (init_mode(cfg) != "shared" and rnd == 1)  # the Flower path's: apart clients share no start
            use = trusted is not None and guard and len(states) >= 3  # as FedFuseStrategy.aggregate_train
            whole = OnWhole(trusted, lambda st=state: st) if use else None  # g₀ and losses of the whole model
            rs = screen_round(rnd, [f"client{i}" for i in range(len(states))], replies, sents, screen_config,
                              direction=guard, reference=whole(state, rnd) if whole else None,
                              losses=whole.losses if whole else None)  # fmt: skip
            states, weights = rs.states, rs.weights
            if mixed:  # back to each client's rank, as LoRAStrategy.aggregate_arrays
                states = [truncate_rank(st, own[i], strategy.alpha, strategy.scale)
                          for st, i in zip(states, rs.keep, strict=True)]  # fmt: skip
            screened = {"clipped": rs.stats["clipped"], "rejected": rs.stats["rejected"], "cut": rs.stats["cut"]}
        if not states:  # every update diverged: the round keeps the previous model
            rows.append({**rows[-1], "round": rnd, "bytes": float(down + up), "dropped": float(dropped), **screened})
            continue
        if lora_run:
            step = _round_update(states, weights, adapters, strategy.alpha, strategy.scale)
            strategy._global, strategy._global_rank = state, max(ranks)
            strategy.round_metrics = {}
            state = strategy.aggregate_arrays(rnd, states, weights)
            err, mean = strategy.round_metrics["lora_agg_error"], strategy.round_metrics["lora_mean_update"]
        else:
            state, err, mean, step = weighted_average(states, weights), 0.0, 1.0, 1.0
        global_model.load_state_dict(state)
        _, acc = evaluate(global_model, ds.x_test, ds.y_test)
        rows.append({"round": rnd, "accuracy": acc, "bytes": float(down + up), "agg_error": err,
                     "rel_error": err / mean if mean else 0.0, "step_error": err / step if step else 0.0,
                     "dropped": float(dropped), **screened})  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default="")
    p.add_argument("--model", default="mlp")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--num-clients", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--alphas", default="0.1,1.0")
    p.add_argument("--settings", default="equal,mixed")
    p.add_argument("--lr", type=float, default=0.05, help="local SGD lr of full fine-tuning")
    p.add_argument("--lora-lr", type=float, default=0.05, help="local SGD lr of the LoRA runs")
    p.add_argument("--optimizer", default="sgd", help="the clients' local optimizer (fedfuse's --optimizer)")
    p.add_argument(
        "--screening",
        choices=["off", "default"],
        default="off",
        help="screen replies as the Flower path does (default) or not (off)",
    )
    p.add_argument("--direction-guard", choices=["median", "off"], default="median",
                   help="with --screening default: the direction guard (fedfuse's --direction-guard)")  # fmt: skip
    p.add_argument("--trusted-data", type=int, default=100,
                   help="with --screening default: the guard's reference, g₀ on N labelled examples (0: the round's "
                   "median, the LoRA strategies' only reference before 2026-12-07)")  # fmt: skip
    p.add_argument("--only", default="", help="comma-separated method labels to run (default: all)")
    p.add_argument("--lora-head", default="auto", help="lora-head of the LoRA runs (auto: the output layer trained)")
    p.add_argument("--lora-bias", default="none", help="lora-bias of the LoRA runs (none, lora_only, all)")
    p.add_argument("--rank", type=int, default=4, help="the equal setting's rank")
    p.add_argument("--mixed-ranks", default="2,4,8", help="the mixed setting's ranks, cycled over clients")
    p.add_argument("--lora-alpha", type=float, default=4.0, help="LoRA scale numerator (scale alpha/r)")
    p.add_argument("--lora-scale", default="standard", choices=SCALES, help="standard: alpha/r; rslora: alpha/√r")
    p.add_argument(
        "--lora-refactor",
        default="update",
        choices=("update", "product"),
        help="what fedex-lora/svd-lora re-factorise: the global product + the clients' mean change "
        "(update) or the mean of the clients' products (product, the rule before 2026-12-06)",
    )
    p.add_argument("--width", type=int, default=0, help="hidden width of the model (0: its default)")
    p.add_argument("--depth", type=int, default=0, help="hidden layers of the model (0: its default)")
    p.add_argument("--pretrain-epochs", type=int, default=5, help="epochs of the central low-classes pretraining")
    p.add_argument(
        "--client-init",
        default="shared",
        choices=("shared", "own"),
        help="round 1's adapters: the global ones (shared) or each client's own init (own: sites that start apart)",
    )
    p.add_argument("--tag", default="")
    add_out(p)
    args = p.parse_args()
    start = load_line()
    print(start, flush=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, Any] = {}
    t0 = time.time()
    with torch_threads(1):
        for alpha in [float(a) for a in args.alphas.split(",")]:
            for setting in args.settings.split(","):
                for label, strategy, ranks in SETTINGS[setting]:
                    if args.only and label not in args.only.split(","):
                        continue
                    key = f"α={alpha:g} {setting}: {label}"
                    runs = []
                    for seed in seeds:
                        cfg = validate_config({
                            "strategy": strategy, "dataset": args.dataset, "data-root": args.data_root,
                            "model": args.model, "num-clients": args.num_clients, "alpha": alpha, "seed": seed,
                            "local-epochs": args.local_epochs, "pretrain": "low-classes",
                            "pretrain-epochs": args.pretrain_epochs, "width": args.width, "depth": args.depth,
                            "client-init": args.client_init,
                            "lora-ranks": {"": "", "4": str(args.rank)}.get(ranks, args.mixed_ranks),
                            "lr": args.lr if strategy == "fedavg" else args.lora_lr, "optimizer": args.optimizer,
                            "direction-guard": args.direction_guard, "trusted-data": args.trusted_data,
                            **({} if strategy == "fedavg" else {"lora-head": args.lora_head,
                                                                "lora-bias": args.lora_bias,
                                                                "lora-alpha": args.lora_alpha,
                                                                "lora-scale": args.lora_scale}),
                            **({"lora-refactor": args.lora_refactor} if strategy in OWNERS["lora-refactor"] else {}),
                        })  # fmt: skip
                        runs.append(run(cfg, args.rounds, screening=args.screening == "default"))
                    results[key] = runs
                    last = [r[-1]["accuracy"] for r in runs]
                    print(f"{key}: final acc {statistics.mean(last):.4f} ± {statistics.pstdev(last):.4f} "
                          f"({time.time() - t0:.0f}s)", flush=True)  # fmt: skip
    name = f"lora-{args.dataset}-{args.model.replace(':', '-')}{'-' + args.tag if args.tag else ''}"
    end = load_line()
    print(end, flush=True)
    load = load_header(start, end)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"args": vars(args), "load": load, "runs": results}
    (args.out / f"{name}.json").write_text(json.dumps(record, indent=1, default=str))
    (args.out / f"{name}.md").write_text(report(results, args, time.time() - t0, load))
    print(f"wrote {args.out / name}.md")


def _scale(args: argparse.Namespace) -> str:
    return str(getattr(args, "lora_scale", "standard"))  # records written before --lora-scale: standard


def _refactor(args: argparse.Namespace) -> str:
    """fedex-lora/svd-lora's target: records written before --lora-refactor re-factorised the mean product."""
    return str(getattr(args, "lora_refactor", "product"))


def _screened(args: argparse.Namespace) -> bool:
    return getattr(args, "screening", "off") == "default"


def _trusted(args: argparse.Namespace) -> int:
    """The guard's trusted examples: records screened before --trusted-data used the round's median (0)."""
    return int(getattr(args, "trusted_data", 0))


def _init(args: argparse.Namespace) -> str:
    """Round 1's adapters: records written before --client-init started every client from the global ones."""
    return str(getattr(args, "client_init", "shared"))


def _ms(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    return f"{statistics.mean(values) * scale:.{digits}f} ± {statistics.pstdev(values) * scale:.{digits}f}"


def report(results: dict[str, Any], args: argparse.Namespace, seconds: float, load: str = "") -> str:
    """The report; ``load`` is the :func:`load_header` line of the run."""
    seeds = args.seeds.split(",")
    lines = [
        f"# Federated LoRA fine-tuning: {args.dataset} / {args.model}",
        "",
        f"`python -m benchmarks.lora --dataset {args.dataset} --model {args.model} --rounds {args.rounds} "
        f"--num-clients {args.num_clients} --local-epochs {args.local_epochs} --seeds {args.seeds} "
        f"--alphas {args.alphas} --settings {args.settings} --lr {args.lr} --lora-lr {args.lora_lr} "
        f"--lora-head {args.lora_head} --lora-bias {args.lora_bias} --rank {args.rank} --mixed-ranks "
        f"{args.mixed_ranks} --lora-alpha {args.lora_alpha:g}"
        f"{' --lora-scale ' + args.lora_scale if _scale(args) != 'standard' else ''}"
        f"{' --lora-refactor product' if _refactor(args) == 'product' else ''} --width {args.width} --depth {args.depth} "
        f"--pretrain-epochs {args.pretrain_epochs}{' --client-init own' if _init(args) == 'own' else ''}"
        f"{' --optimizer ' + args.optimizer if getattr(args, 'optimizer', 'sgd') != 'sgd' else ''}"
        f"{' --screening default' if _screened(args) else ''}"
        f"{' --direction-guard off' if getattr(args, 'direction_guard', 'median') == 'off' else ''}"
        f"{' --trusted-data ' + str(_trusted(args)) if _screened(args) and _trusted(args) != 100 else ''}"
        f"{' --tag ' + args.tag if args.tag else ''}` "
        f"({seconds / 60:.0f} min, 1 thread).",
        "",
        *([load, ""] if load else []),
        f"Base: pretrained centrally on the training samples of classes 0-4 ({args.pretrain_epochs} epochs); "
        f"federated task: all 10 classes, Dirichlet(α) over {args.num_clients} clients, every client every round. "
        f"LoRA on every Linear/Conv2d but the lora-head (alpha {args.lora_alpha:g}, scale "
        f"{'alpha/√r (rslora)' if _scale(args) == 'rslora' else 'alpha/r'}); head trained fully: "
        f"{args.lora_head}, trainable biases: {args.lora_bias}; equal ranks {args.rank}, mixed ranks "
        f"{args.mixed_ranks} cycled over clients. "
        f"{_APART if _init(args) == 'own' else ''}Accuracy: central test set, mean ± std "
        f"over seeds {', '.join(seeds)} (percent). Bytes: arrays sent + received per round, all clients. "
        "Error: ‖U − s·B̄·Ā‖_F / ‖U‖_F of the adapters the server keeps (U = s·B₀·A₀ + Σ λ_i (s_i·B_i·A_i − T_i): "
        "the product of the global adapters B₀, A₀ sent that round plus the clients' mean change from what each "
        "received, T_i = s·B₀·A₀ at client i's rank; with one rank U = the mean of the clients' s·B·A), mean over "
        "rounds; per round update: the same error / ‖U − s·B₀·A₀‖_F, mean over rounds; FedEx-LoRA folds that gap "
        "into the base (its applied update is exact), FLoRA's stacking is exact by construction (0). fedex-lora and "
        f"svd-lora re-factorise {'the mean of the clients products (--lora-refactor product)' if _refactor(args) == 'product' else 'U'}. "
        "Diverged updates (non-finite) are left out of the round, as the Flower path's validation rejects them. "
        + (
            "Replies screened as the Flower path screens them (--screening default): last column, updates clipped "
            "(norm bound) / rejected / cut (influence test) over all runs and rounds; the direction guard's reference: "
            + (
                f"the server's own update g₀ on {_trusted(args)} labelled examples."
                if _trusted(args)
                else "the round's median update (--trusted-data 0)."
            )
            if _screened(args)
            else "No other screening (--screening off)."
        ),
        "",
        "| setting | method | base acc | final acc | best acc | bytes/round (MB) | bytes vs full | rel. agg. error "
        "| error / round update | diverged updates | clipped / rejected / cut |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    full_bytes: dict[str, float] = {}
    for key, runs in results.items():
        setting, label = key.split(": ", 1)
        byt = statistics.mean(statistics.mean(r["bytes"] for r in run[1:]) for run in runs)
        if label == "full FedAvg":
            full_bytes[setting.split()[0]] = byt
        ref = full_bytes.get(setting.split()[0])
        ratio = f"{100 * byt / ref:.1f} %" if ref else "n/a"
        err = [statistics.mean(r["rel_error"] for r in run[1:]) for run in runs]
        step = [statistics.mean(r.get("step_error", 0.0) for r in run[1:]) for run in runs]
        lines.append(
            f"| {setting} | {label} | {_ms([r[0]['accuracy'] for r in runs])} | {_ms([r[-1]['accuracy'] for r in runs])} "
            f"| {_ms([max(x['accuracy'] for x in r) for r in runs])} | {byt / 1e6:.3f} | {ratio} | {_ms(err, 1.0, 3)} "
            f"| {_ms(step, 1.0, 3)} "
            f"| {sum(x.get('dropped', 0) for r in runs for x in r):.0f} "
            f"| {sum(x.get('clipped', 0) for r in runs for x in r):.0f} / "
            f"{sum(x.get('rejected', 0) for r in runs for x in r):.0f} / "
            f"{sum(x.get('cut', 0) for r in runs for x in r):.0f} |"
        )
    lines += ["", "## Accuracy per round (mean over seeds, percent)", ""]
    rounds = len(next(iter(results.values()))[0])
    lines.append("| setting | method | " + " | ".join(str(i) for i in range(rounds)) + " |")
    lines.append("|---|---|" + "---|" * rounds)
    for key, runs in results.items():
        setting, label = key.split(": ", 1)
        per = [statistics.mean(r[i]["accuracy"] for r in runs) * 100 for i in range(rounds)]
        lines.append(f"| {setting} | {label} | " + " | ".join(f"{v:.1f}" for v in per) + " |")
    lines += ["", "## Relative aggregation error per round (mean over seeds)", ""]
    lines.append("| setting | method | " + " | ".join(str(i) for i in range(1, rounds)) + " |")
    lines.append("|---|---|" + "---|" * (rounds - 1))
    for key, runs in results.items():
        setting, label = key.split(": ", 1)
        if label == "full FedAvg":
            continue
        per = [statistics.mean(r[i]["rel_error"] for r in runs) for i in range(1, rounds)]
        lines.append(f"| {setting} | {label} | " + " | ".join(f"{v:.3f}" for v in per) + " |")
    lines += ["", "## Aggregation error / round update per round (mean over seeds)", ""]
    lines.append("| setting | method | " + " | ".join(str(i) for i in range(1, rounds)) + " |")
    lines.append("|---|---|" + "---|" * (rounds - 1))
    for key, runs in results.items():
        setting, label = key.split(": ", 1)
        if label == "full FedAvg":
            continue
        per = [statistics.mean(r[i].get("step_error", 0.0) for r in runs) for i in range(1, rounds)]
        lines.append(f"| {setting} | {label} | " + " | ".join(f"{v:.3f}" for v in per) + " |")
    lines += paired_gains(results, seeds)
    lines.append("")
    return "\n".join(lines) + "\n" + ("" if math.isfinite(seconds) else "")


_APART = (
    "Clients start apart (--client-init own): in round 1 each client draws its own adapter init (A from its own "
    "seed, B = 0) on the same frozen base and head, as sites that fine-tune one public checkpoint independently; "
    "from round 2 on every client starts from the global adapters. "
)

REFERENCES = {"mixed": "HetLoRA (pad)", "equal": "FedAvg-LoRA"}


def _curve(rows: list[dict[str, float]]) -> float:
    """Test accuracy averaged over rounds 1..R of one run (round 0, the shared base, left out)."""
    return statistics.mean(r["accuracy"] for r in rows[1:])


def paired_gains(results: dict[str, Any], seeds: list[str]) -> list[str]:
    """Final accuracy minus the setting's reference (HetLoRA for mixed ranks, FedAvg-LoRA for equal ones) on the
    same seed, in points: mean ± std over seeds and each seed's gain; and the same for the accuracy averaged over
    rounds 1..R (the area under the learning curve: how much sooner a rule gets there); empty when no reference
    was run."""
    out: list[str] = []
    for key, runs in results.items():
        setting, label = key.split(": ", 1)
        ref_label = REFERENCES.get(setting.split()[-1], "")
        ref = results.get(f"{setting}: {ref_label}")
        if ref is None or label == ref_label or label == "full FedAvg":
            continue
        if not out:
            out = ["", "## Paired gain in final accuracy over the reference on the same seed (points)", "",
                   f"| setting | method | reference | final acc: mean ± std | accuracy averaged over rounds 1-{len(runs[0]) - 1}: "
                   f"mean ± std | per seed, final ({', '.join(seeds)}) |", "|---|---|---|---|---|---|"]  # fmt: skip
        gains = [100 * (r[-1]["accuracy"] - q[-1]["accuracy"]) for r, q in zip(runs, ref, strict=True)]
        curve = [100 * (_curve(r) - _curve(q)) for r, q in zip(runs, ref, strict=True)]
        each = ", ".join(f"{g:+.1f}" for g in gains)
        out.append(f"| {setting} | {label} | {ref_label} | {statistics.mean(gains):+.1f} ± {statistics.pstdev(gains):.1f} "
                   f"| {statistics.mean(curve):+.1f} ± {statistics.pstdev(curve):.1f} | {each} |")  # fmt: skip
    return out


if __name__ == "__main__":
    main()
