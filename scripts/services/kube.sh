#!/usr/bin/env bash
# A real kube-apiserver (v1.20.2) over its own etcd, on 127.0.0.1, for the scheduler hook's tests.
#
# install: builds kube-apiserver and kube-scheduler from Debian's `kubernetes` source package
#   (no registry ships control-plane binaries; RECIPES.md) into $KUBE_CACHE (default
#   /var/cache/granary/kube-1.20.2/), outside the clone; rebuilds only when a binary is missing.
#   The Go build takes ~6 min on 2 cores.
# start STATE_DIR: etcd (own data dir) + kube-apiserver with a static admin token (group
#   system:masters) and RBAC enforced, so tests acting as service accounts (pod-bound tokens
#   from the TokenRequest API: the service-account issuer and signing key flags) get only what
#   deploy/'s roles grant; writes
#   STATE_DIR/kube/kubeconfig and STATE_DIR/kube.env with GRANARY_TEST_KUBECONFIG and
#   GRANARY_TEST_KUBE_SCHEDULER (the path of the kube-scheduler binary: the test starts the
#   scheduler itself, with a configuration pointing at the hook it runs).
SVC=kube
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

KUBE_VERSION=1.20.2
KUBE_CACHE=${KUBE_CACHE:-/var/cache/granary/kube-$KUBE_VERSION}

install() {
  apt_ensure etcd-server etcd-client openssl curl
  if [ -x "$KUBE_CACHE/kube-apiserver" ] && [ -x "$KUBE_CACHE/kube-scheduler" ]; then
    return 0
  fi
  apt_ensure golang-go rsync jq
  local work log
  work=$(mktemp -d /tmp/granary-kube-build.XXXXXX)
  log=$work/build.log
  echo "kube: building kube-apiserver + kube-scheduler $KUBE_VERSION from Debian's source package (~6 min; log $log)"
  # Fetch the source package with a private apt state: the system's apt configuration is untouched.
  mkdir -p "$work/apt/etc" "$work/apt/lists/partial" "$work/apt/cache/archives/partial"
  sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources >"$work/apt/etc/src.sources"
  local aptopts=(-o Dir::Etc::sourcelist=/dev/null -o "Dir::Etc::sourceparts=$work/apt/etc"
    -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache")
  run_logged "$log" apt-get "${aptopts[@]}" update
  (cd "$work" && run_logged "$log" apt-get "${aptopts[@]}" source --download-only kubernetes)
  local orig
  # Debian's version is "1.20.5+really1.20.2": the upstream 1.20.2 tree.
  orig=$(find "$work" -maxdepth 1 -name "kubernetes_*really$KUBE_VERSION.orig.tar.*" -o \
    -maxdepth 1 -name "kubernetes_$KUBE_VERSION.orig.tar.*" | head -n1)
  [ -n "$orig" ] || { LOGS+=("$log"); die "no orig tarball of kubernetes $KUBE_VERSION in $work"; }
  mkdir -p "$work/src"
  run_logged "$log" tar -xf "$orig" -C "$work/src" --strip-components=1
  (
    cd "$work/src"
    export GOPATH=$PWD/.go CGO_ENABLED=0 GOPROXY=off GOFLAGS=-ldflags=-s
    mkdir -p .go/src/k8s.io
    ln -sfn ../../.. .go/src/k8s.io/kubernetes
    run_logged "$log" make WHAT="cmd/kube-scheduler cmd/kube-apiserver"
  )
  local bin=$work/src/_output/bin
  [ -x "$bin/kube-apiserver" ] && [ -x "$bin/kube-scheduler" ] || { LOGS+=("$log"); die "the build left no binaries in $bin"; }
  mkdir -p "$KUBE_CACHE"
  cp "$bin/kube-apiserver" "$KUBE_CACHE/kube-apiserver.tmp"
  cp "$bin/kube-scheduler" "$KUBE_CACHE/kube-scheduler.tmp"
  mv "$KUBE_CACHE/kube-apiserver.tmp" "$KUBE_CACHE/kube-apiserver"
  mv "$KUBE_CACHE/kube-scheduler.tmp" "$KUBE_CACHE/kube-scheduler"
  rm -rf "$work"
}

start() {
  prepare_state "${1:-}"
  [ -x "$KUBE_CACHE/kube-apiserver" ] && [ -x "$KUBE_CACHE/kube-scheduler" ] ||
    die "kube-apiserver/kube-scheduler $KUBE_VERSION not built (run: $0 install)"
  command -v etcd >/dev/null || die "etcd is not installed (run: $0 install)"
  local cport pport sport
  read -r cport pport sport < <(free_ports 3)
  local client=http://127.0.0.1:$cport peer=http://127.0.0.1:$pport
  spawn "$D/etcd.pid" "$D/etcd.log" etcd --name kube --data-dir "$D/etcd" \
    --listen-client-urls "$client" --advertise-client-urls "$client" \
    --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
    --initial-cluster "kube=$peer" --initial-cluster-state new
  wait_for 30 "etcd on $client" env ETCDCTL_API=3 etcdctl --endpoints="$client" endpoint health

  # A static admin token, a service-account key pair, and self-signed serving certs (in cert-dir).
  local token
  token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
  echo "$token,admin,admin,system:masters" >"$D/tokens.csv"
  run_logged "$D/openssl.log" openssl genrsa -out "$D/sa.key" 2048
  run_logged "$D/openssl.log" openssl rsa -in "$D/sa.key" -pubout -out "$D/sa.pub"
  mkdir -p "$D/certs"
  spawn "$D/apiserver.pid" "$D/apiserver.log" "$KUBE_CACHE/kube-apiserver" \
    --etcd-servers="$client" --bind-address=127.0.0.1 --advertise-address=127.0.0.1 \
    --secure-port="$sport" --insecure-port=0 --cert-dir="$D/certs" \
    --token-auth-file="$D/tokens.csv" --authorization-mode=RBAC \
    --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file="$D/sa.pub" --service-account-signing-key-file="$D/sa.key" \
    --service-cluster-ip-range=10.96.0.0/16 --disable-admission-plugins=ServiceAccount --allow-privileged=true

  cat >"$D/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: granary-test
  cluster:
    server: https://127.0.0.1:$sport
    insecure-skip-tls-verify: true
users:
- name: admin
  user:
    token: $token
contexts:
- name: granary-test
  context:
    cluster: granary-test
    user: admin
current-context: granary-test
EOF
  wait_for 90 "kube-apiserver on 127.0.0.1:$sport" \
    curl -sfk -H "Authorization: Bearer $token" "https://127.0.0.1:$sport/readyz"
  {
    echo "export GRANARY_TEST_KUBECONFIG=$D/kubeconfig"
    echo "export GRANARY_TEST_KUBE_SCHEDULER=$KUBE_CACHE/kube-scheduler"
  } >"$ENV_FILE"
  echo "kube-apiserver up: https://127.0.0.1:$sport (kubeconfig $D/kubeconfig)"
}

stop() { state_dir_for_stop "${1:-}"; kill_pidfiles "$D/apiserver.pid" "$D/etcd.pid"; }

main "$@"
