#!/usr/bin/env bash
# Single-node Ceph 16 (1 mon, 1 memstore OSD, radosgw) on 127.0.0.1, everything under STATE_DIR/ceph.
SVC=ceph
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
AK=granary-test-ak SK=granary-test-sk BUCKET=granary-test
MEMSTORE_BYTES=${GRANARY_CEPH_MEMSTORE_BYTES:-4294967296}   # the OSD keeps objects in RAM, up to this

install() { apt_ensure ceph-mon ceph-osd radosgw ceph-common curl; }

C() { timeout 30 ceph -c "$D/ceph.conf" --connect-timeout 20 "$@"; }

start() {
  prepare_state "${1:-}"
  command -v radosgw >/dev/null || die "ceph is not installed (run: $0 install)"
  local mport rport fsid; read -r mport rport < <(free_ports 2)
  fsid=$(cat /proc/sys/kernel/random/uuid)
  mkdir -p "$D"/{run,log,mon,osd,rgw}
  cat >"$D/ceph.conf" <<EOF
[global]
fsid = $fsid
mon_host = v2:127.0.0.1:$mport
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
ms_mon_client_mode = crc
ms_client_mode = crc
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
osd_crush_chooseleaf_type = 0
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_objectstore = memstore
memstore_device_bytes = $MEMSTORE_BYTES
run_dir = $D/run
admin_socket = $D/run/\$cluster-\$name.asok
pid_file = $D/run/\$name.pid
log_file = $D/log/\$name.log
mon_cluster_log_file = $D/log/cluster.log
crash_dir = $D/crash
keyring = $D/keyring
mon_data = $D/mon/\$cluster-\$id
osd_data = $D/osd/\$cluster-\$id
rgw_data = $D/rgw/\$cluster-\$id
rgw_frontends = beast endpoint=127.0.0.1:$rport
EOF
  local L=$D/log/setup.log
  LOGS+=("$L" "$D/log/mon.a.log")
  run_logged "$L" ceph-authtool --create-keyring "$D/keyring" --gen-key -n mon. --cap mon 'allow *'
  run_logged "$L" monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$mport]" "$D/monmap"
  run_logged "$L" ceph-mon -c "$D/ceph.conf" --mkfs -i a --monmap "$D/monmap" --keyring "$D/keyring"
  run_logged "$L" ceph-mon -c "$D/ceph.conf" -i a
  wait_for 30 "ceph-mon on 127.0.0.1:$mport" C mon stat

  local uuid id; uuid=$(cat /proc/sys/kernel/random/uuid)
  id=$(C osd new "$uuid" 2>>"$L") || die "ceph osd new failed"
  LOGS+=("$D/log/osd.$id.log")
  mkdir -p "$D/osd/ceph-$id"
  run_logged "$L" ceph-osd -c "$D/ceph.conf" -i "$id" --mkfs --osd-uuid "$uuid"
  run_logged "$L" ceph-osd -c "$D/ceph.conf" -i "$id"
  wait_for 60 "osd.$id up" sh -c "timeout 30 ceph -c '$D/ceph.conf' osd dump | grep -q '^osd.$id up'"

  LOGS+=("$D/log/client.rgw.a.log")
  mkdir -p "$D/rgw/ceph-rgw.a"
  run_logged "$L" radosgw -c "$D/ceph.conf" -n client.rgw.a
  local ep=http://127.0.0.1:$rport
  wait_for 90 "radosgw on $ep" curl -sf "$ep"
  run_logged "$L" timeout 60 radosgw-admin -c "$D/ceph.conf" user create --uid=granary --display-name=granary \
    --access-key="$AK" --secret="$SK"
  wait_for 60 "bucket $BUCKET" s3_create_bucket "$ep" "$AK" "$SK" "$BUCKET"
  cat >"$ENV_FILE" <<EOF
export GRANARY_TEST_RGW_ENDPOINT=$ep
export GRANARY_TEST_RGW_ACCESS_KEY=$AK
export GRANARY_TEST_RGW_SECRET_KEY=$SK
export GRANARY_TEST_RGW_BUCKET=$BUCKET
EOF
  echo "ceph up: $ep (radosgw, bucket $BUCKET; mon 127.0.0.1:$mport)"
}

stop() {
  state_dir_for_stop "${1:-}"
  GRACE=2 kill_pidfiles "$D"/run/*.pid   # all state is throwaway: no need to wait for a clean OSD shutdown
}

main "$@"
