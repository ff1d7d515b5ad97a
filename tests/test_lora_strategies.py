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
        (["--lora-rank", "2", "--lora-targets", "conv*"], "'conv\\*' matches no Linear/Conv2d layer"),
        (["--lora-ranks", "2,x"], "lora-ranks='2,x' is not a comma-separated list"),
        (["--lora-rank", "2", "--base", "BAD"], "base: .* does not fit the model"),
        ([], "needs lora-rank >= 1"),
    ],
)
def test_bad_lora_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, flags, message):
    from fedfuse.cli import main

    bad = tmp_path / "bad.pt"
    torch.save({"net.1.weight": torch.zeros(2, 2)}, bad)
    out = tmp_path / "run"
    flags = [str(bad) if f == "BAD" else f for f in flags]
    rc = main(["simulate", "--backend", "inline", "--strategy", "fedavg-lora", *flags, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert pytest.importorskip("re").search(message, err[0]), err[0]
    assert not out.exists()
