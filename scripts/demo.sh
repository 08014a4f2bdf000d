#!/usr/bin/env bash
# Granary on one node over a local sample dataset: installs what is missing, builds, writes a
# small sample dataset under $GRANARY_DEMO_DIR (default /tmp/granary-demo) and runs
# `granary up` over it in the foreground. Ctrl-C unmounts and exits.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --locked -p granary
dir=${GRANARY_DEMO_DIR:-/tmp/granary-demo}
data=$dir/dataset
mnt=$dir/mnt
if [ ! -f "$dir/.dataset-complete" ]; then
  echo "writing a sample dataset to $data" >&2
  rm -rf "$data" && mkdir -p "$data/train" "$data/val"
  for i in $(seq -w 0 199); do head -c 131072 /dev/urandom > "$data/train/sample-$i.bin"; done
  for i in $(seq -w 0 49); do head -c 131072 /dev/urandom > "$data/val/sample-$i.bin"; done
  head -c $((256 << 20)) /dev/urandom > "$data/shard-0000.tar"
  printf 'Granary sample dataset: 250 x 128 KiB samples and one 256 MiB shard.\n' > "$data/README.txt"
  touch "$dir/.dataset-complete"
fi
mountpoint -q "$mnt" 2>/dev/null && umount -l "$mnt"
mkdir -p "$mnt"
echo "mounting $data at $mnt (metrics: http://127.0.0.1:9464/metrics); try: ls $mnt; sha256sum $mnt/shard-0000.tar" >&2
exec target/release/granary up --source "$data" --mount "$mnt" --cache-dir "$dir/cache" \
  --memory-cache 512MiB --disk-cache 2GiB --metrics-addr 127.0.0.1:9464
