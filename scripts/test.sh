#!/usr/bin/env bash
# The whole test suite: installs what the tests need, starts the real backends on 127.0.0.1
# (an S3 server, Ceph RGW, a GlusterFS volume), runs the format and lint gates and every test,
# and stops the backends again, whatever happens. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
# prometheus: promtool and the server (cli/tests/deploy.rs, observability.rs); chromium: the
# dashboard page test (cli/tests/dashboard.rs).
scripts/install-deps.sh prometheus chromium
scripts/services/all.sh install moto ceph gluster etcd kube

state=$(mktemp -d /tmp/granary-test.XXXXXX)
cleanup() {
  scripts/services/all.sh stop "$state" moto ceph gluster etcd kube >/dev/null 2>&1 || true
  rm -rf "$state"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
scripts/services/all.sh start "$state" moto ceph gluster etcd kube
set -a
. "$state/services.env"
set +a

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
set +e
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$state/cargo-test.log"
status=${PIPESTATUS[0]}
# The benchmark harness's smoke run: every system (native, raw S3, Granary, s3fs, rclone)
# produces a byte-checked figure on tiny sizes.
if GRANARY_BENCH_DEBUG=1 scripts/bench-smoke.sh; then
  echo "test result: ok. 1 passed; 0 failed (benchmark smoke)" | tee -a "$state/cargo-test.log"
else
  echo "test result: FAILED. 0 passed; 1 failed (benchmark smoke)" | tee -a "$state/cargo-test.log"
  status=1
fi
set -e
# One closing line for the whole run (cargo prints one summary per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "total: %d passed, %d failed\n", p, f }' "$state/cargo-test.log"
exit "$status"
