"""fedfuse.selection: one glob grammar for LMC layer groups, partial-averaging presets and PFN masks."""

from __future__ import annotations

import pytest
from torch import nn

from fedfuse.errors import ConfigError
from fedfuse.lmc import layer_groups
from fedfuse.models import MLP, VGG
from fedfuse.selection import batchnorm_keys, head_keys, matches, select_keys, shared_keys
from fedfuse.subspace import pfn_mask

KEYS = ["net.1.weight", "net.1.bias", "net.10.weight", "net.10.bias", "head.weight"]


def test_a_module_name_selects_its_entries_and_nothing_else() -> None:
    assert matches("net.1.weight", "net.1") and matches("net.1.bias", "net.1")
    assert not matches("net.10.weight", "net.1")  # "net.1" is a module name, not a prefix of "net.10"
    assert matches("net.10.weight", "net.1*")
    assert matches("net.1.weight", "*.weight") and not matches("net.1.bias", "*.weight")
    assert matches("net.1.weight", "net") and not matches("network.weight", "net")
    assert not matches("Net.1.weight", "net.1")  # case-sensitive


def test_select_keys_keeps_key_order_and_names_a_pattern_matching_nothing() -> None:
    assert select_keys(KEYS, ["head", "net.1"]) == ["net.1.weight", "net.1.bias", "head.weight"]
    with pytest.raises(ConfigError, match=r"layers: \['conv\*'\] match no state-dict key; keys: net.1.weight, "):
        select_keys(KEYS, ["net.1", "conv*"], label="layers")


def test_presets_and_the_same_grammar_in_lmc_and_pfn_masks() -> None:
    mlp = MLP((8,), 3, (4, 4))  # net.1, net.3, net.5 (head)
    assert head_keys(mlp) == ["net.5.weight", "net.5.bias"]
    assert shared_keys(mlp, "body") == ["net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"]
    assert shared_keys(mlp, "layers=net.1,net.5.bias") == ["net.1.weight", "net.1.bias", "net.5.bias"]
    with pytest.raises(ConfigError, match="match no state-dict key"):
        shared_keys(mlp, "layers=nope.*")
    with pytest.raises(ConfigError, match="no BatchNorm"):
        shared_keys(mlp, "no-bn")
    with pytest.raises(ConfigError, match="layerwise-preset='tail' is not allowed"):
        shared_keys(mlp, "tail")
    cnn = VGG((1, 8, 8), 3, (4, "M"), batch_norm=True, hidden=8)
    bn = batchnorm_keys(cnn)
    assert bn and all(isinstance(dict(cnn.named_modules())[k.rsplit(".", 1)[0]], nn.BatchNorm2d) for k in bn)
    assert not set(bn) & set(shared_keys(cnn, "no-bn"))

    # the module name "net.1" selects the same entries everywhere
    assert layer_groups(mlp, ["net.1"]) == {"net.1": ["net.1.weight", "net.1.bias"]}
    masks = pfn_mask(mlp, 0.5, seed=0, layers=["net.1"])
    assert [k for k, m in masks.items() if bool(m.any())] == ["net.1.weight", "net.1.bias"]
