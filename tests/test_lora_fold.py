"""LoRA model files enter the tools that take plain state dicts: each adapter folded into its base weight,
W = W₀ + s·B·A (fedfuse's adapters and PEFT's), so ``fedfuse merge`` and ``fedfuse lmc`` take sites' LoRA
checkpoints, and the plain average of folded models is the exact mean of the sites' updates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fedfuse.errors import ConfigError
from fedfuse.lora import inject_lora, mean_products
from fedfuse.lora.fold import fold_adapters


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc, self.head = nn.Conv2d(2, 4, 3), nn.Linear(64, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


def _randomised(model: nn.Module) -> nn.Module:
    """Every adapter's B (and a PEFT head copy) drawn at random: a trained-looking LoRA model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("scale", ["standard", "rslora"])
def test_folding_fedfuses_adapters_gives_the_plain_model_the_same_function(scale):
    torch.manual_seed(0)
    lora = _randomised(inject_lora(Net(), "conv,fc", 2, 8.0, ["head"], "none", scale))
    plain = Net()
    plain.load_state_dict(fold_adapters(lora.state_dict(), 8.0, scale))
    x = torch.randn(5, 2, 6, 6)
    assert torch.allclose(plain(x), lora(x), rtol=1e-4, atol=1e-5)
    wrong = Net()
    wrong.load_state_dict(fold_adapters(lora.state_dict(), 4.0, scale))  # another alpha is another model
    assert not torch.allclose(wrong(x), lora(x), rtol=1e-2, atol=1e-3)


def test_folding_a_peft_model_resolves_its_prefix_base_layers_and_saved_head():
    peft = pytest.importorskip("peft")  # in requirements.lock
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, lora_alpha=8, target_modules=["conv", "fc"], modules_to_save=["head"])
    model = _randomised(peft.get_peft_model(Net(), config))
    state = model.state_dict()
    assert any(".original_module." in k for k in state) and any(".modules_to_save." in k for k in state)
    plain = Net()
    plain.load_state_dict(fold_adapters(state, 8.0))  # strict: exactly the plain model's names
    x = torch.randn(5, 2, 6, 6)
    assert torch.allclose(plain(x), model(x), rtol=1e-4, atol=1e-5)


def test_an_adapter_that_does_not_fit_its_base_is_one_line():
    state = inject_lora(Net(), "fc", 2, 8.0, [], "none", "standard").state_dict()
    state["fc.lora_A"] = torch.zeros(2, 63)
    with pytest.raises(ConfigError, match=r"adapter 'fc': B \(5, 2\) · A \(2, 63\) does not fit its base weight"):
        fold_adapters(state, 8.0)
    with pytest.raises(ConfigError, match="lora-alpha=0.0 is out of range; allowed: > 0"):
        fold_adapters(state, 0.0)


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> Path:
    """Three LoRA clients fine-tuned apart on one frozen base (own adapter inits, ranks 2, 4, 2), as saved."""
    from fedfuse.cli import main

    out = tmp_path_factory.mktemp("sites") / "run"
    flags = ["--strategy", "svd-lora", "--lora-ranks", "2,4", "--one-shot", "--dataset", "digits", "--num-clients", "3",
             "--rounds", "1", "--local-epochs", "2", "--pretrain", "low-classes", "--pretrain-epochs", "2"]  # fmt: skip
    rc = main(["simulate", "--backend", "inline", *flags, "--save-client-models", "1", "--out", str(out)])
    assert rc == 0
    return out / "clients" / "round1"


