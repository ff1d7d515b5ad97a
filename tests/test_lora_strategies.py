"""Federated LoRA through fedfuse's ServerApp and ClientApp (inline grid): only adapters travel, at each client's
rank; the server keeps (and for fedex-lora folds residuals into) the base; bad LoRA input is one line, exit 2."""

from __future__ import annotations

import pytest
import torch

from fedfuse.errors import ConfigError

SMALL = {"dataset": "digits", "num-clients": 3, "num-rounds": 2, "pretrain": "low-classes", "pretrain-epochs": 2}


def _run(tmp_path, cfg):
    from clients.client_app import app
    from fedfuse.runners.inline import InlineGrid
    from strategies.server_app import run_server

    sent: dict[int, list[dict[str, tuple[int, ...]]]] = {}
    replies: list[set[str]] = []

    class Recording(InlineGrid):
        def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
            messages = list(messages)
            for m in messages:
                if m.metadata.message_type == "train":
                    arrays = next(iter(m.content.array_records.values())).to_torch_state_dict()
                    sent.setdefault(m.metadata.dst_node_id, []).append({k: tuple(v.shape) for k, v in arrays.items()})
            out = list(super().send_and_receive(messages, timeout=timeout))
            for r in out:
                if r.metadata.message_type == "train" and not r.has_error():
                    replies.append(set(next(iter(r.content.array_records.values())).keys()))
            return out

    cfg = {**SMALL, **cfg, "out": str(tmp_path)}
    last = run_server(Recording(app, cfg["num-clients"]), cfg)
    return last, sent, replies


def test_fedex_lora_with_mixed_ranks_sends_adapters_only_and_folds_the_residual(tmp_path):
    from fedfuse.data import load_dataset
    from fedfuse.experiment import model_for
    from strategies.registry import validate_config

    cfg = {"strategy": "fedex-lora", "lora-ranks": "2,4", "lora-targets": "net.3,net.5"}
    last, sent, replies = _run(tmp_path, cfg)
    # partitions 0, 1, 2 → ranks 2, 4, 2; round 1: adapters only; round 2: + the folded base of the adapted layers
    assert [s[0]["net.3.lora_A"][0] for _, s in sorted(sent.items())] == [2, 4, 2]
    assert all(set(s[0]) == {"net.3.lora_A", "net.3.lora_B", "net.5.lora_A", "net.5.lora_B"} for s in sent.values())
    assert all({"net.3.base.weight", "net.5.base.weight"} <= set(s[1]) for s in sent.values())
    assert all(keys == {"net.3.lora_A", "net.3.lora_B", "net.5.lora_A", "net.5.lora_B"} for keys in replies)
    assert last["replies"] == 3 and last["rejected"] == 0
    assert last["lora_agg_error"] > 0 and last["lora_update_error"] < 1e-4 * last["lora_mean_update"]
    full = validate_config({**SMALL, **cfg})
    base = model_for({**full, "lora-ranks": ""}, load_dataset("digits"))  # the pretrained base, no adapters
    nbytes = sum(v.numel() * v.element_size() for v in base.state_dict().values())
    assert last["bytes_up"] < 0.2 * 3 * nbytes  # adapters only
    final = torch.load(tmp_path / "model.pt")
    assert torch.equal(final["net.1.weight"], base.state_dict()["net.1.weight"])  # not adapted: frozen
    assert not torch.equal(final["net.3.base.weight"], base.state_dict()["net.3.weight"])  # residual folded


@pytest.mark.parametrize("name", ["fedavg-lora", "fedex-lora", "svd-lora", "hetlora", "aligned-lora", "flora"])
def test_per_target_ranks_keep_each_layers_rank_under_every_rule(tmp_path, name):
    """``lora-targets PAT:R`` with ranks that differ by layer: every rule keeps each layer at its own rank (the rules
    once padded or re-factorised every layer to the largest one, and the server's model no longer loaded)."""
    from strategies.registry import validate_config

    cfg = validate_config({**SMALL, "strategy": name, "lora-rank": 8, "lora-targets": "net.3:2,net.5:4"})
    last, sent, _ = _run(tmp_path, cfg)
    assert last["replies"] == 3 and last["rejected"] == 0 and last["central_accuracy"] > 0.2
    assert all(s[-1]["net.3.lora_A"][0] == 2 and s[-1]["net.5.lora_A"][0] == 4 for s in sent.values())
    final = torch.load(tmp_path / "model.pt")
    assert final["net.3.lora_A"].shape[0] == 2 and final["net.5.lora_B"].shape[1] == 4


def test_fedavg_lora_is_inexact_where_adapters_are_averaged_apart(tmp_path):
    last, sent, _ = _run(tmp_path, {"strategy": "fedavg-lora", "lora-rank": 3, "num-rounds": 1})
    assert all("net.1.base.weight" not in s[0] for s in sent.values())  # the base never travels
    assert last["lora_agg_error"] > 0
    assert last["lora_update_error"] == pytest.approx(last["lora_agg_error"], rel=1e-6)
    assert last["central_accuracy"] > 0.3


