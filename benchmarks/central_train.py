"""How far a model trains centrally from scratch on a data set: test accuracy per epoch, SGD (the clients' local
optimiser: momentum 0.9, batch 32) or Adam/AdamW, one seed. Answers "does this architecture learn here at all?" before a
federated run is blamed (e.g. the ``hf:`` transformers reading digits as tokens).

    python -m benchmarks.central_train --runs hf:bert:sgd:0.05:8,hf:bert:adam:0.001:24,hf:llama:sgd:0.05:24
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.common when run as a script

from benchmarks.common import add_out, load_header, load_line  # noqa: E402
from fedfuse.config import OPTIMIZERS  # noqa: E402
from fedfuse.experiment import dataset_for, model_for  # noqa: E402
from fedfuse.train import evaluate, make_optimizer, train  # noqa: E402
from strategies.registry import validate_config  # noqa: E402


def train_central(model_name: str, dataset: str, optimizer: str, lr: float, epochs: int, seed: int = 0) -> list[float]:
    """Test accuracy after each epoch of central training from the model's random init: the clients' own loop
    (:func:`fedfuse.train.train`, batch 32) and optimiser (:func:`fedfuse.train.make_optimizer`, SGD with momentum
    0.9), one optimiser kept over the epochs, epoch e shuffled with seed + e."""
    torch.manual_seed(seed)
    cfg = validate_config({"model": model_name, "dataset": dataset, "seed": seed})
    ds = dataset_for(cfg)
    model = model_for(cfg, ds)
    opt = make_optimizer(optimizer, model.parameters(), lr, momentum=0.9)
    accs = []
    for epoch in range(epochs):
        train(model, ds.x_train, ds.y_train, epochs=1, batch_size=32, seed=seed + epoch, optimizer=opt)
        accs.append(float(evaluate(model, ds.x_test, ds.y_test)[1]))
    return accs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--runs", required=True, help="comma-separated MODEL:OPTIMIZER:LR:EPOCHS (optimizer sgd, adam or adamw)"
    )
    p.add_argument("--dataset", default="digits")
    p.add_argument("--tag", default="hf")
    add_out(p)
    args = p.parse_args()
    runs: list[tuple[str, str, float, int]] = []
    for item in args.runs.split(","):
        model_name, optimizer, lr, epochs = item.rsplit(":", 3)
        if optimizer not in OPTIMIZERS:
            p.error(f"optimizer {optimizer!r} in {item!r} is unknown; allowed: {', '.join(OPTIMIZERS)}")
        runs.append((model_name, optimizer, float(lr), int(epochs)))
    start, t0 = load_line(), time.time()
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    for model_name, optimizer, lr, epochs in runs:
        key = f"{model_name} {optimizer} lr {lr:g}"
        results[key] = train_central(model_name, args.dataset, optimizer, lr, epochs)
        print(f"{key}: {results[key][-1]:.4f} after {epochs} epochs ({time.time() - t0:.0f}s)", flush=True)
    load = load_header(start, load_line())
    lines = [f"# Central training from scratch on {args.dataset}", "",
             f"`python -m benchmarks.central_train --dataset {args.dataset} --runs {args.runs} --tag {args.tag}` "
             f"({(time.time() - t0) / 60:.0f} min, 1 thread, seed 0).", "", load, "",
             "Test accuracy after each epoch (batch 32; SGD: momentum 0.9, as the clients' local training).", "",
             "| model, optimiser | epochs | final | per epoch |", "|---|---|---|---|"]  # fmt: skip
    for key, accs in results.items():
        lines.append(f"| {key} | {len(accs)} | {accs[-1]:.3f} | {' '.join(f'{a:.2f}' for a in accs)} |")
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"central-{args.dataset}-{args.tag}"
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"{name}.json").write_text(json.dumps({"args": vars(args), "load": load, "runs": results}, default=str))
    print(f"wrote {args.out / name}.md")


if __name__ == "__main__":
    main()
