#!/usr/bin/env bash
# Checks memferry's built-in limit loops against fio on the same files, in
# the same run, then runs the full `memferry bench` sweep with a chart.
# Usage: bench/limits.sh [SIZE (default 2GiB)] [WORKDIR (default /var/tmp/memferry-bench)]
# Needs root for cold figures; installs fio when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/setup.sh
exec python3 bench/limits.py --size "${1:-2GiB}" --dir "${2:-/var/tmp/memferry-bench}" --trials "${TRIALS:-6}"
