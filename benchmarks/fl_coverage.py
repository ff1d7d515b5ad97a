"""Which models of the federated-learning literature fedfuse aligns exactly — and that none is silently wrong.

The set: FedAvg's 2NN and CNN (McMahan et al. 2017), LEAF's FEMNIST CNN, Shakespeare CharLSTM and Sent140 LSTM
(Caldas et al. 2018), a CIFAR CNN, CIFAR ResNet-20 with option-A shortcuts (He et al. 2016), a small U-Net with
``ConvTranspose2d``, weight-normed and spectral-normed MLP/CNN, the tied word LM (PyTorch's word_language_model),
``nn.TransformerEncoder`` classifiers fed from ``nn.Embedding`` and from a patch ``Conv2d``.

Per model (random init, constant parameters randomised, batch of 2): derive the spec, pass it through the gate
(:func:`fedfuse.align.gate.verify_spec`: a seeded permuted copy must compute the same function, and a model with
hidden units must have a group), then :func:`fedfuse.align.selfcheck.selfcheck` (permute, recover with ``match``
and ``wb``). Verdicts:

* **exact**: gate passed, the permuted copy is the same function, both methods recover it;
* **refused**: derivation or the gate refuses in one line (fusing two models would raise, not return);
* **silently wrong**: the gate passed but a permuted copy is *not* the same function (fusion would return a wrong
  result without a word) — the goal is none;
* **trivially exact**: passed with 0 groups (fusion is a plain average) — the goal is none.

    python benchmarks/fl_coverage.py [MODEL ...] [--out DIR]   # writes DIR/fl-coverage.{md,json} (default benchmarks/results)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, add_out, load_header, load_line  # noqa: E402
from fedfuse.align import gate  # noqa: E402
from fedfuse.align.selfcheck import break_symmetric_init, selfcheck  # noqa: E402
from fedfuse.align.spec import UnsupportedModelError, derive_spec  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# the models
# ----------------------------------------------------------------------------------------------------------------


def mlp_2nn() -> nn.Module:
    """FedAvg's MNIST 2NN: 784-200-200-10."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 10)
    )


def fedavg_cnn(classes: int = 10, fc: int = 512) -> nn.Module:
    """FedAvg's MNIST CNN (5×5 conv 32, pool, 5×5 conv 64, pool, fc 512); LEAF's FEMNIST CNN: fc 2048, 62 classes."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, fc), nn.ReLU(), nn.Linear(fc, classes),
    )  # fmt: skip


def cifar_cnn() -> nn.Module:
    """The CIFAR-10 CNN of FedAvg/FedProx-style experiments: conv 64, conv 64, fc 384, fc 192."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(64, 64, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 5 * 5, 384), nn.ReLU(), nn.Linear(384, 192), nn.ReLU(), nn.Linear(192, 10),
    )  # fmt: skip


class CharLSTM(nn.Module):
    """LEAF Shakespeare: embedding 8, 2-layer LSTM 256, next-character logits (80) from the last step."""

    def __init__(self, vocab: int = 80, emb: int = 8, hidden: int = 256) -> None:
        super().__init__()
        self.embed, self.lstm, self.fc = nn.Embedding(vocab, emb), nn.LSTM(emb, hidden, 2, batch_first=True), None
        self.fc = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.lstm(self.embed(x))[0][:, -1])


class Sent140LSTM(nn.Module):
    """LEAF Sent140: embedding 300 (GloVe-sized), 2-layer LSTM 100, dense 128, 2 classes."""

    def __init__(self, vocab: int = 400, emb: int = 300, hidden: int = 100) -> None:
        super().__init__()
        self.embed, self.lstm = nn.Embedding(vocab, emb), nn.LSTM(emb, hidden, 2, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(hidden, 128), nn.Linear(128, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(self.lstm(self.embed(x))[0][:, -1])))


