"""fedfuse.merge: merging models trained apart (distillation, CCA Merge, zipping) on digits, in seconds."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedfuse import ConfigError, build_model, evaluate, load_dataset, train
from fedfuse.align import fuse
from fedfuse.align.bn import fold_bn, fold_pairs, reset_bn_stats
from fedfuse.align.solvers import resolve_spec
from fedfuse.align.transport import permute_model
from fedfuse.merge.distill import distill, ensemble_logits, synthetic_inputs
from fedfuse.merge.linear import unfold_measured
from fedfuse.merge.partial import multihead_bytes, partial_zip
from fedfuse.merge.zip import zip_clusters


def _skewed_pair(data, make, epochs: int) -> list:
    """``make(i)`` for i = 0, 1, trained on label-skewed halves of ``data``: 80 % of classes 0-4 to parent 0 and of
    5-9 to parent 1 (and 20 % of the others)."""
    x, y = data.x_train, data.y_train
    rng = np.random.default_rng(0)
    nets = []
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(1)
        for i in range(2):
            mine = (y.numpy() < 5) == (i == 0)
            idx = torch.as_tensor(np.flatnonzero(np.where(mine, rng.random(len(y)) < 0.8, rng.random(len(y)) < 0.2)))
            net = make(i)
            train(net, x[idx], y[idx], epochs=epochs, lr=0.05, momentum=0.9, batch_size=32, seed=i)
            nets.append(net)
    return nets


@pytest.fixture(scope="module")
def digits_parents():
    """Two MLPs (64 wide) from their own inits on label-skewed halves of digits; an unlabeled batch; the test set."""
    data = load_dataset("digits", seed=0)
    x = data.x_train
    parents = _skewed_pair(
        data, lambda i: build_model("mlp", data.input_shape, data.num_classes, width=64, depth=2, seed=10 + i), 15
    )
    unlabeled = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:400]]
    return data, parents, unlabeled


def _acc(template, state, data) -> float:
    net = build_model("mlp", data.input_shape, data.num_classes, width=64, depth=2)
    net.load_state_dict(state)
    return evaluate(net, data.x_test, data.y_test)[1]


def _kl_to_ensemble(net, parents, x) -> float:
    with torch.no_grad():
        target = F.softmax(ensemble_logits(parents, x), 1)
        return float(F.kl_div(F.log_softmax(net(x), 1), target, reduction="batchmean"))


def test_distill_moves_the_fused_model_toward_the_ensemble_deterministically(digits_parents):
    data, parents, unlabeled = digits_parents
    student = build_model("mlp", data.input_shape, data.num_classes, width=64, depth=2)
    student.load_state_dict(fuse(parents, method="average"))
    before_state = {k: v.clone() for k, v in student.state_dict().items()}
    s1 = distill(student, parents, unlabeled, epochs=10, seed=3)
    s2 = distill(student, parents, unlabeled, epochs=10, seed=3)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)  # deterministic for a seed
    assert all(torch.equal(before_state[k], v) for k, v in student.state_dict().items())  # student untouched
    after = build_model("mlp", data.input_shape, data.num_classes, width=64, depth=2)
    after.load_state_dict(s1)
    # on held-out test inputs (never seen by distillation): closer to the ensemble, and more accurate
    assert _kl_to_ensemble(after, parents, data.x_test) < 0.5 * _kl_to_ensemble(student, parents, data.x_test)
    assert evaluate(after, data.x_test, data.y_test)[1] > evaluate(student, data.x_test, data.y_test)[1] + 0.05
    s3 = distill(student, parents, unlabeled, epochs=10, seed=4)
    assert any(not torch.equal(s1[k], s3[k]) for k in s1)


def test_distill_refuses_bad_input_in_one_line(digits_parents):
    data, parents, unlabeled = digits_parents
    student = parents[0]
    for kwargs, word in [
        ({"data": unlabeled[:1]}, "at least 2 inputs"),
        ({"data": torch.zeros(8, 5)}, "cannot run on data of shape (8, 5)"),
        ({"data": unlabeled, "epochs": 0}, "epochs=0"),
        ({"data": unlabeled, "temperature": 0.0}, "temperature=0.0"),
    ]:
        with pytest.raises(ConfigError, match=None) as err:
            distill(student, parents, **kwargs)
        assert word in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="teachers"):
        distill(student, [], unlabeled)


def test_synthetic_inputs_match_the_statistics_of_a_batch(digits_parents):
    _, _, unlabeled = digits_parents
    z = synthetic_inputs(5000, unlabeled, seed=0)
    assert z.shape == (5000, *unlabeled.shape[1:])
    assert torch.allclose(z.mean(0), unlabeled.mean(0), atol=0.1)
    assert torch.allclose(z.std(0), unlabeled.std(0), atol=0.1, rtol=0.1)
    assert torch.equal(z, synthetic_inputs(5000, unlabeled, seed=0))
    with pytest.raises(ConfigError, match="like= .* or shape="):
        synthetic_inputs(10)


# ---------------------------------------------------------------------------------------------------------------
# CCA Merge and zipping (fuse(method="cca" | "zip", data=...))
# ---------------------------------------------------------------------------------------------------------------


def _digits_bn_cnn_parents(data):
    """Two small BN CNNs (conv 8-16-16) from their own inits on label-skewed halves of digits."""

    def make(i: int):
        return build_model("cnn", data.input_shape, data.num_classes, width=32, batch_norm=True, seed=20 + i)

    return [net.eval() for net in _skewed_pair(data, make, 10)]


@pytest.fixture(scope="module")
def bn_cnn_parents(digits_parents):
    data = digits_parents[0]
    return _digits_bn_cnn_parents(data)


def _outputs(template, state, x):
    net = copy.deepcopy(template)
    net.load_state_dict(state)
    with torch.no_grad():
        return net.eval()(x)


@pytest.mark.parametrize("method", ["cca", "zip"])
@pytest.mark.parametrize("arch", ["mlp", "cnn-bn"])
def test_a_permuted_copy_is_recovered_exactly(method, arch, digits_parents, bn_cnn_parents):
    data, mlps, unlabeled = digits_parents
    net = mlps[0] if arch == "mlp" else bn_cnn_parents[0]
    spec = resolve_spec(None, net, unlabeled[:2])
    perm, _ = permute_model(net, spec, seed=3)
    fused = fuse([net, perm], method=method, template=net, data=unlabeled, bn_repair=None)
    with torch.no_grad():
        ref, ref_test = net.eval()(unlabeled), net(data.x_test)
    # exact on the inputs the maps were fitted on; elsewhere units that never fired on them may pair differently
    assert torch.allclose(_outputs(net, fused, unlabeled), ref, atol=1e-4, rtol=1e-4)
    assert (_outputs(net, fused, data.x_test).argmax(1) == ref_test.argmax(1)).float().mean() > 0.99


@pytest.mark.parametrize("method", ["cca", "zip"])
def test_merging_two_mlps_trained_apart_beats_plain_averaging(method, digits_parents):
    data, parents, unlabeled = digits_parents
    template = parents[0]
    average = _acc(template, fuse(parents, method="average"), data)
    merged = _acc(template, fuse(parents, method=method, template=template, data=unlabeled), data)
    assert merged > average + 0.03, (merged, average)


def test_repair_composes_with_zip_on_a_batchnorm_cnn(digits_parents, bn_cnn_parents):
    data, _, unlabeled = digits_parents
    net = bn_cnn_parents[0]

    def acc(state):
        m = copy.deepcopy(net)
        m.load_state_dict(state)
        return evaluate(m, data.x_test, data.y_test)[1]

    plain = acc(fuse(bn_cnn_parents, method="zip", template=net, data=unlabeled, bn_repair=None))
    repaired = acc(fuse(bn_cnn_parents, method="zip", template=net, data=unlabeled, bn_repair="repair"))
    average = acc(fuse(bn_cnn_parents, method="average", template=net, data=unlabeled, bn_repair="repair"))
    assert repaired > plain + 0.05 and repaired > average + 0.1, (plain, repaired, average)


def test_unfold_measured_keeps_the_function_and_sets_the_units_statistics(digits_parents, bn_cnn_parents):
    data, _, unlabeled = digits_parents
    net = bn_cnn_parents[0]
    pairs = fold_pairs(net, unlabeled[:2])
    folded = fold_bn(net.state_dict(), pairs)
    state = unfold_measured(folded, pairs, net, unlabeled)
    with torch.no_grad():
        ref = net.eval()(data.x_test)
    assert torch.allclose(_outputs(net, state, data.x_test), ref, atol=1e-4, rtol=1e-4)
    m = copy.deepcopy(net)
    m.load_state_dict(state)
    reset_bn_stats(m.eval(), unlabeled, batch_size=len(unlabeled))
    for _, bn, _ in pairs:  # the running statistics are already the fused units' own statistics on the batch
        assert torch.allclose(m.state_dict()[f"{bn}.running_mean"], state[f"{bn}.running_mean"], atol=1e-4)


def test_zip_clusters_pairs_the_most_correlated_features_within_and_across_models():
    # features 0..3 of model A, 4..7 of model B: A0~B1, A1~A2 (a within-model pair), A3~B3 ; B0~B2 (within B)
    pairs = [(0, 5), (1, 2), (3, 7), (4, 6)]
    corr = np.full((8, 8), 0.1)
    for i, j in pairs:
        corr[i, j] = corr[j, i] = 0.9
    labels = zip_clusters(corr, 4, cap=2)
    for i, j in pairs:
        assert labels[i] == labels[j]
    assert sorted(np.bincount(labels).tolist()) == [2, 2, 2, 2]
    # five models, cap 5: 15 random features still end in exactly 3 non-empty clusters (when the cap cannot pack,
    # the smallest merge is taken); with a clear structure the clusters are the correlated blocks
    rng = np.random.default_rng(0)
    c = rng.uniform(-1, 1, (15, 15))
    counts = np.bincount(zip_clusters((c + c.T) / 2, 3, cap=5))
    assert len(counts) == 3 and counts.min() > 0 and counts.sum() == 15
    block = np.kron(np.eye(3), np.ones((5, 5))) * 0.8 + c * 0.1
    labels = zip_clusters((block + block.T) / 2, 3, cap=5)
    assert [len(set(labels[k * 5 : k * 5 + 5])) for k in range(3)] == [1, 1, 1]


def test_activation_methods_refuse_bad_input_in_one_line(digits_parents):
    data, parents, unlabeled = digits_parents
    cases = [
        ({"method": "cca"}, "needs data="),
        ({"method": "zip", "data": torch.zeros(8, 3)}, "cannot run on data of shape (8, 3)"),
        ({"method": "cca", "data": unlabeled[:1]}, "at least 2 inputs"),
        ({"method": "zip", "data": unlabeled, "target_width": 32}, "target_width does not apply"),
    ]
    for kwargs, words in cases:
        with pytest.raises(ConfigError) as err:
            fuse(parents, template=parents[0], **kwargs)
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
    narrow = build_model("mlp", data.input_shape, data.num_classes, width=32, depth=2, seed=0)
    with pytest.raises(ConfigError, match="needs identical shapes"):
        fuse([parents[0], narrow], method="cca", template=parents[0], data=unlabeled)
    ln = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(), torch.nn.Linear(16, 10)
    )
    with pytest.raises(ConfigError, match="LayerNorm"):
        fuse([ln, copy.deepcopy(ln)], method="zip", template=ln, data=unlabeled)


# ---------------------------------------------------------------------------------------------------------------
# gwb = wb after its warm start (README: "gwb and wb"); pinned so that a change of either shows here
# ---------------------------------------------------------------------------------------------------------------


def test_gwb_at_its_default_alpha_returns_wb_bit_for_bit_also_for_unequal_widths(digits_parents):
    data, parents, _ = digits_parents
    x, y = data.x_train, data.y_train
    narrow = build_model("mlp", data.input_shape, data.num_classes, width=32, depth=2, seed=30)
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(1)
        train(narrow, x[y.numpy() % 2 == 0], y[y.numpy() % 2 == 0], epochs=10, lr=0.05, momentum=0.9, seed=0)
    for models in (parents, [narrow, parents[1]]):
        wb = fuse(models, method="wb", template=parents[0], target_width=64, bn_repair=None)
        gwb = fuse(models, method="gwb", template=parents[0], target_width=64, bn_repair=None)
        assert all(torch.equal(wb[k], gwb[k]) for k in wb)
    # unequal depths: neither fuses them (layers are paired one to one), one line
    deep = build_model("mlp", data.input_shape, data.num_classes, width=64, depth=3, seed=0)
    with pytest.raises(ConfigError, match="does not match model 0's architecture"):
        fuse([parents[0], deep], method="gwb", template=parents[0])


# ---------------------------------------------------------------------------------------------------------------
# partial zipping: the last k groups kept apart as a multi-head ensemble
# ---------------------------------------------------------------------------------------------------------------


def test_partial_zip_spans_full_zipping_to_the_ensemble(digits_parents, bn_cnn_parents):
    data, mlps, unlabeled = digits_parents
    for parents in (mlps, bn_cnn_parents):
        net = parents[0]
        groups = len(resolve_spec(None, net, unlabeled[:2]).groups)
        with torch.no_grad():
            ens = ensemble_logits(parents, data.x_test)
            full = _outputs(net, fuse(parents, method="zip", template=net, data=unlabeled, bn_repair=None), data.x_test)
            none = partial_zip(parents, template=net, data=unlabeled, keep_last=groups)(data.x_test)
            zero = partial_zip(parents, template=net, data=unlabeled, keep_last=0)(data.x_test)
        assert torch.allclose(none, ens, atol=1e-4, rtol=1e-4)  # nothing zipped: the logit ensemble
        assert torch.allclose(zero, full, atol=1e-4, rtol=1e-4)  # everything zipped: fuse(method="zip")
    head = partial_zip(mlps, template=mlps[0], data=unlabeled, keep_last=1)
    assert len(head.trunk) > 0 and multihead_bytes(head) < 2 * sum(v.numel() * 4 for v in mlps[0].state_dict().values())
    with pytest.raises(ConfigError, match="keep_last=7 is out of range"):
        partial_zip(mlps, template=mlps[0], data=unlabeled, keep_last=7)
