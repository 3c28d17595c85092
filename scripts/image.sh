#!/usr/bin/env bash
# `make image`: build localhost/mailrelay:<version> from the Dockerfile with buildah (no Docker
# daemon: --isolation chroot, vfs storage; run as root). The base image is PYTHON_IMAGE: the
# Dockerfile's default (python:3.11-slim) where a registry is reachable, or, with
# PYTHON_IMAGE=local, a Debian 12 base made here by mmdebstrap (python3, python3-venv,
# python3-pip, ca-certificates) and imported as localhost/debian-python:bookworm, for machines
# that reach Debian's and PyPI's package servers but no container registry. pip inside the build
# gets the host's CA bundle and resolv.conf mounted (as the host's pip uses them).
#
#   scripts/image.sh [TAG]        environment: PYTHON_IMAGE (default: python:3.11-slim)
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)
tag=${1:-localhost/mailrelay:$version}
base=${PYTHON_IMAGE:-python:3.11-slim}
storage=(--storage-driver vfs)
if [ "$(id -u)" -ne 0 ]; then
  echo "image.sh: buildah with --isolation chroot needs root" >&2
  exit 2
fi
# buildah (and mmdebstrap for the local base) are Debian packages; not in `make system-deps`,
# because `make test` does not build the image.
need=()
command -v buildah >/dev/null || need+=(buildah)
[ "$base" = local ] && ! command -v mmdebstrap >/dev/null && need+=(mmdebstrap)
if [ ${#need[@]} -gt 0 ]; then
  echo "image.sh: installing Debian packages: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ "$base" = local ]; then
  base=localhost/debian-python:bookworm
  if ! buildah "${storage[@]}" inspect --type image "$base" >/dev/null 2>&1; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    echo "image.sh: making the Debian base $base with mmdebstrap"
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
      bookworm "$work/rootfs.tar"
    container=$(buildah "${storage[@]}" from scratch)
    buildah "${storage[@]}" add "$container" "$work/rootfs.tar" /
    buildah "${storage[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --cmd /bin/sh "$container"
    buildah "${storage[@]}" commit --quiet --rm "$container" "$base" >/dev/null
  fi
fi
mounts=()
for file in /etc/ssl/certs/ca-certificates.crt /etc/resolv.conf; do
  [ -f "$file" ] && mounts+=(-v "$file:$file:ro")
done
echo "image.sh: building $tag from $base"
started=$(date +%s)
buildah "${storage[@]}" bud --isolation chroot --layers=false "${mounts[@]}" \
  --build-arg "PYTHON_IMAGE=$base" --build-arg "VERSION=$version" -t "$tag" -f Dockerfile .
echo "image.sh: built $tag in $(( $(date +%s) - started )) s"
# vfs storage copies every layer: drop the image this tag replaced (and other untagged ones)
buildah "${storage[@]}" rmi --prune >/dev/null 2>&1 || true
buildah "${storage[@]}" images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$tag"
