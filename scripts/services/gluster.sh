#!/usr/bin/env bash
# GlusterFS 10: glusterd (working dir under STATE_DIR) + volume gv0 + FUSE mount at STATE_DIR/gluster/mnt.
# glusterd's management port is fixed (24007), so only one instance per machine.
SVC=gluster
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
VOL=gv0
G() { timeout 60 gluster --mode=script "$@"; }

install() { apt_ensure glusterfs-server glusterfs-client fuse3 iproute2; }

start() {
  prepare_state "${1:-}"
  command -v glusterd >/dev/null || die "glusterfs is not installed (run: $0 install)"
  ! ss -Hltn 'sport = :24007' | grep -q . || die "port 24007 is taken (another glusterd still running?)"
  local host; host=$(hostname)
  getent ahostsv4 "$host" | grep -q '^127\.' || die "hostname '$host' must resolve to 127.x (the gluster CLI refuses localhost as brick host)"
  mkdir -p "$D/wd" "$D/brick" "$D/mnt" "$D/log"
  sed -e "s|option working-directory .*|option working-directory $D/wd|" \
      -e "s|option transport.socket.listen-port|option transport.socket.bind-address 127.0.0.1\n    &|" \
      /etc/glusterfs/glusterd.vol >"$D/glusterd.vol"
  LOGS+=("$D/log/glusterd.log")
  run_logged "$D/log/cli.log" glusterd -f "$D/glusterd.vol" -p "$D/glusterd.pid" --log-file="$D/log/glusterd.log"
  wait_for 30 "glusterd" G volume list
  run_logged "$D/log/cli.log" G volume create "$VOL" "$host:$D/brick" force
  run_logged "$D/log/cli.log" G volume start "$VOL"
  LOGS+=("$D/log/mnt.log")
  run_logged "$D/log/cli.log" glusterfs --volfile-server=127.0.0.1 --volfile-id="$VOL" \
    --pid-file="$D/mnt.pid" --log-file="$D/log/mnt.log" "$D/mnt"
  wait_for 30 "FUSE mount at $D/mnt" mountpoint -q "$D/mnt"
  wait_for 30 "a writable mount" sh -c "echo ok >'$D/mnt/.probe' && rm '$D/mnt/.probe'"
  echo "export GRANARY_TEST_GLUSTER_DIR=$D/mnt" >"$ENV_FILE"
  echo "gluster up: $D/mnt (volume $VOL, brick $host:$D/brick)"
}

stop() {
  state_dir_for_stop "${1:-}"
  [ -d "$D" ] || return 0
  umount_under "$D/mnt"
  kill_pidfiles "$D/mnt.pid"
  if [ -f "$D/glusterd.pid" ] && alive "$(tr -dc 0-9 <"$D/glusterd.pid")"; then
    G volume stop "$VOL" force >/dev/null 2>&1 || true
    G volume delete "$VOL" >/dev/null 2>&1 || true
  fi
  # brick (glusterfsd) pid files, in case the volume stop did not run or did not finish
  kill_pidfiles "$D/glusterd.pid" "/var/run/gluster/vols/$VOL/$(hostname)$(echo "$D/brick" | tr / -).pid"
}

main "$@"
