#!/usr/bin/env bash
# The container test (tests/test_container.py, `pytest -m container`), from a fresh machine or a warm one:
#   1. installs docker.io and debootstrap when missing (Debian/Ubuntu, as root);
#   2. starts dockerd when no daemon answers (bridge and iptables off, as this sandbox needs; builds and
#      containers then use host networking: PIPELINE_DOCKER_NETWORK=host);
#   3. makes the local Debian bookworm base (docker/make-local-base.sh; skipped when it exists);
#   4. runs the container tests and prints build/container-test/report.json.
# Cached between runs on one machine (never required): the local base image, BuildKit's layer and
# pip-download caches, the test tools' venv under ~/.cache/ondevice-llm-build. About 6 min warm and
# 10-15 min cold on 2 cores.
# Env: PYTHON (default .venv/bin/python), PIPELINE_EXTRA_CA (default: the system CA bundle, which here
# holds the TLS proxy's CA), CONTAINER_TEST_COLD=1 (prune BuildKit's cache first: a true cold build).
#
#   .ci/container.sh prepare   steps 1-3, then builds the tests' runtime image once with the system
#                              python3 (tasks/image.py needs nothing installed), so that BuildKit's cache
#                              holds its dependency layers (most of a cold build: the lock's pip install).
#                              .ci/run starts this beside the host's install, which leaves a core idle.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-test}"
PYTHON="${PYTHON:-.venv/bin/python}"
DOCKER=/usr/bin/docker          # Debian's client: BuildKit built in, no buildx plugin needed

if ! command -v dockerd >/dev/null || [ ! -x "$DOCKER" ] || ! command -v debootstrap >/dev/null; then
    echo "== installing docker.io and debootstrap"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io debootstrap >/dev/null
fi

if ! "$DOCKER" version >/dev/null 2>&1; then
    echo "== starting dockerd (log: /var/log/dockerd.log)"
    nohup dockerd --bridge=none --iptables=false >/var/log/dockerd.log 2>&1 &
    for _ in $(seq 60); do "$DOCKER" version >/dev/null 2>&1 && break; sleep 1; done
    "$DOCKER" version >/dev/null || { tail -20 /var/log/dockerd.log; echo "error: dockerd did not start" >&2; exit 1; }
fi

echo "== local base image"
DOCKER="$DOCKER" docker/make-local-base.sh
LOCAL_BASE="${CONTAINER_TEST_BASE:-ondevice-llm-build/debian-base:bookworm}"   # tests/test_container.py's

if [ "$MODE" = prepare ]; then
    # The tests build from a copy of the tracked and untracked files (no .git, hence SOURCE_DATE_EPOCH 0);
    # build from such a copy too, so that nothing is written into this checkout's build/ folder.
    ctx=$(mktemp -d /tmp/ci-image-context.XXXXXX)
    git ls-files -co --exclude-standard -z | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$ctx"
    echo "== warming BuildKit's cache: the runtime image (cpu) from $ctx"
    start=$(date +%s)
    (cd "$ctx" && SOURCE_DATE_EPOCH=0 PIPELINE_DOCKER="$DOCKER" PIPELINE_DOCKER_NETWORK="${PIPELINE_DOCKER_NETWORK:-host}" \
        python3.11 -m tasks.image build --root . --target runtime --variant cpu --base "$LOCAL_BASE" \
        --extra-ca "${PIPELINE_EXTRA_CA:-/etc/ssl/certs/ca-certificates.crt}" --iidfile "$ctx.iid" \
        --tag ondevice-llm-build-test:prepared)
    echo "== prepared in $(( $(date +%s) - start ))s"
    rm -rf "$ctx" "$ctx.iid"
    exit 0
fi

export PIPELINE_DOCKER="$DOCKER"
export PIPELINE_DOCKER_NETWORK="${PIPELINE_DOCKER_NETWORK:-host}"
export PIPELINE_EXTRA_CA="${PIPELINE_EXTRA_CA:-/etc/ssl/certs/ca-certificates.crt}"

echo "== pytest -m container"
rm -f build/container-test/report.json
status=0
timeout 1800 "$PYTHON" -m pytest -m container tests/test_container.py -v -rA -p no:cacheprovider || status=$?
[ -f build/container-test/report.json ] && cat build/container-test/report.json

# Old test images (superseded tags) would pile up run after run; only this project's dangling ones go.
"$DOCKER" image prune --force --filter label=dev.ondevice-llm-build.source-date-epoch >/dev/null || true
exit "$status"
