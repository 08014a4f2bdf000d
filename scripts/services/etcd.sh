#!/usr/bin/env bash
# etcd 3.4 (Debian's etcd-server), single member on 127.0.0.1.
SVC=etcd
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

install() { apt_ensure etcd-server etcd-client; }

start() {
  prepare_state "${1:-}"
  command -v etcd >/dev/null || die "etcd is not installed (run: $0 install)"
  local cport pport; read -r cport pport < <(free_ports 2)
  local client=http://127.0.0.1:$cport peer=http://127.0.0.1:$pport
  spawn "$D/etcd.pid" "$D/etcd.log" etcd --name granary --data-dir "$D/data" \
    --listen-client-urls "$client" --advertise-client-urls "$client" \
    --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
    --initial-cluster "granary=$peer" --initial-cluster-state new
  wait_for 30 "etcd on $client" env ETCDCTL_API=3 etcdctl --endpoints="$client" endpoint health
  echo "export GRANARY_TEST_ETCD=$client" >"$ENV_FILE"
  echo "etcd up: $client"
}

stop() { state_dir_for_stop "${1:-}"; kill_pidfiles "$D/etcd.pid"; }

main "$@"