class WordLM(nn.Module):
    """PyTorch's word_language_model with ``--tied``: embedding 200, 2-layer LSTM 200, decoder tied to the encoder."""

    def __init__(self, vocab: int = 1000, d: int = 200) -> None:
        super().__init__()
        self.encoder, self.rnn, self.decoder = nn.Embedding(vocab, d), nn.LSTM(d, d, 2), nn.Linear(d, vocab)
        self.decoder.weight = self.encoder.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.rnn(self.encoder(x))[0])


class _BlockA(nn.Module):
    def __init__(self, cin: int, c: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.pad = (c - cin) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.pad:
            x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)
        return F.relu(out + x)


class ResNet20A(nn.Module):
    """CIFAR ResNet-20 (3 stages × 3 blocks, 16/32/64 channels), option-A (zero-padding) shortcuts."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for i, c in enumerate((16, 32, 64)):
            for j in range(3):
                blocks.append(_BlockA(cin, c, 2 if i and not j else 1))
                cin = c
        self.layers, self.fc = nn.Sequential(*blocks), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.layers(F.relu(self.bn(self.conv(x)))), 1).flatten(1))


class UNet(nn.Module):
    """A 2-level U-Net (conv blocks, max-pool down, ``ConvTranspose2d`` up, skip concatenation), 2 classes."""

    def __init__(self, w: int = 16) -> None:
        super().__init__()

        def block(i: int, o: int) -> nn.Module:
            return nn.Sequential(
                nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.Conv2d(o, o, 3, padding=1), nn.ReLU()
            )

        self.d1, self.d2, self.mid = block(1, w), block(w, 2 * w), block(2 * w, 4 * w)
        self.up2, self.u2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, 2), block(4 * w, 2 * w)
        self.up1, self.u1 = nn.ConvTranspose2d(2 * w, w, 2, 2), block(2 * w, w)
        self.out = nn.Conv2d(w, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.d1(x)
        b = self.d2(F.max_pool2d(a, 2))
        m = self.mid(F.max_pool2d(b, 2))
        b = self.u2(torch.cat([self.up2(m), b], 1))
        return self.out(self.u1(torch.cat([self.up1(b), a], 1)))


class NormedMLP(nn.Module):
    def __init__(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = wrap(nn.Linear(784, 200)), wrap(nn.Linear(200, 200)), nn.Linear(200, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


class SNDiscriminator(nn.Module):
    """An SN-GAN-style CNN discriminator: spectral norm on every conv and the head."""

    def __init__(self, w: int = 32) -> None:
        super().__init__()
        self.c1, self.c2 = spectral_norm(nn.Conv2d(3, w, 3, 1, 1)), spectral_norm(nn.Conv2d(w, 2 * w, 4, 2, 1))
        self.c3, self.fc = spectral_norm(nn.Conv2d(2 * w, 2 * w, 4, 2, 1)), spectral_norm(nn.Linear(2 * w, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.c1(x), 0.1)
        h = F.leaky_relu(self.c3(F.leaky_relu(self.c2(h), 0.1)), 0.1)
        return self.fc(h.sum((2, 3)))


class TextTransformer(nn.Module):
    """``nn.Embedding`` + learned positions → ``nn.TransformerEncoder`` (2 layers, d 64, 4 heads) → mean → classes."""

    def __init__(self, vocab: int = 500, d: int = 64, seq: int = 16) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(1, seq, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 128, dropout=0.0, batch_first=True)
        self.encoder, self.head = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x) + self.pos).mean(1))


class PatchTransformer(nn.Module):
    """The same encoder fed from a patch ``Conv2d`` (a tiny ViT without class token)."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, 4)
        layer = nn.TransformerEncoderLayer(d, 4, 128, dropout=0.0, batch_first=True)
        self.encoder, self.head = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.patch(x).flatten(2).transpose(1, 2)).mean(1))


def _tokens(n: int, seq: int, vocab: int, seq_first: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (seq, n) if seq_first else (n, seq), generator=g)


