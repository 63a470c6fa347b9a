#!/usr/bin/env bash
# Build gpubake's own builder image (dockerfiles/builder.Dockerfile) with the
# local Docker Engine.
#   scripts/builder-image.sh [--ca-bundle FILE] [--base IMAGE] [--tag TAG]
# --ca-bundle: PEM bundle for HTTPS to PyPI behind a TLS-inspecting proxy, used
#   in the build's first stage only (not in the image).
# --base: the Debian 12 image to start from (default debian:12; where no
#   registry is reachable, gpubake/base:debian-12, which `build.py` makes).
# --tag: default gpubake/builder:<gpubake version>, then also tagged :latest.
set -euo pipefail
cd "$(dirname "$0")/.."
die() { printf 'builder-image: error: %s\n' "$*" >&2; exit 1; }

bundle="" base="debian:12" tag=""
while (($#)); do
  case $1 in
    --ca-bundle) bundle=${2:?--ca-bundle needs a FILE}; shift 2 ;;
    --base) base=${2:?--base needs an IMAGE}; shift 2 ;;
    --tag) tag=${2:?--tag needs a TAG}; shift 2 ;;
    -h | --help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' gpubake/__init__.py)
tags=()
[ -n "$tag" ] || { tag="gpubake/builder:$version"; tags=(-t gpubake/builder:latest); }
if [ -n "$bundle" ]; then
  [ -f "$bundle" ] || die "--ca-bundle $bundle: no such file"
  grep -q -- '-----BEGIN CERTIFICATE-----' "$bundle" || die "--ca-bundle $bundle holds no PEM certificate"
fi
command -v docker >/dev/null || die "docker not found: install Docker Engine (apt-get install docker.io)"
docker info >/dev/null 2>&1 || die "Docker Engine not reachable: start dockerd"
docker image inspect "$base" >/dev/null 2>&1 || docker pull -q "$base" >/dev/null 2>&1 ||
  die "base image $base is not here and cannot be pulled: pass --base with a local Debian 12 image"

work=build/builder
mkdir -p "$work"
cleanup() {
  rm -f "$work/ca-bundle.pem"
  # the first stage's image holds the bundle: never keep it
  docker image prune -f --filter label=io.gpubake.builder-stage=env >/dev/null 2>&1 || true
}
trap cleanup EXIT
if [ -n "$bundle" ]; then cp "$bundle" "$work/ca-bundle.pem"; else : >"$work/ca-bundle.pem"; fi
printf 'builder-image: building %s from %s\n' "$tag" "$base" >&2
docker build -q -f dockerfiles/builder.Dockerfile --build-arg "BASE=$base" -t "$tag" "${tags[@]}" . >/dev/null
printf '%s\n' "$tag"
