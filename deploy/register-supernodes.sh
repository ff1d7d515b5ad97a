#!/usr/bin/env bash
# Register SuperNode public keys with a SuperLink that runs with --enable-supernode-auth.
# Idempotent: a key the SuperLink already knows (persistent state) counts as registered.
#
# Usage: register-supernodes.sh KEY.pub [KEY.pub ...]
# Environment:
#   SUPERLINK_ADDRESS  host:port of the SuperLink (default superlink:9093)
#   ROOT_CERTIFICATES  CA certificate that signed the SuperLink certificate (default /certs/ca.crt)
#   REGISTER_TIMEOUT   seconds to keep retrying while the SuperLink starts (default 120)
set -euo pipefail

address="${SUPERLINK_ADDRESS:-superlink:9093}"
ca="${ROOT_CERTIFICATES:-/certs/ca.crt}"
deadline=$(( $(date +%s) + ${REGISTER_TIMEOUT:-120} ))
[[ $# -gt 0 ]] || { echo "register-supernodes.sh: no public keys given" >&2; exit 2; }
[[ -f "$ca" ]] || { echo "register-supernodes.sh: CA certificate $ca not found (run deploy/gen-certs.sh)" >&2; exit 2; }
case "$ca" in /*) ;; *) ca="$(cd "$(dirname "$ca")" && pwd)/$(basename "$ca")";; esac  # flwr wants an absolute path

FLWR_HOME="$(mktemp -d)"
export FLWR_HOME
trap 'rm -rf "$FLWR_HOME"' EXIT
cat >"$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "deployment"

[superlink.deployment]
address = "$address"
root-certificates = "$ca"
TOML

register() {  # key: retry while the SuperLink starts; "already in use" means registered before
  local key="$1" out
  while true; do
    if out="$(flwr supernode register "$key" deployment 2>&1)"; then
      echo "registered $(basename "$key"): $(grep -o 'SuperNode [0-9]*' <<<"$out" || true)"
      return 0
    elif grep -q "already in use" <<<"$out"; then
      echo "already registered: $(basename "$key")"
      return 0
    elif (( $(date +%s) >= deadline )); then
      echo "register-supernodes.sh: could not register $key at $address:" >&2
      echo "$out" >&2
      return 1
    fi
    sleep 2
  done
}

for key in "$@"; do
  [[ -f "$key" ]] || { echo "register-supernodes.sh: public key $key not found" >&2; exit 2; }
done
pids=()
for key in "$@"; do register "$key" & pids+=("$!"); done  # in parallel: each flwr call starts Python
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit "$status"