def _images(*shape: int) -> torch.Tensor:
    return torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], Any]]] = {
    "FedAvg 2NN (MNIST)": (mlp_2nn, lambda: _images(1, 28, 28)),
    "FedAvg CNN (MNIST)": (fedavg_cnn, lambda: _images(1, 28, 28)),
    "LEAF CNN (FEMNIST)": (lambda: fedavg_cnn(62, 2048), lambda: _images(1, 28, 28)),
    "CIFAR CNN": (cifar_cnn, lambda: _images(3, 32, 32)),
    "LEAF CharLSTM (Shakespeare)": (CharLSTM, lambda: _tokens(2, 80, 80)),
    "LEAF Sent140 LSTM": (Sent140LSTM, lambda: _tokens(2, 25, 400)),
    "word LM, tied (LSTM)": (WordLM, lambda: _tokens(2, 35, 1000, seq_first=True)),
    "ResNet-20 option A (CIFAR)": (ResNet20A, lambda: _images(3, 32, 32)),
    "U-Net (ConvTranspose2d)": (UNet, lambda: _images(1, 32, 32)),
    "weight-normed MLP": (lambda: NormedMLP(weight_norm), lambda: _images(1, 28, 28)),
    "spectral-normed MLP": (lambda: NormedMLP(spectral_norm), lambda: _images(1, 28, 28)),
    "spectral-normed CNN (SN-GAN D)": (SNDiscriminator, lambda: _images(3, 32, 32)),
    "nn.Transformer text classifier": (TextTransformer, lambda: _tokens(2, 16, 500)),
    "nn.Transformer on patches (ViT-like)": (PatchTransformer, lambda: _images(3, 32, 32)),
}

# ----------------------------------------------------------------------------------------------------------------
# the check
# ----------------------------------------------------------------------------------------------------------------


def check(name: str) -> dict[str, Any]:
    """One model: derive, gate, coverage, selfcheck; a JSON-able record."""
    build, inputs = MODELS[name]
    torch.manual_seed(0)
    model, x = build().eval(), inputs()
    break_symmetric_init(model, x)
    rec: dict[str, Any] = {"model": name, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3)}
    t0 = time.perf_counter()
    try:
        spec = derive_spec(model, x)
    except UnsupportedModelError as exc:
        return {**rec, "verdict": "refused", "reason": str(exc).splitlines()[0], "seconds": _s(t0)}
    t1 = time.perf_counter()
    gate._CACHE.clear()
    try:
        gate.verify_spec(model, spec, x)
        refusal = ""
    except UnsupportedModelError as exc:
        refusal = str(exc)
    gate_s = time.perf_counter() - t1
    cov = gate.coverage(model, spec)
    rec.update(
        groups=len(spec.groups),
        param_share=round(cov.param_share, 4),
        axes=f"{cov.axes_moved}/{cov.axes_total}",
        untouched=cov.untouched,
        derive_s=round(t1 - t0, 2),
        gate_s=round(gate_s, 2),
    )
    res = selfcheck(model, x)
    rec.update(
        permuted_err=res.permuted_err, errors=res.errors, fuse_s={k: round(v, 2) for k, v in res.seconds.items()}
    )
    same_function = res.permuted_err is not None and res.permuted_err <= res.rtol
    if refusal:
        rec.update(verdict="refused", reason=refusal)
    elif not same_function:
        rec.update(verdict="SILENTLY WRONG", reason=f"permuted copy differs by {res.permuted_err:.2g}")
    elif not spec.groups:
        rec.update(verdict="trivially exact", reason="0 groups")
    elif res.ok:
        rec.update(verdict="exact", reason="")
    else:
        rec.update(verdict="not recovered", reason=f"errors {res.errors} {res.failures}")
    rec["seconds"] = _s(t0)
    return rec


def _s(t0: float) -> float:
    return round(time.perf_counter() - t0, 2)