def test_merge_takes_lora_sites_and_their_average_is_the_exact_mean_update(sites, tmp_path, capsys):
    from fedfuse.cli import main

    files = [str(sites / f"partition{p}.pt") for p in range(3)]
    out = tmp_path / "merge"
    rc = main(["merge", *files, "--model", "mlp", "--test-data", "digits", "--method", "average,wb", "--save",
               "average", "--out", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    merged = torch.load(out / "model.pt")
    states = [torch.load(f) for f in files]
    exact = mean_products(states, [1.0] * 3, alpha=4.0)  # Σ λ_i s_i B_i A_i, fedfuse's default alpha
    for prefix, update in exact.items():
        want = states[0][f"{prefix}.base.weight"].double() + update
        assert torch.allclose(merged[f"{prefix}.weight"].double(), want, atol=1e-6), prefix
    report = json.loads((out / "merge.json").read_text())
    assert report["lora"] == {"alpha": 4.0, "scale": "standard", "folded": [True, True, True]}
    parents = report["parents"]  # on one frozen base the sites stay connected: their average is no worse
    assert report["average"] > sum(parents) / len(parents), report


def test_lmc_takes_two_lora_sites_and_bad_lora_flags_are_one_line(sites, tmp_path, capsys):
    from fedfuse.cli import main

    a, b = (str(sites / f"partition{p}.pt") for p in (0, 1))
    assert main(["lmc", a, b, "--dataset", "digits", "--out", str(tmp_path / "lmc")]) == 0
    before = json.loads((tmp_path / "lmc" / "lmc.json").read_text())["full"]["before"]
    assert before["max_loss"] <= 0.05 and before["mid_loss"] < 0, before  # one frozen base: no loss barrier
    capsys.readouterr()
    bad = {"0": "lora-alpha=0.0 is out of range; allowed: > 0", "sqrt": "lora-scale='sqrt' is not allowed; allowed: "}
    for flags in (["--lora-alpha", "0"], ["--lora-scale", "sqrt"]):
        message = bad[flags[1]]
        out = tmp_path / "bad"
        rc = main(["merge", a, b, "--model", "mlp", "--test-data", "digits", *flags, "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and message in err[-1] and not out.exists(), err


@pytest.mark.parametrize("kind", ["fedfuse", "peft"])
def test_gpt2s_conv1d_layers_take_adapters_and_fold_back_to_the_plain_model(kind):
    """transformers' Conv1D (GPT-2, weight in × out) is adapted as the Linear it computes; a LoRA GPT-2 — fedfuse's
    or PEFT's (fan_in_fan_out) — folds back into the plain model: the same function, every weight in × out."""
    pytest.importorskip("transformers")  # in requirements.lock
    import copy

    from fedfuse.lora import output_layer
    from fedfuse.merge.inputs import build_template, lora_folder

    torch.manual_seed(0)
    template = build_template("hf:gpt2", (1, 8, 8), 10, seed=0)
    x = torch.randn(4, 1, 8, 8)
    head = output_layer(template, x)
    if kind == "fedfuse":
        lora = inject_lora(copy.deepcopy(template), "", 2, 8.0, [head], "none", "standard")
        assert sum("lora_A" in k for k in lora.state_dict()) >= 3  # attention and MLP Conv1D layers adapted
    else:
        peft = pytest.importorskip("peft")
        config = peft.LoraConfig(r=2, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                                 modules_to_save=[head])  # fmt: skip
        lora = peft.get_peft_model(copy.deepcopy(template), config)
    lora = _randomised(lora).eval()
    plain = copy.deepcopy(template).eval()
    plain.load_state_dict(lora_folder(8.0, "standard", template)(lora.state_dict()))
    with torch.no_grad():
        assert torch.allclose(plain(x), lora(x), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(template.eval()(x), lora(x), rtol=1e-2, atol=1e-3)  # the adapters do change it


def test_merge_reads_peft_save_pretrained_directories_on_a_base(tmp_path, capsys):
    """Sites that fine-tuned with PEFT hand in ``save_pretrained`` directories (adapters only, alpha in
    adapter_config.json): with --lora-base they fold onto the base, and their average is W₀ + mean(s·B·A)."""
    peft = pytest.importorskip("peft")  # in requirements.lock
    import copy

    from fedfuse.cli import main
    from fedfuse.merge.inputs import build_template

    template = build_template("mlp", (1, 8, 8), 10, seed=0)
    torch.save(template.state_dict(), tmp_path / "base.pt")
    sites, deltas = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["net.1", "net.3"])
        model = _randomised(peft.get_peft_model(copy.deepcopy(template), config))
        model.save_pretrained(str(tmp_path / f"site{seed}"))
        sites.append(str(tmp_path / f"site{seed}"))
        state = model.state_dict()
        deltas.append({p: 3.0 * state[f"base_model.model.{p}.lora_B.default.weight"]
                       @ state[f"base_model.model.{p}.lora_A.default.weight"] for p in ("net.1", "net.3")})  # fmt: skip
    out = tmp_path / "merge"
    flags = ["--model", "mlp", "--test-data", "digits", "--method", "average", "--save", "average"]
    assert main(["merge", *sites, *flags, "--lora-base", str(tmp_path / "base.pt"), "--out", str(out)]) == 0
    merged, base = torch.load(out / "model.pt"), template.state_dict()
    for p in ("net.1", "net.3"):  # s = lora_alpha / r = 3 from the adapters' own config
        want = base[f"{p}.weight"] + (deltas[0][p] + deltas[1][p]) / 2
        assert torch.allclose(merged[f"{p}.weight"], want, atol=1e-5), p
    assert json.loads((out / "merge.json").read_text())["lora"]["folded"] == [True, True]
    lmc = ["lmc", *sites, "--dataset", "digits", "--lora-base", str(tmp_path / "base.pt"), "--out", str(tmp_path / "l")]
    assert main(lmc) == 0 and (tmp_path / "l" / "lmc.json").is_file()
    capsys.readouterr()
    assert main(["merge", *sites, *flags, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a PEFT adapter directory (adapters only, no base); pass --lora-base FILE" in err[0]
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("scale", ["standard", "rslora"])
def test_a_peft_adapter_becomes_fedfuses_adapters_with_the_same_function(tmp_path, scale):
    """as_client_adapters: a PEFT save_pretrained adapter (conv and linear factors, a saved head, its own alpha)
    loaded into fedfuse's LoRA model on the same base computes what the PEFT model computes."""
    from peft import LoraConfig, get_peft_model

    from fedfuse.lora.fold import as_client_adapters, read_peft_adapter
    from fedfuse.lora.run import frozen_state

    def base() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.ReLU(),
                             nn.Linear(8, 3))  # fmt: skip

    peft = get_peft_model(base(), LoraConfig(r=2, lora_alpha=7, target_modules=["0", "3"], modules_to_save=["5"],
                                             use_rslora=scale == "rslora"))  # fmt: skip
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    peft.save_pretrained(str(tmp_path / "site"))
    ours = inject_lora(base(), "0,3", rank=2, alpha=3.0, head=["5"])
    adapter, alpha, got_scale = read_peft_adapter(tmp_path / "site")
    state = as_client_adapters(adapter, alpha, got_scale, ours)
    assert set(state) == {"0.lora_A", "0.lora_B", "3.lora_A", "3.lora_B", "5.weight", "5.bias"}
    ours.load_state_dict({**frozen_state(ours), **state})
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(ours(x), peft.eval()(x), atol=1e-5)
