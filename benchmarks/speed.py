"""Alignment speed: weight matching / fusion wall time, the plain implementation vs the current one, in one run.

Cases (random init, ``num_classes=10``, no weights downloaded):

* ``vgg11_bn``, ``resnet50``, ``resnet18``: two torchvision models, ``weight_matching(a, b)``;
* ``cifar_vgg11_pair``: two CIFAR-width VGG11 (convs 64…512 + BN, one Linear 512→10), ``weight_matching``;
* ``cifar_vgg11_match`` / ``cifar_vgg11_wb``: six of them, ``fuse(method="match" | "wb")``.

"before" runs ``fedfuse.align.solvers._weight_matching_reference`` (the plain coordinate descent from
the identity, ``solvers._REFERENCE = True``) and, for ``wb``, :func:`_wb_before` (the WB loop as it was
before the speed work: one ``ot_transport`` per model, allocating float64 average, mask-based finite
check; its fused state must equal "after"'s bit for bit); "after" the cached one with its default greedy start; for
pairs also "same start" (cached, ``start="identity"``), which must return the very permutations of
"before". All in the same process, so the ratios are measured under the same load (the machine is shared:
compare ratios, not absolute times). The spec is derived and gate-checked once per case, outside the timings (*derive s*). Pairs report
the objective ``Σ_k ⟨A_k, (P·B)_k⟩`` of each result (higher is better).

    python benchmarks/speed.py                       # every case, before and after
    python benchmarks/speed.py --cases cifar_vgg11_match --no-before

Writes ``speed.md``, ``speed.json`` and ``speed.png`` under ``--out`` (default ``benchmarks/results``) (time per model vs parameters).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.common when run as a script

from benchmarks.common import add_out, load_header, load_line  # noqa: E402
from fedfuse import state as state_mod  # noqa: E402
from fedfuse.align import apply_transport, fuse, ot_transport, solvers, weight_matching  # noqa: E402
from fedfuse.align import fusion as fusion_mod  # noqa: E402
from fedfuse.align.gate import gated_spec  # noqa: E402
from fedfuse.align.transport import state_of  # noqa: E402
from fedfuse.state import normalise_weights  # noqa: E402


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


def _wb_before(models: list[nn.Module], spec: Any, max_iter: int = 10, tol: float = 1e-4) -> dict[str, torch.Tensor]:
    """``fuse(models, method="wb", spec=spec)`` as implemented before the speed work (uniform weights, ref 0)."""

    def average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in states[0].items():
            if not torch.is_floating_point(v):
                out[k] = v.clone()
                continue
            acc = torch.zeros_like(v, dtype=torch.float64)
            lam = normalise_weights(normalise_weights(None, len(states)), len(states))  # fuse's λ, renormalised
            for st, w in zip(states, lam, strict=True):
                acc += st[k].to(dtype=torch.float64) * w
            out[k] = acc.to(v.dtype)
        return out

    def change(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor]) -> float:
        num = sum(float(((v.double() - old[k].double()) ** 2).sum()) for k, v in new.items() if v.is_floating_point())
        den = sum(float((old[k].double() ** 2).sum()) for k, v in new.items() if v.is_floating_point())
        return (num / max(den, 1e-300)) ** 0.5

    with torch.no_grad(), fusion_mod.single_threaded():
        states = [state_of(m) for m in models]
        for i, st in enumerate(states):
            for k, v in st.items():
                if torch.is_floating_point(v) and not bool(torch.isfinite(v).all()):
                    raise ValueError(f"{k} of model {i} is not finite")
        fusion_mod._check_free_axes(states, [spec.for_state(st) for st in states])
        bary: dict[str, torch.Tensor] = {k: v.clone() for k, v in states[0].items()}
        transports: list[Any] = [None] * len(states)
        aligned: list[dict[str, torch.Tensor]] = []
        for _ in range(max_iter):
            aligned = []
            for i, st in enumerate(states):
                transports[i] = ot_transport(bary, st, spec, init=transports[i], sweeps=1)
                aligned.append(apply_transport(st, spec, transports[i]))
            new = average(aligned)
            delta, bary = change(new, bary), new
            if delta < tol:
                break
        fusion_mod.check_alignment(states, aligned, spec, 0, "wb")
    return bary


def _run(
    kind: str,
    models: list[nn.Module],
    spec: Any,
    reference: bool,
    start: str = "greedy",
    max_iter: int = 100,
    one_thread: bool = False,
    wb_workers: int | None = None,
) -> tuple[float, Any, int | None]:
    """(seconds, result, sweeps) with the plain (``reference``) or the current implementation.

    The plain implementation ran every product on one thread (its entry points pinned one thread, and
    ``threaded_matmul`` did not exist): ``reference`` restores that, so *before* is the code as it was.
    """
    solvers._REFERENCE = reference
    gemm_min, workers = state_mod.GEMM_THREADS_MIN_MACS, fusion_mod.WB_WORKERS
    fusion_mod.WB_WORKERS = workers if wb_workers is None else wb_workers
    if reference or one_thread:
        state_mod.GEMM_THREADS_MIN_MACS = sys.maxsize
    try:
        t0 = time.perf_counter()
        if kind == "wm":
            perms, sweeps = weight_matching(
                models[0],
                models[1],
                spec,
                return_iterations=True,
                start=start,
                max_iter=max_iter,  # type: ignore[arg-type]
            )
            return time.perf_counter() - t0, perms, sweeps  # type: ignore[return-value]
        if reference and kind == "wb":
            before = _wb_before(models, spec)
            return time.perf_counter() - t0, before, None
        fused = fuse(models, method=kind, spec=spec)  # type: ignore[arg-type]
        return time.perf_counter() - t0, fused, None
    finally:
        solvers._REFERENCE = False
        state_mod.GEMM_THREADS_MIN_MACS = gemm_min
        fusion_mod.WB_WORKERS = workers


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two results (permutation matrices or fused states)."""
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def _objective(models: list[nn.Module], spec: Any, perms: dict[str, torch.Tensor]) -> float:
    """``Σ_k ⟨A_k, (P·B)_k⟩`` over floating entries: what weight matching maximises."""
    sa, sb = models[0].state_dict(), apply_transport(models[1], spec, perms)
    return sum(float((sa[k].double() * sb[k].double()).sum()) for k in sa if sa[k].is_floating_point())


