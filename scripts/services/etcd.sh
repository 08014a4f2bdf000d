#!/usr/bin/env bash
# etcd 3.4 (Debian's etcd-server), single member on 127.0.0.1, TLS with client-certificate auth.
SVC=etcd
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

install() { apt_ensure etcd-server etcd-client openssl; }

# A CA of this etcd's own ($D/tls/ca.pem + ca.key) and a server certificate for 127.0.0.1.
# Tests issue their clients' certificates from the same CA (`granary certs --out DIR` reuses a
# ca.pem + ca.key it finds in DIR), so etcd accepts them.
make_certs() {
  local t=$1
  mkdir -p "$t"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -keyout "$t/ca.key" -out "$t/ca.pem" -subj "/CN=granary test etcd CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$t/etcd.key" -out "$t/etcd.csr" -subj "/CN=etcd" 2>/dev/null
  printf 'subjectAltName=DNS:etcd,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' >"$t/ext"
  openssl x509 -req -in "$t/etcd.csr" -CA "$t/ca.pem" -CAkey "$t/ca.key" -CAcreateserial \
    -days 30 -extfile "$t/ext" -out "$t/etcd.pem" 2>/dev/null
  chmod 600 "$t/ca.key" "$t/etcd.key"
}

start() {
  prepare_state "${1:-}"
  command -v etcd >/dev/null || die "etcd is not installed (run: $0 install)"
  command -v openssl >/dev/null || die "openssl is not installed (run: $0 install)"
  local t=$D/tls; make_certs "$t"
  local cport pport; read -r cport pport < <(free_ports 2)
  local client=https://127.0.0.1:$cport peer=https://127.0.0.1:$pport
  # Clients and the peer port need a certificate from the CA (--client-cert-auth).
  spawn "$D/etcd.pid" "$D/etcd.log" etcd --name granary --data-dir "$D/data" \
    --listen-client-urls "$client" --advertise-client-urls "$client" \
    --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
    --initial-cluster "granary=$peer" --initial-cluster-state new \
    --cert-file "$t/etcd.pem" --key-file "$t/etcd.key" --trusted-ca-file "$t/ca.pem" --client-cert-auth \
    --peer-cert-file "$t/etcd.pem" --peer-key-file "$t/etcd.key" --peer-trusted-ca-file "$t/ca.pem" \
    --peer-client-cert-auth
  wait_for 30 "etcd on $client" env ETCDCTL_API=3 etcdctl --endpoints="$client" \
    --cacert "$t/ca.pem" --cert "$t/etcd.pem" --key "$t/etcd.key" endpoint health
  {
    echo "export GRANARY_TEST_ETCD=$client"
    # ca.pem + ca.key (for `granary certs --out`), and etcd.pem/etcd.key for etcdctl.
    echo "export GRANARY_TEST_ETCD_TLS=$t"
  } >"$ENV_FILE"
  echo "etcd up: $client (TLS, client certificates from $t/ca.pem)"
}

stop() { state_dir_for_stop "${1:-}"; kill_pidfiles "$D/etcd.pid"; }

main "$@"
