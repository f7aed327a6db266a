#!/usr/bin/env bash
# A throw-away Docker engine for CI: run COMMAND with DOCKER_HOST pointing at it, then remove every trace of it.
#
#   scripts/docker_engine.sh COMMAND [ARG...]
#
# 1. installs Debian's engine, compose v1 and debootstrap where missing (`--no-install-recommends`);
# 2. starts `dockerd` in the background with its own data root, exec root, pid file and socket under one fresh
#    folder (SPLIT_ENGINE_DIR, default a new /tmp/split-engine.XXXXXX), and waits until it answers;
# 3. makes the base image the Dockerfile's PYTHON_IMAGE names, which no registry is needed for:
#    `debootstrap --variant=minbase` of Debian bookworm with python3 and python3-venv, `docker import`ed under
#    that tag (CI machines reach a Debian mirror but no image registry);
# 4. runs COMMAND with DOCKER_HOST=unix://.../docker.sock and SPLIT_DOCKER_ENGINE=1 (tests/engine_support.py
#    uses that engine, never the host's);
# 5. on exit, success or failure (a trap): stops dockerd by its PID, removes the iptables rules and chains and
#    the bridge it made, unmounts what is left under its folder and deletes the folder.
# The command's exit status is the script's.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$#" -eq 0 ]; then
  echo "usage: $0 COMMAND [ARG...]" >&2
  exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "$0: dockerd needs root" >&2
  exit 2
fi

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Debian's client (20.10) speaks BuildKit without a buildx plugin; a client elsewhere on PATH may not.
DOCKER=/usr/bin/docker
[ -x "$DOCKER" ] || DOCKER=$(command -v docker)

ENGINE_DIR=${SPLIT_ENGINE_DIR:-$(mktemp -d /tmp/split-engine.XXXXXX)}
mkdir -p "$ENGINE_DIR"
SOCKET="$ENGINE_DIR/docker.sock"
PIDFILE="$ENGINE_DIR/dockerd.pid"
export DOCKER_HOST="unix://$SOCKET"
bridges() { ip -o link show type bridge 2>/dev/null | sed -n 's/^[0-9]*: \([^:@]*\).*/\1/p' | sort; }
bridges_before=$(bridges)
# dockerd turns IPv4 forwarding on and sets the FORWARD chain's policy to DROP: both are put back.
ip_forward_before=$(cat /proc/sys/net/ipv4/ip_forward)
forward_policy_before=$(iptables -S FORWARD 2>/dev/null | sed -n 's/^-P FORWARD //p')

remove_iptables_traces() {
  # The rules dockerd adds (jumps to its DOCKER* chains, the masquerade of its bridges) and then its chains.
  local table line chain
  for table in filter nat; do
    iptables-save -t "$table" 2>/dev/null | grep -E '^-A .*(DOCKER|docker0|br-[0-9a-f]{12})' | while read -r line; do
      # shellcheck disable=SC2086  # the rule's words, as iptables-save printed them
      eval iptables -t "$table" -D "${line#-A }" 2>/dev/null || true
    done
    for chain in $(iptables-save -t "$table" 2>/dev/null | sed -n 's/^:\(DOCKER[A-Z0-9-]*\) .*/\1/p'); do
      iptables -t "$table" -F "$chain" 2>/dev/null || true
    done
    for chain in $(iptables-save -t "$table" 2>/dev/null | sed -n 's/^:\(DOCKER[A-Z0-9-]*\) .*/\1/p'); do
      iptables -t "$table" -X "$chain" 2>/dev/null || true
    done
  done
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  set +e  # clean up all that can be, whatever fails
  if [ -s "$PIDFILE" ]; then
    local pid
    pid=$(cat "$PIDFILE")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  remove_iptables_traces
  iptables -P FORWARD "${forward_policy_before:-ACCEPT}" 2>/dev/null
  echo "$ip_forward_before" >/proc/sys/net/ipv4/ip_forward
  # The bridges it made (docker0, compose's br-...): those that were not there before it started.
  for link in $(comm -13 <(echo "$bridges_before") <(bridges)); do
    ip link delete "$link" || true
  done
  # Mounts the engine may leave (overlay layers, its netns files), deepest first.
  grep -F " $ENGINE_DIR/" /proc/mounts | awk '{print $2}' | sort -r | while read -r mount; do
    umount -l "$mount" || true
  done
  rm -rf "$ENGINE_DIR"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

started=$(date +%s)
dockerd \
  --data-root "$ENGINE_DIR/data" \
  --exec-root "$ENGINE_DIR/exec" \
  --pidfile "$PIDFILE" \
  --host "$DOCKER_HOST" \
  --containerd-namespace split-ci \
  --containerd-plugins-namespace split-ci-plugins \
  >"$ENGINE_DIR/dockerd.log" 2>&1 &
for _ in $(seq 1 120); do
  "$DOCKER" version >/dev/null 2>&1 && break
  sleep 0.5
done
if ! "$DOCKER" version >/dev/null 2>&1; then
  echo "$0: dockerd did not answer on $DOCKER_HOST; its log:" >&2
  tail -n 40 "$ENGINE_DIR/dockerd.log" >&2
  exit 1
fi
echo "docker engine up in $(($(date +%s) - started)) s: $DOCKER_HOST (data root $ENGINE_DIR/data)"

# The base image, under the tag the Dockerfile's PYTHON_IMAGE names (its default).
started=$(date +%s)
base=$(sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile)
rootfs="$ENGINE_DIR/rootfs"
debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
  bookworm "$rootfs" "${SPLIT_DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$ENGINE_DIR/debootstrap.log" 2>&1 || {
  echo "$0: debootstrap failed; its log:" >&2
  tail -n 40 "$ENGINE_DIR/debootstrap.log" >&2
  exit 1
}
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | "$DOCKER" import --change 'CMD ["python3"]' - "$base" >/dev/null
rm -rf "$rootfs"
echo "base image $base made in $(($(date +%s) - started)) s"

status=0
SPLIT_DOCKER_ENGINE=1 SPLIT_DOCKER="$DOCKER" "$@" || status=$?
exit "$status"