def run_case(name: str, before: bool, max_iter: int) -> dict[str, Any]:
    build, shape, n, kind = CASES[name]
    models = _models(build, n)
    t0 = time.perf_counter()
    spec = gated_spec(models[0], torch.randn(1, *shape))  # derived and verified once: derive_s counts both
    row: dict[str, Any] = {
        "case": name,
        "kind": kind,
        "models": n,
        "params": sum(v.numel() for v in models[0].state_dict().values() if v.is_floating_point()),
        "groups": len(spec.groups),
        "derive_s": time.perf_counter() - t0,
    }
    if max_iter != 100:
        row["max_iter"] = max_iter
    # the first call of a process pays one-off costs (the OpenMP pool, first-touch pages of every buffer): timed
    # apart as *cold*, then every variant runs warm, as in a server that fuses every round
    row["after_cold_s"], _, _ = _run(kind, models, spec, False, max_iter=max_iter)
    row["after_s"], after, row["sweeps"] = _run(kind, models, spec, False, max_iter=max_iter)
    print(f"{name}: after {row['after_s']:.2f} s, {row['sweeps']} sweeps", flush=True)
    row["after_1t_s"], after_1t, _ = _run(kind, models, spec, False, max_iter=max_iter, one_thread=True)
    row["one_thread_diff"] = _same(after, after_1t)
    print(f"{name}: after, every product on one thread {row['after_1t_s']:.2f} s", flush=True)
    if kind == "wb":  # the models aligned to the barycenter one at a time (as before the WB worker threads)
        row["after_1w_s"], after_1w, _ = _run(kind, models, spec, False, wb_workers=1)
        row["one_worker_diff"] = _same(after, after_1w)
        print(f"{name}: after, one WB worker {row['after_1w_s']:.2f} s", flush=True)
    if kind == "wm":
        row["objective_after"] = _objective(models, spec, after)
        row["same_start_s"], same, row["same_start_sweeps"] = _run(kind, models, spec, False, "identity", max_iter)
        row["objective_same_start"] = _objective(models, spec, same)
        print(f"{name}: same start {row['same_start_s']:.2f} s, {row['same_start_sweeps']} sweeps", flush=True)
    if before:
        row["before_s"], ref, row["before_sweeps"] = _run(kind, models, spec, True, max_iter=max_iter)
        row["speedup"] = row["before_s"] / row["after_s"]
        row["max_abs_diff"] = _same(ref, after)
        if kind == "wm":
            row["objective_before"] = _objective(models, spec, ref)
            row["speedup_same_start"] = row["before_s"] / row["same_start_s"]
            row["same_start_diff"] = _same(ref, same)
        print(f"{name}: before {row['before_s']:.2f} s, ×{row['speedup']:.1f}", flush=True)
    return row


