"""``fedfuse merge``: N parents → model.pt, merge.json, merge.png; mergekit-style recipes; one-line refusals.

Parents are tiny MLPs (width 16) trained for a few epochs on thirds of digits in the fixture (seconds).
"""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from fedfuse.align import fusion
from fedfuse.cli import main
from fedfuse.data import load_dataset
from fedfuse.models import build_model
from fedfuse.state import torch_threads, weighted_average
from fedfuse.train import evaluate, train

WIDTH = ["--model", "mlp", "--width", "16"]


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


def refused(argv: list[str], capsys, out) -> str:
    """Asserts exit 2, one line on stderr, no traceback, and ``out`` not created; returns the line."""
    existed = out.exists()
    before = sorted(p.name for p in out.iterdir()) if existed else None
    code = run_cli([*argv, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert out.exists() == existed
    if existed:
        assert sorted(p.name for p in out.iterdir()) == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no hidden leftovers
    return err


def _train(net: nn.Module, i: int) -> dict[str, torch.Tensor]:
    ds = load_dataset("digits")
    idx = torch.arange(i, len(ds.x_train), 3)  # a third of the training set each
    train(net, ds.x_train[idx], ds.y_train[idx], epochs=6, lr=0.05, momentum=0.9, seed=i)
    return net.state_dict()


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    """Three MLPs (width 16) from their own inits, each trained on its own third of digits."""
    root = tmp_path_factory.mktemp("parents")
    paths = []
    with torch_threads(1):  # tiny nets: threads only contend
        for i in range(3):
            net = build_model("mlp", (1, 8, 8), 10, width=16, seed=100 + i)
            torch.save(_train(net, i), root / f"p{i}.pt")
            paths.append(str(root / f"p{i}.pt"))
    return paths


def _net(state: dict[str, torch.Tensor]) -> nn.Module:
    net = build_model("mlp", (1, 8, 8), 10, width=16)
    net.load_state_dict(state)
    return net.eval()


def test_merge_writes_model_plot_and_json_with_real_accuracies(parents, tmp_path) -> None:
    # Prepare: 2 parents weighted 3:1, two methods, digits' test split
    out = tmp_path / "m"
    argv = ["merge", parents[0], parents[1], *WIDTH, "--method", "average,wb", "--weights", "3", "1"]
    # Execute
    assert run_cli([*argv, "--test-data", "digits", "--out", str(out)]) == 0
    # Assert: every number in merge.json is what evaluating the models ourselves gives
    report = json.loads((out / "merge.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["merge.json", "merge.png", "model.pt"]
    assert {"parents", "average", "ensemble", "methods", "seconds", "saved"} <= set(report)
    ds = load_dataset("digits")
    states = [torch.load(p, weights_only=True) for p in parents[:2]]
    assert report["parents"] == [evaluate(_net(s), ds.x_test, ds.y_test)[1] for s in states]
    assert report["weights"] == [0.75, 0.25]
    plain = weighted_average(states, [0.75, 0.25])
    assert report["average"] == evaluate(_net(plain), ds.x_test, ds.y_test)[1]
    with torch.no_grad():
        logits = 0.75 * _net(states[0])(ds.x_test) + 0.25 * _net(states[1])(ds.x_test)
    assert report["ensemble"] == int((logits.argmax(1) == ds.y_test).sum()) / len(ds.y_test)
    assert set(report["methods"]) == {"average", "wb"} and report["methods"]["average"] == report["average"]
    best = max(report["methods"], key=report["methods"].get)
    saved = torch.load(out / "model.pt", weights_only=True)
    assert report["saved"]["variant"] == best
    assert evaluate(_net(saved), ds.x_test, ds.y_test)[1] == report["methods"][best] == report["saved"]["accuracy"]
    assert (out / "merge.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_method_all_runs_every_method_with_and_without_repair_and_distillation(parents, tmp_path) -> None:
    out = tmp_path / "all"
    argv = ["merge", *parents, *WIDTH, "--method", "all", "--repair", "--distill-data", "digits"]
    assert run_cli([*argv, "--distill-epochs", "2", "--test-data", "digits", "--out", str(out)]) == 0
    report = json.loads((out / "merge.json").read_text())
    want = {m + r + d for m in fusion.METHODS for r in ("", "+repair") for d in ("", "+distill")}
    assert set(report["methods"]) == want == set(report["seconds"])
    assert all(0.0 <= a <= 1.0 for a in report["methods"].values())
    # distillation moves the fused MLP toward the ensemble: it never returns a student worse on held-out KL, and
    # on these parents the distilled average is more accurate than the plain one
    assert report["methods"]["average+distill"] > report["methods"]["average"]
    assert len(report["parents"]) == 3 and report["distill_data"]["source"] == "digits (train split)"


def test_distill_data_synthetic_is_data_free(parents, tmp_path) -> None:
    out = tmp_path / "syn"
    argv = ["merge", *parents[:2], *WIDTH, "--method", "wb", "--distill-data", "synthetic", "--data-samples", "64"]
    assert run_cli([*argv, "--distill-epochs", "1", "--test-data", "digits", "--out", str(out)]) == 0
    report = json.loads((out / "merge.json").read_text())
    assert set(report["methods"]) == {"wb", "wb+distill"}
    assert report["distill_data"] == {"source": "synthetic N(0, 1)", "samples": 64}


def test_save_names_the_variant_and_dtype_casts_it(parents, tmp_path) -> None:
    out = tmp_path / "s"
    argv = ["merge", *parents[:2], *WIDTH, "--method", "match,wb", "--save", "match", "--dtype", "float16"]
    assert run_cli([*argv, "--test-data", "digits", "--out", str(out)]) == 0
    report = json.loads((out / "merge.json").read_text())
    saved = torch.load(out / "model.pt", weights_only=True)
    assert report["saved"]["variant"] == "match" and report["saved"]["dtype"] == "float16"
    assert all(v.dtype == torch.float16 for v in saved.values())
    ds = load_dataset("digits")
    acc = evaluate(_net({k: v.float() for k, v in saved.items()}), ds.x_test, ds.y_test)[1]
    assert report["saved"]["accuracy"] == acc


def test_npz_test_data_gives_the_same_numbers_as_the_data_set(parents, tmp_path) -> None:
    ds = load_dataset("digits")
    np.savez(tmp_path / "test.npz", x=ds.x_test.reshape(len(ds.x_test), -1).numpy(), y=ds.y_test.numpy())  # flat x
    np.savez(tmp_path / "inputs.npz", x=ds.x_train[:200].numpy())
    runs = {}
    for name, data in (("npz", str(tmp_path / "test.npz")), ("builtin", "digits")):
        out = tmp_path / name
        argv = ["merge", *parents[:2], *WIDTH, "--method", "wb", "--repair", "--data", str(tmp_path / "inputs.npz")]
        assert run_cli([*argv, "--test-data", data, "--out", str(out)]) == 0
        runs[name] = json.loads((out / "merge.json").read_text())
    for key in ("parents", "average", "ensemble", "methods"):
        assert runs["npz"][key] == runs["builtin"][key]
    assert runs["npz"]["test_samples"] == len(ds.y_test) and runs["npz"]["data"]["samples"] == 200


def test_a_users_own_model_factory(tmp_path, monkeypatch) -> None:
    # Prepare: a module in the working directory with a factory, and two parents built from it
    (tmp_path / "my_merge_models.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def tiny(input_shape, num_classes):
                return nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, num_classes))
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_merge_models

    for i in range(2):
        torch.manual_seed(i)
        torch.save(_train(my_merge_models.tiny((1, 8, 8), 10), i), tmp_path / f"t{i}.pt")
    # Execute
    argv = ["merge", "t0.pt", "t1.pt", "--model", "my_merge_models:tiny", "--method", "match", "--test-data", "digits"]
    code = run_cli([*argv, "--out", "out"])
    sys.modules.pop("my_merge_models", None)
    # Assert
    assert code == 0
    report = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert report["model"] == "my_merge_models:tiny" and set(report["methods"]) == {"match"}
    assert all(a > 0.3 for a in report["parents"])  # trained, far above chance (0.1)


def _recipe(tmp_path, parents, method: str = "linear", extra: str = "") -> str:
    path = tmp_path / "recipe.yml"
    path.write_text(
        textwrap.dedent(
            f"""
            models:
              - model: {parents[0]}
                parameters:
                  weight: 1.0
              - model: {parents[1]}
                parameters:
                  weight: 3.0
            merge_method: {method}
            dtype: bfloat16
            fedfuse:
              model: mlp
              width: 16
              test-data: digits
            """
        )
        + extra
    )
    return str(path)


@pytest.mark.parametrize("form", ["positional", "--recipe"])
def test_mergekit_recipe_linear_is_the_weighted_average(parents, tmp_path, form) -> None:
    recipe = _recipe(tmp_path, parents)
    out = tmp_path / "r"
    argv = ["merge", recipe] if form == "positional" else ["merge", "--recipe", recipe]
    assert run_cli([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "merge.json").read_text())
    assert report["weights"] == [0.25, 0.75] and set(report["methods"]) == {"average"}
    assert report["methods"]["average"] == report["average"]
    saved = torch.load(out / "model.pt", weights_only=True)
    plain = weighted_average([torch.load(p, weights_only=True) for p in parents[:2]], [0.25, 0.75])
    assert all(torch.equal(saved[k], plain[k].to(torch.bfloat16)) for k in plain)


@pytest.mark.parametrize(
    ("method", "extra", "message"),
    [
        ("ties", "", "merge_method='ties' is not supported; supported: linear (= average), average, match"),
        ("linear", "slices: []\n", "slices (layer ranges) are not supported"),
        ("linear", "tokenizer_source: union\n", "recipe key 'tokenizer_source' is not supported"),
        ("linear", "parameters: {normalize: false}\n", "fedfuse always normalises"),
    ],
)
def test_recipe_it_cannot_honour_is_one_line(parents, tmp_path, capsys, method, extra, message) -> None:
    err = refused(["merge", _recipe(tmp_path, parents, method, extra)], capsys, tmp_path / "out")
    assert message in err


def test_recipe_and_flags_that_disagree_are_refused(parents, tmp_path, capsys) -> None:
    err = refused(["merge", _recipe(tmp_path, parents), "--width", "32"], capsys, tmp_path / "out")
    assert "--width=32 disagrees with the recipe's 16" in err


def test_overwrite_replaces_a_previous_merge_and_nothing_else(parents, tmp_path, capsys) -> None:
    out = tmp_path / "o"
    argv = ["merge", *parents[:2], *WIDTH, "--test-data", "digits"]
    assert run_cli([*argv, "--method", "average", "--out", str(out)]) == 0
    assert "is not empty; pass --overwrite" in refused([*argv, "--method", "wb"], capsys, out)
    assert run_cli([*argv, "--method", "wb", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["merge.json", "merge.png", "model.pt"]
    assert set(json.loads((out / "merge.json").read_text())["methods"]) == {"wb"}
    (out / "notes.txt").write_text("someone else's file")
    err = refused([*argv, "--method", "average", "--overwrite"], capsys, out)
    assert "holds 'notes.txt', not only a previous merge's" in err


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "'/no/such/p.pt' is not a file"),
        ("pickled", "holds pickled code or objects, not just tensors; refused"),
        ("garbage", "is not a torch file; allowed: a state dict saved with torch.save (e.g. torch.save("),
        ("width", "does not fit model='mlp': 'net.1.weight' has shape (16, 64), the model's is (32, 64)"),
        ("method", "method='ties' is not supported; allowed: average, match"),
        ("model", "model='vit' is not allowed"),
        ("factory", "model='no_such_pkg.mod:f' cannot be imported"),
        ("npz-no-y", "lacks array(s) y; expected x, y"),
        ("npz-shape", "the parents were built with (built here for test-data samples of shape (5,))"),
        ("data-shape", "data='digits (train split)': samples have shape (1, 8, 8), the test data's are (5,)"),
        ("not-data", "is neither an .npz file (arrays x, y) nor a data set"),
        ("repair-no-data", "--repair needs inputs to look at; pass --data"),
        ("distill-lr", "distill-lr=0.0 is out of range; allowed: > 0"),
        ("weights", "weights: 3 given for 2 parents"),
        ("one-parent", "merge needs at least 2 parent state dicts, got 1"),
        ("save", "save='gw' is not among the variants run; allowed: wb"),
        ("no-test-data", "--test-data FILE.npz|DATASET is required"),
        ("seed", "seed=-1 is out of range; allowed: an integer >= 0"),
        ("nan-lr", "distill-lr=nan is not a finite number"),
        ("int", "'net.1.weight' holds int64, the model's float32 is floating point"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(parents, tmp_path, capsys, case, message) -> None:
    # Prepare: each case one bad value in an otherwise good command
    a, b = parents[:2]
    test, method, extra, width = "digits", "wb", [], "16"
    if case == "missing":
        b = "/no/such/p.pt"
    elif case == "pickled":
        b = str(tmp_path / "module.pt")
        torch.save(build_model("mlp", (1, 8, 8), 10, width=16), b)  # a whole module: pickled code
    elif case == "garbage":
        b = str(tmp_path / "junk.pt")
        (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    elif case == "width":
        width = "32"
    elif case == "method":
        method = "wb,ties"
    elif case in ("model", "factory"):
        extra = ["--model", "vit" if case == "model" else "no_such_pkg.mod:f"]
    elif case == "npz-no-y":
        test = str(tmp_path / "x.npz")
        np.savez(test, x=np.zeros((4, 64), np.float32))
    elif case == "npz-shape":
        test = str(tmp_path / "x5.npz")
        np.savez(test, x=np.zeros((4, 5), np.float32), y=np.zeros(4, np.int64))
    elif case == "data-shape":
        test = str(tmp_path / "x5.npz")
        np.savez(test, x=np.zeros((4, 5), np.float32), y=np.zeros(4, np.int64))
        extra = ["--repair", "--data", "digits"]
    elif case == "not-data":
        test = "digitz"
    elif case == "repair-no-data":
        test = str(tmp_path / "t.npz")
        np.savez(test, x=np.zeros((4, 64), np.float32), y=np.zeros(4, np.int64))
        extra = ["--repair"]
    elif case == "weights":
        extra = ["--weights", "1", "2", "3"]
    elif case == "one-parent":
        b = None
    elif case == "save":
        extra = ["--save", "gw"]
    elif case == "distill-lr":
        extra = ["--distill-data", "synthetic", "--distill-lr", "0"]
    elif case == "seed":
        extra = ["--seed", "-1"]
    elif case == "nan-lr":
        extra = ["--distill-data", "synthetic", "--distill-lr", "nan"]
    elif case == "int":  # no float entry left: the fusion's own NaN check would pass it and alignment then fail
        b = str(tmp_path / "int.pt")
        torch.save({k: v.long() for k, v in torch.load(parents[1]).items()}, b)
    argv = ["merge", a, *([b] if b else []), "--model", "mlp", "--width", width, "--method", method]
    argv += [] if case == "no-test-data" else ["--test-data", test]
    # Execute + Assert
    err = refused([*argv, *extra], capsys, tmp_path / "out")
    assert message in err, err


def test_all_skips_a_method_the_model_defeats_and_a_named_one_stops(tmp_path, monkeypatch, capsys) -> None:
    # Prepare: a factory whose cumsum mixes hidden units (no permutation commutes with it); two such parents
    (tmp_path / "my_odd_models.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class Odd(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.a, self.b = nn.Linear(64, 12), nn.Linear(12, 10)

                def forward(self, x):
                    return self.b(torch.cumsum(self.a(x.flatten(1)), 1))
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_odd_models

    for i in range(2):  # untrained: the refusal is about the architecture
        torch.manual_seed(i)
        torch.save(my_odd_models.Odd().state_dict(), tmp_path / f"o{i}.pt")
    argv = ["merge", "o0.pt", "o1.pt", "--model", "my_odd_models:Odd", "--test-data", "digits"]
    # Execute: all methods, then wb alone
    code_all = run_cli([*argv, "--method", "all", "--out", "all"])
    capsys.readouterr()
    err = refused([*argv, "--method", "wb"], capsys, tmp_path / "wb")
    sys.modules.pop("my_odd_models", None)
    # Assert: `all` keeps what works and names what it skipped; a named method is one line, exit 2
    assert code_all == 0
    report = json.loads((tmp_path / "all" / "merge.json").read_text())
    assert set(report["methods"]) == {"average"}
    assert set(report["skipped"]) == set(fusion.METHODS) - {"average"}
    assert all("torch.cumsum" in why for why in report["skipped"].values())
    assert "method='wb' on model='my_odd_models:Odd'" in err and "torch.cumsum" in err
