#!/usr/bin/env bash
# Build a minimal local Debian bookworm base image (python3 + venv + pip) with debootstrap and
# `docker import`, for testing docker/Dockerfile where the real CUDA base cannot be pulled.
#
#   docker/make-local-base.sh [TAG]        default TAG: ondevice-llm-build/debian-base:bookworm
#
# Idempotent: does nothing when TAG already exists. Needs root, debootstrap and a Docker daemon.
# Env: DOCKER (client, default /usr/bin/docker), DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

TAG="${1:-ondevice-llm-build/debian-base:bookworm}"
DOCKER="${DOCKER:-/usr/bin/docker}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if "$DOCKER" image inspect "$TAG" >/dev/null 2>&1; then
    echo "local base $TAG exists; nothing to do"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "error: debootstrap not found: apt-get install -y debootstrap" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "error: debootstrap needs root" >&2; exit 2; }

work="$(mktemp -d /var/tmp/debian-base.XXXXXX)"
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"

echo "debootstrap bookworm (minbase) into $root"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; echo "error: debootstrap failed (log above)" >&2; exit 1; }

# Same apt sources a debian:bookworm image has, an empty apt cache and no host-specific files.
cat >"$root/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SOURCES
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/* "$root"/tmp/* \
    "$root"/root/.cache
: >"$root/etc/hostname"
: >"$root/etc/resolv.conf"

tar -C "$root" --numeric-owner -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap bookworm minbase + python3, python3-venv, python3-pip" \
    - "$TAG"
echo "imported $TAG ($("$DOCKER" image inspect --format '{{.Size}}' "$TAG") bytes)"
