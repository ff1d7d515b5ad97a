"""Alignment speed: weight matching / fusion wall time, the plain implementation vs the current one, in one run.

Cases (random init, ``num_classes=10``, no weights downloaded):

* ``vgg11_bn``, ``resnet50``, ``resnet18``: two torchvision models, ``weight_matching(a, b)``;
* ``cifar_vgg11_pair``: two CIFAR-width VGG11 (convs 64…512 + BN, one Linear 512→10), ``weight_matching``;
* ``cifar_vgg11_match`` / ``cifar_vgg11_wb``: six of them, ``fuse(method="match" | "wb")``.

"before" runs ``fedfuse.align.solvers._weight_matching_reference`` (the plain coordinate descent,
``solvers._REFERENCE = True``), "after" the cached one; both in the same process, so the ratio is
measured under the same load (the machine is shared: compare ratios, not absolute times). The spec is
derived once per case, outside the timings. Each case also checks that both give the same permutations
(pairs) or the same fused state (fusions).

    python benchmarks/speed.py                       # every case, before and after
    python benchmarks/speed.py --cases cifar_vgg11_match --no-before

Writes ``benchmarks/results/speed.md``, ``speed.json`` and ``speed.png`` (time per model vs parameters).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedfuse.align import derive_spec, fuse, solvers, weight_matching

RESULTS = Path(__file__).resolve().parent / "results"


def cifar_vgg11() -> nn.Module:
    """VGG11 at CIFAR width: 8 conv3×3 (64, 128, 256, 256, 512, 512, 512, 512) + BN + ReLU, 5 max-pools, Linear."""
    layers: list[nn.Module] = []
    channels = 3
    for item in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.BatchNorm2d(int(item)), nn.ReLU()]
        channels = int(item)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, 10))


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(num_classes=10)

    return build


# name -> (builder, input shape, number of models, what to run)
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int, str]] = {
    "cifar_vgg11_pair": (cifar_vgg11, (3, 32, 32), 2, "wm"),
    "cifar_vgg11_match": (cifar_vgg11, (3, 32, 32), 6, "match"),
    "cifar_vgg11_wb": (cifar_vgg11, (3, 32, 32), 6, "wb"),
    "resnet18": (_torchvision("resnet18"), (3, 224, 224), 2, "wm"),
    "resnet50": (_torchvision("resnet50"), (3, 224, 224), 2, "wm"),
    "vgg11_bn": (_torchvision("vgg11_bn"), (3, 224, 224), 2, "wm"),
}


def _models(build: Callable[[], nn.Module], n: int) -> list[nn.Module]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(build().eval())
    return out


def _run(kind: str, models: list[nn.Module], spec: Any, reference: bool) -> tuple[float, Any, int | None]:
    """(seconds, result, sweeps) with the plain (``reference``) or the current implementation."""
    solvers._REFERENCE = reference
    try:
        t0 = time.perf_counter()
        if kind == "wm":
            perms, sweeps = weight_matching(models[0], models[1], spec, return_iterations=True)
            return time.perf_counter() - t0, perms, sweeps  # type: ignore[return-value]
        fused = fuse(models, method=kind, spec=spec)  # type: ignore[arg-type]
        return time.perf_counter() - t0, fused, None
    finally:
        solvers._REFERENCE = False


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two results (permutation matrices or fused states)."""
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def run_case(name: str, before: bool) -> dict[str, Any]:
    build, shape, n, kind = CASES[name]
    models = _models(build, n)
    t0 = time.perf_counter()
    spec = derive_spec(models[0], torch.randn(1, *shape))
    row: dict[str, Any] = {
        "case": name,
        "kind": kind,
        "models": n,
        "params": sum(v.numel() for v in models[0].state_dict().values() if v.is_floating_point()),
        "groups": len(spec.groups),
        "derive_s": time.perf_counter() - t0,
    }
    row["after_s"], after, row["sweeps"] = _run(kind, models, spec, reference=False)
    print(f"{name}: after {row['after_s']:.2f} s", flush=True)
    if before:
        row["before_s"], ref, sweeps = _run(kind, models, spec, reference=True)
        row["speedup"] = row["before_s"] / row["after_s"]
        row["max_abs_diff"] = _same(ref, after)
        row["same_sweeps"] = sweeps == row["sweeps"]
        print(
            f"{name}: before {row['before_s']:.2f} s, ×{row['speedup']:.1f}, diff {row['max_abs_diff']:.3g}", flush=True
        )
    return row


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for key, style in (("before_s", "o--"), ("after_s", "s-")):
        pts = sorted((r["params"], r[key] / r["models"], r["case"]) for r in rows if key in r)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=key.split("_")[0])
        for x, y, label in pts:
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters per model")
    ax.set_ylabel("seconds per model")
    ax.set_title("weight matching / fusion time per model (2 torch threads)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _md(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Alignment speed: plain vs cached weight matching (one run)",
        "",
        f"{meta['when']}, {meta['machine']}, torch {meta['torch']}, {meta['threads']} torch threads, "
        f"load average at start {meta['load']}. Random init, num_classes=10. Times exclude spec derivation "
        "(*derive*). *Per model*: time / number of models. *Diff*: largest absolute difference between the "
        "two results (permutation matrices for pairs, fused states for six-model fusions).",
        "",
        "| case | run | models | params/model | groups | derive s | before s | after s | speed-up | "
        "after s / model | sweeps | diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        before = f"{r['before_s']:.2f}" if "before_s" in r else "–"
        speed = f"×{r['speedup']:.1f}" if "speedup" in r else "–"
        diff = f"{r['max_abs_diff']:.3g}" if "max_abs_diff" in r else "–"
        lines.append(
            f"| {r['case']} | {r['kind']} | {r['models']} | {r['params']:,} | {r['groups']} | {r['derive_s']:.1f} | "
            f"{before} | {r['after_s']:.2f} | {speed} | {r['after_s'] / r['models']:.2f} | {r['sweeps'] or '–'} | "
            f"{diff} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--no-before", action="store_true", help="skip the plain implementation (no ratios)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="", help="suffix of the result files (speed-<tag>.*)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    meta = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "threads": args.threads,
        "load": " ".join(f"{v:.1f}" for v in os.getloadavg()),
    }
    rows = [run_case(name, not args.no_before) for name in args.cases]
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "speed" + (f"-{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (RESULTS / f"{stem}.md").write_text(_md(meta, rows))
    _plot(rows, RESULTS / f"{stem}.png")
    print(_md(meta, rows))


if __name__ == "__main__":
    main()
