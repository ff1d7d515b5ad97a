"""``fedfuse merge``: N trained parents → one model, measured against the parents, their average and their ensemble.

:func:`prepare` reads and checks everything (model, parents, data, methods, output directory) and writes nothing;
:func:`run` fuses and evaluates; :func:`write` puts ``model.pt``, ``merge.png`` and ``merge.json`` into ``out``
(a new ``out`` at once: a hidden sibling renamed into place; nothing is written before every input is checked).

With ``λ`` the normalised weights and ``f_i`` the parents (accuracy on the labelled test data):

* ``parents``: each ``f_i``;
* ``average``: the plain weighted average ``Σ λ_i θ_i`` (no alignment, no BatchNorm reset);
* ``ensemble``: the **logit ensemble** ``argmax Σ λ_i f_i(x)`` (λ-averaged logits, as FedDF distils; it keeps N
  models, so it is the mark a single merged model aims at, not a model written out);
* ``methods``: every variant asked for: ``fuse(parents, λ, method=m, template, data=X, bn_repair=…)`` for each
  ``m`` (``all`` = :data:`fedfuse.align.fusion.METHODS` read at run time), ``m+repair`` (REPAIR, Jordan et al.
  2023) with ``repair``, ``m+distill`` / ``m+repair+distill`` (FedDF distillation of the fused model toward the
  parents' logit ensemble, :func:`fedfuse.merge.distill.distill`) with distillation data (``synthetic``: the
  data-free case, ``data_samples`` Gaussian N(0, 1) inputs shaped like the test samples). ``X`` (the inputs
  activation-based methods and REPAIR look at) is ``data``, else the distillation data, else the training split
  of a built-in test data set; with ``X`` a plain ``m`` on a BatchNorm model resets the BN statistics on ``X``
  (``bn_repair="auto"``).

``seconds``: wall time of each variant (a ``+distill`` one includes the fusion it starts from). With ``all``, a
method that cannot take the model (it raises ConfigError) is listed in ``skipped`` with the reason; a method named
explicitly stops the merge with that line instead.

``model.pt`` is the variant named by ``save``, or else the variant with the best test accuracy *(chosen on the
test data, so that number is optimistic for the chosen one; hold out other data to report it)*, cast to
``dtype`` when given (its accuracy after the cast is ``saved.accuracy`` in ``merge.json``).
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fedfuse.catalog import LORA_ALPHA
from fedfuse.checkpoint import read_state_dict
from fedfuse.errors import ConfigError, RunFailedError
from fedfuse.merge.inputs import Inputs, build_template, check_fits, load_inputs, load_parent

__all__ = ["MergeRequest", "Prepared", "prepare", "run", "write", "merge", "resolve_methods", "DTYPES"]

SYNTHETIC = "synthetic"  # --distill-data synthetic: the data-free case
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OUT_FILES = ("model.pt", "merge.json", "merge.png")


@dataclass
class MergeRequest:
    """Everything ``fedfuse merge`` is asked (the CLI flags, or a mergekit-style recipe, see
    :mod:`fedfuse.merge.recipe`)."""

    parents: list[str]
    out: str
    model: str = "mlp"
    test_data: str = "digits"  # the CLI and recipes require it (build_request)
    methods: list[str] = field(default_factory=lambda: ["all"])
    weights: list[float] | None = None
    repair: bool = False
    data: str | None = None
    distill_data: str | None = None
    data_root: str = ""
    width: int = 0
    depth: int = 0
    batch_norm: bool = False
    group_norm: int = 0
    num_classes: int = 0
    seed: int = 0
    data_samples: int = 1000
    distill_epochs: int = 20
    distill_lr: float = 1e-3
    distill_batch_size: int = 64
    save: str | None = None
    dtype: str | None = None
    reference: int | None = None
    overwrite: bool = False
    lora_alpha: float = LORA_ALPHA  # LoRA parents: s = alpha / r (standard) or alpha / √r (rslora); fedfuse's default
    lora_scale: str = "standard"
    lora_base: str | None = None  # PEFT adapter directories (save_pretrained): the base model's state dict


@dataclass
class Prepared:
    """A checked request: the template module, the parents' states and the data, ready to :func:`run`."""

    req: MergeRequest
    template: nn.Module
    states: list[dict[str, Tensor]]
    weights: list[float]
    test: Inputs
    align: Inputs | None
    distill: Inputs | None
    variants: list[tuple[str, str, bool, bool]]  # (name, method, repair, distill)
    lora_folded: list[bool] = field(default_factory=list)  # per parent: a LoRA model folded into its plain one


