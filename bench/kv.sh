#!/usr/bin/env bash
# KV block store vs fio random I/O at the same block size and queue depth.
# Usage: bench/kv.sh [BLOCKS (default 512)] [WORKDIR (default /var/tmp/memferry-kv-bench)]
# Installs fio when missing; reserves hugepages for fio's buffers as root.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/setup.sh
exec python3 bench/kv.py --blocks "${1:-512}" --dir "${2:-/var/tmp/memferry-kv-bench}" --trials "${TRIALS:-5}"