def test_lora_options_belong_to_lora_strategies():
    from strategies.lora import FedAvgLoRA
    from strategies.registry import validate_config

    with pytest.raises(ConfigError, match="lora-rank=4 needs strategy fedavg-lora or fedex-lora"):
        validate_config({"strategy": "fedavg", "lora-rank": 4})
    with pytest.raises(ConfigError, match="needs one rank for every client"):
        FedAvgLoRA(client_ranks=[2, 4])
    with pytest.raises(ConfigError, match="needs lora-rank >= 1"):
        FedAvgLoRA.config_kwargs(validate_config({"strategy": "fedavg-lora"}), model=None, example_input=None)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lora-rank", "200"], "lora-rank=200 is too large for layer 'net.1'"),
        (["--lora-rank", "2", "--lora-targets", "conv*"], "'conv\\*' matches no Linear/Conv2d/Conv1D layer"),
        (["--lora-ranks", "2,x"], "lora-ranks='2,x' is not a comma-separated list"),
        (["--lora-rank", "2", "--base", "BAD"], "base: .* does not fit the model"),
        (["--lora-rank", "2", "--lora-scale", "sqrt"], "lora-scale='sqrt' is not allowed; allowed: standard, rslora"),
        ([], "needs lora-rank >= 1"),
        (["--lora-rank", "2", "--model", "rnn"], "finds no Linear/Conv2d/Conv1D layer to adapt besides .* \\(fc\\)"),
        (["--lora-ranks", "2,4"], "lora-ranks=2,4: FedAvgLoRA needs one rank for every client"),
        (["--strategy", "hetlora", "--lora-rank", "4", "--lora-ranks", "2,8"], "lora-rank=4 and lora-ranks='2,8' ar"),
        (["--strategy", "hetlora", "--num-clients", "3", "--lora-ranks", "2,4,8,16"], "4 ranks for num-clients=3"),
        (["--lora-rank", "2", "--client-init-from", "DIR"], "client-init-from=.* lacks partition0.pt"),
        (["--lora-rank", "2", "--lora-targets", ","], "lora-targets=',' names no module"),
    ],
)
def test_bad_lora_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, flags, message):
    from fedfuse.cli import main

    bad = tmp_path / "bad.pt"
    torch.save({"net.1.weight": torch.zeros(2, 2)}, bad)
    out = tmp_path / "run"
    flags = [{"BAD": str(bad), "DIR": str(tmp_path)}.get(f, f) for f in flags]
    rc = main(["simulate", "--backend", "inline", "--strategy", "fedavg-lora", *flags, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert pytest.importorskip("re").search(message, err[0]), err[0]
    assert not out.exists()


@pytest.mark.parametrize("name", ["fedavg-lora", "fedex-lora", "aligned-lora", "svd-lora", "hetlora", "flora"])
def test_every_lora_strategy_averages_the_dense_keys_plainly(name):
    from strategies.registry import resolve_strategy

    cls = resolve_strategy(name)
    ranks = [4, 4] if name == "fedavg-lora" else [2, 4]
    g = torch.Generator().manual_seed(0)
    glob = {"l.base.weight": torch.randn(6, 5, generator=g), "l.lora_A": torch.randn(4, 5, generator=g),
            "l.lora_B": torch.zeros(6, 4), "l.base.bias": torch.zeros(6), "head.weight": torch.zeros(3, 6)}  # fmt: skip
    states = [
        {"l.lora_A": torch.randn(r, 5, generator=g), "l.lora_B": torch.randn(6, r, generator=g),
         "l.base.bias": torch.randn(6, generator=g), "head.weight": torch.randn(3, 6, generator=g)}
        for r in ranks
    ]  # fmt: skip
    strategy = cls(alpha=4.0, client_ranks=ranks if len(set(ranks)) > 1 else None,
                   train_keys=["l.base.bias", "head.weight"], seed=0)  # fmt: skip
    strategy._global, strategy._global_rank, strategy.round_metrics = glob, 4, {}
    new = strategy.aggregate_arrays(1, states, [1.0, 3.0])
    for key in ("l.base.bias", "head.weight"):
        assert torch.allclose(new[key], 0.25 * states[0][key] + 0.75 * states[1][key], atol=1e-6)
    assert new["l.lora_A"].shape == (4, 5) and torch.isfinite(new["l.lora_B"]).all()


def test_a_users_trusted_reference_is_called_with_the_whole_global_lora_model():
    """README: in a user's own ServerApp a LoRA strategy calls ``trusted=`` with the whole global LoRA state (frozen
    base included, so a ``TrustedReference`` of the user's LoRA/PEFT model can load it), not the adapters it sends."""
    from strategies.lora import FedAvgLoRA

    calls = []

    def trusted(state, server_round):
        calls.append((set(state), server_round))
        return dict(state)

    glob = {"l.base.weight": torch.zeros(6, 5), "l.lora_A": torch.ones(4, 5), "l.lora_B": torch.zeros(6, 4)}
    strategy = FedAvgLoRA(alpha=4.0, trusted=trusted, seed=0)
    strategy._global = glob
    sent = {k: glob[k] for k in ("l.lora_A", "l.lora_B")}
    assert strategy.trusted(sent, 3) == glob
    assert calls == [(set(glob), 3)]
    assert strategy.trusted.losses is None  # a plain callable has no per-example losses: no influence test
    assert FedAvgLoRA(alpha=4.0, seed=0).trusted is None  # no reference given: the round's median


def test_the_head_and_the_adapted_biases_travel_at_every_rank(tmp_path):
    """hetlora, ranks 2,4: with lora-head=auto (the default) and lora-bias=lora_only the output layer and the
    adapted layers' biases are sent both ways (at every rank) and land in the global model."""
    cfg = {"strategy": "hetlora", "lora-ranks": "2,4", "lora-bias": "lora_only", "num-rounds": 2}
    last, sent, replies = _run(tmp_path, cfg)
    dense = {"net.1.base.bias", "net.3.base.bias", "net.5.weight", "net.5.bias"}
    assert all(dense <= set(s[0]) and dense <= set(s[1]) for s in sent.values())
    assert all(keys == dense | {f"net.{i}.lora_{f}" for i in (1, 3) for f in "AB"} for keys in replies)
    assert last["replies"] == 3 and last["rejected"] == 0
    final = torch.load(tmp_path / "model.pt")
    assert "net.5.weight" in final and "net.5.lora_A" not in final


def test_a_trained_head_beats_the_frozen_one_on_a_tiny_run():
    """3 clients, 3 rounds of hetlora (ranks 2,4) from the low-classes base, the plain loop of benchmarks/lora.py:
    with the head trained (lora-head=auto) the new classes are learnt; with a frozen, LoRA-adapted head (none) its
    biases keep suppressing them (measured: +0.19..0.25 per seed)."""
    from benchmarks.lora import run
    from strategies.registry import validate_config

    def final(head, seed):
        cfg = validate_config({
            "strategy": "hetlora", "dataset": "digits", "num-clients": 3, "alpha": 1.0, "seed": seed,
            "pretrain": "low-classes", "pretrain-epochs": 2, "lora-ranks": "2,4", "lora-head": head,
        })  # fmt: skip
        return run(cfg, 3)[-1]["accuracy"]

    gains = [final("auto", s) - final("none", s) for s in (0, 1, 2)]
    assert sum(gains) / 3 > 0.1, gains


@pytest.mark.parametrize("name", ["fedex-lora", "svd-lora", "hetlora", "flora"])
def test_rslora_clients_and_server_agree_on_the_scale(name):
    """lora-scale=rslora from the run config: the clients' layers scale by alpha/√r and the server's rule reads
    their updates with the same scale: the round's lora_update_error is the measured gap between the global model's
    applied update and the mean of the clients' own layer deltas, and that gap is 0 for the exact rules (fedex-lora,
    flora; svd-lora too here: every client's A starts from the same seeded init, a rank-r A being the first r rows
    of the rank-8 one, so the mean has rank <= 8) with mixed ranks 2,4,8."""
    from fedfuse.data import load_dataset
    from fedfuse.experiment import model_for
    from fedfuse.lora import layer_scales
    from fedfuse.lora.run import adapter_state
    from strategies.registry import resolve_strategy, validate_config

    cfg = validate_config({**SMALL, "strategy": name, "lora-ranks": "2,4,8", "lora-scale": "rslora",
                           "lora-alpha": 6.0, "lora-targets": "net.3", "pretrain-epochs": 1})  # fmt: skip
    ds = load_dataset("digits")
    cls = resolve_strategy(name)
    glob = model_for(cfg, ds)
    strategy = cls(**cls.config_kwargs(cfg, model=glob, example_input=None), seed=0)
    assert strategy.scale == "rslora"
    g = torch.Generator().manual_seed(0)
    clients, states = [], []
    for r in (2, 4, 8):
        m = model_for(cfg, ds, lora_rank=r)
        assert layer_scales(m) == {"net.3": pytest.approx(6.0 / r**0.5)}
        with torch.no_grad():
            m.net[3].lora_B.copy_(0.01 * torch.randn(m.net[3].lora_B.shape, generator=g))
        clients.append(m)
        states.append(adapter_state(m))
    start = {k: v.clone() for k, v in glob.state_dict().items()}
    strategy._global, strategy._global_rank, strategy.round_metrics = start, 8, {}
    new = strategy.aggregate_arrays(1, states, [1.0, 2.0, 3.0])
    glob.load_state_dict(new)
    with torch.no_grad():
        mean = sum(w / 6 * m.net[3].delta().double() for w, m in zip([1.0, 2.0, 3.0], clients, strict=True))
        applied = glob.net[3].base.weight.double() - start["net.3.base.weight"].double() + glob.net[3].delta().double()
    gap = float((applied - mean).norm())
    assert strategy.round_metrics["lora_mean_update"] == pytest.approx(float(mean.norm()), rel=1e-4)
    if name != "hetlora":
        assert gap < 1e-5 * float(mean.norm()), name
    else:  # the factors averaged apart
        assert gap > 1e-3 * float(mean.norm())
        assert strategy.round_metrics["lora_update_error"] == pytest.approx(gap, rel=1e-3)


@pytest.mark.parametrize("name", ["fedex-lora", "svd-lora", "hetlora", "svd-lora:product", "fedex-lora:product"])
def test_clients_that_change_nothing_leave_the_global_model_as_it_was(name):
    """Mixed ranks 2,4,8 after some rounds (global adapters with 8 nonzero components): each client returns the
    adapters it was sent at its rank. The exact rules aggregate the clients' changes (none), so the global model's
    adapted weight W + s·B·A stays; HetLoRA's padding averages the components a rank-2 client never received as 0,
    and so does re-factorising the mean of the clients' products (lora-refactor product)."""
    from fedfuse import lora
    from strategies.registry import resolve_strategy, validate_config

    name, _, refactor = name.partition(":")
    cls = resolve_strategy(name)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(8, 10, generator=g, dtype=torch.float64), torch.randn(12, 8, generator=g, dtype=torch.float64)
    adapters = lora.svd_lora([{"l.lora_A": a, "l.lora_B": b}], [1.0], 8, 4.0)  # SVD order, as after a round
    glob = {"l.base.weight": torch.randn(12, 10, generator=g), **{k: v.float() for k, v in adapters.items()}}
    chosen = {"lora-refactor": refactor} if refactor else {}
    cfg = validate_config({"strategy": name, "lora-ranks": "2,4,8", **chosen})
    strategy = cls(**{**cls.config_kwargs(cfg, model=None, example_input=None), "train_keys": []}, seed=0)
    assert getattr(strategy, "refactor", "update") == (refactor or "update")
    strategy._global, strategy._global_rank, strategy.round_metrics = glob, 8, {}
    states = [lora.truncate_rank({k: glob[k] for k in ("l.lora_A", "l.lora_B")}, r, 4.0) for r in (2, 4, 8)]
    new = strategy.aggregate_arrays(2, states, [1.0, 1.0, 1.0])

    def weight(state):
        return state["l.base.weight"].double() + lora.mean_products([state], [1.0], 4.0)["l"]

    drift = float((weight(new) - weight(glob)).norm()) / float(weight(glob).norm())
    if name == "hetlora" or refactor == "product":
        assert drift > 0.05
    else:
        assert drift < 1e-6
        assert strategy.round_metrics["lora_agg_error"] < 1e-5 * strategy.round_metrics["lora_mean_update"]


def test_lora_refactor_belongs_to_the_svd_rules():
    from strategies.lora import HetLoRA, SVDLoRA
    from strategies.registry import validate_config

    with pytest.raises(ConfigError, match="lora-refactor='product' needs strategy fedex-lora or svd-lora"):
        validate_config({"strategy": "hetlora", "lora-ranks": "2,4", "lora-refactor": "product"})
    with pytest.raises(ConfigError, match="lora-refactor.*'mean'.*update, product"):
        validate_config({"strategy": "svd-lora", "lora-rank": 4, "lora-refactor": "mean"})
    with pytest.raises(ConfigError, match="refactor='product' applies to FedExLoRA and SVDLoRA only, not HetLoRA"):
        HetLoRA(refactor="product")
    with pytest.raises(ConfigError, match="refactor='sum' is unknown; allowed: update, product"):
        SVDLoRA(refactor="sum")


@pytest.mark.parametrize("pretrain", ["low-classes", "none"])
def test_lora_clients_that_start_apart_draw_their_own_adapters_on_the_same_base(pretrain):
    """Each model built as in a process of its own (the per-process base cache emptied first, as a Ray worker
    starts): the server's and every apart client's frozen base agree, pretrained or the run seed's init."""
    from fedfuse.data import load_dataset
    from fedfuse.experiment import apart_model, model_for
    from fedfuse.lora import run as lora_run
    from strategies.registry import validate_config

    cfg = validate_config({**SMALL, "strategy": "fedavg-lora", "lora-rank": 3, "client-init": "own",
                           "pretrain": pretrain})  # fmt: skip
    ds = load_dataset("digits")

    def fresh(build):  # type: ignore[no-untyped-def]
        lora_run._BASES.clear()
        return build()

    glob, *own = [fresh(lambda: model_for(cfg, ds)), fresh(lambda: apart_model(cfg, ds, 0)),
                  fresh(lambda: apart_model(cfg, ds, 1))]  # fmt: skip
    states = [m.state_dict() for m in (glob, *own)]
    for key, value in states[0].items():
        if key.endswith("lora_A"):  # each client its own A, none the global one
            assert not torch.equal(value, states[1][key]) and not torch.equal(states[1][key], states[2][key]), key
        else:  # the frozen base, the head and B = 0 are the run's
            assert all(torch.equal(value, s[key]) for s in states[1:]), key
    assert apart_model({**cfg, "client-init": "shared"}, ds, 0) is None


def test_lora_from_own_inits_is_where_averaging_the_factors_apart_fails(tmp_path):
    """Round 1 from each client's own adapter init: mean(B)·mean(A) mixes factors of unrelated subspaces, so
    FedAvg-LoRA's error relative to the clients' mean update is several times that of a shared start; FedEx-LoRA's
    applied update stays exact and the CLI runs it."""
    from fedfuse.cli import main

    rel = {}
    for init in ("shared", "own"):
        last, _, _ = _run(tmp_path / init, {"strategy": "fedavg-lora", "lora-rank": 3, "num-rounds": 1,
                                            "client-init": init})  # fmt: skip
        rel[init] = last["lora_agg_error"] / last["lora_mean_update"]
    assert rel["own"] > 3 * rel["shared"], rel
    exact, _, _ = _run(tmp_path / "exact", {"strategy": "fedex-lora", "lora-rank": 3, "num-rounds": 1,
                                            "client-init": "own"})  # fmt: skip
    assert exact["lora_update_error"] < 1e-6 * exact["lora_mean_update"] < exact["lora_agg_error"]  # float32 rounding
    out = tmp_path / "cli"
    flags = ["--dataset", "digits", "--num-clients", "3", "--rounds", "1", "--pretrain", "low-classes"]
    rc = main(["simulate", "--backend", "inline", "--strategy", "svd-lora", "--lora-ranks", "2,4", "--one-shot",
               *flags, "--out", str(out)])  # fmt: skip
    assert rc == 0 and (out / "metrics.csv").is_file()


def test_sites_adapters_saved_apart_start_the_next_run_from_files_adapters_alone_suffice(tmp_path):
    """--save-client-models keeps every client of a mixed-rank run (each at its own rank); a LoRA run started from
    those files (--client-init-from) loads them on the run's frozen base, from whole files or adapter-only ones
    alike; a file whose frozen base differs is one line, exit 2."""
    from fedfuse.cli import main
    from fedfuse.data import load_dataset
    from fedfuse.experiment import apart_model
    from fedfuse.lora.run import frozen_state
    from strategies.registry import validate_config

    flags = ["--backend", "inline", "--strategy", "svd-lora", "--lora-ranks", "2,4", "--dataset", "digits",
             "--num-clients", "3", "--rounds", "1", "--pretrain", "low-classes", "--pretrain-epochs", "2"]  # fmt: skip
    assert main(["simulate", *flags, "--one-shot", "--save-client-models", "1", "--out", str(tmp_path / "a")]) == 0
    saved = tmp_path / "a" / "clients" / "round1"
    files = {p: torch.load(saved / f"partition{p}.pt") for p in range(3)}
    assert [files[p]["net.1.lora_A"].shape[0] for p in range(3)] == [2, 4, 2]  # every client, at its own rank
    run = {"strategy": "svd-lora", "lora-ranks": "2,4", "dataset": "digits", "num-clients": 3,
           "pretrain": "low-classes", "pretrain-epochs": 2}  # fmt: skip
    cfg = validate_config({**run, "client-init-from": str(saved)})
    ds = load_dataset("digits")
    whole = apart_model(cfg, ds, 0)
    frozen = frozen_state(whole)
    assert frozen and all(torch.equal(whole.state_dict()[k], v) for k, v in files[0].items())
    only = tmp_path / "only"
    only.mkdir()
    for p, state in files.items():
        torch.save({k: v for k, v in state.items() if k not in frozen}, only / f"partition{p}.pt")
    from_only = apart_model({**cfg, "client-init-from": str(only)}, ds, 0).state_dict()
    assert all(torch.equal(from_only[k], v) for k, v in whole.state_dict().items())
    assert main(["simulate", *flags, "--client-init-from", str(only), "--out", str(tmp_path / "b")]) == 0
    key = next(k for k in frozen if k.endswith("weight"))
    torch.save({**files[1], key: files[1][key] + 0.01}, only / "partition1.pt")
    with pytest.raises(ConfigError, match=f"partition1.pt': '{key}' differs from the run's"):
        apart_model({**cfg, "client-init-from": str(only)}, ds, 1)
    assert main(["simulate", *flags, "--client-init-from", str(only), "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()


def test_lora_on_a_base_nobody_trained_is_warned_about_once_every_check_passed(tmp_path, capsys):
    from fedfuse.cli import main

    flags = ["simulate", "--backend", "inline", "--no-progress", "--strategy", "fedavg-lora", "--lora-rank", "2",
             "--num-clients", "2", "--rounds", "1"]  # fmt: skip
    assert main([*flags, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: LoRA adapts a base nobody trained (no --base, --pretrain none)") == 1, err
    assert main([*flags, "--pretrain", "low-classes", "--pretrain-epochs", "1", "--out", str(tmp_path / "b")]) == 0
    assert "nobody trained" not in capsys.readouterr().err


def test_gpt2_fine_tunes_federated_with_adapters_on_its_conv1d_layers(tmp_path):
    """hf:gpt2's Conv1D layers (attention and MLP) take adapters; only they and the head travel."""
    pytest.importorskip("transformers")  # in requirements.lock
    last, _, replies = _run(tmp_path, {"strategy": "svd-lora", "model": "hf:gpt2", "lora-ranks": "2,4",
                                       "num-rounds": 1, "pretrain-epochs": 1})  # fmt: skip
    assert replies and all(any(k.endswith("c_attn.lora_A") for k in keys) for keys in replies)
    assert all(k.endswith(("lora_A", "lora_B")) or k.startswith("model.score") for keys in replies for k in keys)
    assert last["replies"] == 3 and last["lora_mean_update"] > 0


@pytest.mark.parametrize("arch", ["vit", "llama", "bert"])
def test_every_hf_architecture_fine_tunes_federated_with_lora(tmp_path, arch):
    """LoRA layers expose their base's ``weight``/``bias`` as PEFT's do: hf:vit reads its patch projection's
    ``weight.dtype`` in forward (it crashed with an AttributeError before)."""
    pytest.importorskip("transformers")  # in requirements.lock
    last, _, replies = _run(tmp_path, {"strategy": "fedex-lora", "model": f"hf:{arch}", "lora-rank": 2,
                                       "num-rounds": 1, "pretrain-epochs": 1})  # fmt: skip
    assert last["replies"] == 3 and last["rejected"] == 0 and last["lora_mean_update"] > 0
    assert replies and all(any(k.endswith("lora_A") for k in keys) for keys in replies)


def test_lora_layers_show_their_base_weight_and_bias():
    from fedfuse.lora import inject_lora

    model = inject_lora(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 2)),
                        rank=1)  # fmt: skip
    for layer in (model[0], model[2]):
        assert layer.weight is layer.base.weight and layer.bias is layer.base.bias
    assert not any(".weight" in k and ".base." not in k for k in model.state_dict())  # nothing saved twice


PEFT_APP = '''
"""A Flower user's own apps: PEFT LoRA on their own pretrained net, fedfuse's FedExLoRA on the server."""
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from peft import LoraConfig, get_peft_model
from sklearn.datasets import load_digits

from strategies import FedExLoRA

X, Y = load_digits(return_X_y=True)
X, Y = torch.tensor(X, dtype=torch.float32) / 16.0, torch.tensor(Y)


def lora_model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 10))
    opt, low = torch.optim.SGD(net.parameters(), lr=0.2), Y[:1500] < 5
    for _ in range(100):  # the user's pretraining: digits 0-4 only
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(X[:1500][low]), Y[:1500][low]).backward()
        opt.step()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], modules_to_save=["4"], lora_dropout=0.0)
    return get_peft_model(net, config)


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    model = lora_model()
    received = msg.content["arrays"].to_torch_state_dict()
    assert not model.load_state_dict(received, strict=False).unexpected_keys
    pid = int(context.node_config["partition-id"])
    x, y = X[pid:1500:3], Y[pid:1500:3]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    state = model.state_dict()
    arrays = ArrayRecord({k: state[k] for k in received})  # everything it received, the frozen base included
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": len(x)})}), reply_to=msg)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    model = lora_model()
    strategy = FedExLoRA(model=model, fraction_evaluate=0.0, min_available_nodes=3)
    history = []

    def central(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        with torch.no_grad():
            history.append(float((model(X[1500:]).argmax(1) == Y[1500:]).float().mean()))
        return MetricRecord({"accuracy": history[-1]})

    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=3,
                            evaluate_fn=central)
    print("HISTORY", history)
    print("SENT", [result.train_metrics_clientapp[r]["bytes_down"] for r in (1, 2, 3)])
    print("REJECTED", [result.train_metrics_clientapp[r]["rejected"] for r in (1, 2, 3)])


run_simulation(server_app=server, client_app=client, num_supernodes=3,
               backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
'''


@pytest.mark.ray
def test_fedex_lora_plugs_into_a_users_own_peft_app(tmp_path):
    """A user's own ServerApp/ClientApp on PEFT: alpha and the head come from the model; a client that returns
    everything it received (the folded base weights too, from round 2) is aggregated every round."""
    import json
    import subprocess
    import sys

    script = tmp_path / "peft_app.py"
    script.write_text(PEFT_APP)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in log, log[-3000:]
    lines = {ln.split(" ", 1)[0]: json.loads(ln.split(" ", 1)[1]) for ln in proc.stdout.splitlines() if ln[:1].isupper()
             and ln.split(" ", 1)[0] in ("HISTORY", "SENT", "REJECTED")}  # fmt: skip
    history, sent = lines["HISTORY"], lines["SENT"]
    assert lines["REJECTED"] == [0, 0, 0], log[-3000:]
    assert sent[1] > sent[0]  # from round 2 the nodes also get the base weights the residual was folded into
    assert history[3] > history[1] + 0.05 and history[1] > history[0] + 0.05, history  # every round moved it


def test_a_frozen_entry_sent_back_changed_is_rejected_and_an_unchanged_one_dropped():
    from types import SimpleNamespace

    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    from fedfuse.replies import unpack_reply

    sent = {"l.lora_A": torch.ones(2, 3), "l.lora_B": torch.zeros(4, 2)}
    frozen = {"l.base_layer.weight": torch.randn(4, 3)}

    def reply(state):  # what unpack_reply reads of a Message: its content
        return SimpleNamespace(content=RecordDict({"arrays": ArrayRecord(state),
                                                   "metrics": MetricRecord({"num-examples": 5})}))  # fmt: skip

    echoed = unpack_reply(reply({**sent, **frozen}), sent, "num-examples", frozen=frozen)
    assert set(echoed.state) == set(sent)
    assert set(unpack_reply(reply(sent), sent, "num-examples", frozen=frozen).state) == set(sent)
    moved = {**sent, "l.base_layer.weight": frozen["l.base_layer.weight"] + 1e-3}
    assert "frozen entry" in unpack_reply(reply(moved), sent, "num-examples", frozen=frozen)
    assert "unexpected key" in unpack_reply(reply({**sent, **frozen}), sent, "num-examples")  # not frozen: refused


def test_lora_strategies_take_alpha_scale_and_head_from_the_model():
    from peft import LoraConfig, get_peft_model

    from fedfuse.lora import inject_lora
    from strategies import FedExLoRA, SVDLoRA

    def net():
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))

    peft = get_peft_model(net(), LoraConfig(r=2, lora_alpha=8, target_modules=["0"], modules_to_save=["2"],
                                            use_rslora=True))  # fmt: skip
    s = FedExLoRA(model=peft)
    assert (s.alpha, s.scale) == (8.0, "rslora")
    assert s.train_keys == ["base_model.model.2.modules_to_save.default.weight",
                            "base_model.model.2.modules_to_save.default.bias"]  # fmt: skip
    own = SVDLoRA(model=inject_lora(net(), rank=2, alpha=3.0, head=["2"]))
    assert (own.alpha, own.scale, own.train_keys) == (3.0, "standard", ["2.weight", "2.bias"])
    assert FedExLoRA().alpha == 4.0 and FedExLoRA().train_keys == []  # no model: fedfuse's defaults
    with pytest.raises(ConfigError, match=r"alpha=4\.0 contradicts the model's LoRA layers \(alpha 8\.0\)"):
        FedExLoRA(model=peft, alpha=4.0)
    with pytest.raises(ConfigError, match="has no LoRA adapters"):
        FedExLoRA(model=net())


@pytest.mark.parametrize("name", ["fedex-lora", "flora"])
def test_a_lora_run_cut_after_round_1_resumes_bit_identically(tmp_path, name):
    """The strategy's state (the base folded into, which nodes then receive) and FLoRA's seeded restarts survive a
    resume: a run cut after round 1 ends bit-identical to an uninterrupted one."""
    from clients.client_app import app
    from fedfuse.runners.inline import InlineGrid
    from strategies.registry import validate_config
    from strategies.server_app import run_server

    config = {**SMALL, "strategy": name, "lora-ranks": "2,4", "num-rounds": 3}
    run_server(InlineGrid(app, 3), validate_config({**config, "out": str(tmp_path / "ref")}))

    class Stop(Exception):
        pass

    def stop_after_round_1(row):
        if row["round"] == 1:
            raise Stop

    cut = validate_config({**config, "out": str(tmp_path / "cut")})
    with pytest.raises(Stop):
        run_server(InlineGrid(app, 3), cut, stop_after_round_1)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["strategy"]["lora_base_folded"]
    run_server(InlineGrid(app, 3), cut, resume=True)
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("ref", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sites_peft_adapter_directories_start_a_lora_run_as_the_same_functions(tmp_path):
    """--client-init-from DIR with PEFT save_pretrained directories DIR/partition<P>/ (each site's own lora_alpha,
    rslora or not): every client starts from a model computing what the site's PEFT model computes (B rescaled
    to the run's scale); a rank that is not the client's is one line, exit 2, nothing written."""
    from fedfuse.cli import main
    from fedfuse.data import load_dataset
    from fedfuse.experiment import apart_model, client_model, model_for
    from fedfuse.lora import inject_peft, layer_scales, trained_keys
    from strategies.registry import validate_config

    run = {"strategy": "svd-lora", "lora-ranks": "2,4", "dataset": "digits", "num-clients": 3,
           "pretrain": "low-classes", "pretrain-epochs": 2}  # fmt: skip
    ds = load_dataset("digits")
    cfg = validate_config(run)
    template = client_model(cfg, ds, 0)
    targets = ",".join(layer_scales(template))
    head = sorted({k.rpartition(".")[0] for k in trained_keys(template)})
    sites = tmp_path / "sites"
    peft_models = {}
    for p, (rank, alpha, scale) in enumerate([(2, 16.0, "standard"), (4, 6.0, "rslora"), (2, 4.0, "standard")]):
        torch.manual_seed(p)
        peft = inject_peft(model_for({**cfg, "lora-ranks": ""}, ds), targets, rank, alpha, head=head, scale=scale)
        with torch.no_grad():
            for param in peft.parameters():
                if param.requires_grad:  # the site's fine-tuning: B away from 0, the head moved
                    param.add_(0.05 * torch.randn_like(param))
        peft.save_pretrained(str(sites / f"partition{p}"))
        peft_models[p] = peft.eval()
    x = torch.as_tensor(ds.x_test[:64], dtype=torch.float32)
    for p, peft in peft_models.items():
        model = apart_model({**cfg, "client-init-from": str(sites)}, ds, p).eval()
        with torch.no_grad():
            assert torch.allclose(model(x), peft(x), atol=1e-5), p
    flags = ["--backend", "inline", "--strategy", "svd-lora", "--lora-ranks", "2,4", "--dataset", "digits",
             "--num-clients", "3", "--rounds", "1", "--pretrain", "low-classes", "--pretrain-epochs", "2"]  # fmt: skip
    assert main(["simulate", *flags, "--client-init-from", str(sites), "--out", str(tmp_path / "a")]) == 0
    wrong = inject_peft(model_for({**cfg, "lora-ranks": ""}, ds), targets, 2, 8.0, head=head)
    wrong.save_pretrained(str(sites / "partition1"))  # partition 1 trains at rank 4
    with pytest.raises(ConfigError, match=r"client-init-from: '.*partition1' does not fit the model: .*lora_A"):
        apart_model({**cfg, "client-init-from": str(sites)}, ds, 1)
    assert main(["simulate", *flags, "--client-init-from", str(sites), "--out", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b").exists()
    plain = ["--backend", "inline", "--dataset", "digits", "--num-clients", "3", "--rounds", "1"]
    with pytest.raises(ConfigError, match="is a PEFT adapter directory; it needs a LoRA run"):
        from fedfuse.experiment import load_init_state

        load_init_state(sites / "partition0", model_for(validate_config({"dataset": "digits"}), ds))
    assert main(["simulate", *plain, "--client-init-from", str(sites), "--out", str(tmp_path / "c")]) == 2


def test_a_lora_runs_own_model_is_a_base_for_the_next_run(tmp_path):
    """``--base`` takes a LoRA run's ``model.pt`` (adapters and folded base weights): its adapters are folded into
    the plain model with the run's alpha, so the next run starts as the same function (round 0 = the last round)."""
    from fedfuse.results import load_metrics
    from strategies.registry import validate_config

    first, _, _ = _run(tmp_path / "a", validate_config({**SMALL, "strategy": "fedex-lora", "lora-rank": 2}))
    again = {k: v for k, v in SMALL.items() if not k.startswith("pretrain")}
    cfg = validate_config({**again, "strategy": "svd-lora", "lora-rank": 4, "base": str(tmp_path / "a" / "model.pt"),
                           "num-rounds": 1})  # fmt: skip
    _run(tmp_path / "b", cfg)
    assert load_metrics(tmp_path / "b")["rounds"][0]["central_accuracy"] == first["central_accuracy"]


def test_full_fedavg_reports_its_bytes_like_the_lora_strategies(tmp_path):
    """A LoRA-vs-full comparison reads both from the metrics: full FedAvg moves the whole model to and from a node."""
    from strategies.registry import validate_config

    full, _, _ = _run(tmp_path / "full", validate_config({**SMALL, "strategy": "fedavg", "num-rounds": 1}))
    lora_run, _, _ = _run(tmp_path / "lora", validate_config({**SMALL, "strategy": "fedex-lora", "lora-rank": 2,
                                                             "num-rounds": 1}))  # fmt: skip
    model = torch.load(tmp_path / "full" / "model.pt")
    nbytes = sum(v.numel() * v.element_size() for v in model.values())
    assert full["bytes_down"] == full["bytes_up"] == 3 * nbytes
    assert 0 < lora_run["bytes_up"] < 0.2 * full["bytes_up"]
