# fedfuse on Flower's official base image (Python 3.11, Ubuntu 24.04). The base tag's flwr version is the one
# pinned in requirements.lock (`make lock` writes it here; tests/test_compose.py checks lock, tag and the
# installed flwr agree), and every package the image installs is constrained to the lock's versions.
#
# One image runs every process of the deployment (docker-compose.yml picks the command):
#   flower-superlink, flower-supernode and flower-superexec (which starts flwr-serverapp / flwr-clientapp
#   with the fedfuse ServerApp and ClientApp), and the Fleet-only gateway (deploy/fleet_gateway.py).
#   fedfuse and its dependencies are installed here, so no process installs anything at run time
#   (--disable-runtime-dependency-installation on the SuperLink).
#
#   docker build -t fedfuse/flower:0.1.0 .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 ...   # CUDA wheels
# UNLOCK="torch torchvision" drops those pins from the constraints (the offline test fixture has only an older
# CPU torch wheel; users leave it empty and get the locked torch as a +cpu build from TORCH_INDEX_URL).
FROM flwr/base:1.42.0-py3.11-ubuntu24.04

# CPU wheels by default (a few hundred MB instead of several GB of CUDA libraries).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG UNLOCK=""

USER root
WORKDIR /app

# Dependencies first (cached while only the code changes), at the lock's versions. The base image already has
# the locked flwr; drop the `[simulation]` extra (Ray), which a deployment does not use.
COPY pyproject.toml README.md requirements.lock ./
RUN sed -i 's/"flwr\[simulation\]/"flwr/' pyproject.toml \
    && for p in ${UNLOCK}; do sed -i "/^${p}==/d" requirements.lock; done \
    && mkdir -p fedfuse strategies clients && touch fedfuse/__init__.py strategies/__init__.py clients/__init__.py \
    && python -m pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" -c requirements.lock . \
    && python -m pip uninstall -y fedfuse \
    && rm -rf fedfuse strategies clients build *.egg-info requirements.lock

COPY fedfuse ./fedfuse
COPY strategies ./strategies
COPY clients ./clients
COPY deploy/register-supernodes.sh /usr/local/bin/register-supernodes.sh
COPY deploy/fleet_gateway.py /usr/local/bin/fleet_gateway.py
# /app/state (SuperLink database) and /app/runs (ServerApp `out`, relative to /app) are volumes that
# Docker initialises from these directories, owned by the base image's unprivileged user `app`.
RUN python -m pip install --no-cache-dir --no-deps . \
    && rm -rf build *.egg-info \
    && chmod 755 /usr/local/bin/register-supernodes.sh /usr/local/bin/fleet_gateway.py \
    && python -c "import flwr, fedfuse, clients.client_app, strategies.server_app; print('flwr', flwr.__version__)" \
    && mkdir -p /app/state /app/runs /app/.flwr \
    && chown -R app:app /app/state /app/runs /app/.flwr

USER app
ENV FLWR_HOME=/app/.flwr \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    PYTHONUNBUFFERED=1
