#!/usr/bin/env bash
# moto S3 server (in memory) on 127.0.0.1 with bucket granary-test.
SVC=moto
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
VENV=${GRANARY_MOTO_VENV:-/var/cache/granary/moto-venv}
AK=granary-test-ak SK=granary-test-sk BUCKET=granary-test

install() {
  "$VENV/bin/python" -c 'import moto, boto3, flask' 2>/dev/null && [ -x "$VENV/bin/moto_server" ] && return 0
  apt_ensure python3-venv curl
  rm -rf "$VENV"; mkdir -p "$(dirname "$VENV")"
  local log=/tmp/granary-moto-install.log; : >"$log"
  run_logged "$log" "$PY" -m venv "$VENV"
  run_logged "$log" "$VENV/bin/pip" install -q --disable-pip-version-check 'moto[server]' boto3
}

start() {
  prepare_state "${1:-}"
  [ -x "$VENV/bin/moto_server" ] || die "moto is not installed (run: $0 install)"
  local port; port=$(free_ports 1)
  spawn "$D/moto.pid" "$D/moto.log" "$VENV/bin/moto_server" -H 127.0.0.1 -p "$port"
  local ep=http://127.0.0.1:$port
  wait_for 30 "moto on $ep" curl -sf "$ep/moto-api/"
  wait_for 10 "bucket $BUCKET" s3_create_bucket "$ep" "$AK" "$SK" "$BUCKET"
  cat >"$ENV_FILE" <<EOF
export GRANARY_TEST_S3_ENDPOINT=$ep
export GRANARY_TEST_S3_ACCESS_KEY=$AK
export GRANARY_TEST_S3_SECRET_KEY=$SK
export GRANARY_TEST_S3_BUCKET=$BUCKET
export GRANARY_TEST_BOTO3_PYTHON=$VENV/bin/python
EOF
  echo "moto up: $ep (bucket $BUCKET)"
}

stop() { state_dir_for_stop "${1:-}"; kill_pidfiles "$D/moto.pid"; }

main "$@"
