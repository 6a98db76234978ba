#!/usr/bin/env bash
# Reproduces the core rows of docs/benchmarks.md: memferry save/restore
# against fio on the same shard files, in the same run.
# Usage: bench/core.sh [SIZE (default 2GiB)] [WORKDIR (default /var/tmp/memferry-bench)]
# Needs root for cold rows (drops the page cache); installs fio when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/setup.sh
exec python3 bench/core.py --size "${1:-2GiB}" --dir "${2:-/var/tmp/memferry-bench}" --runs "${RUNS:-9}"
