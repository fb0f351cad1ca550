#!/usr/bin/env bash
# Build the agent image (deploy/k8s/Containerfile) with podman on this host, without a
# registry: the base image comes from the Debian archive (debootstrap), the Python packages
# from the host's own pip (its index, configuration and CA) as a wheelhouse the build
# installs offline. Idempotent: the base image and the wheelhouse are made once and reused
# (the wheelhouse again only when the dependencies change); podman's layer cache keeps the apt
# step, so a rebuild after a source change re-runs only the install of the agent.
#
#   deploy/k8s/build-image.sh                  # -> $CREDLESS_IMAGE (localhost/credless:dev)
#   WHEELS=index deploy/k8s/build-image.sh     # the build fetches from PyPI itself
#
# Environment: CREDLESS_IMAGE (tag), CREDLESS_BUILD_CACHE (/var/cache/credless-build: the
# wheelhouse, the lock), DEBIAN_MIRROR, WHEELS (wheelhouse | index), CREDLESS_BUILD_OFFLINE=1
# (rebuild from what is cached only, no network: fail instead of downloading; the tests
# run it so). Needs root, podman,
# runc and debootstrap (deploy/setup-host.sh installs them). Prints one "took" line a step.
set -euo pipefail

IMAGE=${CREDLESS_IMAGE:-localhost/credless:dev}
CACHE=${CREDLESS_BUILD_CACHE:-/var/cache/credless-build}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WHEELS=${WHEELS:-wheelhouse}
OFFLINE=${CREDLESS_BUILD_OFFLINE:-0}
BASE=debian:bookworm-slim
REPO=$(cd "$(dirname "$0")/../.." && pwd)

# crun refuses a hybrid cgroup layout (v1 controllers, v2 at /sys/fs/cgroup/unified); runc
# runs on both. podman's default nproc limit (32768) exceeds what some hosts let root set.
PODMAN=(podman --runtime runc)
LIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

log() { printf 'build-image: %s\n' "$*" >&2; }
took() { log "$1 took $(( $(date +%s) - $2 ))s ($3)"; }
offline() { log "offline: $1 is not cached; run deploy/k8s/build-image.sh (make image) first"; exit 1; }

[ "$(id -u)" -eq 0 ] || { log "must run as root (podman's root storage, debootstrap)"; exit 1; }
for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null || { log "$tool missing: run deploy/setup-host.sh"; exit 1; }
done
mkdir -p "$CACHE"
# One build at a time (parallel test workers, make and CI may all ask for the image).
exec 9>"$CACHE/lock"
flock 9

# 1. The base image: Debian's minimal bookworm, as the registry's debian:bookworm-slim is.
t=$(date +%s)
if podman image exists "$BASE"; then
  took "base image $BASE" "$t" reused
else
  [ "$OFFLINE" = 1 ] && offline "the base image $BASE"
  root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase bookworm "$root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || { log "debootstrap failed: $CACHE/debootstrap.log"; exit 1; }
  # The sources the registry image has: security and point-release updates, not only main.
  rm -f "$root/etc/apt/sources.list"
  cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | podman import --quiet --change 'CMD ["bash"]' - "$BASE" >/dev/null
  rm -rf "$root"
  trap - EXIT
  took "base image $BASE" "$t" "debootstrap + import"
fi

# --network host: the build's apt step reaches the archive as the host does, with no bridge
# network (netavark, iptables rules) set up on the host for it. Offline, none: an apt layer
# missing from the cache fails the build instead of downloading.
net=host
[ "$OFFLINE" = 1 ] && net=none
build() {
  "${PODMAN[@]}" build "${LIMITS[@]}" --pull=never --network "$net" -f "$REPO/deploy/k8s/Containerfile" "$@" "$REPO"
}

# 2. The wheelhouse, for the Python the image's Debian ships (wheels are per Python version).
: >"$CACHE/build.log"
if [ "$WHEELS" = wheelhouse ]; then
  t=$(date +%s)
  base_id=$(build --target base -q 2>>"$CACHE/build.log") \
    || { log "podman build --target base failed: $CACHE/build.log"; exit 1; }
  pyver=$("${PODMAN[@]}" run --rm "${LIMITS[@]}" --network none "$base_id" \
    python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  py=$(command -v "python$pyver" || true)
  [ -n "$py" ] || { log "the image's Python is $pyver; this host has no python$pyver for its wheels"; exit 1; }
  took "apt stage (the image's Python: $pyver)" "$t" "podman build --target base"
  t=$(date +%s)
  house="$CACHE/wheels-py$pyver"
  # Made again when the dependencies, the build backend or the recipe below change (bump
  # RECIPE with it); not for other edits of pyproject.toml.
  RECIPE="pip wheel . hatchling, v1"
  deps=$("$py" -c 'import json, sys, tomllib
d = tomllib.load(open(sys.argv[1], "rb"))
print(json.dumps([d["build-system"], d["project"]["dependencies"]], sort_keys=True))' \
    "$REPO/pyproject.toml")
  stamp=$(echo "$deps $RECIPE $pyver" | sha256sum | cut -c1-16)
  if [ -f "$house/.stamp" ] && [ "$(cat "$house/.stamp")" = "$stamp" ]; then
    took "wheelhouse $house" "$t" reused
  else
    [ "$OFFLINE" = 1 ] && offline "a wheelhouse for these dependencies"
    rm -rf "$house.tmp" && mkdir -p "$house.tmp"
    # The dependencies and the build backend (pip builds /src in the image, in isolation,
    # from these alone). The agent's own wheel is dropped: the image builds it from source.
    "$py" -m pip wheel -q --wheel-dir "$house.tmp" "$REPO" hatchling >"$CACHE/pip.log" 2>&1 \
      || { log "pip wheel failed: $CACHE/pip.log"; exit 1; }
    rm -f "$house.tmp"/credless-*.whl
    echo "$stamp" >"$house.tmp/.stamp"
    rm -rf "$house" && mv "$house.tmp" "$house"
    took "wheelhouse $house" "$t" "pip wheel with $py"
  fi
  # Into the build context (build/ is git-ignored), where the build reads it: a copy, so
  # that the cache here outlives `git clean` and serves every checkout.
  rm -rf "$REPO/build/wheelhouse" && mkdir -p "$REPO/build"
  cp -a "$house" "$REPO/build/wheelhouse"
  from=(--build-arg WHEELS=wheelhouse)
else
  from=(--build-arg WHEELS=index)
fi

# 3. The image. Every image of these builds, intermediate ones too, carries the base stage's
# label, so untagged ones can be pruned without touching anyone else's images. Only those a
# day old: the venv stage's layers are untagged too (the image copies /opt/credless out of
# them) and are the cache that spares a rebuild its pip install.
t=$(date +%s)
build "${from[@]}" -t "$IMAGE" >>"$CACHE/build.log" 2>&1 \
  || { tail -n 30 "$CACHE/build.log" >&2; log "podman build failed: $CACHE/build.log"; exit 1; }
podman image prune -f --filter label=org.opencontainers.image.title=credless --filter until=24h >/dev/null
took "image $IMAGE" "$t" "podman build, WHEELS=$WHEELS"
