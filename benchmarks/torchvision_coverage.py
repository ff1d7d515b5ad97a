"""Which torchvision classifiers fedfuse aligns exactly: derive, permute, recover with ``match`` and ``wb``.

For every name in ``torchvision.models.list_models(module=torchvision.models)``: build it (random init,
``num_classes=10``, the smallest input it runs on, batch 2), make the check meaningful
(:func:`fedfuse.align.selfcheck.break_symmetric_init`), then :func:`fedfuse.align.selfcheck.selfcheck`.
One torch thread. Writes ``torchvision-coverage.md`` and ``.json`` under ``--out`` (default ``benchmarks/results``).

    python benchmarks/torchvision_coverage.py                 # all models
    python benchmarks/torchvision_coverage.py resnet18 vit_b_16
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

from benchmarks.common import RESULTS, add_out, fmt_err, load_header, load_line, records_load, selfcheck_record  # noqa: E402
from fedfuse.align.selfcheck import break_symmetric_init, selfcheck
from fedfuse.models.torchvision_models import build_torchvision, check_input_size, torchvision_names


def check(
    name: str, seed: int = 0, methods: tuple[str, ...] = ("match", "wb"), float64: bool | None = None
) -> dict[str, Any]:
    """Build ``name`` and run the self-check with ``methods``; a JSON-able record."""
    t0 = time.perf_counter()
    s = check_input_size(name)
    model = build_torchvision(name, (3, s, s), 10, seed=seed)
    x = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(seed))
    break_symmetric_init(model, x, seed=seed)
    res = selfcheck(model, x, methods=methods, float64=float64)
    return selfcheck_record(name, model, s, res, t0)


def write(rows: list[dict[str, Any]], tag: str, out: Path = RESULTS, load: str | None = None) -> Path:
    """``out/<tag>.json`` and ``.md``; ``load`` is this run's :func:`load_header` line (None: the span of the
    records' own load lines, for a report rewritten from stored records)."""
    out.mkdir(parents=True, exist_ok=True)
    load = records_load(rows) if load is None else load
    rows = sorted(rows, key=lambda r: r["model"])
    (out / f"{tag}.json").write_text(json.dumps(rows, indent=1))
    derived = [r for r in rows if r["derived"]]
    recovered = [r for r in derived if r["ok"]]
    partial = [r for r in derived if not r["ok"] and _not_run(r) and not r["failures"]]
    lines = [
        "# torchvision classifiers: derive / permute / recover",
        "",
        f"Produced by `python benchmarks/torchvision_coverage.py` (1 torch thread; times are inflated by other jobs "
        f"on a shared machine; torch {torch.__version__}). Each model's record is one `check()`; runs may be resumed with `--update`. Random init, `num_classes=10`, batch of 2 at the smallest input each model "
        "runs on; constant parameters (zero-init heads, layer scales) randomised and BatchNorm statistics set "
        "from the batch, so outputs are O(1). Errors are max|Δ logits| / max|logits|; pass = ≤ 1e-4.",
        "",
        load,
        "",
        f"**{len(rows)} models checked: {len(derived)} derive a spec, {len(recovered)} of them are permutation-invariant "
        f"and recovered exactly by both `match` and `wb`; {len(rows) - len(derived)} are refused at derivation "
        "with one line (below)"
        + (
            f"; {len(partial)} checked with one method only ({', '.join(r['model'] for r in partial)}: the other "
            "did not fit in this machine's memory)"
            if partial
            else ""
        )
        + ".**",
        "",
        "Exact by construction, partial where a symmetry is not representable (those units stay fixed, never "
        "wrongly moved; see `fedfuse/align/rules/`): grouped convolutions (ResNeXt, RegNet) keep their input "
        "channels fixed and permute outputs within each block; RegNet-Y's squeeze-excitation scale meets a grouped "
        "conv's per-block groups, so both stay fixed; ShuffleNet's channel shuffle and MaxViT's q/k/v `chunk` cut "
        "through a group, which fixes it; attention permutes dims within each head (q/k jointly, v with the "
        "output projection), never whole heads.",
        "",
        "| model | params (M) | input | groups | permuted | match | wb | status | derive / match / wb / total s |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        if r["derived"]:
            status = "recovered" if r["ok"] else "FAILED: " + "; ".join(f"{k}: {v}" for k, v in r["failures"].items())
            if r in partial:
                exact = all(e <= 1e-4 for e in r["errors"].values()) and r["permuted_err"] <= 1e-4
                status = (
                    f"{'exact' if exact else 'FAILED'} by {', '.join(r['errors'])}; {', '.join(_not_run(r))} not run"
                )
        else:
            status = "refused: " + r["reason"].split("; it touches")[0]
        sec = r["seconds"]
        times = " / ".join(f"{sec[k]:.1f}" if k in sec else "–" for k in ("derive", "match", "wb"))
        lines.append(
            f"| {r['model']} | {r['params_m']} | {r['input']} | {r['groups']} | {fmt_err(r['permuted_err'])} | "
            f"{fmt_err(r['errors'].get('match'))} | {fmt_err(r['errors'].get('wb'))} | {status} | {times} / {r['total_s']:.1f} |"
        )
    missing = sorted(set(torchvision_names()) - {r["model"] for r in rows})
    for name in missing:
        lines.append(f"| {name} | | | | | | | not run in this session (time) | |")
    total = sum(r["total_s"] for r in rows)
    lines += ["", f"Total wall time of the {len(rows)} checked models: {total:.0f} s; {len(missing)} not run."]
    lines += [
        "",
        "CPU seconds and peak RSS of the models marked `huge` (not run in CI): `torchvision-coverage-huge.md`.",
    ]
    path = out / f"{tag}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _not_run(r: dict[str, Any]) -> list[str]:
    """The recovery methods a record has no result for."""
    return [m for m in ("match", "wb") if m not in r["errors"] and m not in r["failures"]]


def _merge(stored: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new`` with the methods it did not run taken from ``stored`` (same model, same derivation); ``ok`` only
    when both methods are present and pass."""
    if not new["derived"]:
        return new
    out = dict(new)
    if stored is not None and stored["derived"] and stored["groups"] == new["groups"]:
        for key in ("errors", "failures", "seconds"):
            out[key] = {**stored[key], **new[key]}
        if (set(stored["errors"]) | set(stored["failures"])) - set(new["errors"]) - set(new["failures"]):
            out["total_s"] = round(stored["total_s"] + new["total_s"], 2)  # a method kept from the stored run
    ran = set(out["errors"]) | set(out["failures"])
    rtol = 1e-4  # selfcheck's default
    out["ok"] = (
        ran >= {"match", "wb"}
        and out["permuted_err"] is not None
        and out["permuted_err"] <= rtol
        and not out["failures"]
        and all(e <= rtol for e in out["errors"].values())
    )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="model names (default: all torchvision classifiers)")
    ap.add_argument("--tag", default="torchvision-coverage")
    ap.add_argument("--update", action="store_true", help="re-check the named models in the existing results")
    ap.add_argument("--merge", nargs="*", default=[], help="tags of other runs whose records to take in")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the stored records")
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["match", "wb"],
        choices=["match", "wb"],
        help="recover with these only; with --update a model's other methods are kept from its stored record "
        "(one method per process for models whose two checks do not fit in memory together)",
    )
    ap.add_argument(
        "--float64",
        action="store_true",
        help="compare outputs in float64 at any size (selfcheck does above 150M parameters only in float32, whose "
        "rounding in a deep, wide model can exceed the 1e-4 tolerance by itself; costs one float64 network)",
    )
    add_out(ap)
    args = ap.parse_args(argv)
    args.update = args.update or args.report_only
    torch.set_num_threads(1)
    old = args.out / f"{args.tag}.json"
    start = load_line()
    print(start, flush=True)
    rows = json.loads(old.read_text()) if args.update and old.exists() else []
    for tag in args.merge:  # records of another (parallel) run of this script
        extra = json.loads((args.out / f"{tag}.json").read_text())
        rows = [r for r in rows if r["model"] not in {e["model"] for e in extra}] + extra
    for name in [] if args.report_only else args.models or torchvision_names():
        stored = [r for r in rows if r["model"] == name]
        rows = [r for r in rows if r["model"] != name]
        rows.append(
            _merge(
                stored[0] if stored else None, check(name, methods=tuple(args.methods), float64=args.float64 or None)
            )
        )
        r = rows[-1]
        print(f"{name}: ok={r['ok']} derived={r['derived']} {r['seconds']} {r['reason'][:120]}", flush=True)
        write(rows, args.tag, args.out, load_header(start, load_line()))
    end = load_line()
    print(end, flush=True)
    print(write(rows, args.tag, args.out, None if args.report_only else load_header(start, end)))


if __name__ == "__main__":
    main()
