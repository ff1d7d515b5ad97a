# TEST FIXTURE, not for users: a local stand-in for Flower's official `flwr/base` image, for machines
# that cannot reach Docker Hub. tests/docker/build-standin-base.sh builds it from a debootstrap root file
# system and tags it with exactly the name the project's Dockerfile starts FROM, so the project's
# Dockerfile and docker-compose.yml are built and run unchanged. It mirrors what the official image
# provides to fedfuse's Dockerfile: Python 3.11 in a venv at /python/venv on PATH (`python`, `pip`),
# flwr installed there, an unprivileged user `app` (uid 49999) with home and WORKDIR /app.
# Differences (offline substitutes, documented in docs/deployment.md): Debian 12 instead of
# Ubuntu 24.04, and a pip config naming the host's CA bundle, a local CPU torch wheel (find-links) and a
# constraint that pins torch to it (what download.pytorch.org/whl/cpu gives a user with internet).
FROM local/debian:bookworm
ARG FLWR_VERSION
COPY pip.conf /etc/pip.conf
COPY host-ca.crt /etc/pip/host-ca.crt
COPY constraints.txt /etc/pip/constraints.txt
COPY wheels/ /opt/wheels/
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /python/venv \
    && /python/venv/bin/python -m pip install --no-cache-dir "flwr==${FLWR_VERSION}" \
    && useradd --uid 49999 --user-group --home-dir /app --no-create-home --shell /usr/sbin/nologin app \
    && mkdir -p /app && chown app:app /app
ENV PATH=/python/venv/bin:$PATH \
    HOME=/app
WORKDIR /app
USER app
