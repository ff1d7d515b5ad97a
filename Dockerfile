# fedfuse on Flower's official base image (Python 3.11, Ubuntu 24.04), pinned to the Flower version
# CI installs (pyproject.toml admits flwr 1.41 and 1.42; tests/test_compose.py checks the tag is the installed flwr;
# pip resolves 1.41.0 where 1.42.0's certifi>=2026.10.19 is not on the package index).
#
# One image runs every process of the deployment (docker-compose.yml picks the command):
#   flower-superlink, flower-supernode and flower-superexec (which starts flwr-serverapp / flwr-clientapp
#   with the fedfuse ServerApp and ClientApp), and the Fleet-only gateway (deploy/fleet_gateway.py).
#   fedfuse and its dependencies are installed here, so no process installs anything at run time
#   (--disable-runtime-dependency-installation on the SuperLink).
#
#   docker build -t fedfuse/flower:0.1.0 .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 ...   # CUDA wheels
FROM flwr/base:1.41.0-py3.11-ubuntu24.04

# CPU wheels by default (a few hundred MB instead of several GB of CUDA libraries).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

USER root
WORKDIR /app

# Dependencies first (cached while only the code changes). The base image already has flwr 1.41.0;
# drop the `[simulation]` extra (Ray), which a deployment does not use.
COPY pyproject.toml README.md ./
RUN sed -i 's/"flwr\[simulation\]/"flwr/' pyproject.toml \
    && mkdir -p fedfuse strategies clients && touch fedfuse/__init__.py strategies/__init__.py clients/__init__.py \
    && python -m pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" . \
    && python -m pip uninstall -y fedfuse \
    && rm -rf fedfuse strategies clients build *.egg-info

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
