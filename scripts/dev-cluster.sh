#!/usr/bin/env bash
# A three-worker Granary cluster on this machine, for development: etcd (TLS, client
# certificates), dev TLS certificates from etcd's CA, three `granary server` workers over a local
# sample directory (gRPC and QUIC over TLS), then `granary status`.
# Stop it with: scripts/dev-cluster.sh stop
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${GRANARY_DEV_CLUSTER_DIR:-/tmp/granary-dev-cluster}
if [ "${1:-}" = stop ]; then
  for pid in "$dir"/w*.pid; do [ -f "$pid" ] && kill -INT "$(cat "$pid")" 2>/dev/null || true; done
  scripts/services/etcd.sh stop "$dir/services"
  exit 0
fi
scripts/install-deps.sh
scripts/services/etcd.sh install
cargo build --release --locked -p granary
bin=target/release/granary
mkdir -p "$dir/data"
[ -f "$dir/data/sample.bin" ] || head -c $((64 << 20)) /dev/urandom > "$dir/data/sample.bin"
scripts/services/etcd.sh start "$dir/services"
. "$dir/services/etcd.env"
# One CA for etcd and Granary: `granary certs` issues from the ca.pem + ca.key it finds.
mkdir -p "$dir/tls"
cp "$GRANARY_TEST_ETCD_TLS/ca.pem" "$GRANARY_TEST_ETCD_TLS/ca.key" "$dir/tls/"
"$bin" certs --out "$dir/tls" w1 w2 w3 client >/dev/null
for i in 1 2 3; do
  cat > "$dir/w$i.toml" <<TOML
node_id = "w$i"
listen = "127.0.0.1:1707$i"
metrics_addr = "127.0.0.1:1717$i"
[cache]
dir = "$dir/cache-w$i"
memory = "256MiB"
disk = "1GiB"
[cluster]
etcd = ["$GRANARY_TEST_ETCD"]
[tls]
dir = "$dir/tls"
[[mount]]
path = "/data"
source = "$dir/data"
TOML
  "$bin" server --config "$dir/w$i.toml" > "$dir/w$i.log" 2>&1 &
  echo $! > "$dir/w$i.pid"
done
sleep 2
tls="--tls-dir $dir/tls --tls-name client"
"$bin" status --etcd "$GRANARY_TEST_ETCD" $tls
cat <<MSG

Mount it:  mkdir -p $dir/mnt && $bin mount --etcd $GRANARY_TEST_ETCD --tls-dir $dir/tls $dir/mnt
Status:    $bin status --etcd $GRANARY_TEST_ETCD $tls [--json]
Datasets:  $bin dataset --server 127.0.0.1:17071 --tls-dir $dir/tls pin sample --path /data --nodes w1,w2
           $bin dataset --server 127.0.0.1:17071 --tls-dir $dir/tls load sample --wait
Stop:      scripts/dev-cluster.sh stop
MSG
