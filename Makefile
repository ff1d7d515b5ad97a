# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv, install every dependency at the exact version in requirements.lock, then fedfuse itself
# (--no-deps), then run. `make lock` regenerates the lock (and the Dockerfile's flwr/base tag) from pyproject.toml.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedfuse-installed
LOCK := requirements.lock
PIP := $(PY) -m pip --disable-pip-version-check
PYTEST_ARGS ?=
# appended to the demo's flags (later flags win): tests/test_readme.py runs a small demo
DEMO_ARGS ?=

.PHONY: install demo test lint lock clean

$(STAMP): $(LOCK) pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet -r $(LOCK)
	$(PIP) install --quiet --no-deps -e .
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

# Re-resolve the lock from pyproject.toml's ranges (LOCK_ARGS="--upgrade-package flwr" moves one package).
lock:
	bash deploy/lock.sh

clean:
	rm -rf $(VENV) .venv-lock runs .pytest_cache
