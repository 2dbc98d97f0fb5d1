#!/usr/bin/env bash
# Builds the user-code image (the Dockerfile at the repository's root), or reuses what is built already.
# One script for `make image`, .ci/run and tests/test_docker_runs.py: each step is skipped when its output is
# up to date, so a second call costs one `docker build` on a warm layer cache (seconds).
#
#   MARKETFS_IMAGE       the tag to build (default marketfs:latest)
#   MARKETFS_BASE_IMAGE  the base image (default python:3.11-slim, pulled by docker build); `debootstrap`
#                        builds marketfs-base:bookworm from Debian packages instead, for a Docker host that
#                        can reach a Debian mirror but no image registry (needs root and debootstrap)
#   PYTHON               the Python that downloads the wheels (default .venv/bin/python, else python3)
#
# With --base-only it stops after the base image. Wheels and the base's root filesystem go under build/docker/
# (git-ignored); images live in Docker's own storage.
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE=${MARKETFS_IMAGE:-marketfs:latest}
BASE=${MARKETFS_BASE_IMAGE:-python:3.11-slim}
DEBIAN_BASE=marketfs-base:bookworm
WORK=build/docker
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

say() { echo "image: $*"; }
# pip's notes about find-links folders of this machine's pip configuration that do not exist: not ours to fix.
quiet_pip() { grep -v "is ignored: it is neither a file nor a directory" || true; }
fail() { echo "image: $*" >&2; exit 1; }

docker info >/dev/null 2>&1 || fail "no Docker engine answers (docker info failed): start dockerd, or set DOCKER_HOST"

# The Debian mirror apt already uses here (none is named in this repository).
debian_mirror() {
    apt-get indextargets --format '$(REPO_URI)' 'Origin: Debian' 'Codename: bookworm' 'Created-By: Packages' \
        2>/dev/null | head -n1
}

debootstrap_base() {
    if docker image inspect "$DEBIAN_BASE" >/dev/null 2>&1; then
        say "base $DEBIAN_BASE reused"
        return
    fi
    command -v debootstrap >/dev/null || fail "MARKETFS_BASE_IMAGE=debootstrap needs debootstrap: apt-get install debootstrap"
    [ "$(id -u)" = 0 ] || fail "MARKETFS_BASE_IMAGE=debootstrap needs root (debootstrap); or set MARKETFS_BASE_IMAGE to an image with Python 3.11"
    local mirror rootfs=$WORK/rootfs began=$SECONDS
    mirror=$(debian_mirror)
    [ -n "$mirror" ] || fail "apt knows no Debian bookworm mirror (apt-get update first, or set MARKETFS_BASE_IMAGE)"
    say "base $DEBIAN_BASE: debootstrap bookworm from $mirror (about 2.5 minutes)"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap failed; its log: $WORK/debootstrap.log"; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import - "$DEBIAN_BASE" >/dev/null
    rm -rf "$rootfs"
    say "base $DEBIAN_BASE built in $((SECONDS - began)) s"
}

# The locked wheels for Linux x86-64 CPython 3.11, hash-checked as `make install` checks them; fetched again
# only when requirements.lock changes (its hash is kept beside them).
wheelhouse() {
    local stamp=$WORK/wheelhouse.sha256 want
    want=$(sha256sum requirements.lock | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        say "wheelhouse reused ($WORK/wheelhouse)"
        return
    fi
    local began=$SECONDS
    say "wheelhouse: downloading requirements.lock's wheels into $WORK/wheelhouse"
    rm -rf "$WORK/wheelhouse" "$WORK/build-tools" "$stamp"
    # Wheels for the image's platform whatever the host's (a Mac's `make image` too): Linux x86-64, glibc up to
    # bookworm's 2.36, CPython 3.11.
    local platforms=(--platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64)
    for minor in $(seq 5 36); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
    "$PY" -m pip download --quiet --only-binary=:all: "${platforms[@]}" --python-version 3.11 --implementation cp \
        --require-hashes -r requirements.lock -d "$WORK/wheelhouse" 2> >(quiet_pip >&2)
    # pyproject's build backend, to install the project itself without an index.
    "$PY" -m pip download --quiet --only-binary=:all: "setuptools>=69" wheel -d "$WORK/build-tools" 2> >(quiet_pip >&2)
    echo "$want" >"$stamp"
    say "wheelhouse ready in $((SECONDS - began)) s"
}

mkdir -p "$WORK"
if [ "$BASE" = debootstrap ]; then
    debootstrap_base
    BASE=$DEBIAN_BASE
fi
[ "${1:-}" = --base-only ] && exit 0
wheelhouse
began=$SECONDS
# The legacy builder: BuildKit is not in every Docker host's packages (Debian's docker.io has no buildx).
DOCKER_BUILDKIT=0 docker build --quiet --build-arg "BASE_IMAGE=$BASE" -t "$IMAGE" . >/dev/null
say "$IMAGE built on $BASE in $((SECONDS - began)) s ($(docker image inspect -f '{{.Id}}' "$IMAGE" | cut -c8-19))"
