#!/usr/bin/env bash
# Run several service scripts at once:
#   all.sh install [names...] | all.sh start STATE_DIR [names...] | all.sh stop STATE_DIR [names...]
# Default names: moto ceph gluster (also: etcd, kube). start writes STATE_DIR/services.env (all env files joined).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cmd=${1:-}; shift || true
case "$cmd" in
  install)
    names=("$@"); [ ${#names[@]} -gt 0 ] || names=(moto ceph gluster)
    for n in "${names[@]}"; do "$here/$n.sh" install; done ;;
  start|stop)
    [ -n "${1:-}" ] || { echo "usage: $0 $cmd STATE_DIR [names...]" >&2; exit 2; }
    state=$1; shift
    names=("$@"); [ ${#names[@]} -gt 0 ] || names=(moto ceph gluster)
    mkdir -p "$state"; rm -f "$state/services.env"
    if [ "$cmd" = start ]; then
      for n in "${names[@]}"; do
        "$here/$n.sh" start "$state" || { "$0" stop "$state" "${names[@]}"; exit 1; }
        cat "$state/$n.env" >>"$state/services.env"
      done
    else
      for n in "${names[@]}"; do "$here/$n.sh" stop "$state"; done
    fi ;;
  *) echo "usage: $0 install [names...] | start|stop STATE_DIR [names...]" >&2; exit 2 ;;
esac
