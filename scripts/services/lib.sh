# Shared helpers for scripts/services/*.sh (sourced, not run).
# Each service script sets SVC (its name) before sourcing this file.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
export PATH=$PATH:/usr/sbin:/sbin
# Debian's python3 (always there with python3-venv on this image); fall back to whatever is on PATH.
PY=/usr/bin/python3; [ -x "$PY" ] || PY=$(command -v python3)

LOGS=()   # log files whose tail is shown when we fail

die() {
  echo "[$SVC] ERROR: $*" >&2
  local f seen=" "
  for f in "${LOGS[@]}"; do
    [ -f "$f" ] && [[ $seen != *" $f "* ]] || continue
    seen+="$f "
    echo "----- last lines of $f -----" >&2
    tail -n 40 "$f" >&2
  done
  if [ -n "${ON_FAIL:-}" ]; then local h=$ON_FAIL; ON_FAIL=; "$h" "$STATE" || true; fi
  exit 1
}

# run_logged LOG CMD...: run CMD with its output appended to LOG; on failure show the log and exit.
run_logged() {
  local log=$1; shift
  echo "+ $*" >>"$log"
  "$@" >>"$log" 2>&1 || { LOGS+=("$log"); die "command failed: $*"; }
}

# apt_ensure PKG...: install the missing packages (apt-get update only when something is missing).
apt_ensure() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local log; log=$(mktemp /tmp/granary-apt.XXXXXX.log)
  run_logged "$log" apt-get -o DPkg::Lock::Timeout=300 update
  run_logged "$log" apt-get -o DPkg::Lock::Timeout=300 install -y "${missing[@]}"
  rm -f "$log"
}

# free_ports N: print N distinct free TCP ports on 127.0.0.1 (all bound at once, so no duplicates).
free_ports() {
  "$PY" - "$1" <<'EOF'
import socket, sys
ss = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in ss: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in ss))
EOF
}

# wait_for SECONDS WHAT CMD...: poll CMD until it succeeds, or die after SECONDS.
wait_for() {
  local secs=$1 what=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || die "timed out after ${secs}s waiting for $what"
    sleep 0.3
  done
}

# spawn PIDFILE LOG CMD...: start CMD in the background, detached from our stdio, and record its pid.
spawn() {
  local pidfile=$1 log=$2; shift 2
  LOGS+=("$log")
  setsid "$@" </dev/null >>"$log" 2>&1 &
  echo $! >"$pidfile"
}

# umount_under DIR: unmount everything mounted at or below DIR (lazily if busy or dead). Never fails.
umount_under() {
  local m
  awk -v d="$1" '$2 == d || index($2, d "/") == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
}

# alive PID: the process exists and is not a zombie waiting to be reaped.
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null && [[ $(ps -o stat= -p "$1") != Z* ]]; }

# kill_pidfiles FILE...: TERM each recorded pid, wait up to $GRACE (10) s, then KILL. Never fails.
kill_pidfiles() {
  local f pids=() p
  for f in "$@"; do
    [ -f "$f" ] || continue
    p=$(tr -dc 0-9 <"$f"); alive "$p" && pids+=("$p")
    rm -f "$f"
  done
  [ ${#pids[@]} -eq 0 ] && return 0
  kill "${pids[@]}" 2>/dev/null || true
  for _ in $(seq $((${GRACE:-10} * 5))); do
    for p in "${pids[@]}"; do alive "$p" && break; p=; done
    [ -z "$p" ] && return 0
    sleep 0.2
  done
  kill -9 "${pids[@]}" 2>/dev/null || true
}

# prepare_state STATE_DIR: sets D=STATE_DIR/$SVC (fresh, refusing if a recorded pid still runs) and ENV_FILE.
prepare_state() {
  [ -n "${1:-}" ] || die "usage: $0 start STATE_DIR"
  mkdir -p "$1"
  STATE=$(cd "$1" && pwd); D=$STATE/$SVC; ENV_FILE=$STATE/$SVC.env
  local f
  for f in $(find "$D" -name '*.pid' 2>/dev/null); do
    alive "$(tr -dc 0-9 <"$f")" && die "already running from $D (run: $0 stop $STATE)"
  done
  umount_under "$D"
  rm -rf "$D" "$ENV_FILE"; mkdir -p "$D"
  ON_FAIL=stop   # a failed start stops whatever it had started
}

state_dir_for_stop() {
  [ -n "${1:-}" ] || die "usage: $0 stop STATE_DIR"
  STATE=$(cd "$1" 2>/dev/null && pwd || echo "$1"); D=$STATE/$SVC
  rm -f "$STATE/$SVC.env"
}

# s3_create_bucket ENDPOINT AK SK BUCKET: PUT the bucket with curl's SigV4 (treats "already exists" as success).
s3_create_bucket() {
  local code
  code=$(env -u AWS_CA_BUNDLE curl -s -o /dev/null -w '%{http_code}' -X PUT \
    --aws-sigv4 'aws:amz:us-east-1:s3' --user "$2:$3" \
    -H 'x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855' "$1/$4")
  [ "$code" = 200 ] || [ "$code" = 409 ]
}

usage() { echo "usage: $0 install | start STATE_DIR | stop STATE_DIR" >&2; exit 2; }

main() {
  case "${1:-}" in
    install) install; echo "$SVC: installed" ;;
    start|stop) "$@" ;;
    *) usage ;;
  esac
}
