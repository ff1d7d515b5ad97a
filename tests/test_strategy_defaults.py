"""Every registered strategy is a drop-in for Flower's: the arguments it shares with its Flower base (``FedAvg``,
and ``FedProx`` for ours) default to Flower's values, and one built without its model says so in one line."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy import FedProx as FlowerFedProx

from fedfuse.align.fusion import DATA_METHODS
from fedfuse.errors import ConfigError
from fedfuse.models import build_model
from strategies.registry import STRATEGIES, build_strategy, resolve_strategy, validate_config

# (strategy name, argument) -> why it differs from Flower on purpose. Empty: none does.
DELIBERATE: dict[tuple[str, str], str] = {}

FLOWER = (FedAvg, FlowerFedProx)


def _flower_defaults(cls: type) -> dict[str, object]:
    """Every argument of the Flower strategies ``cls`` derives from, with Flower's default."""
    out: dict[str, object] = {}
    for base in FLOWER:
        if issubclass(cls, base):
            for p in inspect.signature(base.__init__).parameters.values():
                if p.name != "self":
                    out[p.name] = p.default
    return out


def _needs_model(cls: type) -> bool:
    try:
        cls()
    except TypeError:
        return True
    return False


def _build(cls: type) -> object:
    """``cls`` with its required arguments only (a small model where it needs one; cca/zip: a server batch)."""
    if not _needs_model(cls):
        return cls()
    data = {"server_data": torch.zeros(4, 1, 8, 8)} if getattr(cls, "method", "") in DATA_METHODS else {}
    return cls(model=build_model("mlp", (1, 8, 8), 10), **data)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_has_flowers_defaults(name: str) -> None:
    cls = resolve_strategy(name)
    flower = _flower_defaults(cls)
    assert "fraction_evaluate" in flower  # every registered strategy is a FedAvg
    ours = inspect.signature(cls.__init__).parameters
    strategy = _build(cls)
    reference = FedAvg()
    differ = {}
    for arg, default in flower.items():
        if arg in ours:  # stated in our own signature: the same default
            mine = ours[arg].default
        else:  # passed through **kwargs to Flower: what the built strategy holds
            assert any(p.kind is p.VAR_KEYWORD for p in ours.values()), (name, arg)
            mine = default
        held = getattr(strategy, arg)
        expected = getattr(reference, arg) if hasattr(reference, arg) else default
        if mine != default or held != expected:
            differ[arg] = (mine, held, default)
    deliberate = {arg for (n, arg) in DELIBERATE if n == name}
    assert set(differ) == deliberate, f"{name}: differs from Flower's defaults {differ}"


def test_fedfuses_own_server_app_still_evaluates_centrally() -> None:
    """`fedfuse simulate` / the ServerApp pass their sampling explicitly: central evaluation only, except
    layerwise's personalised evaluation on every client (behaviour unchanged by Flower's defaults above)."""
    model = build_model("mlp", (1, 8, 8), 10)
    for name in STRATEGIES:
        data = name in DATA_METHODS  # cca/zip need the server's unlabeled batch
        lora = {"lora-rank": 2} if name.endswith("lora") else {}  # LoRA strategies need a rank (tests/test_lora*)
        cfg = validate_config({"strategy": name, "num-clients": 4, **({"server-data": 4} if data else {}), **lora})
        batch = torch.zeros(4, 1, 8, 8) if data else None
        strategy = build_strategy(cfg, model=model, example_input=torch.zeros(2, 1, 8, 8), server_data=batch)
        wanted = 1.0 if name == "layerwise" else 0.0
        assert strategy.fraction_evaluate == wanted, name
        assert strategy.min_evaluate_nodes == 0 and strategy.min_available_nodes == 4, name
        assert strategy.min_train_nodes == min(2, math.ceil(4 * float(cfg["fraction-train"]))), name


@pytest.mark.parametrize("name", [n for n in STRATEGIES if n not in ("fedavg", "fedprox") and "lora" not in n])
def test_a_strategy_without_its_model_says_so_in_one_line(name: str) -> None:
    cls = resolve_strategy(name)
    with pytest.raises(TypeError) as info:
        cls()
    message = str(info.value)
    assert isinstance(info.value, ConfigError)  # the CLI's one line, exit 2
    assert "\n" not in message
    assert message == (
        f"{cls.__name__} needs model=, a torch module of the global architecture (the clients' model), "
        f"e.g. {cls.__name__}(model=Net())"
    )


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_misspelt_argument_names_the_nearest_one(name: str) -> None:
    """Flower's old name, and a run option's spelling where the argument is shorter: one line with the nearest."""
    cls = resolve_strategy(name)
    kw = {"model": build_model("mlp", (1, 8, 8), 10)} if _needs_model(cls) else {}
    if getattr(cls, "method", "") in DATA_METHODS:
        kw["server_data"] = torch.zeros(4, 1, 8, 8)
    with pytest.raises(ConfigError, match=r"takes no argument fraction_fit=0\.5; did you mean 'fraction_train'\?$"):
        cls(**kw, fraction_fit=0.5)
    if hasattr(cls, "method") and "solver" in inspect.signature(cls.__init__).parameters:
        with pytest.raises(ConfigError, match="fusion_solver='sinkhorn'; did you mean 'solver'"):
            cls(**kw, fusion_solver="sinkhorn")
