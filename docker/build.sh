#!/usr/bin/env bash
# Build the mone-serve image with podman on a machine that can reach PyPI and Debian's apt but no container
# registry (our CI): make the base image with debootstrap if it is missing, download the wheels on the host,
# then build offline from them.  Elsewhere plain `docker build -f docker/Dockerfile .` does the same job.
#
#   docker/build.sh [TAG]            (default tag: localhost/mone-serve:latest)
#
# Environment: BASE_IMAGE (default localhost/debian-py311:base, made here when missing), TORCH_SPEC
# (default torch==2.13.0), PYTHON (the interpreter that downloads the wheels; default python3),
# CONTAINERS_CONF (default docker/containers.conf: runc and explicit ulimits).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
tag="${1:-localhost/mone-serve:latest}"
base="${BASE_IMAGE:-localhost/debian-py311:base}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
python="${PYTHON:-python3}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"

apt_mirror() {
  # The Debian mirror this machine's apt uses (deb822 .sources or a classic sources.list line).
  local url
  url="$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1 || true)"
  [ -n "$url" ] || url="$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
    | awk '{print $2}' | grep -v security | head -n1 || true)"
  echo "${url:-http://deb.debian.org/debian}"
}

if [[ "$base" == localhost/debian-py311:* ]] && ! podman image exists "$base"; then
  echo "making base image $base with debootstrap"
  rootfs="$(mktemp -d)"
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$(apt_mirror)" >/dev/null
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import - "$base" >/dev/null
fi

# The project's dependencies as wheels in docker/wheels/ (pip keeps what is already there).
requirements="$(mktemp)"
"$python" -c "import tomllib; print('\n'.join(tomllib.load(open('$root/pyproject.toml', 'rb'))['project']['dependencies']))" >"$requirements"
"$python" -m pip download -q --only-binary=:all: --dest "$here/wheels" "$torch_spec" -r "$requirements"
rm -f "$requirements"

# --format docker: the OCI image format has no HEALTHCHECK.
podman build --format docker --file "$here/Dockerfile" --tag "$tag" \
  --build-arg BASE_IMAGE="$base" --build-arg TORCH_SPEC="$torch_spec" "$root"
