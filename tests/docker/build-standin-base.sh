#!/usr/bin/env bash
# TEST FIXTURE: build a local stand-in for the base image the project's Dockerfile starts FROM
# (flwr/base:<flwr version>-py3.11-ubuntu24.04), for machines where Docker Hub is unreachable.
# Users with internet never run this: `docker compose build` pulls the official image.
#
#   tests/docker/build-standin-base.sh            # prints the tag it built (or found)
#
# Steps: debootstrap a minimal Debian 12 root file system (cached in $STANDIN_CACHE, default
# /var/tmp/fedfuse-standin), `docker import` it as local/debian:bookworm, then build
# tests/docker/standin-base.Dockerfile (python3.11 + venv + pip + flwr==<the tag's version>, user app
# uid 49999) and tag it with exactly the Dockerfile's FROM name. pip inside the image gets the host's CA
# bundle (pip's global `cert`), the CPU torch wheel from the host's pip find-links, and a constraint
# pinning torch to that wheel. Needs root, a running Docker engine, debootstrap (installed here with apt-get when
# missing, as deploy/install-docker.sh installs the engine) and the Debian mirror.
# Exit 3: a prerequisite is missing and cannot be installed on this machine (the test SKIPS with the reason);
# any other failure is a real failure.
# Environment: DEBIAN_MIRROR (default: first URI of the host's apt sources, else deb.debian.org),
# PYTHON (whose pip config is read; default python3), FORCE=1 rebuilds an existing stand-in.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
log() { echo "build-standin-base.sh: $*" >&2; }

tag="$(sed -n 's/^FROM[[:space:]]\+\([^[:space:]]\+\).*/\1/p' "$root/Dockerfile" | head -n 1)"
[[ "$tag" == flwr/base:* ]] || { log "Dockerfile FROM is '$tag', expected flwr/base:<version>-..."; exit 2; }
flwr_version="${tag#flwr/base:}"
flwr_version="${flwr_version%%-*}"

if [[ "${FORCE:-0}" != 1 ]] && docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag"
  exit 0
fi

cache="${STANDIN_CACHE:-/var/tmp/fedfuse-standin}"
if ! docker image inspect local/debian:bookworm >/dev/null 2>&1; then
  mirror="${DEBIAN_MIRROR:-}"
  if [[ -z "$mirror" ]]; then
    mirror="$(grep -h -o -m1 -E '^URIs:[[:space:]]*\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null \
      | head -n1 | awk '{print $2}')" || true
    mirror="${mirror:-http://deb.debian.org/debian}"
  fi
  rootfs="$cache/rootfs-bookworm"
  if [[ ! -f "$rootfs/.complete" ]]; then
    if ! command -v debootstrap >/dev/null; then
      [[ "$(id -u)" == 0 ]] || { log "debootstrap is not installed and this is not root: cannot install it"; exit 3; }
      command -v apt-get >/dev/null || { log "debootstrap is not installed and there is no apt-get"; exit 3; }
      log "installing debootstrap"
      export DEBIAN_FRONTEND=noninteractive
      { apt-get update -qq && apt-get install -y -qq --no-install-recommends debootstrap; } >/dev/null \
        || { log "apt-get install debootstrap failed (no package mirror?)"; exit 3; }
    fi
    rm -rf "$rootfs"
    mkdir -p "$rootfs"
    log "debootstrap bookworm from $mirror into $rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 \
      || { log "debootstrap failed (Debian mirror $mirror unreachable?), see $cache/debootstrap.log"; tail -n 5 "$cache/debootstrap.log" >&2; exit 3; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    touch "$rootfs/.complete"
  fi
  tar -C "$rootfs" --exclude=./.complete -c . | docker import - local/debian:bookworm >/dev/null
fi

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
cp "$here/standin-base.Dockerfile" "$ctx/Dockerfile"
py="${PYTHON:-python3}"
cert="$("$py" -m pip config get global.cert 2>/dev/null || true)"
cert="${cert:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
cp "$cert" "$ctx/host-ca.crt"
mkdir -p "$ctx/wheels"
: >"$ctx/constraints.txt"
links="$("$py" -m pip config get global.find-links 2>/dev/null || true) ${PIP_FIND_LINKS:-}"
for d in $links; do
  for w in "$d"/torch-*+cpu-cp311-cp311-*.whl; do
    [[ -f "$w" ]] || continue
    cp "$w" "$ctx/wheels/"
    v="$(basename "$w" | cut -d- -f2)"
    echo "torch==$v" >"$ctx/constraints.txt"
    break 2
  done
done
printf '[global]\ncert = /etc/pip/host-ca.crt\nfind-links = /opt/wheels\nconstraint = /etc/pip/constraints.txt\n' >"$ctx/pip.conf"
log "building $tag (flwr==$flwr_version; torch constraint: $(cat "$ctx/constraints.txt"))"
docker build -q -t "$tag" --build-arg "FLWR_VERSION=$flwr_version" "$ctx" >/dev/null
echo "$tag"
