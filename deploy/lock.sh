#!/usr/bin/env bash
# Regenerate requirements.lock (every direct and transitive dependency of fedfuse and its dev extra at an exact
# version) with pip-tools, then derive the Dockerfile's base image tag from the locked flwr (one source of truth).
#
#   make lock                      # resolve today's newest versions that pyproject.toml admits
#   make lock LOCK_ARGS="--upgrade-package flwr"    # move one package, keep the rest
#
# The lock is for CPython 3.11 on Linux x86_64 (what CI and `make` use); pip-compile resolves with this
# machine's pip configuration (its index, find-links and constraints) exactly as `pip install` would.
set -euo pipefail
cd "$(dirname "$0")/.."
tools="${LOCK_VENV:-.venv-lock}"
test -x "$tools/bin/pip-compile" || {
  python3 -m venv "$tools"
  "$tools/bin/python" -m pip install --quiet --disable-pip-version-check "pip-tools==7.6.2"
}
# shellcheck disable=SC2086
CUSTOM_COMPILE_COMMAND="make lock" "$tools/bin/pip-compile" --quiet --extra dev --strip-extras --allow-unsafe --no-emit-index-url \
  --no-emit-find-links --no-emit-trusted-host --output-file requirements.lock ${LOCK_ARGS:-} pyproject.toml
flwr="$(sed -n 's/^flwr==\([^ ]*\).*/\1/p' requirements.lock)"
[[ -n "$flwr" ]] || { echo "lock.sh: requirements.lock pins no flwr" >&2; exit 1; }
sed -i "s|^FROM flwr/base:[^-[:space:]]*-|FROM flwr/base:${flwr}-|" Dockerfile
echo "lock.sh: requirements.lock written (flwr ${flwr}); Dockerfile FROM $(sed -n 's/^FROM //p' Dockerfile | head -n1)"
