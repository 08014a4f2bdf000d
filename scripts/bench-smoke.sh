#!/usr/bin/env bash
# CI smoke test of the benchmark harness (docs/BENCHMARKS.md): installs what it needs when
# missing, then runs `granary-bench --smoke`: every installed system on every workload at tiny
# sizes, one run; then `granary-bench --cluster --smoke`: 1, 2 and 3 workers with their clients
# (~15 s); then `granary-bench --cluster --hosts --smoke`: 1 to 4 workers as emulated hosts
# (network namespaces, shaped links), each serving its own mount (~10 s); then `granary-bench --pinned --smoke`: a pinned dataset loaded and read through
# passthrough (~10 s); then `granary-bench --training --smoke`: two epochs of batches for a
# simulated GPU over native, granary, granary-pinned and s3fs (~10 s). It fails unless every
# figure was measured with the right bytes and the chart was drawn, or if anything is left
# mounted (or an emulated host's namespace or bridge is left) afterwards. Extra arguments go to the first run.
# GRANARY_BENCH_DEBUG=1 measures the debug build (what CI does: the smoke checks figures, not speed).
#   s3fs, rclone       the peer FUSE tools measured beside Granary
#   fonts-dejavu-core  the font the chart's labels are drawn in
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh s3fs rclone fonts-dejavu-core

status=0
if [ "${GRANARY_BENCH_DEBUG:-}" = 1 ]; then
  # CI: the debug build the tests already made; the smoke checks figures, not speed.
  cargo build --locked -p granary
  bench=(cargo run --locked -p granary-bench -- --granary-bin "${CARGO_TARGET_DIR:-target}/debug/granary")
else
  bench=(cargo run --release --locked -p granary-bench --)
fi
"${bench[@]}" --smoke "$@" || status=$?
"${bench[@]}" --cluster --smoke || status=$?
"${bench[@]}" --cluster --hosts --smoke || status=$?
"${bench[@]}" --pinned --smoke || status=$?
"${bench[@]}" --training --smoke || status=$?
# The bench unmounts and stops everything it started, however it ends; check.
work=$(realpath -m "${CARGO_TARGET_DIR:-target}/bench-work")
if grep -q " $work" /proc/mounts; then
  echo "bench-smoke: still mounted under $work:" >&2
  grep " $work" /proc/mounts >&2
  status=1
fi
if ip netns list | grep -q '^granary-h' || [ -e /sys/class/net/granbr0 ]; then
  echo "bench-smoke: emulated hosts left behind:" >&2
  ip netns list | grep '^granary-h' >&2 || true
  ls -d /sys/class/net/granbr0 >&2 2>/dev/null || true
  status=1
fi
exit "$status"
