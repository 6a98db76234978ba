# Sourced by the bench scripts: installs fio when missing and builds memferry.
if ! command -v fio >/dev/null; then
  echo "installing fio..." >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null
fi
cargo build --release -q
