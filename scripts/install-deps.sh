#!/usr/bin/env bash
# Installs the system packages Granary needs to build and run on Debian 12 (idempotent), and
# any further Debian packages named as arguments.
#   fuse3             fusermount3, for unmounting (the kernel's FUSE is built in)
#   protobuf-compiler protoc, for the gRPC code generated at build time
set -euo pipefail
need=()
for pkg in fuse3 protobuf-compiler "$@"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