def _label(row: dict[str, Any]) -> str:
    return row["case"] + (f" ({row['max_iter']} sweeps)" if "max_iter" in row else "")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    markers = {"wm": "o", "match": "s", "wb": "^"}
    for kind, marker in markers.items():
        for key, line in (("before_s", "--"), ("after_s", "-")):
            pts = sorted((r["params"], r[key] / r["models"], _label(r)) for r in rows if key in r and r["kind"] == kind)
            if not pts:
                continue
            label = f"{'pair weight matching' if kind == 'wm' else f'6-model {kind}'}, {key.split('_')[0]}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker + line, label=label)
            for x, y, case in pts:
                ax.annotate(case, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters per model")
    ax.set_ylabel("seconds per model")
    ax.set_title("weight matching / fusion time per model (2 torch threads)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _md(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The report of one run (``meta`` carries the :func:`load_line` at start and end where recorded)."""
    lines = [
        "# Alignment speed: plain vs cached weight matching (one run)",
        "",
        *([load_header(meta["load_line_start"], meta.get("load_line_end")), ""] if "load_line_start" in meta else []),
        f"{meta['when']}, {meta['machine']}, torch {meta['torch']}, {meta['threads']} torch threads, "
        f"load average (1, 5, 15 min) at start {meta['load']}, at the end {meta.get('load_end', '?')}. Random init, num_classes=10. Times exclude spec derivation "
        "(*derive*). *before*: plain loop from the identity; *same start*: cached loop from the identity (its "
        "permutations must equal *before*'s: *diff* column, max |Δ| of the permutation matrices); *after*: "
        "cached loop from the greedy start (the default). Sweeps: before / same start / after. *obj*: "
        "Σ⟨A, P·B⟩ of before / after (higher is better). For six-model fusions *diff* is max |Δ| between the "
        "fused states of before and after. *max_iter*: sweep cap when not the default 100. *before* runs every "
        "product on one thread, as the code did; *after 1 thr* is *after* with every product on one thread too "
        "(`threaded_matmul` off: what the caller's threads add), *1-thr diff* its max |Δ| from *after*. Each "
        "case first runs *after* once more, timed as *cold* (the process's first call: thread pool start, "
        "first-touch pages; the spec's gate check is in *derive s*, not here); every other column is a warm call. "
        "*after 1 worker* (WB only): the models aligned to the barycenter one after another (`fusion.WB_WORKERS = 1`, as before the WB worker threads), its max |Δ| "
        "from *after* in *1-w diff*.",
        "",
        "| case | run | models | params/model | groups | derive s | before s | same start s | after s | "
        "after cold s | after 1 thr s | after 1 worker s | ×same start | ×after | after s / model | sweeps | diff | "
        "1-thr diff | 1-w diff | obj before → after |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|---|",
    ]

    def f(r: dict[str, Any], key: str, fmt: str = "{:.2f}") -> str:
        return fmt.format(r[key]) if key in r else "–"

    for r in rows:
        sweeps = "/".join(str(r[k]) for k in ("before_sweeps", "same_start_sweeps", "sweeps") if r.get(k))
        if "max_iter" in r:
            sweeps += f" (max_iter {r['max_iter']})"
        wm = r["kind"] == "wm"
        diff = f(r, "same_start_diff", "{:.3g}") if wm else f(r, "max_abs_diff", "{:.3g}")
        obj = f"{f(r, 'objective_before', '{:.6g}')} → {f(r, 'objective_after', '{:.6g}')}" if wm else "–"
        lines.append(
            f"| {r['case']} | {r['kind']} | {r['models']} | {r['params']:,} | {r['groups']} | {r['derive_s']:.1f} | "
            f"{f(r, 'before_s')} | {f(r, 'same_start_s')} | {r['after_s']:.2f} | {f(r, 'after_cold_s')} | "
            f"{f(r, 'after_1t_s')} | {f(r, 'after_1w_s')} | "
            f"{f(r, 'speedup_same_start', '×{:.1f}')} | {f(r, 'speedup', '×{:.1f}')} | "
            f"{r['after_s'] / r['models']:.2f} | {sweeps} | {diff} | {f(r, 'one_thread_diff', '{:.3g}')} | "
            f"{f(r, 'one_worker_diff', '{:.3g}')} | {obj} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--no-before", action="store_true", help="skip the plain implementation (no ratios)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-iter", type=int, default=100, help="sweep cap for pairs (the same for every variant)")
    p.add_argument("--tag", default="", help="suffix of the result files (speed-<tag>.*)")
    p.add_argument(
        "--plot-from", nargs="+", type=Path, help="only plot the rows of these speed*.json into speed-all.png"
    )
    add_out(p)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot_from:
        latest = {}  # a case measured again in a later file replaces the earlier row
        for f in args.plot_from:
            latest.update({(r["case"], r.get("max_iter")): r for r in json.loads(f.read_text())["rows"]})
        rows = list(latest.values())
        _plot(rows, args.out / "speed-all.png")
        return
    torch.set_num_threads(args.threads)
    meta = {
        "load_line_start": load_line(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "threads": args.threads,
        "load": " ".join(f"{v:.1f}" for v in os.getloadavg()),
    }
    print(meta["load_line_start"], flush=True)
    rows = [run_case(name, not args.no_before, args.max_iter) for name in args.cases]
    meta["load_end"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    meta["load_line_end"] = load_line()
    stem = "speed" + (f"-{args.tag}" if args.tag else "")
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (args.out / f"{stem}.md").write_text(_md(meta, rows))
    _plot(rows, args.out / f"{stem}.png")
    print(_md(meta, rows))
    print(meta["load_line_end"], flush=True)


if __name__ == "__main__":
    main()
