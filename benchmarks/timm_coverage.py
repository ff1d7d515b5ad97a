"""Does fedfuse align models it has never seen? A diverse sample of ``timm`` architectures, as a user brings them.

For each model in :data:`SAMPLE`: ``timm.create_model(name, pretrained=False, num_classes=10, **kwargs)`` (no
weights downloaded), a batch of 2 random images at a small input it runs on, constant parameters randomised
(:func:`fedfuse.align.selfcheck.break_symmetric_init`), then :func:`fedfuse.align.selfcheck.selfcheck`: derive the
spec, permute every group randomly, recover with ``match`` and ``wb``; exact means outputs equal to 1e-4.
One torch thread. Writes ``timm-coverage.md`` and ``.json`` under ``--out`` (default ``benchmarks/results``).

    python benchmarks/timm_coverage.py                    # the whole sample
    python benchmarks/timm_coverage.py resnet18d vit_tiny_patch16_224 --update
    python benchmarks/timm_coverage.py --derive-only      # spec + permutation only (fast triage)
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

# name -> (square input side, extra create_model kwargs). Sides are small but each model's own minimum
# (strides / window sizes / fixed token grids); transformers with a fixed grid get ``img_size`` set to it.
SAMPLE: dict[str, tuple[int, dict[str, Any]]] = {
    "resnet18d": (32, {}),
    "resnet26d": (32, {}),
    "seresnext26d_32x4d": (32, {}),
    "dla34": (32, {}),
    "densenet121": (32, {}),
    "inception_v3": (75, {}),
    "xception41": (32, {}),
    "hrnet_w18_small": (64, {}),
    "regnetx_002": (32, {}),
    "efficientnet_b0": (32, {}),
    "mobilenetv3_small_100": (32, {}),
    "ghostnet_100": (32, {}),
    "rexnet_100": (32, {}),
    "convnext_atto": (32, {}),
    "convnextv2_atto": (32, {}),
    "vit_tiny_patch16_224": (32, {"img_size": 32}),
    "deit_tiny_patch16_224": (32, {"img_size": 32}),
    "cait_xxs24_224": (32, {"img_size": 32}),
    "mixer_s16_224": (32, {"img_size": 32}),
    "resmlp_12_224": (32, {"img_size": 32}),
    "pit_ti_224": (64, {"img_size": 64}),
    "tnt_s_patch16_224": (32, {"img_size": 32}),
    "poolformer_s12": (32, {}),
    "levit_128s": (64, {"img_size": 64}),
    "mobilevit_xxs": (64, {}),
    "efficientformer_l1": (224, {}),
    "coat_lite_tiny": (32, {"img_size": 32}),
    "coatnet_nano_rw_224": (64, {"img_size": 64}),
    "swin_tiny_patch4_window7_224": (56, {"img_size": 56}),
}

# beyond the sample: derive + permute only (no fusion), to see what a stranger's model meets
EXTRA: dict[str, tuple[int, dict[str, Any]]] = {
    "tf_efficientnet_b0": (32, {}),  # TF "same" padding convs
    "nfnet_l0": (32, {}),  # weight-standardised convs with gains
    "dm_nfnet_f0": (64, {}),
    "fastvit_t8": (64, {}),  # channel multipliers
    "xcit_nano_12_p16_224": (32, {"img_size": 32}),  # cross-covariance attention, repeat
    "crossvit_tiny_240": (240, {}),  # two branches, stacked heads
    "eva02_tiny_patch14_224": (28, {"img_size": 28}),  # rotary embeddings, SwiGLU
    "beit_base_patch16_224": (32, {"img_size": 32}),  # computed qkv bias, relative position bias
    "gcvit_xxtiny": (224, {}),
    "maxvit_nano_rw_256": (64, {"img_size": 64}),
    "focalnet_tiny_srf": (32, {}),
    "sequencer2d_s": (32, {}),  # bidirectional LSTMs over rows/columns
    "resnest14d": (32, {}),  # split attention
    "res2net50_14w_8s": (32, {}),
    "edgenext_xx_small": (64, {}),
    "hgnetv2_b0": (64, {}),
    "repvit_m1": (64, {}),
    "lcnet_050": (32, {}),
    "tinynet_e": (32, {}),
    "mixnet_s": (32, {}),  # mixed kernel sizes (split channels)
    "cspresnet50": (64, {}),
    "vovnet39a": (64, {}),
    "selecsls42b": (64, {}),
    "visformer_tiny": (224, {}),
    "gernet_s": (64, {}),
    "convmixer_768_32": (32, {}),
    "twins_svt_small": (64, {"img_size": 64}),
    "davit_tiny": (64, {}),
    "inception_next_tiny": (64, {}),
    "fasternet_t0": (64, {}),
    "starnet_s1": (64, {}),
    "efficientvit_b0": (64, {}),
    "nest_tiny": (64, {"img_size": 64}),
    "volo_d1_224": (64, {"img_size": 64}),
    "mvitv2_tiny": (224, {}),
}


def build(name: str, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """``name`` from timm with random init (``pretrained=False``) and its example batch."""
    import timm

    side, kwargs = SAMPLE.get(name) or EXTRA.get(name) or (32, {})
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(seed))
    break_symmetric_init(model, x, seed=seed)
    return model.eval(), x


def check(name: str, seed: int = 0, methods: tuple[str, ...] = ("match", "wb")) -> dict[str, Any]:
    """Build ``name`` and run the self-check; a JSON-able record."""
    t0 = time.perf_counter()
    model, x = build(name, seed)
    res = selfcheck(model, x, methods=methods)
    return selfcheck_record(name, model, x.shape[-1], res, t0, kind="sample" if methods else "extra")


def write(rows: list[dict[str, Any]], tag: str, out: Path = RESULTS, load: str | None = None) -> Path:
    """``out/<tag>.json`` and ``.md``; ``load`` is this run's :func:`load_header` line (None: the span of the
    records' own load lines, for a report rewritten from stored records)."""
    import timm

    out.mkdir(parents=True, exist_ok=True)
    load = records_load(rows) if load is None else load
    rows = sorted(rows, key=lambda r: r["model"])
    (out / f"{tag}.json").write_text(json.dumps(rows, indent=1))
    sample = [r for r in rows if r.get("kind", "sample") == "sample"]
    extra = [r for r in rows if r.get("kind") == "extra"]
    s_derived = [r for r in sample if r["derived"]]
    s_recovered = [r for r in s_derived if r["ok"] and r["errors"]]
    lines = [
        "# timm models: derive / permute / recover",
        "",
        f"Produced by `python benchmarks/timm_coverage.py` (1 torch thread; times are inflated by other jobs on a "
        f"shared machine; torch {torch.__version__}, timm {timm.__version__}). `timm.create_model(name, pretrained=False, num_classes=10)` "
        "(no weights downloaded), batch of 2 random images at the side in the table; constant parameters "
        "randomised and BatchNorm statistics set from the batch, so outputs are O(1). Errors are "
        "max|Δ logits| / max|logits|; pass = ≤ 1e-4 for the permuted copy and for `match` and `wb` recovering it.",
        "",
        load,
        "",
        f"**Sample: {len(sample)} models checked: {len(s_derived)} derive a spec, {len(s_recovered)} of them are "
        f"permutation-invariant and recovered exactly by both `match` and `wb`; {len(sample) - len(s_derived)} "
        "are refused at derivation with one line.**",
        "",
        "Exact by construction, partial where a symmetry is not representable (those units stay fixed, never "
        "wrongly moved; see `fedfuse/align/rules/`). Heads are permuted inside (q/k dims jointly, v dims with the "
        "output projection) for timm's `Attention` (ViT, DeiT, PiT, MobileViT) and Swin's `WindowAttention` (leaf "
        "rules); attention written inline with a reshape of a fused projection (CaiT's class attention, LeViT, CoaT, "
        "EfficientFormer, TNT, XCiT, BEiT, EVA-02) keeps its q/k/v units fixed, the residual stream and MLPs move. "
        "A SwiGLU `chunk` of one projection (EVA-02) fixes that projection: EVA-02 aligns only its residual stream. "
        "Grouped convolutions keep their inputs fixed and permute outputs within each block; a module shared "
        "under two names (CoaT's position encoding) moves under every state-dict key.",
        "",
    ]
    lines += _table(sample)
    if extra:
        ok = [r for r in extra if r["derived"] and r["ok"]]
        lines += [
            "",
            f"## Beyond the sample: derive and permute only ({len(extra)} models, `--extra`)",
            "",
            f"{len(ok)} derive a spec that a random permutation leaves exact; "
            f"{sum(1 for r in extra if not r['derived'])} are refused with one line. `match`/`wb` not run here.",
            "",
        ]
        lines += _table(extra)
    total = sum(r["total_s"] for r in rows)
    lines += ["", f"Total wall time of the {len(rows)} checked models: {total:.0f} s."]
    path = out / f"{tag}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | params (M) | input | groups | permuted | match | wb | status | derive / match / wb / total s |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        if r["derived"]:
            status = "recovered" if r["ok"] else "FAILED: " + "; ".join(f"{k}: {v}" for k, v in r["failures"].items())
            if (r["permuted_err"] or 0) > 1e-4:
                status = "FAILED: a random permutation changes the outputs (wrong spec)"
            elif r["ok"] and not r["errors"]:
                status = "permutation-invariant (fusion not run)"
        else:
            status = "refused: " + r["reason"].split("; it touches")[0]
        sec = r["seconds"]
        times = " / ".join(f"{sec[k]:.1f}" if k in sec else "–" for k in ("derive", "match", "wb"))
        lines.append(
            f"| {r['model']} | {r['params_m']} | {r['input']} | {r['groups']} | {fmt_err(r['permuted_err'])} | "
            f"{fmt_err(r['errors'].get('match'))} | {fmt_err(r['errors'].get('wb'))} | {status} | {times} / "
            f"{r['total_s']:.1f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="timm model names (default: the sample)")
    ap.add_argument("--tag", default="timm-coverage")
    ap.add_argument("--update", action="store_true", help="re-check the named models in the existing results")
    ap.add_argument("--derive-only", action="store_true", help="derive and permute only (no fusion)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the stored records")
    ap.add_argument("--extra", action="store_true", help="also derive/permute the EXTRA models (no fusion)")
    add_out(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    old = args.out / f"{args.tag}.json"
    start = load_line()
    print(start, flush=True)
    rows = json.loads(old.read_text()) if (args.update or args.report_only) and old.exists() else []
    fusion = () if args.derive_only else ("match", "wb")
    names = args.models or list(SAMPLE) + (list(EXTRA) if args.extra else [])
    for name in [] if args.report_only else names:
        rows = [r for r in rows if r["model"] != name]
        rows.append(check(name, methods=() if name in EXTRA else fusion))
        r = rows[-1]
        print(
            f"{name}: ok={r['ok']} derived={r['derived']} groups={r['groups']} perm={fmt_err(r['permuted_err'])} "
            f"{r['errors']} {r['failures']} {r['seconds']} {r['reason'][:200]}",
            flush=True,
        )
        if not args.derive_only:
            write(rows, args.tag, args.out, load_header(start, load_line()))
    end = load_line()
    print(end, flush=True)
    if not args.derive_only:
        print(write(rows, args.tag, args.out, None if args.report_only else load_header(start, end)))


if __name__ == "__main__":
    main()
