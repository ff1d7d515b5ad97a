"""Start-up: the CLI's help, option checks and bad-input exits load no torch, Flower, POT, scipy or pandas; the
torch-free name tables (fedfuse.catalog, strategies.options) agree with the modules that build the things."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "flwr", "ot", "scipy", "pandas", "sklearn")

PROBE = """
import json, sys
from fedfuse.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print(json.dumps({{"code": code, "heavy": heavy}}), file=sys.stderr)
"""


def _probe(*argv: str) -> tuple[int, list[str], str]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], capture_output=True, text=True, timeout=60
    )
    *lines, last = proc.stderr.strip().splitlines()
    report = json.loads(last)
    return report["code"], report["heavy"], "\n".join(lines)


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--help"], 0, ""),
        (["simulate", "--help"], 0, ""),
        (["simulate", "--rounds", "0"], 2, "num-rounds=0 is out of range; allowed: >= 1"),
        (["simulate", "--strategy", "wb", "--fusion-solver", "lp"], 2, "fusion-solver='lp' is not allowed"),
        (["simulate", "--strategy", "fedavg", "--gwb-alpha", "0.2"], 2, "gwb-alpha=0.2 needs strategy gwb"),
        (["simulate", "--model", "vgg"], 2, "model='vgg' is not allowed"),
        (["simulate", "--attack", "boost:2"], 2, "attack='boost:2' is not KIND:VALUE"),
    ],
)
def test_help_and_bad_options_load_no_heavy_library(argv: list[str], code: int, message: str) -> None:
    got, heavy, stderr = _probe(*argv)
    assert (got, heavy) == (code, [])
    assert message in stderr


def test_name_tables_agree_with_the_modules_that_build_them() -> None:
    from fedfuse import catalog, selection
    from fedfuse.align import gw
    from fedfuse.attacks import ATTACKS
    from fedfuse.data import DATASETS
    from fedfuse.models import LIBRARIES, MODELS
    from strategies import options
    from strategies.registry import STRATEGIES, resolve_strategy

    assert catalog.DATASET_NAMES == tuple(DATASETS)
    assert catalog.MODEL_NAMES == tuple(MODELS)
    assert catalog.LIBRARY_PREFIXES == tuple(LIBRARIES)
    assert catalog.ATTACKS == ATTACKS
    assert options.LAYERWISE_PRESETS == selection.LAYERWISE_PRESETS
    assert options.DEFAULT_ALPHA == gw.DEFAULT_ALPHA
    assert list(options.STRATEGY_OPTIONS) == list(STRATEGIES)
    for name in STRATEGIES:  # each class reads its options from the table
        assert resolve_strategy(name).options is options.STRATEGY_OPTIONS[name], name


def test_fedfuse_train_stays_the_function() -> None:
    import fedfuse
    import fedfuse.train as module  # noqa: F401  (binds fedfuse.train: must not replace the function)
    from fedfuse.train import train

    assert fedfuse.train is train
    assert fedfuse.build_model.__module__ == "fedfuse.models"


def test_digits_are_read_as_load_digits_reads_them() -> None:
    import numpy as np
    from sklearn.datasets import load_digits

    from fedfuse.data import digits_arrays

    x, y = digits_arrays()
    d = load_digits()
    assert x.dtype == d.data.dtype and np.array_equal(x, d.data) and np.array_equal(y, d.target)


def test_inline_fedavg_run_on_iid_digits_loads_no_alignment_or_dataset_library(tmp_path) -> None:
    """What every simulated client and the inline runner import for plain FedAvg: no scipy/POT (alignment, LoRA's
    matching), no Hugging Face datasets/flwr-datasets (the iid split is computed directly), no pandas."""
    code = (
        "import json, sys\n"
        "from fedfuse.runners.inline import run_inline\n"
        f"run_inline({{'dataset': 'digits', 'model': 'mlp', 'num-clients': 3, 'num-rounds': 1, 'partition': 'iid',"
        f" 'out': {str(tmp_path)!r}}})\n"
        "print(json.dumps(sorted(m for m in ('scipy', 'ot', 'datasets', 'flwr_datasets', 'pandas', 'sklearn')"
        " if m in sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
