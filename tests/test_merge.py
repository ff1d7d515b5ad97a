"""fedfuse.merge: merging models trained apart (distillation, CCA Merge, zipping) on digits, in seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedfuse import ConfigError, build_model, evaluate, load_dataset, train
from fedfuse.align import fuse
from fedfuse.merge.distill import distill, ensemble_logits, synthetic_inputs


@pytest.fixture(scope="module")
def digits_parents():
    """Two MLPs (64 wide) from their own inits on label-skewed halves of digits; an unlabeled batch; the test set."""
    data = load_dataset("digits", seed=0)
    x, y = data.x_train, data.y_train
    rng = np.random.default_rng(0)
    parents = []
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(1)
        for i in range(2):
            # 80 % of classes 0-4 to parent 0 and of 5-9 to parent 1 (and 20 % of the others)
            mine = (y.numpy() < 5) == (i == 0)
            keep = np.where(mine, rng.random(len(y)) < 0.8, rng.random(len(y)) < 0.2)
            idx = torch.as_tensor(np.flatnonzero(keep))
            net = build_model("mlp", data.input_shape, data.num_classes, width=64, depth=2, seed=10 + i)
            train(net, x[idx], y[idx], epochs=15, lr=0.05, momentum=0.9, batch_size=32, seed=i)
            parents.append(net)
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
