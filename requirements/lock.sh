#!/usr/bin/env bash
# Re-lock both variants from the *.in files: universal (any platform marker), hash-pinned.
# Needs uv (pip install uv). Review the diff, run the tests, commit the .in and .lock.txt together.
set -euo pipefail
cd "$(dirname "$0")"
UV="${UV:-../.venv/bin/uv}"
for variant in cpu cuda; do
  "$UV" pip compile "$variant.in" --universal --python-version 3.11 --generate-hashes -o "$variant.lock.txt"
done
# The opt-in Azure ML extra, constrained by the CPU lock (Linux x86_64: its Windows split does not resolve).
"$UV" pip compile azure.in --python-platform x86_64-manylinux_2_28 --python-version 3.11 --generate-hashes -o azure.lock.txt
