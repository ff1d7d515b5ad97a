#!/usr/bin/env bash
# Install and start a Docker engine on a Debian/Ubuntu host where none is running, and make
# `docker compose` work. Idempotent: does nothing that is already done.
#
#   sudo deploy/install-docker.sh          # then: docker compose version
#
# What it does (as root):
#   1. if `docker`, `dockerd` or `docker-compose` is missing: apt-get install docker.io containerd runc
#      docker-compose iptables (Debian 12 packages Compose v1 only, 1.29.2);
#   2. if `docker compose` is not a command: installs a CLI plugin `docker-compose` that forwards to the v1
#      binary (answering Docker's plugin metadata probe), so `docker compose ...` works with either;
#   3. if no daemon answers: starts `dockerd` in the background (log: $DOCKERD_LOG, default
#      /var/log/fedfuse-dockerd.log) and waits up to 30 s for it. With systemd running, use
#      `systemctl start docker` instead; this script only starts dockerd itself when no init system does.
#
# Prints `started-dockerd PID` when it started the daemon (a caller that wants to stop exactly that
# daemon later kills that PID), `engine-running` when one was already up. Exit 1 with the reason when
# the engine cannot start (not root, no kernel support for overlay/iptables, apt unreachable).
set -euo pipefail

log() { echo "install-docker.sh: $*" >&2; }
die() { log "$*"; exit 1; }

if docker info >/dev/null 2>&1; then
  echo "engine-running"
  exit 0
fi
[[ "$(id -u)" == 0 ]] || die "no Docker engine answers and this is not root (uid $(id -u)): cannot install or start one"

need=()
command -v dockerd >/dev/null || need+=(docker.io containerd runc)
command -v docker >/dev/null || need+=(docker.io)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v iptables >/dev/null || need+=(iptables)
if (( ${#need[@]} )); then
  command -v apt-get >/dev/null || die "missing ${need[*]} and no apt-get to install them"
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || die "apt-get install ${need[*]} failed"
fi

# `docker compose` as a CLI plugin forwarding to Compose v1 (only when no v2 plugin is installed).
if ! docker compose version >/dev/null 2>&1; then
  plugin_dir=/usr/local/lib/docker/cli-plugins
  mkdir -p "$plugin_dir"
  cat >"$plugin_dir/docker-compose" <<'SHIM'
#!/bin/sh
# Docker CLI plugin shim (written by fedfuse deploy/install-docker.sh): `docker compose ...` runs
# Compose v1 (`docker-compose`), the only Compose packaged by Debian 12.
if [ "$1" = "docker-cli-plugin-metadata" ]; then
  printf '{"SchemaVersion":"0.1.0","Vendor":"fedfuse shim","Version":"%s","ShortDescription":"Docker Compose (v1 via shim)"}\n' \
    "$(/usr/bin/docker-compose version --short 2>/dev/null || echo 1)"
  exit 0
fi
shift  # the CLI passes the plugin name ("compose") first
exec /usr/bin/docker-compose "$@"
SHIM
  chmod 755 "$plugin_dir/docker-compose"
  docker compose version >/dev/null 2>&1 || die "the docker compose shim in $plugin_dir does not answer"
fi

logfile="${DOCKERD_LOG:-/var/log/fedfuse-dockerd.log}"
nohup dockerd >"$logfile" 2>&1 &
pid=$!
for _ in $(seq 1 60); do
  if docker info >/dev/null 2>&1; then
    echo "started-dockerd $pid"
    exit 0
  fi
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.5
done
kill "$pid" 2>/dev/null || true
for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done  # let it shut down
die "dockerd did not come up (last lines of $logfile: $(tail -n 3 "$logfile" 2>/dev/null | tr '\n' ' '))"
