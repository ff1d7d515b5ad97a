"""``fedfuse lmc`` and ``fedfuse merge``: the commands that work on saved model files (no Flower involved).

    fedfuse lmc runs/a/model.pt runs/b/model.pt --align --layerwise --out runs/lmc
    fedfuse merge a.pt b.pt c.pt --model mlp --method all --repair --test-data digits --out runs/merge

Parsers and handlers only; the work is in :mod:`fedfuse.lmc` and :mod:`fedfuse.merge`. ``fedfuse.cli`` adds the
parsers and turns ConfigError into one line with exit code 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fedfuse.catalog import LORA_SCALES
from fedfuse.config import OPTIONS, validate_config
from fedfuse.errors import ConfigError

__all__ = ["add_lmc_parser", "add_merge_parser", "run_lmc", "run_merge"]


def add_lmc_parser(sub: Any) -> None:
    """``fedfuse lmc A.pt B.pt``: barriers between two saved models (see :func:`run_lmc`)."""
    p = sub.add_parser("lmc", help="linear mode connectivity of two saved models: full, layer-wise, cumulative")
    p.add_argument("model_a", metavar="A.pt", help="state dict (model.pt, clients/round<R>/partition<P>.pt, ...)")
    p.add_argument("model_b", metavar="B.pt")
    p.add_argument("--model", default=None, help="mlp, cnn, ..., torchvision:NAME, timm:NAME or package.module:factory")
    for name in ("dataset", "width", "depth", "group-norm", "data-root", "seed"):
        opt = OPTIONS[name]
        p.add_argument(f"--{name}", dest=name, default=None, metavar=opt.type.__name__.upper(), help=opt.help)
    p.add_argument("--batch-norm", dest="batch-norm", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--align", action="store_true", help="also the barrier after aligning B to A (weight matching)")
    p.add_argument("--layerwise", action="store_true", help="per-layer barriers (one group interpolated)")
    p.add_argument("--cumulative", action="store_true", help="cumulative barriers: shallow, deep, random order")
    p.add_argument("--bn-reset", action="store_true", help="recompute BatchNorm statistics at every α")
    p.add_argument("--num-points", type=int, default=11, help="α grid size (default 11)")
    p.add_argument("--samples", type=int, default=2000, help="test samples used (0 = all; default 2000)")
    p.add_argument(
        "--test-data",
        default=None,
        metavar="FILE.npz",
        help="labelled .npz (arrays x, y) to measure on instead of --dataset's test split",
    )
    _add_lora_flags(p)
    p.add_argument("--out", required=True, help="directory for lmc.json and the plots")
    p.add_argument("--overwrite", action="store_true", help="replace a previous lmc's files in --out")


def add_merge_parser(sub: Any) -> None:
    """``fedfuse merge A.pt B.pt …`` or ``fedfuse merge recipe.yml``: see :mod:`fedfuse.merge.parents`."""
    p = sub.add_parser(
        "merge",
        help="merge N trained state dicts into one model; compare with the parents, their average and ensemble",
        epilog="examples:\n  fedfuse merge a.pt b.pt c.pt --model mlp --method all --repair --test-data digits "
        "--out runs/merge\n  fedfuse merge recipe.yml --out runs/merge   # mergekit-style recipe",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = "state dicts, PEFT adapter directories (with --lora-base), or one recipe.yml"
    p.add_argument("parents", nargs="*", metavar="A.pt", help=what)
    p.add_argument("--recipe", default=None, metavar="YAML", help="mergekit-style recipe (models, merge_method, ...)")
    p.add_argument("--model", default=None, help="mlp, cnn, ..., torchvision:NAME, timm:NAME or package.module:factory")
    ints = {
        "width": "hidden width (0 = the model's default)", "depth": "hidden layers (0 = default)",
        "num-classes": "model outputs (default: the data set's, or max label + 1 of an .npz)",
        "seed": "seed of distillation and matching (default 0)", "data-samples": "inputs used of --data and "
        "--distill-data (0 = all; default 1000)", "distill-epochs": "default 20", "distill-batch-size": "default 64",
    }  # fmt: skip
    for flag, text in ints.items():
        p.add_argument(f"--{flag}", type=int, default=None, metavar="INT", help=text)
    p.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=None, help="BatchNorm in CNN/ResNet")
    p.add_argument(
        "--group-norm", type=int, default=None, metavar="INT", help="GroupNorm groups in CNN/ResNet (0 = off)"
    )
    p.add_argument("--method", default=None, help="comma-separated fuse methods or all (default: all)")
    p.add_argument("--repair", action="store_const", const=True, default=None, help="each method also with REPAIR")
    p.add_argument("--test-data", default=None, metavar="FILE|DATASET", help="labelled .npz (x, y) or data set name")
    p.add_argument("--data", default=None, metavar="FILE|DATASET", help="inputs for activation methods and REPAIR")
    p.add_argument(
        "--distill-data",
        default=None,
        metavar="FILE|DATASET|synthetic",
        help="inputs to distil each method on (FedDF); synthetic = N(0, 1) noise, data-free",
    )
    p.add_argument("--distill-lr", type=float, default=None, metavar="FLOAT", help="Adam learning rate (default 1e-3)")
    p.add_argument("--data-root", default=None, metavar="DIR", help="directory with data files (mnist10k)")
    p.add_argument(
        "--weights",
        type=float,
        nargs="+",
        default=None,
        metavar="W",
        help="one per parent (default 1 each: equal, unlike a federated round's num-examples weights)",
    )
    _add_lora_flags(p)
    p.add_argument("--save", default=None, metavar="VARIANT", help="variant written as model.pt (default: best)")
    p.add_argument("--dtype", default=None, help="saved model dtype: float32, float16, bfloat16")
    p.add_argument("--out", default=None, help="directory for model.pt, merge.json, merge.png")
    p.add_argument("--overwrite", action="store_const", const=True, default=None, help="replace a non-empty --out")


def _add_lora_flags(p: argparse.ArgumentParser) -> None:
    """--lora-alpha / --lora-scale: how a LoRA model file (adapters on a base) is folded into its plain model;
    --lora-base: the base a PEFT adapter directory is folded onto."""
    p.add_argument("--lora-alpha", type=float, default=None, metavar="FLOAT",
                   help="LoRA files (adapters + base, fedfuse's or PEFT's) are folded, W = W0 + s*B*A with s = "
                        "alpha / r; alpha as trained (default 4, fedfuse's; PEFT's lora_alpha)")  # fmt: skip
    p.add_argument("--lora-scale", default=None, help=f"{' or '.join(LORA_SCALES)}: s = alpha/r or alpha/sqrt(r)")
    p.add_argument("--lora-base", default=None, metavar="FILE",
                   help="the base model's state dict, for models given as PEFT save_pretrained directories "
                        "(adapters only; alpha and scale from their adapter_config.json)")  # fmt: skip


LMC_FILES = ("lmc.json", "curve.png", "layerwise.png", "cumulative.png")


def _lmc_inputs(
    args: argparse.Namespace, cfg: dict[str, Any], model: str, factory: bool
) -> tuple[Any, Any, Any, Any, Any]:
    """(template, state A, state B, test inputs, BatchNorm-reset pool) for ``fedfuse lmc``: a built-in model on
    ``--dataset``'s test split, or, for ``--test-data FILE.npz`` or a ``package.module:factory`` model
    (``factory``), the inputs and template ``fedfuse merge`` reads (:mod:`fedfuse.merge.inputs`)."""
    from fedfuse.checkpoint import read_state_dict
    from fedfuse.experiment import dataset_for, model_for
    from fedfuse.lora.fold import is_peft_dir
    from fedfuse.merge.inputs import (
        Inputs,
        build_template,
        check_fits,
        load_inputs,
        load_parent,
        load_peft_parent,
        lora_folder,
    )
    from fedfuse.merge.parents import MergeRequest  # its LoRA defaults: fedfuse's own run defaults

    lora = (MergeRequest.lora_alpha if args.lora_alpha is None else args.lora_alpha,
            args.lora_scale or MergeRequest.lora_scale)  # fmt: skip
    if not args.test_data and not factory:
        ds = dataset_for(cfg)
        template = model_for(cfg, ds)
        fold, base = lora_folder(*lora, template), _lora_base(args, template)
        a, b = (
            load_peft_parent(p, template, base)
            if is_peft_dir(p)
            else read_state_dict(p, template.state_dict(), adapt=fold)
            for p in (args.model_a, args.model_b)
        )
        return template, a, b, Inputs(ds.x_test, ds.y_test, f"{cfg['dataset']} (test split)"), ds.x_train
    spec, flag = (args.test_data, "test-data") if args.test_data else (str(cfg["dataset"]), "dataset")
    kw = {"data_root": str(cfg["data-root"]), "seed": int(cfg["seed"])}
    test = load_inputs(spec, flag=flag, labelled=True, **kw)
    shape = tuple(test.x.shape[1:])
    num_classes = test.num_classes or int(test.y.max()) + 1  # type: ignore[union-attr]
    template = build_template(model, shape, num_classes, width=int(cfg["width"]), depth=int(cfg["depth"]),
                              batch_norm=bool(cfg["batch-norm"]), seed=int(cfg["seed"]),
                              group_norm=int(cfg["group-norm"]))  # fmt: skip
    test = check_fits(template, test, flag, model, shape)
    base = _lora_base(args, template)
    a, b = (load_parent(p, template, model, shape, *lora, None, base) for p in (args.model_a, args.model_b))
    pool = load_inputs(spec, flag=flag, labelled=False, split="train", **kw).x if test.num_classes else test.x
    return template, a, b, test, pool.reshape(len(pool), *shape)


def _lora_base(args: argparse.Namespace, template: Any) -> Any:
    """--lora-base read against the plain ``template`` (None when not given)."""
    from fedfuse.checkpoint import read_state_dict

    return read_state_dict(args.lora_base, template.state_dict(), what="lora-base") if args.lora_base else None


def run_lmc(args: argparse.Namespace) -> None:
    """Full barrier (and after alignment), per-layer and cumulative barriers of A ↔ B on the test data;
    writes ``lmc.json`` + ``curve.png`` (+ ``layerwise.png``, ``cumulative.png``) into ``--out``, which must be
    empty or hold only a previous lmc's files (replaced with ``--overwrite``); nothing is written before every
    barrier is measured."""
    from dataclasses import asdict

    from fedfuse import lmc
    from fedfuse.models import library_of
    from fedfuse.results import atomic_write_bytes, check_replaceable
    from fedfuse.validation import non_finite

    names = ("dataset", "width", "depth", "data-root", "seed", "batch-norm", "group-norm")
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    model = args.model or str(OPTIONS["model"].default)
    factory = ":" in model and library_of(model) is None
    # core options only (no strategy); a user's package.module:factory is checked where it is built
    cfg = validate_config(given if factory or args.model is None else {**given, "model": args.model})
    if args.num_points < 2 or args.samples < 0:
        raise ConfigError(f"num-points={args.num_points} must be >= 2 and samples={args.samples} >= 0")
    out = Path(args.out)
    check_replaceable(out, bool(args.overwrite), LMC_FILES, "lmc")
    template, state_a, state_b, test, pool = _lmc_inputs(args, cfg, model, factory)
    for which, path, state in (("A", args.model_a, state_a), ("B", args.model_b, state_b)):
        bad = non_finite(state)
        if bad is not None:
            raise ConfigError(f"model {which} {path!r}: {bad[0]!r} holds {bad[1]} NaN or inf values; allowed: finite")
    n = min(args.samples, len(test.y)) or len(test.y)
    x, y = test.x[:n], test.y[:n]
    kw: dict[str, Any] = {"num_points": args.num_points, "bn_reset_data": pool[:1024] if args.bn_reset else None}
    full = lmc.barrier(template, state_a, state_b, x, y, align=args.align, **kw)
    config = {**given, **({"model": model} if args.model else {})}
    if args.test_data:
        config["test-data"] = test.label
    report: dict[str, Any] = {"a": args.model_a, "b": args.model_b, "config": config, "samples": n, "full": full}
    line = f"full barrier (loss, max over α): {full['before']['max_loss']:.4f}"
    if full["after"] is not None:
        line += f"; after aligning B to A (weight matching): {full['after']['max_loss']:.4f}"
    print(line)
    layerwise = cumulative = None
    if args.layerwise:
        layerwise = lmc.layerwise_barriers(template, state_a, state_b, x, y, **kw)
        report["layerwise"] = asdict(layerwise)
        for g in layerwise.groups:
            print(f"  {g.group}: {g.base_a.max_loss:.4f} (others from A), {g.base_b.max_loss:.4f} (from B)")
    if args.cumulative:
        cumulative = {
            o: lmc.cumulative_barriers(template, state_a, state_b, x, y, order=o, seed=cfg["seed"], **kw)
            for o in lmc.ORDERS
        }
        report["cumulative"] = {o: asdict(r) for o, r in cumulative.items()}
    out.mkdir(parents=True, exist_ok=True)
    for name in LMC_FILES:  # a previous lmc's files (--overwrite): none of them outlives this run
        (out / name).unlink(missing_ok=True)
    curves = {"A → B": full["before"]["curve"]}
    if full["after"] is not None:
        curves["A → aligned B"] = full["after"]["curve"]
    lmc.plot_curve(curves, out / "curve.png")
    if layerwise is not None:
        lmc.plot_layerwise(layerwise, out / "layerwise.png")
    if cumulative is not None:
        lmc.plot_cumulative(cumulative, out / "cumulative.png")
    atomic_write_bytes(out / "lmc.json", json.dumps(report, indent=2).encode())
    print(
        f"results in {out}/ (lmc.json, curve.png{', layerwise.png' if args.layerwise else ''}"
        f"{', cumulative.png' if args.cumulative else ''})"
    )


def run_merge(args: argparse.Namespace) -> None:
    from fedfuse.merge.parents import merge
    from fedfuse.merge.recipe import build_request

    parents, recipe = list(args.parents), args.recipe
    if recipe is None and len(parents) == 1 and parents[0].endswith((".yml", ".yaml")):
        parents, recipe = [], parents[0]
    names = ("model", "width", "depth", "num_classes", "seed", "data_samples", "distill_epochs", "distill_batch_size",
             "batch_norm", "group_norm", "repair", "test_data", "data", "distill_data", "distill_lr", "data_root",
             "weights", "save", "dtype", "out", "overwrite", "lora_alpha", "lora_scale", "lora_base")  # fmt: skip
    given = {k: getattr(args, k) for k in names}
    given.update(parents=parents or None, methods=args.method.split(",") if args.method is not None else None)
    report = merge(build_request(given, recipe))
    print(f"results in {args.out}/ (model.pt = {report['saved']['variant']}, merge.json, merge.png)")
