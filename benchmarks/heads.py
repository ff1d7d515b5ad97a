"""Attention heads as blocks vs within-head only: two independently trained transformers, aligned and fused.

Each pair: two ``Embedding → nn.TransformerEncoder (2 layers, 4 heads of 8) → mean → Linear`` classifiers trained
apart (own init and data order, Adam 3e-3, 1500 steps of 64) on a synthetic token task (the most frequent of three
token buckets in a 7-token sequence; both reach ~100 %). For the derived spec (head sets) and the same spec without
them (``blocks=()``: units permuted within heads only, heads kept in place) the table gives ``‖θ_A − align(θ_B)‖ /
‖θ_A‖`` over all parameters and over the attention ones (weight matching, exact layer-wise OT), and the test
accuracy of ``fuse([A, B])`` by ``match`` and ``wb`` (``average``: no alignment). One process, one thread.

    python benchmarks/heads.py --pairs 3 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.common when run as a script

from benchmarks.common import add_out, load_header, load_line  # noqa: E402
from fedfuse.align.fusion import align, fuse  # noqa: E402
from fedfuse.align.spec import derive_spec  # noqa: E402
from fedfuse.align.transport import load_state  # noqa: E402


class Encoder(nn.Module):
    """Embedding → nn.TransformerEncoder (2 layers, 4 heads) → mean → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2)
        self.fc = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.enc(self.emb(x)).mean(1))


def data(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(1, 50, (n, 7), generator=gen)
    counts = torch.stack([(x < 17).sum(1), ((x >= 17) & (x < 34)).sum(1), (x >= 34).sum(1)], 1)
    return x, (counts + 0.1 * torch.arange(3)).argmax(1)


def train(seed: int, steps: int) -> nn.Module:
    torch.manual_seed(seed)
    model = Encoder()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(100 + seed)
    for _ in range(steps):
        x, y = data(64, gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def distance(a: nn.Module, state: dict[str, torch.Tensor], part: str = "") -> float:
    """``‖θ_a − θ‖ / ‖θ_a‖`` over the parameters whose key contains ``part``."""
    ref = {k: v for k, v in a.state_dict().items() if part in k}
    num = sum(float(((state[k] - v) ** 2).sum()) for k, v in ref.items())
    return (num / sum(float((v**2).sum()) for v in ref.values())) ** 0.5


def run_pair(seed_a: int, seed_b: int, steps: int, test: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    a, b = train(seed_a, steps), train(seed_b, steps)
    spec = derive_spec(a, test[0][:2])
    row: dict[str, Any] = {"pair": [seed_a, seed_b], "acc": [accuracy(a, *test), accuracy(b, *test)]}
    row["none"] = [distance(a, b.state_dict()), distance(a, b.state_dict(), "self_attn")]
    for label, sp in (("blocks", spec), ("within", replace(spec, blocks=()))):
        for method in ("weight", "ot"):
            state = align(a, copy.deepcopy(b), method=method, spec=sp)
            row[f"{method} {label}"] = [distance(a, state), distance(a, state, "self_attn")]
        for method in ("match", "wb"):
            fused = fuse([a, b], method=method, spec=sp, bn_repair=None)
            row[f"fuse {method} {label}"] = accuracy(load_state(copy.deepcopy(a), fused), *test)
    row["fuse average"] = accuracy(load_state(copy.deepcopy(a), fuse([a, b], method="average")), *test)
    return row


def report(rows: list[dict[str, Any]], header: str) -> str:
    lines = [
        "# Attention heads as blocks vs within-head only (benchmarks/heads.py)",
        "",
        header,
        "",
        "Distance ‖θ_A − align(θ_B)‖/‖θ_A‖, all parameters / attention parameters; accuracy of the fused model.",
        "",
        "| pair | A, B acc | none | weight: blocks | weight: within | OT: blocks | OT: within "
        "| match: blocks | match: within | wb: blocks | wb: within | average |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def d(r: dict[str, Any], k: str) -> str:
        return f"{r[k][0]:.4f} / {r[k][1]:.4f}"

    for r in rows:
        cells = [f"{r['pair'][0]}, {r['pair'][1]}", f"{r['acc'][0]:.3f}, {r['acc'][1]:.3f}", d(r, "none")]
        cells += [d(r, f"{m} {lab}") for m in ("weight", "ot") for lab in ("blocks", "within")]
        cells += [f"{r[f'fuse {m} {lab}']:.3f}" for m in ("match", "wb") for lab in ("blocks", "within")]
        lines.append("| " + " | ".join([*cells, f"{r['fuse average']:.3f}"]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--steps", type=int, default=1500)
    add_out(p)
    args = p.parse_args()
    torch.set_num_threads(1)
    start, t0 = load_line(), time.perf_counter()
    test = data(2000, torch.Generator().manual_seed(7))
    rows = [run_pair(2 * i, 2 * i + 1, args.steps, test) for i in range(args.pairs)]
    header = load_header(start, load_line()) + f"  \nWall time: {time.perf_counter() - t0:.0f} s"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "heads.json").write_text(json.dumps({"rows": rows, "loads": [header]}, indent=1))
    (args.out / "heads.md").write_text(report(rows, header))
    print(report(rows, header))


if __name__ == "__main__":
    main()
