#!/usr/bin/env bash
# Installs the two S3-compatible servers the tests run against, into the
# git-ignored tools directory (default: <repo>/.tools), and does nothing when
# they are already there:
#   - moto server (PyPI `moto[server]`, in memory, checks conditional writes)
#     in a virtual environment: .tools/moto/bin/moto_server
#   - s3s-fs 0.14.1 (crates.io, files on disk, checks SigV4 signatures):
#     .tools/s3s-fs/bin/s3s-fs
# Needs Rust, a C compiler and python3 with venv/ensurepip (Debian:
# `apt-get install python3-venv` when ensurepip is missing).
# Called by the test harness (crates/memferry-cli/tests/common/s3.rs) and by
# .ci/run; safe to run concurrently (a lock serialises installs).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
tools="${MEMFERRY_TOOLS_DIR:-$repo/.tools}"
mkdir -p "$tools"
exec 9>"$tools/.install.lock"
flock 9

moto="$tools/moto"
if [ ! -f "$moto/.installed" ]; then
    echo "install-s3-servers: installing moto[server] into $moto" >&2
    rm -rf "$moto"
    if ! python3 -m venv "$moto" 2>/dev/null; then
        rm -rf "$moto"
        if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
            echo "install-s3-servers: python3 venv/ensurepip missing, installing python3-venv" >&2
            apt-get install -y python3-venv >&2 || { apt-get update >&2 && apt-get install -y python3-venv >&2; }
            python3 -m venv "$moto"
        else
            echo "install-s3-servers: python3 -m venv failed: install python3-venv (Debian/Ubuntu) and retry" >&2
            exit 1
        fi
    fi
    "$moto/bin/python" -m pip install --quiet --disable-pip-version-check 'moto[server]>=5.1,<6' >&2
    touch "$moto/.installed"
fi

s3s="$tools/s3s-fs"
if [ ! -x "$s3s/bin/s3s-fs" ]; then
    rm -rf "$s3s"
    echo "install-s3-servers: building s3s-fs 0.14.1 into $s3s (a few minutes, once)" >&2
    CARGO_TARGET_DIR="$tools/s3s-fs-build" cargo install s3s-fs --version 0.14.1 --locked \
        --features binary --root "$s3s" >&2
    rm -rf "$tools/s3s-fs-build"
fi
echo "moto_server=$moto/bin/moto_server"
echo "s3s_fs=$s3s/bin/s3s-fs"
