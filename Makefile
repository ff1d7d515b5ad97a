# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv, install fedfuse with its dependencies, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedfuse-installed
PYTEST_ARGS ?=
# appended to the demo's flags (later flags win): tests/test_readme.py runs a small demo
DEMO_ARGS ?=

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The main job: a 10-client non-IID (Dirichlet 0.3) federated simulation on Ray, bundled digits data.
demo: $(STAMP)
	$(VENV)/bin/fedfuse simulate --compare fedavg,wb,fedavg@client-init=shared --client-init own --dataset digits \
		--model mlp --num-clients 10 --rounds 10 --partition dirichlet --alpha 0.3 --local-epochs 2 --seed 0 \
		--out runs/demo --overwrite $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -c "import flwr, torch; print('flwr', flwr.__version__, '/ torch', torch.__version__)"
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