def resolve_methods(names: Sequence[str]) -> list[str]:
    """Method names checked against :data:`fedfuse.align.fusion.METHODS` as it is now; ``all`` = every one."""
    from fedfuse.align import fusion

    available = list(fusion.METHODS)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ConfigError(f"method is empty; allowed: {', '.join(available)}, all")
    for n in names:
        if n != "all" and n not in available:
            raise ConfigError(f"method={n!r} is not supported; allowed: {', '.join(available)}, all")
    out: list[str] = []
    for n in available if "all" in names else names:
        if n not in out:
            out.append(n)
    return out


def _variants(methods: list[str], repair: bool, distill: bool) -> list[tuple[str, str, bool, bool]]:
    """Each method without and with every option given: ``m``, ``m+repair``, ``m+distill``, ``m+repair+distill``."""
    out = []
    for m in methods:
        for r in (False, True) if repair else (False,):
            for d in (False, True) if distill else (False,):
                out.append((m + ("+repair" if r else "") + ("+distill" if d else ""), m, r, d))
    return out


def prepare(req: MergeRequest) -> Prepared:
    """Every check that can fail, in order: output dir, methods, data, model, parents; nothing is written."""
    from fedfuse.align.fusion import DATA_METHODS
    from fedfuse.results import check_replaceable
    from fedfuse.state import normalise_weights

    out = Path(req.out)
    check_replaceable(out, req.overwrite, OUT_FILES, "merge")
    if len(req.parents) < 2:
        raise ConfigError(f"merge needs at least 2 parent state dicts, got {len(req.parents)}")
    methods = resolve_methods(req.methods)
    if req.dtype is not None and req.dtype not in DTYPES:
        raise ConfigError(f"dtype={req.dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    if req.data_samples < 0:
        raise ConfigError(f"data-samples={req.data_samples} must be >= 0 (0 = all)")
    for flag, value in (("distill-epochs", req.distill_epochs), ("distill-batch-size", req.distill_batch_size)):
        if not value >= 1:
            raise ConfigError(f"{flag}={value} is out of range; allowed: >= 1")
    if not req.distill_lr > 0:
        raise ConfigError(f"distill-lr={req.distill_lr} is out of range; allowed: > 0")
    if req.weights is not None:
        if len(req.weights) != len(req.parents):
            raise ConfigError(f"weights: {len(req.weights)} given for {len(req.parents)} parents; give one each")
        if any(not w >= 0 for w in req.weights) or sum(req.weights) <= 0:
            raise ConfigError(f"weights={req.weights} must be >= 0 with a positive sum")
    if req.reference is not None and not 0 <= req.reference < len(req.parents):
        raise ConfigError(f"reference={req.reference} is not a parent index (0..{len(req.parents) - 1})")
    test = load_inputs(req.test_data, flag="test-data", labelled=True, data_root=req.data_root, seed=req.seed)
    kw = {"labelled": False, "split": "train", "data_root": req.data_root, "seed": req.seed}
    synthetic = req.distill_data == SYNTHETIC
    real = req.distill_data and not synthetic
    distill = load_inputs(req.distill_data, flag="distill-data", **kw) if real else None  # type: ignore[arg-type]
    if synthetic:  # data-free: N(0, 1) inputs shaped like the test samples (fedfuse's data sets are standardised)
        from fedfuse.merge.distill import synthetic_inputs

        x = synthetic_inputs(req.data_samples or 1000, shape=tuple(test.x.shape[1:]), seed=req.seed)
        distill = Inputs(x, None, "synthetic N(0, 1)")
    align = load_inputs(req.data, flag="data", **kw) if req.data else distill
    if align is None and test.num_classes is not None:  # a built-in test set: its training split
        align = load_inputs(req.test_data, flag="test-data", **kw)
    needs = [m for m in methods if m in DATA_METHODS] + (["--repair"] if req.repair else [])
    if needs and align is None:
        raise ConfigError(
            f"{', '.join(needs)} {'needs' if len(needs) == 1 else 'need'} inputs to look at; pass --data FILE.npz "
            "(array x) or a data set name"
        )
    num_classes = req.num_classes or test.num_classes or int(test.y.max()) + 1  # type: ignore[union-attr]
    shape = tuple(test.x.shape[1:])
    template = build_template(
        req.model,
        shape,
        num_classes,
        width=req.width,
        depth=req.depth,
        batch_norm=req.batch_norm,
        seed=req.seed,
        group_norm=req.group_norm,
    )
    test = check_fits(template, test, "test-data", req.model, shape)
    n = req.data_samples
    if align is not None:
        align = check_fits(template, align, "data", req.model, shape)
        align = Inputs(align.x[: n or None], None, align.label)
    if distill is not None:
        distill = check_fits(template, distill, "distill-data", req.model, shape)
        distill = Inputs(distill.x[: n or None], None, distill.label)
    folded: list[bool] = []
    base = read_state_dict(req.lora_base, template.state_dict(), what="lora-base") if req.lora_base else None
    states = [load_parent(p, template, req.model, shape, req.lora_alpha, req.lora_scale, folded, base)
              for p in req.parents]  # fmt: skip
    variants = _variants(methods, req.repair, distill is not None)
    if req.save is not None and req.save not in [v[0] for v in variants]:
        raise ConfigError(
            f"save={req.save!r} is not among the variants run; allowed: {', '.join(v[0] for v in variants)}"
        )
    weights = normalise_weights(req.weights, len(states))
    return Prepared(req, template, states, weights, test, align, distill, variants, folded)


def _net(template: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    net = copy.deepcopy(template)
    net.load_state_dict(state)
    return net.eval()


def accuracy(template: nn.Module, state: dict[str, Tensor], data: Inputs) -> float:
    """Test accuracy of ``template`` loaded with ``state``."""
    from fedfuse.train import evaluate

    return float(evaluate(_net(template, state), data.x, data.y)[1])  # type: ignore[arg-type]


def run(p: Prepared, log: Any = print) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Fuse and evaluate every variant; returns (the ``merge.json`` report, the state dict to save)."""
    from fedfuse.align.fusion import fuse
    from fedfuse.merge.distill import distill, ensemble_logits
    from fedfuse.state import weighted_average

    req, t = p.req, p.template
    parents = [accuracy(t, s, p.test) for s in p.states]
    average = accuracy(t, weighted_average(p.states, p.weights, ref=0), p.test)
    teachers = [_net(t, s) for s in p.states]
    with torch.no_grad():
        z = torch.cat([ensemble_logits(teachers, xb, p.weights) for xb in p.test.x.split(1024)])
    ensemble = int((z.argmax(1) == p.test.y).sum()) / len(z)  # type: ignore[operator]
    x = p.align.x if p.align is not None else None
    bn_reset = x is not None and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in t.modules())
    plain = "average (BatchNorm statistics averaged too)" if bn_reset else "average"
    log(f"parents {', '.join(f'{a:.4f}' for a in parents)}; {plain} {average:.4f}; logit ensemble {ensemble:.4f}")
    if bn_reset:  # fuse(bn_repair="auto") re-estimates them on the data: the method "average" differs from the above
        log("every method below re-estimates BatchNorm statistics on --data")
    results: dict[str, float] = {}
    seconds: dict[str, float] = {}
    skipped: dict[str, str] = {}
    fused: dict[str, dict[str, Tensor]] = {}
    for name, method, rep, dist in p.variants:
        start = time.perf_counter()
        base = name.removesuffix("+distill")
        if dist and base in skipped:
            skipped[name] = skipped[base]
            continue
        if dist:
            student = _net(t, fused[base])
            state = distill(student, teachers, p.distill.x, epochs=req.distill_epochs, lr=req.distill_lr,  # type: ignore[union-attr]
                            batch_size=req.distill_batch_size, seed=req.seed, weights=p.weights)  # fmt: skip
            seconds[name] = seconds[base] + time.perf_counter() - start
        else:
            try:
                state = fuse(p.states, p.weights, method=method, template=t, data=x, init=req.reference,  # type: ignore[assignment]
                             bn_repair="repair" if rep else "auto", seed=req.seed)  # fmt: skip
            except ConfigError as exc:  # this method cannot take this model: `all` goes on, a named method stops
                if "all" not in req.methods:
                    raise ConfigError(f"method={method!r} on model={req.model!r}: {exc}") from None
                skipped[name] = str(exc)
                log(f"{name}: skipped ({exc})")
                continue
            except Exception as exc:  # noqa: BLE001 — a failed fusion: one line (exit 1), nothing written
                raise RunFailedError(f"{name} failed ({type(exc).__name__}: {exc}); nothing written") from None
            seconds[name] = time.perf_counter() - start
        fused[name] = state
        results[name] = accuracy(t, state, p.test)
        log(f"{name}: {results[name]:.4f} ({seconds[name]:.2f} s)")
    if not results:
        raise ConfigError(f"no method could merge model={req.model!r}: {next(iter(skipped.values()))}")
    if req.save in skipped:
        raise ConfigError(f"save={req.save!r} was skipped: {skipped[req.save]}")
    chosen = req.save or max(results, key=lambda k: results[k])
    state = fused[chosen]
    if req.dtype is not None:
        state = {k: v.to(DTYPES[req.dtype]) if v.is_floating_point() else v for k, v in state.items()}
    saved_acc = accuracy(t, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, p.test)
    lora = {"alpha": req.lora_alpha, "scale": req.lora_scale, "folded": p.lora_folded} if any(p.lora_folded) else None
    report = {
        "parents": parents,
        "average": average,
        "ensemble": ensemble,
        "methods": results,
        "seconds": seconds,
        "skipped": skipped,
        "ensemble_kind": "argmax of the λ-weighted mean of the parents' logits",
        "saved": {
            "variant": chosen,
            "accuracy": saved_acc,
            "dtype": req.dtype or "float32",
            "chosen_by": "save" if req.save else "best test accuracy",
        },  # fmt: skip
        "weights": p.weights,
        "parent_files": [str(Path(f)) for f in req.parents],
        "model": req.model,
        "test_data": p.test.label,
        "test_samples": len(p.test.x),
        "data": None if p.align is None else {"source": p.align.label, "samples": len(p.align.x)},
        "distill_data": None if p.distill is None else {"source": p.distill.label, "samples": len(p.distill.x)},
        "lora": lora,  # LoRA parents: each folded, W0 + s·B·A, with this alpha and scale
    }
    return report, state


def plot(report: dict[str, Any], title: str = "") -> bytes:
    """A horizontal bar chart (PNG bytes): each parent, the average, every variant, the ensemble."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"parent {i}", a, "0.6") for i, a in enumerate(report["parents"])]
    bars.append(("plain average", report["average"], "0.35"))
    saved = report["saved"]["variant"]
    bars += [(k, a, "tab:green" if k == saved else "tab:blue") for k, a in report["methods"].items()]
    bars.append(("logit ensemble", report["ensemble"], "tab:orange"))
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.32 * len(bars)))
    ys = range(len(bars))[::-1]
    ax.barh(list(ys), [b[1] for b in bars], color=[b[2] for b in bars])
    ax.set_yticks(list(ys), [b[0] for b in bars])
    for y, (_, a, _) in zip(ys, bars, strict=True):
        ax.text(a, y, f" {a:.3f}", va="center", fontsize=8)
    ax.axvline(report["ensemble"], color="tab:orange", ls="--", lw=1)
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("test accuracy")
    ax.set_title(title or f"merging {len(report['parents'])} parents (green: model.pt)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write(out: Path, report: dict[str, Any], state: dict[str, Tensor]) -> None:
    """``model.pt``, ``merge.png`` and ``merge.json``, all made in memory first. A new ``out`` appears at once (a
    hidden sibling renamed into place); into an existing one (empty, or a previous merge with ``--overwrite``) each
    file is replaced atomically, ``merge.json`` last — the directory itself is never moved (it may be the cwd)."""
    from fedfuse.results import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(state, buf)
    files = {"model.pt": buf.getvalue(), "merge.png": plot(report), "merge.json": json.dumps(report, indent=2).encode()}
    out = Path(os.path.abspath(out))
    if not out.exists():
        tmp = out.with_name(f".{out.name}.merging-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        try:
            for name, data in files.items():
                atomic_write_bytes(tmp / name, data)
            os.rename(tmp, out)
            return
        except OSError:
            if not out.exists():  # unless another process made ``out`` meanwhile: then write into it below
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for name, data in files.items():
        atomic_write_bytes(out / name, data)


def merge(req: MergeRequest, log: Any = print) -> dict[str, Any]:
    """:func:`prepare`, :func:`run`, :func:`write`; returns the report."""
    prepared = prepare(req)
    report, state = run(prepared, log)
    write(Path(req.out), report, state)
    return report
