#!/usr/bin/env bash
# System packages the project uses beyond PyPI: the Fashion-MNIST data set (training, evaluation tests);
# for the deployment tests (tests/docker/) podman, buildah and runc (build and run the image), debootstrap
# (its local base image), Prometheus with promtool, podman-compose, and kubectl (`kubectl kustomize`);
# Chromium (the web page's browser test drives it headless with Playwright); hey, the outside load generator
# of bench.budget and bench.where.
# Serving needs none of them: `make test` (and `make setup`) run this script, `make serve` does not.
# Installs what is missing with apt-get when run as root; otherwise says what to install.  With
# MONE_REQUIRE_SYSTEM=1 (CI, .ci/run) a package that is still missing afterwards is an error.
set -euo pipefail
packages=(dataset-fashion-mnist chromium podman buildah runc debootstrap prometheus podman-compose hey)
# Debian's kubectl is the kubernetes-client package; keep a kubectl that is already installed another way.
command -v kubectl >/dev/null || packages+=(kubernetes-client)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "installing system packages: ${missing[*]}"
  apt-get update -qq >/dev/null || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null || true
fi
still=()
for p in "${missing[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || still+=("$p")
done
[ ${#still[@]} -eq 0 ] && exit 0
echo "missing system packages: ${still[*]} (install them with: sudo apt-get install ${still[*]})" >&2
if [ "${MONE_REQUIRE_SYSTEM:-0}" != "0" ]; then
  echo "MONE_REQUIRE_SYSTEM is set: the tests that need them would fail" >&2
  exit 1
fi
