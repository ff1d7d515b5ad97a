#!/usr/bin/env bash
# Generate everything the TLS deployment (docker-compose.yml) mounts:
#
#   OUT/certs/ca.crt, ca.key                CA (give ca.crt to every SuperNode host and to `flwr` users)
#   OUT/certs/superlink.crt, superlink.key  SuperLink server certificate (Fleet + Control + Runtime API)
#   OUT/certs/supernode.crt, supernode.key  SuperNode Runtime-API certificate (SuperNode <-> its SuperExec)
#   OUT/keys/supernode-I, supernode-I.pub   ECDSA P-384 SuperNode auth keys (OpenSSH format), I = 1..N
#   OUT/secrets/superexec.secret            shared HMAC secret between a SuperLink/SuperNode and its SuperExec
#
# Usage: deploy/gen-certs.sh [OUT_DIR]          (default: deploy/ next to this script)
# Environment:
#   NUM_SUPERNODES   number of SuperNode key pairs (default 5: three default nodes + the `more-nodes` profile)
#   SUPERLINK_SANS   extra subjectAltNames for the SuperLink certificate, e.g. "DNS:fl.example.org,IP:10.0.0.5"
#                    (add the address SuperNodes and `flwr` users dial; `superlink`, `fleet-gateway`, `localhost`,
#                    127.0.0.1, ::1 are always included; the Fleet gateway serves the same certificate)
#   CERT_DAYS        validity in days (default 365)
#   FORCE=1          overwrite existing files (default: keep an existing CA and keys, regenerate nothing)
#   CONTAINER_UID    chown the output to this uid (Flower's images run as `app`, uid 49999; needs root), so the
#                    containers can read the private files, which stay 0600 in 0700 directories
#
# Private keys and the SuperExec secret are written 0600, their directories 0700 (umask 077); certificates
# and public keys are 0644.
set -euo pipefail
umask 077

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here}"
n="${NUM_SUPERNODES:-5}"
days="${CERT_DAYS:-365}"
certs="$out/certs" keys="$out/keys" secrets="$out/secrets"

command -v openssl >/dev/null || { echo "gen-certs.sh: openssl not found" >&2; exit 1; }
command -v ssh-keygen >/dev/null || { echo "gen-certs.sh: ssh-keygen not found" >&2; exit 1; }
case "$n" in ''|*[!0-9]*) echo "gen-certs.sh: NUM_SUPERNODES=$n is not a non-negative integer" >&2; exit 2;; esac

if [[ -f "$certs/ca.crt" && "${FORCE:-0}" != 1 ]]; then
  echo "gen-certs.sh: $certs/ca.crt exists; keeping it (FORCE=1 regenerates everything)"
  keep=1
else
  keep=0
  rm -rf "$certs" "$keys" "$secrets"
fi
mkdir -p "$certs" "$keys" "$secrets"

server_cert() {  # name cn sans
  local name="$1" cn="$2" sans="$3" ext
  ext="$(mktemp)"
  printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$sans" >"$ext"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out "$certs/$name.key" 2>/dev/null
  openssl req -new -key "$certs/$name.key" -subj "/CN=$cn" -out "$certs/$name.csr" 2>/dev/null
  openssl x509 -req -in "$certs/$name.csr" -CA "$certs/ca.crt" -CAkey "$certs/ca.key" -CAcreateserial \
    -days "$days" -sha256 -extfile "$ext" -out "$certs/$name.crt" 2>/dev/null
  rm -f "$certs/$name.csr" "$ext"
}

if [[ "$keep" == 0 ]]; then
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out "$certs/ca.key" 2>/dev/null
  openssl req -new -x509 -key "$certs/ca.key" -sha256 -days "$days" -subj "/CN=fedfuse-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$certs/ca.crt" 2>/dev/null

  sans="DNS:superlink,DNS:fleet-gateway,DNS:localhost,IP:127.0.0.1,IP:::1"
  [[ -n "${SUPERLINK_SANS:-}" ]] && sans="$sans,$SUPERLINK_SANS"
  server_cert superlink superlink "$sans"

  node_sans="DNS:localhost,IP:127.0.0.1,IP:::1"
  for i in $(seq 1 "$n"); do node_sans="$node_sans,DNS:supernode-$i"; done
  server_cert supernode supernode "$node_sans"

  openssl rand -hex 32 | tr -d '\n' >"$secrets/superexec.secret"
fi

for i in $(seq 1 "$n"); do
  [[ -f "$keys/supernode-$i" ]] && continue
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "supernode-$i" -f "$keys/supernode-$i"
done

# Private: keys and the secret 0600, directories 0700 (also for files kept from an earlier run); public: 0644.
shopt -s nullglob
chmod 700 "$certs" "$keys" "$secrets"
private=("$certs"/*.key "$secrets"/*)
public=("$certs"/*.crt "$keys"/*.pub)
for f in "$keys"/*; do [[ "$f" == *.pub ]] || private+=("$f"); done
(( ${#private[@]} )) && chmod 600 "${private[@]}"
(( ${#public[@]} )) && chmod 644 "${public[@]}"
rm -f "$certs/ca.srl"
if [[ -n "${CONTAINER_UID:-}" ]]; then
  chown -R "$CONTAINER_UID" "$certs" "$keys" "$secrets" || {
    echo "gen-certs.sh: chown to CONTAINER_UID=$CONTAINER_UID failed (run as root)" >&2; exit 1; }
fi
if [[ -z "${CONTAINER_UID:-}" && "$(id -u)" != 49999 ]]; then
  echo "gen-certs.sh: note: the files belong to uid $(id -u); docker-compose.yml's containers run as uid 49999 and" \
    "cannot read them: sudo CONTAINER_UID=49999 $0 ${1:-} (docs/deployment.md)" >&2
fi
if [[ "$keep" == 1 ]]; then
  echo "gen-certs.sh: kept $certs and $secrets; $keys has SuperNode key pairs 1..$n"
else
  echo "gen-certs.sh: wrote $certs (CA, superlink, supernode), $keys ($n SuperNode key pairs), $secrets"
fi