BEFORE = (
    "Before the gate and these rules (main at 32bd120, the same models and seeds, measured once on 2026-12-03): "
    "weight-normed MLP, spectral-normed MLP, spectral-normed CNN and the tied word LM were **silently wrong** (a "
    "permuted copy differed by 1.04, 0.72, 0.31 and 0.93 of the output scale, yet `fuse` of two independent "
    "initialisations returned without a word); the `nn.Transformer` text classifier was **trivially exact** (0 "
    "groups, plain average, selfcheck ok); ResNet-20 option A moved 18 of 40 weight axes; the U-Net was refused at "
    "`ConvTranspose2d`. The word LM now moves only its first LSTM layer (4/10 axes): the tie keeps the embedding "
    "width fixed until `nn.Embedding` has a rule (then the width, both LSTM layers' inputs and the decoder's columns "
    "form one group — tests/test_align_gate.py checks that with a stand-in Embedding rule); the `nn.Transformer` "
    "classifiers wait for the MultiheadAttention/TransformerEncoder rules."
)


def write(rows: list[dict[str, Any]], out: Path = RESULTS, load: str = "") -> Path:
    """``out/fl-coverage.json`` and ``.md`` (``load``: the :func:`load_header` line, recorded in both)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "fl-coverage.json").write_text(json.dumps(rows, indent=1))
    counts = {v: sum(r["verdict"] == v for r in rows) for v in dict.fromkeys(r["verdict"] for r in rows)}
    lines = [
        "# FL-literature models: derive / gate / permute / recover",
        "",
        "Produced by `python benchmarks/fl_coverage.py` (times are inflated by other jobs on a shared machine). "
        "Random init, constant parameters randomised, batch of 2. *groups*: hidden-unit groups of the derived spec; "
        "*params moved*: share of parameter elements in a tensor some group moves; *weight axes moved*: axes 0 and 1 "
        "of every ≥2-d weight that move (a model's input and output axes never move); *gate*: the seeded-permutation "
        "proof every derived spec passes before use; *derive+gate+match+wb*: seconds (selfcheck's match and wb each "
        "recover a permuted copy).",
        "",
        load,
        "",
        "Verdicts: " + ", ".join(f"**{k}** {v}" for k, v in counts.items()) + f" of {len(rows)}.",
        "",
        "| model | params (M) | groups | params moved | weight axes moved | verdict | derive / gate / match / wb (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fs = r.get("fuse_s", {})
        times = (
            f"{r.get('derive_s', r['seconds'])} / {r.get('gate_s', '–')} / {fs.get('match', '–')} / {fs.get('wb', '–')}"
        )
        share = f"{100 * r['param_share']:.1f}%" if "param_share" in r else "–"
        verdict = r["verdict"] + (f": {r['reason']}" if r.get("reason") else "")
        lines.append(
            f"| {r['model']} | {r['params_m']} | {r.get('groups', '–')} | {share} | {r.get('axes', '–')} | "
            f"{verdict.replace('|', '/')} | {times} |"
        )
    lines += ["", BEFORE]
    untouched = [(r["model"], r["untouched"]) for r in rows if r.get("untouched")]
    if untouched:
        lines += ["", "Keys no rule touched although their layer's units move (a missed rule?):", ""]
        lines += [f"- {m}: {', '.join(u[:6])}" for m, u in untouched]
    path = out / "fl-coverage.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", help="models to check (default: all)")
    add_out(p)
    args = p.parse_args(argv)
    names = args.models or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model {unknown[0]!r}; allowed: {', '.join(MODELS)}")
    start = load_line()
    print(start, flush=True)
    rows = []
    for name in names:
        rows.append(check(name))
        r = rows[-1]
        print(
            f"{name}: {r['verdict']} {r.get('reason', '')[:150]} groups={r.get('groups')} axes={r.get('axes')} {r['seconds']}s",
            flush=True,
        )
    end = load_line()
    print(end, flush=True)
    print(write(rows, args.out, load_header(start, end)))


if __name__ == "__main__":
    main()
