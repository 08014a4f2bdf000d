#!/usr/bin/env bash
# The whole test suite: installs what the tests need, starts the real backends on 127.0.0.1
# (an S3 server, Ceph RGW, a GlusterFS volume), runs the format and lint gates and every test,
# and stops the backends again, whatever happens. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/services/all.sh install

state=$(mktemp -d /tmp/granary-test.XXXXXX)
cleanup() {
  scripts/services/all.sh stop "$state" >/dev/null 2>&1 || true
  rm -rf "$state"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
scripts/services/all.sh start "$state"
set -a
. "$state/services.env"
set +a

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked "$@"
